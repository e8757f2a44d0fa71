"""virtio-blk's data path, driven from the host, side by side with fio on the same image.

No guest CPU is involved: a C driver (cext/testdrv.c) plays the guest's virtio_blk on one
queue — rings in guest memory, doorbells on the queue's ioeventfd, interrupts read from the
MSI-X vector's eventfd — while the VMM serves the device exactly as it does for a guest
(the disk's own thread, cext/blk_thread.c: doorbell → one C walk of the ring → SQEs, submitted
in the io_uring_enter that waits for the next doorbell or completion → used entries → one
interrupt; ASYNCVMM_BLK_THREAD=0: the same on the loop). fio's io_uring engine on the same image, with the same block
size, queue depth and O_DIRECT setting, is the host's limit.

Workloads (fio names): randread 4k QD1, randread 4k QD32, randwrite 4k QD32, read 1M QD4
(sequential). Each with O_DIRECT (the disk's limit: `-s N,virtio-blk,IMG,direct`) and
through the page cache (the CPU's limit). Reported per row: IOPS, MB/s, median and p99
latency (publish → used entry; fio: submission → completion), and CPU time per request of
the VMM alone (the process's CPU minus the driver thread's, so the "guest" is not counted)
vs fio's whole CPU time per request.

The coroutine backend (asyncvmm.BlockBackend, block/backend.py) on the same image, in the
same run: a backend whose coroutines pread/pwrite the image (cached, 4 KiB workloads), so
its IOPS beside the io_uring device's is the cost of handing each batch to Python.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass

from testdrv import ffi, lib  # perf/testdrv.py: the test-only driver

from asyncvmm.devices.virtio.block.backend import BackendBlk, BlockBackend
from asyncvmm.devices.virtio.block.device import VirtioBlk
from asyncvmm.devices.virtio.block.image import BlockOptions
from asyncvmm.devices.virtio.spec import Feature
from asyncvmm.devices.virtio.vhost_user.backend import Backend
from asyncvmm.devices.virtio.vhost_user.blk import CONFIG_SIZE, VhostUserBlk
from asyncvmm.devices.virtio.vhost_user.qsd import Daemon
from asyncvmm.loop import run as run_loop
from asyncvmm.poll import devices_may_poll

try:
    from asyncvmm.poll import device_threads_may_poll
except ImportError:  # a checkout from before the disk's own thread (perf/ab.py measures it with this harness)
    def device_threads_may_poll(vcpus: int) -> bool:
        return False
from asyncvmm.testing.mock_driver import Harness, VirtioDriver

MiB = 1 << 20
# The driver as a halt-polling vCPU: hardware KVM's default cap, halt_poll_ns on x86
# (Documentation/virt/kvm/halt-polling.rst; cext/testdrv.h has the rule).
HALT_POLL_NS = lib.AVMM_TESTDRV_HALT_POLL_NS  # hardware KVM's halt_poll_ns default (cext/testdrv.h)


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's: randread, randwrite, read
    bs: int
    qd: int
    nreq: int  # full run; --quick uses a fifth

    @property
    def label(self) -> str:
        size = f"{self.bs // 1024}k" if self.bs < MiB else f"{self.bs // MiB}M"
        return f"{self.rw} {size} QD{self.qd}"


WORKLOADS = [
    Workload("randread-4k-qd1", "randread", 4096, 1, 5000),
    Workload("randread-4k-qd32", "randread", 4096, 32, 200000),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32, 100000),
    Workload("read-1m-qd4", "read", MiB, 4, 4000),
]


def _pct(values: list[int], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] / 1000.0


class PreadDisk(BlockBackend):
    """The simplest coroutine backend: the image through pread/pwrite (the page cache's)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    async def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    async def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def run_asyncvmm(image: str, w: Workload, nreq: int, direct: bool, poll: bool | None = None, *,
                 qsd: bool = False, backend: bool = False, halt_poll_ns: int = 0) -> dict:
    """One run of the C driver against a virtio-blk on the loop; figures of that run.
    `qsd`: the disk is qemu-storage-daemon's vhost-user-blk export of the same raw image
    (QEMU's data path, the peer), behind asyncvmm's vhost-user front-end. `backend`: the
    coroutine backend (PreadDisk) serves it. `halt_poll_ns`: the driver is a halt-polling
    vCPU with that cap (HALT_POLL_NS: hardware KVM's default), 0: it always sleeps."""

    async def go() -> dict:
        h = Harness(mem_size=256 * MiB, shared=qsd)
        daemon = vhost = disk = None
        try:
            may_poll = devices_may_poll(1) if poll is None else poll  # the machine's rules, for 1 vCPU
            thread_poll = device_threads_may_poll(1) if poll is None else poll
            if qsd:
                daemon = await Daemon.start(image, "raw", readonly=False, queues=1, direct=direct)
                vhost = await Backend.connect(daemon.socket, image, CONFIG_SIZE, starting=True)
                dev = h.add(VhostUserBlk(vhost, h.mem, queues=1))
            elif backend:
                disk = PreadDisk(image)
                dev = h.add(BackendBlk(disk, h.mem, queues=1))
            else:
                kw = {"thread_poll": thread_poll} if "thread_poll" in inspect.signature(VirtioBlk).parameters else {}
                dev = h.add(VirtioBlk(BlockOptions(image, direct=direct), h.mem, queues=1, poll=may_poll, **kw))
            drv = VirtioDriver(h, dev)
            await drv.setup(queue_size=256)
            q = drv.queues[0]
            heap = h.heap
            hdr = heap.alloc(16 * w.qd, 16)
            status = heap.alloc(w.qd, 1)
            buf = heap.alloc(w.bs * w.qd, 4096)
            base = h.mem.regions[0]
            cfg = ffi.new("struct avmm_testdrv_cfg *")
            cfg.desc = ffi.cast("struct vring_desc *", h.mem.hva(q.desc))
            cfg.avail = ffi.cast("struct vring_avail *", h.mem.hva(q.avail))
            cfg.used = ffi.cast("struct vring_used *", h.mem.hva(q.used))
            cfg.size, cfg.qd, cfg.block_size = q.size, w.qd, w.bs
            cfg.kick_fd, cfg.irq_fd = q.kick_fd, q.vector_fd
            cfg.write = int(w.rw.endswith("write"))
            cfg.random = int(w.rw.startswith("rand"))
            cfg.event_idx = int(drv.has(Feature.RING_EVENT_IDX))
            cfg.nreq = nreq
            cfg.capacity_sectors = dev.device.read_config(0, 8)  # capacity, as the guest reads it
            cfg.seed = int.from_bytes(os.urandom(8), "little")  # fio is run with randrepeat=0 too
            cfg.hva = ffi.cast("uint8_t *", base.hva)
            cfg.hva_gpa = base.gpa
            cfg.hdr_gpa, cfg.buf_gpa, cfg.status_gpa = hdr, buf, status
            cfg.halt_poll_ns = halt_poll_ns
            depth0 = _engine_depth(dev)
            res = ffi.new("struct avmm_testdrv_result *")
            lat = ffi.new("uint32_t[]", nreq)
            d0 = _proc_cpu(daemon.pid) if daemon is not None else 0.0
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            rc = await asyncio.to_thread(lib.avmm_testdrv_run, cfg, res, lat)
            depth1 = _engine_depth(dev)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            d1 = _proc_cpu(daemon.pid) if daemon is not None else 0.0
            if rc < 0 or res.completed != nreq or res.errors or res.timeouts:
                raise RuntimeError(f"driver: rc {rc}, {res.completed}/{nreq} done, {res.errors} errors, "
                                   f"{res.timeouts} timeouts")
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) - res.driver_cpu_ns / 1e9 + (d1 - d0)
            seconds = res.ns / 1e9
            lats = list(lat)
            stats = dev.device.stats()
            return {
                "iops": nreq / seconds,
                "mbps": nreq * w.bs / seconds / 1e6,
                "p50_us": _pct(lats, 50),
                "p99_us": _pct(lats, 99),
                "cpu_us_per_req": cpu / nreq * 1e6,
                "interrupts": res.interrupts,
                "kicks": res.kicks,
                "batches": stats["requests"]["batches"] if not qsd else 0,
                "thread": stats.get("thread", {}) if not qsd else {},
                "halts": res.halt.halts, "halts_polled": res.halt.polled, "halts_slept": res.halt.slept,
                "halts_yielded": res.halt.yielded, "halt_poll_us": res.halt.poll_ns / 1000,
                # the average number of requests io_uring had (submitted, not yet reaped) over the run
                **({"disk_depth": (depth1 - depth0) / res.ns} if depth0 is not None and depth1 is not None else {}),
            }
        finally:
            h.close()
            if vhost is not None:
                vhost.close()
            if daemon is not None:
                await daemon.stop(quiet=True)
            if disk is not None:
                disk.close()

    return run_loop(go())


def _engine_depth(dev) -> int | None:
    """The disk's io_uring engine's integral of its depth (requests submitted and not yet
    reaped, times ns) so far, or None (another device, or a checkout without it)."""
    stats = getattr(dev.device, "stats", None)
    return stats().get("engine_ops", {}).get("depth_ns") if stats else None


def _verdict(w: Workload, iops_ratio: float, p50_added: float) -> str:
    """The targets: QD32 IOPS ≥ 0.90 × fio's, QD1 median ≤ fio's + 10 µs."""
    if w.qd == 32:
        return "ok" if iops_ratio >= 0.9 else "MISS"
    return ("ok" if p50_added <= 10 else "MISS") if w.qd == 1 else ""


def _proc_cpu(pid: int) -> float:
    """A process's user + system CPU seconds so far (/proc/PID/stat: utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def medians(runs: list[dict]) -> dict:
    """Each numeric figure's median over the runs (the thread's counters, a dict, are not one)."""
    return {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_fio(image: str, w: Workload, nreq: int, direct: bool) -> dict:
    argv = ["fio", "--name=limit", "--ioengine=io_uring", f"--filename={image}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.qd}", f"--direct={int(direct)}", f"--number_ios={nreq}",
            f"--size={os.path.getsize(image)}", "--lat_percentiles=1", "--randrepeat=0",
            "--norandommap", "--output-format=json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-300:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in w.rw else "read"]
    ios = side["total_ios"]
    pct = side["lat_ns"]["percentile"]
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * (job["job_runtime"] / 1000.0)
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p50_us": pct["50.000000"] / 1000.0,
        "p99_us": pct["99.000000"] / 1000.0,
        "cpu_us_per_req": cpu / max(ios, 1) * 1e6,
        "disk_depth": side["lat_ns"]["mean"] * side["iops"] / 1e9,  # Little's law: in flight on average
    }


WAKEUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "perf", "wakeup")


def wakeup_floor(notes: list[str]) -> dict[str, float]:
    """perf/wakeup.c on this host: p50 µs for one thread to wake another through an eventfd
    (half its eventfd ping-pong's round trip), the two on different CPUs (the woken one's CPU
    idle) and on one CPU."""
    if not os.path.exists(WAKEUP):
        notes.append(f"blk: {WAKEUP} not built (make -C perf): no wake-up floor")
        return {}
    r = subprocess.run([WAKEUP, "20000", "eventfd"], capture_output=True, text=True, timeout=120)
    out = {}
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0] == "wakeup" and f[2] in ("2cpu", "1cpu"):
            fields = dict(x.split("=", 1) for x in f[3:] if "=" in x)
            out["two_cpus" if f[2] == "2cpu" else "one_cpu"] = float(fields["p50_us"]) / 2
    return out


def make_image(path: str, size: int) -> None:
    """A raw image full of data (reads of holes would cost nothing)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def bench_blk(quick: bool, notes: list[str], reps: int = 5) -> tuple[str, dict]:
    if not shutil.which("fio"):
        raise RuntimeError("fio not found (tools/setup --perf installs it)")
    size = (256 if quick else 1024) * MiB
    tmpdir = tempfile.mkdtemp(prefix="asyncvmm-perf-blk-", dir="/var/tmp")
    image = os.path.join(tmpdir, "disk.img")
    rows, figs, polled_lines, peer_lines, coroutine_lines, hp_rows = [], {}, [], [], [], []
    floor = wakeup_floor(notes)
    for k, v in floor.items():
        figs[f"blk.wakeup.{k}_p50_us"] = v
    try:
        make_image(image, size)
        for direct in (True, False):
            mode = "direct" if direct else "cached"
            for w in WORKLOADS:
                nreq = max(w.nreq // (5 if quick else 1), 1000 if w.bs < MiB else 200)
                ours, fio, hp = [], [], []
                for rep in range(1 if quick else reps):  # interleaved, medians
                    # Who goes first alternates: a cloud disk's burst credits spent by one run
                    # would otherwise always count against the other.
                    runs = [(fio, run_fio), (ours, run_asyncvmm)]
                    if w.bs < MiB:  # the rows with targets: the driver as a halt-polling vCPU too
                        runs.append((hp, functools.partial(run_asyncvmm, halt_poll_ns=HALT_POLL_NS)))
                    for into, run in runs if rep % 2 == 0 else reversed(runs):
                        into.append(run(image, w, nreq, direct))
                a = medians(ours)
                f = medians(fio)
                key = f"blk.{mode}.{w.name}"
                for k in ("iops", "p50_us", "p99_us", "cpu_us_per_req"):
                    figs[f"{key}.asyncvmm.{k}"] = round(a[k], 2)
                    figs[f"{key}.fio.{k}"] = round(f[k], 2)
                iops_ratio = a["iops"] / f["iops"] if f["iops"] else 0.0
                lat_added = a["p50_us"] - f["p50_us"]
                figs[f"{key}.iops_ratio"] = round(iops_ratio, 3)
                figs[f"{key}.p50_added_us"] = round(lat_added, 2)
                figs[f"{key}.fio.disk_depth"] = round(f["disk_depth"], 2)
                if "disk_depth" in a:
                    figs[f"{key}.asyncvmm.disk_depth"] = round(a["disk_depth"], 2)

                if hp:
                    h = medians(hp)
                    hkey = f"{key}.asyncvmm_haltpoll"
                    for k in ("iops", "p50_us", "p99_us", "cpu_us_per_req"):
                        figs[f"{hkey}.{k}"] = round(h[k], 2)
                    h_ratio = h["iops"] / f["iops"] if f["iops"] else 0.0
                    h_added = h["p50_us"] - f["p50_us"]
                    figs[f"{key}.haltpoll_iops_ratio"] = round(h_ratio, 3)
                    figs[f"{key}.haltpoll_p50_added_us"] = round(h_added, 2)
                    figs[f"{hkey}.halts_polled_share"] = round(h["halts_polled"] / max(h["halts"], 1), 3)
                    if "disk_depth" in h:
                        figs[f"{hkey}.disk_depth"] = round(h["disk_depth"], 2)
                    hp_rows.append([mode, w.label, f"{f['iops']:.0f}", f"{f['p50_us']:.1f}",
                                    f"{a['iops']:.0f}", f"{iops_ratio:.2f}", f"{a['p50_us']:.1f}", f"{lat_added:+.1f}",
                                    _verdict(w, iops_ratio, lat_added),
                                    f"{h['iops']:.0f}", f"{h_ratio:.2f}", f"{h['p50_us']:.1f}", f"{h_added:+.1f}",
                                    f"{h['halts_polled'] / max(h['halts'], 1):.2f}", _verdict(w, h_ratio, h_added),
                                    f"{f['disk_depth']:.1f}",
                                    f"{a['disk_depth']:.1f}" if "disk_depth" in a else "—",
                                    f"{h['disk_depth']:.1f}" if "disk_depth" in h else "—"])
                target = _verdict(w, iops_ratio, lat_added)
                if w.qd == 1:  # the same with busy polling forced, whatever this host's CPUs
                    polled = [run_asyncvmm(image, w, nreq, direct, poll=True) for _ in range(1 if quick else reps)]
                    p50 = statistics.median(r["p50_us"] for r in polled)
                    figs[f"{key}.asyncvmm_polled.p50_us"] = round(p50, 2)
                    figs[f"{key}.polled_p50_added_us"] = round(p50 - f["p50_us"], 2)
                    polled_lines.append(f"  {mode} {w.label} with busy polling forced: p50 {p50:.1f} µs "
                                        f"(fio {f['p50_us']:.1f}, added {p50 - f['p50_us']:+.1f}: "
                                        f"{'ok' if p50 - f['p50_us'] <= 10 else 'MISS'})")
                if w.rw == "randread" and w.qd in (1, 32) and shutil.which("qemu-storage-daemon"):
                    # QEMU's own data path on the same image, the same driver: the peer.
                    peer = [run_asyncvmm(image, w, nreq, direct, qsd=True) for _ in range(1 if quick else reps)]
                    q = medians(peer)
                    for k in ("iops", "p50_us", "p99_us", "cpu_us_per_req"):
                        figs[f"{key}.qsd_vhost_user.{k}"] = round(q[k], 2)
                    peer_lines.append(f"  {mode} {w.label}: qemu-storage-daemon vhost-user-blk {q['iops']:.0f} IOPS, "
                                      f"p50 {q['p50_us']:.1f} µs, p99 {q['p99_us']:.1f} µs, CPU {q['cpu_us_per_req']:.2f} "
                                      f"µs/req (asyncvmm {a['iops']:.0f} IOPS, p50 {a['p50_us']:.1f}; "
                                      f"fio {f['iops']:.0f}, p50 {f['p50_us']:.1f})")
                if not direct and w.bs < MiB:  # the coroutine backend beside the io_uring device
                    co = [run_asyncvmm(image, w, nreq, direct, backend=True) for _ in range(1 if quick else reps)]
                    c = medians(co)
                    ckey = f"blk.coroutine.{w.name}"
                    figs.update({f"{ckey}.iops": round(c["iops"], 2), f"{ckey}.p50_us": round(c["p50_us"], 2),
                                 f"{ckey}.cpu_us_per_req": round(c["cpu_us_per_req"], 2),
                                 f"{ckey}.vs_uring": round(c["iops"] / a["iops"], 3) if a["iops"] else 0})
                    coroutine_lines.append(
                        f"  {w.label}: {c['iops']:.0f} IOPS ({c['iops'] / a['iops']:.2f} of io_uring's {a['iops']:.0f}), "
                        f"p50 {c['p50_us']:.1f} µs, VMM CPU {c['cpu_us_per_req']:.2f} µs/req, "
                        f"{nreq / max(c['batches'], 1):.1f} req/batch")
                rows.append([
                    mode, w.label,
                    f"{a['iops']:.0f}", f"{f['iops']:.0f}", f"{iops_ratio:.2f}",
                    f"{a['mbps']:.0f}", f"{a['p50_us']:.1f}", f"{f['p50_us']:.1f}", f"{lat_added:+.1f}",
                    f"{a['p99_us']:.1f}", f"{f['p99_us']:.1f}",
                    f"{a['cpu_us_per_req']:.2f}", f"{f['cpu_us_per_req']:.2f}",
                    f"{a['iops'] and a['batches'] and nreq / a['batches']:.1f}", target,
                ])
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    from table import table  # noqa: PLC0415 (perf/table.py)

    headers = ["mode", "workload", "IOPS", "fio IOPS", "ratio", "MB/s", "p50 µs", "fio p50", "added",
               "p99 µs", "fio p99", "VMM CPU µs/req", "fio CPU µs/req", "req/batch", "target"]
    text = ("virtio-blk data path (C driver on the host, no guest CPU) vs fio io_uring, same image "
            f"({size // MiB} MiB raw, /var/tmp), medians of {1 if quick else reps}:\n"
            + table(headers, rows, "ll" + "r" * 13)
            + "\n  targets: QD32 IOPS ≥ 0.90 × fio; QD1 median latency ≤ fio + 10 µs. VMM CPU excludes the "
              "driver thread (the \"guest\"); fio CPU is the whole fio job.\n"
            + (f"  the wake-up floor (perf/wakeup.c, an anchor): a thread wakes another through an eventfd in "
               f"{floor.get('two_cpus', 0):.1f} µs p50 when the other sleeps on another CPU, "
               f"{floor.get('one_cpu', 0):.1f} µs on the same CPU; fio pays one such wake-up per QD1 request, "
               "a VMM whose thread sleeps pays three (doorbell, completion, interrupt), one whose thread polls for the next request two (completion, interrupt)\n"
               if floor else "")
            + f"  device polling: the loop's {'on' if devices_may_poll(1) else 'off'}, the disk's own thread's "
              f"{'on' if device_threads_may_poll(1) else 'off'}, by the machine's rules for 1 vCPU on "
              f"{os.cpu_count()} CPUs (asyncvmm.poll)\n" + "\n".join(polled_lines)
            + ("\n  the peer, QEMU's data path: the same driver against qemu-storage-daemon's vhost-user-blk export "
               "of the same image (CPU µs/req: the front-end's and the daemon's)\n" + "\n".join(peer_lines)
               if peer_lines else "")
            + ("\n  the driver as a vCPU on hardware KVM (the targets are judged on it) beside the driver that "
               "always sleeps (the table above), same runs interleaved with fio's:\n"
               + table(["mode", "workload", "fio IOPS", "fio p50", "sleeps: IOPS", "ratio", "p50 µs", "added",
                        "target", "halt-polls: IOPS", "ratio", "p50 µs", "added", "polled", "target",
                        "depth: fio", "sleeps", "halt-polls"], hp_rows, "ll" + "r" * 16)
               + "\n  sleeps: the driver sleeps on the vector's eventfd whenever nothing has completed (a vCPU whose "
                 "every halt goes to the host's scheduler). halt-polls: it first spins on the used ring for KVM's "
                 f"adaptive halt-polling window (cap {HALT_POLL_NS // 1000} µs, x86's halt_poll_ns default; grows "
                 "from 10 µs on halts shorter than the cap, halves on longer ones), as a halted vCPU does on "
                 "hardware KVM; 'polled' = the share of its halts the window ended. depth: requests in flight at "
                 "the disk on average — fio's by Little's law (IOPS × mean latency), asyncvmm's integrated at its "
                 "io_uring (submitted, not yet reaped)."
               if hp_rows else "")
            + "\n  coroutine backend (asyncvmm.BlockBackend: pread/pwrite in the coroutines, page cache), same "
              "image, cached:\n" + "\n".join(coroutine_lines))
    return text, figs
