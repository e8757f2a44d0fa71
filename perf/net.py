"""virtio-net's data path, driven from the host, side by side with a plain program on the TAP.

No guest CPU: a C driver (cext/testdrv.c, avmm_testdrv_net_run) plays the guest's
virtio_net on one queue pair while the VMM's loop serves the device as it does for a guest.
The limit is build/perf/tapbench, one C program that opens the same TAP the same way
(IFF_VNET_HDR) and writes or reads it as fast as it can. Everything runs in a network
namespace made for the run, on a TAP made there (`ip tuntap add ... vnet_hdr`):

  TX   frames guest -> TAP (the namespace's stack drops them): 60-byte and 1514-byte frames,
       and 64 KiB TSO frames (one vnet header asking for segmentation)
  RX   frames TAP -> guest, injected by `tapbench gen` (AF_PACKET sendmmsg) in the namespace;
       the receiver's rate from its first frame to its last; frames the TAP had to drop
       because the receiver fell behind are counted, not hidden
  RTT  one frame out and its echo back (`tapbench echo` in the namespace), median

passt: the same driver against virtio-net on passt (user-mode networking: frames framed on
a Unix stream, copied in C), in the host's namespace, beside the TAP's rows: TX frames go
to passt (which drops what is not IP), RX frames are UDP datagrams sent by a generator on
this host to 127.0.0.1 and forwarded to the guest by passt (`fwd=udp:PORT`); nothing
leaves the machine. passt itself is the limit there (its per-frame work), so the ratio is
to asyncvmm on the TAP, not to a plain program.

Run through perf/bench.py (--only net); `--child` is this module's own entry for the
asyncvmm side, which must run inside the namespace.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import testdrv  # perf/testdrv.py: the test-only driver

ROOT = Path(os.environ.get("ASYNCVMM_BENCH_ROOT") or Path(__file__).resolve().parent.parent).resolve()
TAPBENCH = ROOT / "build" / "perf" / "tapbench"
TAP = "avbench0"
GUEST_MAC = "52:54:00:be:0c:01"  # tapbench's frames go to this MAC
MSS = 1448
# The driver as a halt-polling vCPU: hardware KVM's default cap on x86 (cext/testdrv.h).
HALT_POLL_NS = testdrv.lib.AVMM_TESTDRV_HALT_POLL_NS

# (name, frame length without the vnet header, MSS for TSO or 0, frames per run)
CASES = [
    ("64B", 60, 0, 200_000),
    ("1500B", 1514, 0, 100_000),
    ("64KiB-TSO", 65000, MSS, 20_000),  # 5000 lasted ~20-60 ms: too short to time
]


def sh(ns: str, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, **kw)


class Namespace:
    def __init__(self):
        self.name = f"avmm-perf-{os.getpid()}"

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        sh(self.name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sh(self.name, "ip", "link", "set", "lo", "up")
        sh(self.name, "ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
        sh(self.name, "ip", "link", "set", "dev", TAP, "mtu", "65521", "txqueuelen", "200000", "up")
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _json_line(p: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result from {p.args}: {p.stderr.read() if p.stderr else ''}")


# -- the asyncvmm side (runs in the namespace) ------------------------------------------------
def child(mode: str, length: int, count: int, mss: int) -> None:
    import asyncio  # noqa: PLC0415

    from asyncvmm._native import lib as native  # noqa: PLC0415
    from testdrv import ffi, lib  # noqa: PLC0415 (perf/testdrv.py: the test-only driver)

    from asyncvmm.devices.virtio.net.device import VirtioNet  # noqa: PLC0415
    from asyncvmm.devices.virtio.net.tap import NetOptions  # noqa: PLC0415
    from asyncvmm.devices.virtio.spec import Feature  # noqa: PLC0415
    from asyncvmm.loop import run as run_loop  # noqa: PLC0415
    from asyncvmm.poll import device_threads_may_poll, devices_may_poll  # noqa: PLC0415
    from asyncvmm.testing.mock_driver import NET_HDR, Harness, VirtioDriver  # noqa: PLC0415

    async def go() -> dict:
        h = Harness(mem_size=256 << 20)
        try:
            mac = bytes(int(b, 16) for b in GUEST_MAC.split(":"))
            poll = {"yes": True, "no": False}.get(os.environ.get("ASYNCVMM_BENCH_POLL", ""), devices_may_poll(1))
            # the device's own thread (ASYNCVMM_NET_THREAD) polls by its rule, or as forced
            thread_poll = {"yes": True, "no": False}.get(os.environ.get("ASYNCVMM_BENCH_POLL", ""),
                                                         device_threads_may_poll(1))
            passt = os.environ.get("ASYNCVMM_BENCH_PASST")  # the CONF of a passt device, or a TAP
            opts = NetOptions.parse(passt) if passt else NetOptions(TAP, mac=mac)
            # checkouts from before the device's thread (perf/ab.py) take no thread_poll
            kw = {"thread_poll": thread_poll} if "thread_poll" in inspect.signature(VirtioNet).parameters else {}
            dev = h.add(VirtioNet(opts, h.mem, mac=mac, queues=1, poll=poll, **kw))
            drv = VirtioDriver(h, dev)
            await drv.setup(queue_size=256)
            rxq, txq = drv.queues[0], drv.queues[1]
            frame = bytearray(NET_HDR.size + length)
            if mss:
                hdr = NET_HDR.pack(native.VIRTIO_NET_HDR_F_NEEDS_CSUM, native.VIRTIO_NET_HDR_GSO_TCPV4, 54, mss, 34, 16, 0)
                body = bytes.fromhex("020000000001") + mac + b"\x08\x00" + bytes([0x45, 0]) + (length - 14).to_bytes(2, "big")
                body += bytes([0, 0, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1])
                body += bytes([0x13, 0x89, 0x9C, 0x40]) + bytes(8) + bytes([0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0])
            else:
                hdr = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
                body = bytes.fromhex("020000000001") + mac + b"\x88\xb5"
            frame[: len(hdr)] = hdr
            frame[len(hdr) : len(hdr) + len(body)] = body
            fgpa = h.heap.alloc(len(frame), 64)
            h.mem.write(fgpa, bytes(frame))
            buf_len = 4096
            bufs = h.heap.alloc(buf_len * rxq.size, 4096)
            base = h.mem.regions[0]
            c = ffi.new("struct avmm_testdrv_net_cfg *")
            c.rx_desc = ffi.cast("struct vring_desc *", h.mem.hva(rxq.desc))
            c.tx_desc = ffi.cast("struct vring_desc *", h.mem.hva(txq.desc))
            c.rx_avail = ffi.cast("struct vring_avail *", h.mem.hva(rxq.avail))
            c.tx_avail = ffi.cast("struct vring_avail *", h.mem.hva(txq.avail))
            c.rx_used = ffi.cast("struct vring_used *", h.mem.hva(rxq.used))
            c.tx_used = ffi.cast("struct vring_used *", h.mem.hva(txq.used))
            c.size = rxq.size
            c.mode = {"tx": lib.AVMM_TESTDRV_NET_TX, "rx": lib.AVMM_TESTDRV_NET_RX, "ping": lib.AVMM_TESTDRV_NET_PING}[mode]
            c.rx_kick_fd, c.tx_kick_fd = rxq.kick_fd, txq.kick_fd
            c.rx_irq_fd, c.tx_irq_fd = rxq.vector_fd, txq.vector_fd
            c.event_idx = int(drv.has(Feature.RING_EVENT_IDX))
            c.count = count
            c.hva = ffi.cast("uint8_t *", base.hva)
            c.hva_gpa = base.gpa
            c.frame_gpa, c.frame_len = fgpa, len(frame)
            c.rx_buf_len, c.rx_bufs_gpa = buf_len, bufs
            c.timeout_ms = int(os.environ.get("ASYNCVMM_BENCH_TIMEOUT_MS", "5000"))
            c.halt_poll_ns = int(os.environ.get("ASYNCVMM_BENCH_HALT_POLL_NS", "0"))  # 0: the driver always sleeps
            res = ffi.new("struct avmm_testdrv_net_result *")
            lat = ffi.new("uint32_t[]", max(count, 1))
            print(json.dumps({"ready": 1}), flush=True)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.to_thread(lib.avmm_testdrv_net_run, c, res, lat)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) - res.driver_cpu_ns / 1e9
            ns = res.ns
            if mode == "rx":
                # From the first frame to the last, as tapbench rx times the limit: the
                # driver starts before the generator does (`ip netns exec` and an exec,
                # tens of ms), which counted against a 60 ms TSO run halved its rate.
                ns = res.last_ns - res.first_ns
            out = {"frames": res.frames, "bytes": res.bytes, "ns": max(ns, 1), "cpu_ns": int(cpu * 1e9),
                   "kicks": res.kicks, "interrupts": res.interrupts, "halts": res.halt.halts,
                   "halts_polled": res.halt.polled, "halts_yielded": res.halt.yielded,
                   "stats": dev.device.stats()["pairs"][0],
                   "thread": dev.device.stats().get("thread", {})}
            if mode == "ping" and res.frames:
                lats = sorted(lat[i] for i in range(res.frames))
                out["p50_ns"] = lats[len(lats) // 2]
                out["p99_ns"] = lats[len(lats) * 99 // 100]
            return out
        finally:
            h.close()

    print(json.dumps(run_loop(go())), flush=True)


# -- the orchestration --------------------------------------------------------------------------
def _ours(ns: str, mode: str, length: int, count: int, mss: int, poll: bool | None = None,
          halt_poll_ns: int = 0) -> subprocess.Popen:
    env = dict(os.environ, ASYNCVMM_BENCH_HALT_POLL_NS=str(halt_poll_ns))
    if poll is not None:
        env["ASYNCVMM_BENCH_POLL"] = "yes" if poll else "no"
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(Path(__file__)), "--child", mode,
                             str(length), str(count), str(mss)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _limit(ns: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, str(TAPBENCH), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float) -> dict:
    try:
        out = _json_line(p, timeout)
        p.wait(timeout=timeout)
        return out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def run_tx(ns: str, who: str, length: int, count: int, mss: int) -> dict:
    if who == "limit":
        return _finish(_limit(ns, "tx", TAP, str(length), str(count), str(mss)), 300)
    p = _ours(ns, "tx", length, count, mss)
    _json_line(p, 60)  # ready
    return _finish(p, 300)


def run_rx(ns: str, who: str, length: int, count: int, mss: int) -> dict:
    p = _limit(ns, "rx", TAP, str(count), "1" if mss else "0") if who == "limit" else _ours(ns, "rx", length, count, mss)
    _json_line(p, 60)  # ready
    gen = _limit(ns, "gen", TAP, str(length), str(count), GUEST_MAC, str(mss))
    g = _finish(gen, 300)
    r = _finish(p, 300)
    r["sent"] = g["frames"]
    return r


def run_ping(ns: str, who: str, count: int, poll: bool | None = None, halt_poll_ns: int = 0) -> dict:
    echo = _limit(ns, "echo", TAP)
    try:
        _json_line(echo, 30)
        if who == "limit":
            return _finish(_limit(ns, "ping", TAP, "60", str(count)), 120)
        p = _ours(ns, "ping", 60, count, 0, poll, halt_poll_ns)
        _json_line(p, 60)
        return _finish(p, 120)
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()
        echo.stderr.close()


# The RX generator for passt: UDP datagrams to 127.0.0.1:PORT once told to go.
_UDP_GEN = """
import json, socket, sys
port, size, count = map(int, sys.argv[1:4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
data = bytes(size)
print(json.dumps({"ready": 1}), flush=True)
sys.stdin.readline()
sent = 0
for _ in range(count):
    try:
        s.sendto(data, ("127.0.0.1", port))
        sent += 1
    except OSError:
        pass
print(json.dumps({"frames": sent}), flush=True)
"""


PASST_RX_TIMEOUT_MS = 300  # passt drops what it cannot take: the run ends this long after the last frame


def _passt_child(mode: str, length: int, count: int, conf: str) -> subprocess.Popen:
    env = dict(os.environ, ASYNCVMM_BENCH_PASST=conf, ASYNCVMM_BENCH_TIMEOUT_MS=str(PASST_RX_TIMEOUT_MS))
    return subprocess.Popen([sys.executable, str(Path(__file__)), "--child", mode, str(length), str(count), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def run_passt_tx(length: int, count: int) -> dict:
    p = _passt_child("tx", length, count, "passt")
    _json_line(p, 60)
    return _finish(p, 300)


def run_passt_rx(length: int, count: int) -> dict:
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    payload = length - 14 - 20 - 8  # Ethernet, IPv4 and UDP headers
    gen = subprocess.Popen([sys.executable, "-c", _UDP_GEN, str(port), str(payload), str(count * 2)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _json_line(gen, 30)
        p = _passt_child("rx", length, count, f"passt,fwd=udp:127.0.0.1:{port}:{port}")
        _json_line(p, 60)
        time.sleep(0.2)  # passt binds the forwarded port as it starts
        gen.stdin.write("go\n")
        gen.stdin.flush()
        r = _finish(p, 300)
        r["sent"] = _finish(gen, 120)["frames"]
        return r
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
        gen.stdin.close()


def _may_poll() -> bool:
    from asyncvmm.poll import devices_may_poll  # noqa: PLC0415

    return devices_may_poll(1)


def bench_net(quick: bool, notes: list[str], reps: int = 3) -> tuple[str, dict]:
    if not TAPBENCH.exists():
        raise RuntimeError("build/perf/tapbench missing: run tools/setup")
    from table import table  # noqa: PLC0415 (perf/table.py)

    reps = 1 if quick else reps
    rows, figs = [], {}
    with Namespace() as ns:
        for direction in ("tx", "rx"):
            for name, length, mss, count in CASES:
                count = count // (5 if quick else 1)
                ours, limit = [], []
                for _ in range(reps):
                    fn = run_tx if direction == "tx" else run_rx
                    limit.append(fn(ns.name, "limit", length, count, mss))
                    ours.append(fn(ns.name, "asyncvmm", length, count, mss))

                def rate(r):
                    return r["frames"] / (r["ns"] / 1e9) if r["ns"] else 0.0

                a_pps = statistics.median(rate(r) for r in ours)
                l_pps = statistics.median(rate(r) for r in limit)
                a_gbps = statistics.median(r["bytes"] * 8 / r["ns"] for r in ours if r["ns"])
                l_gbps = statistics.median(r["bytes"] * 8 / r["ns"] for r in limit if r["ns"])
                a_cpu = statistics.median(r["cpu_ns"] / max(r["frames"], 1) / 1000 for r in ours)
                l_cpu = statistics.median(r["cpu_ns"] / max(r["frames"], 1) / 1000 for r in limit)
                lost = [r.get("sent", r["frames"]) - r["frames"] for r in ours + limit]
                ratio = a_pps / l_pps if l_pps else 0.0
                key = f"net.{direction}.{name}"
                figs.update({f"{key}.asyncvmm.pps": round(a_pps), f"{key}.limit.pps": round(l_pps),
                             f"{key}.asyncvmm.gbps": round(a_gbps, 3), f"{key}.limit.gbps": round(l_gbps, 3),
                             f"{key}.ratio": round(ratio, 3), f"{key}.asyncvmm.cpu_us_per_frame": round(a_cpu, 3)})
                rows.append([direction.upper(), name, f"{a_pps:,.0f}", f"{l_pps:,.0f}", f"{ratio:.2f}",
                             f"{a_gbps:.2f}", f"{l_gbps:.2f}", f"{a_cpu:.2f}", f"{l_cpu:.2f}",
                             str(max(lost)) if direction == "rx" else "—", "ok" if ratio >= 0.9 else "MISS"])
        if shutil.which("passt"):
            for direction in ("tx", "rx"):
                for name, length, mss, count in CASES:
                    if mss:
                        continue  # no segmentation offload over passt's stream
                    count = count // (10 if quick else 4)
                    fn = run_passt_tx if direction == "tx" else run_passt_rx
                    runs = [fn(length, count) for _ in range(reps)]
                    pps = statistics.median(r["frames"] / (r["ns"] / 1e9) for r in runs if r["ns"])
                    gbps = statistics.median(r["bytes"] * 8 / r["ns"] for r in runs if r["ns"])
                    cpu = statistics.median(r["cpu_ns"] / max(r["frames"], 1) / 1000 for r in runs)
                    tap = figs.get(f"net.{direction}.{name}.asyncvmm.pps", 0)
                    key = f"net.passt.{direction}.{name}"
                    figs.update({f"{key}.asyncvmm.pps": round(pps), f"{key}.asyncvmm.gbps": round(gbps, 3),
                                 f"{key}.asyncvmm.cpu_us_per_frame": round(cpu, 3),
                                 f"{key}.vs_tap": round(pps / tap, 3) if tap else 0})
                    rows.append([f"{direction.upper()} passt", name, f"{pps:,.0f}", "—",
                                 f"{pps / tap:.2f} of TAP" if tap else "—", f"{gbps:.2f}", "—", f"{cpu:.2f}", "—",
                                 "—", ""])
        else:
            notes.append("net: passt is not installed (tools/setup installs it): no passt rows")
        pings = 2000 if quick else 10000
        a = run_ping(ns.name, "asyncvmm", pings)
        hp = run_ping(ns.name, "asyncvmm", pings, halt_poll_ns=HALT_POLL_NS)
        ap = run_ping(ns.name, "asyncvmm", pings, poll=True)
        lim = run_ping(ns.name, "limit", pings)
        figs.update({"net.rtt.asyncvmm.p50_us": round(a.get("p50_ns", 0) / 1000, 1),
                     "net.rtt.asyncvmm_haltpoll.p50_us": round(hp.get("p50_ns", 0) / 1000, 1),
                     "net.rtt.asyncvmm_haltpoll.p99_us": round(hp.get("p99_ns", 0) / 1000, 1),
                     "net.rtt.haltpoll_p50_added_us": round((hp.get("p50_ns", 0) - lim.get("p50_ns", 0)) / 1000, 1),
                     "net.rtt.asyncvmm_polled.p50_us": round(ap.get("p50_ns", 0) / 1000, 1),
                     "net.rtt.limit.p50_us": round(lim.get("p50_ns", 0) / 1000, 1)})
        hp_added = (hp.get("p50_ns", 0) - lim.get("p50_ns", 0)) / 1000
        hp_whole = "p50_ns" in hp and hp.get("frames") == pings and "p50_ns" in lim
        if not hp_whole:  # a run that timed out: no figure, no verdict
            for k in ("net.rtt.asyncvmm_haltpoll.p50_us", "net.rtt.asyncvmm_haltpoll.p99_us",
                      "net.rtt.haltpoll_p50_added_us"):
                figs.pop(k, None)
            notes.append(f"net: the halt-polling driver's round trip got {hp.get('frames', 0)} of {pings} replies")
        rtt = (f"  round trip (60-byte frame out, echoed back by tapbench echo), median / p99: the driver as a "
               f"halt-polling vCPU (hardware KVM's model, cap {HALT_POLL_NS // 1000} µs; the target is judged on it) "
               f"{hp.get('p50_ns', 0) / 1000:.1f} / {hp.get('p99_ns', 0) / 1000:.1f} µs "
               f"(added {hp_added:+.1f}: {('ok' if hp_added <= 10 else 'MISS') if hp_whole else 'FAILED'}; "
               f"{hp.get('halts_polled', 0) / max(hp.get('halts', 0), 1):.2f} of its halts polled); "
               f"the driver that always sleeps {a.get('p50_ns', 0) / 1000:.1f} / {a.get('p99_ns', 0) / 1000:.1f} µs "
               f"(busy polling forced: {ap.get('p50_ns', 0) / 1000:.1f} / {ap.get('p99_ns', 0) / 1000:.1f} µs); "
               f"plain TAP program {lim.get('p50_ns', 0) / 1000:.1f} / {lim.get('p99_ns', 0) / 1000:.1f} µs\n"
               f"  device polling: {'on' if _may_poll() else 'off'} by the machine's rule for 1 vCPU on "
               f"{os.cpu_count()} CPUs (asyncvmm.poll.devices_may_poll)")
    headers = ["dir", "frames", "asyncvmm pps", "limit pps", "ratio", "Gbit/s", "limit Gbit/s", "VMM CPU µs/frame",
               "limit CPU µs/frame", "rx lost", "≥0.90"]
    text = ("virtio-net data path (C driver on the host, no guest CPU) vs one C program on the same TAP, "
            f"medians of {reps}:\n" + table(headers, rows, "ll" + "r" * 9) + "\n" + rtt +
            "\n  VMM CPU excludes the driver thread (the \"guest\"). RX: frames injected by tapbench gen; "
            "'rx lost' = frames the TAP dropped because the receiver fell behind (worst run). "
            "passt rows: virtio-net on passt in the host's namespace (TX to passt, RX UDP from "
            "127.0.0.1 through fwd=udp, twice the count sent as fast as a Python loop can), its ratio to asyncvmm "
            "on the TAP; the generator overruns passt on purpose, so the RX rate is what passt delivered, from "
            "the first frame to the last.")
    return text, figs


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        print("run it through perf/bench.py --only net", file=sys.stderr)
        sys.exit(2)
