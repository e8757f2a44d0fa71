"""virtio-net on passt (user-mode networking), driven by the host-side driver: a real passt
per test, the guest's side played by passt_peer.py (DHCP, TCP by hand).

Nothing here leaves this machine: DHCP is answered by passt itself, and the only
connections go to the gateway's address, which passt maps to this host's loopback
(its default --map-gw), or come from this host's loopback through a port forward.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from asyncvmm._native import lib
from conftest import free_port, open_fds
from passt_peer import Dhcp, Guest, TcpConn

from asyncvmm.config import VmConfig
from asyncvmm.devices.virtio.net.device import NetFeature, VirtioNet
from asyncvmm.devices.virtio.net.passt import Passt, PasstOptions
from asyncvmm.devices.virtio.net.tap import NetOptions, stable_mac
from asyncvmm.devices.virtio.spec import Status
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import Harness, NetClient, VirtioDriver

HERE = Path(__file__).resolve().parent
needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed (tools/setup installs it)")


def host_addresses() -> set[bytes]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return {ipaddress.IPv4Address(line.split()[3].split("/")[0]).packed for line in out.splitlines()}


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class PasstNet:
    """A harness with one virtio-net on its own passt, and the guest's IP stack."""

    def __init__(self, conf: str = "passt"):
        self.opts = NetOptions.parse(conf)

    async def __aenter__(self) -> "PasstNet":
        self.h = Harness()
        try:
            self.dev = self.h.add(VirtioNet(self.opts, self.h.mem, mac=stable_mac("test", "passt"), queues=1))
            self.drv = VirtioDriver(self.h, self.dev)
            await self.drv.setup()
            self.c = NetClient(self.drv)
            self.c.post_rx(64)
            self.guest = Guest(self.c, self.dev.device.mac)
        except BaseException:
            self.h.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.h.close()

    @property
    def net(self) -> VirtioNet:
        return self.dev.device

    @property
    def passt(self):
        return self.net.tap


def run(coro):
    fds = open_fds()
    asyncio.run(coro)
    assert open_fds() <= fds, "an fd was left open"


# -- the spelling: `passt` is never a TAP's name ------------------------------------------

def test_passt_spelling_is_never_a_tap():
    o = NetOptions.parse("passt,fwd=tcp:2222:22,fwd=udp:127.0.0.1:5353,mtu=1500,mac=52:54:00:aa:bb:cc")
    assert o.passt == PasstOptions((("tcp", 2222, 22), ("udp", 5353, 5353)), ("", "127.0.0.1"), 1500)
    assert o.passt.args() == ["-t", "2222:22", "-u", "127.0.0.1/5353:5353", "--mtu", "1500"]
    assert NetOptions.parse("tap0").passt is None
    for bad in ("passt,fwd=tcp:0:22", "passt,fwd=sctp:1:2", "passt,fwd=tcp:70000", "passt,queues=2",
                "passt,mtu=10", "passt,bogus=1", "tap0,fwd=tcp:1:2", "passt,fwd=tcp:300.1.1.1:80"):
        with pytest.raises(ConfigError) as e:
            NetOptions.parse(bad, "3:0,")
        assert "\n" not in str(e.value) and "-s 3:0,virtio-net" in str(e.value)


@needs_passt
def test_passt_device_offers_no_offloads_and_one_pair():
    async def go():
        async with PasstNet() as n:
            d = n.drv
            for f in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.HOST_TSO4, NetFeature.GUEST_TSO4,
                      NetFeature.CTRL_GUEST_OFFLOADS, NetFeature.MQ):
                assert not d.has(f), f
            assert d.has(NetFeature.MRG_RXBUF) and d.has(NetFeature.STATUS)
            assert d.config_read(6, 2) == lib.VIRTIO_NET_S_LINK_UP
            assert n.net.stats()["passt"]["link"] == "up"
            assert not os.path.exists("/sys/class/net/passt")  # no TAP of that name was made
    run(go())


# -- DHCP, and traffic both ways --------------------------------------------------------

@needs_passt
def test_passt_dhcp_lease():
    async def go():
        async with PasstNet() as n:
            lease = await n.guest.dhcp()
            assert lease.acked, lease
            # passt gives the guest the host's own address (and its gateway): none of this
            # goes beyond passt, which answered from within.
            assert lease.address in host_addresses(), lease
            assert lease.router != bytes(4) and lease.seconds > 0
            s = n.net.stats()["pairs"][0]
            assert s["tx_packets"] >= 2 and s["rx_packets"] >= 2 and s["rx_reads"] >= 1
    run(go())


@needs_passt
def test_passt_tcp_to_a_service_on_this_host():
    """The guest connects to the gateway's address; passt carries it to 127.0.0.1."""
    payload = os.urandom(20000)

    async def go():
        got = asyncio.get_running_loop().create_future()

        async def serve(reader, writer):
            data = await reader.readexactly(len(payload))
            writer.write(hashlib.sha256(data).digest() + data[::-1][:3000])
            await writer.drain()
            got.set_result(data)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, PasstNet() as n:
            lease = await n.guest.dhcp()
            conn = await TcpConn.connect(n.guest, lease.router, port)
            conn.send(payload)
            reply = await conn.recv(32 + 3000)
            assert reply[:32] == hashlib.sha256(payload).digest()
            assert reply[32:] == payload[::-1][:3000]
            async with asyncio.timeout(5):
                assert await got == payload
            conn.reset()
    run(go())


@needs_passt
def test_passt_port_forward_from_the_host():
    host_port, guest_port = free_port(), 8080

    async def go():
        async with PasstNet(f"passt,fwd=tcp:127.0.0.1:{host_port}:{guest_port}") as n:  # loopback only
            await n.guest.dhcp()  # passt learns the guest's MAC and address
            reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
            conn = await TcpConn.accept(n.guest, guest_port)
            message = b"from the host " * 300
            writer.write(message)
            await writer.drain()
            assert await conn.recv(len(message)) == message
            conn.send(b"the guest answers: " + hashlib.sha256(message).hexdigest().encode())
            async with asyncio.timeout(5):
                answer = await reader.readexactly(19 + 64)
            assert answer == b"the guest answers: " + hashlib.sha256(message).hexdigest().encode()
            writer.close()
            conn.reset()
    run(go())


@needs_passt
def test_passt_survives_guest_frames_it_would_not_take():
    """passt resets its connection (and with --one-off, exits) on a frame shorter than an
    Ethernet header or longer than 65535 bytes: the device drops those, passt stays."""
    async def go():
        async with PasstNet() as n:
            await n.guest.dhcp()
            n.c.tx.take_used()  # the DHCP frames'
            before = n.net.stats()["pairs"][0]
            for frame in (b"", bytes(13), b"\xff" * 6 + n.net.mac + b"\x08\x00" + bytes(65536 - 14)):
                n.c.send(frame)
            await n.c.sent(3)
            after = n.net.stats()["pairs"][0]
            assert after["tx_errors"] == before["tx_errors"] + 3
            assert after["tx_packets"] == before["tx_packets"]
            await asyncio.sleep(0.3)  # passt had time to read (and refuse) whatever was sent
            assert n.net.stats()["passt"]["link"] == "up" and n.passt.proc.poll() is None
            lease = await n.guest.dhcp()  # and it still answers
            assert lease.acked, lease
    run(go())


# -- passt going away ---------------------------------------------------------------------

@needs_passt
def test_passt_killed_link_down_and_the_vmm_carries_on():
    async def go():
        async with PasstNet() as n:
            await n.guest.dhcp()
            pid = n.passt.pid
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(5):  # the cause may come after the link went down
                while "killed by SIGKILL" not in n.net.stats()["passt"]["gone"]:
                    await asyncio.sleep(0.01)
            stats = n.net.stats()
            assert stats["passt"]["link"] == "down", stats["passt"]
            assert n.drv.config_read(6, 2) & lib.VIRTIO_NET_S_LINK_UP == 0
            assert n.drv.status & Status.NEEDS_RESET
            # The guest's frames are taken and dropped, never left to fill the ring.
            before = stats["pairs"][0]["tx_errors"]
            n.c.tx.take_used()  # the DHCP frames'
            n.c.send(b"\xff" * 6 + n.net.mac + b"\x08\x00" + bytes(50))
            await n.c.sent(1)
            assert n.net.stats()["pairs"][0]["tx_errors"] == before + 1
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped
    run(go())


@needs_passt
def test_passt_socket_closed_before_it_exits_never_stalls_the_loop():
    """The socket closes while passt still runs: the device says so at once (it never waits
    for passt on the loop), and names the real cause when passt has exited, reaped then."""
    async def go():
        async with PasstNet() as n:
            await n.guest.dhcp()
            pid = n.passt.pid
            t = time.monotonic()
            assert n.passt.why_gone() == f"passt (pid {pid}) closed its socket"
            assert time.monotonic() - t < 0.1
            n.passt.sock.shutdown(socket.SHUT_RD)  # our reads see the end of the stream; passt lives
            async with asyncio.timeout(5):
                while n.net.link_up:
                    await asyncio.sleep(0.005)
            assert n.net.peer_gone == f"passt (pid {pid}) closed its socket"
            assert n.passt.proc.poll() is None
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(5):
                while "killed by SIGKILL" not in n.net.peer_gone:
                    await asyncio.sleep(0.005)
            assert n.passt.proc.returncode == -signal.SIGKILL
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # reaped
    run(go())


@needs_passt
def test_passt_stops_with_the_device():
    async def go():
        async with PasstNet() as n:
            pid = n.passt.pid
            assert os.path.exists(f"/proc/{pid}")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    run(go())


# -- a plain user's passt -----------------------------------------------------------------

@needs_passt
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to become the plain user nobody (setpriv)")
def test_passt_dhcp_as_a_plain_user():
    """The whole device as `nobody`: passt is then that user's (as root, passt drops to
    nobody by itself), and the lease comes the same way."""
    child = HERE / "passt_user_child.py"
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--reset-env",
                        sys.executable, str(child)], capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split("=", 1) for line in r.stdout.split())
    assert lines["uid"] == str(65534) and lines["passt_uid"] == str(65534), r.stdout
    assert ipaddress.IPv4Address(lines["lease"]).packed in host_addresses(), r.stdout


@needs_passt
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/dev/kvm")
                    or not _has_group("kvm"),
                    reason="needs root to become the plain user nobody in the kvm group (setpriv), and /dev/kvm")
def test_cli_run_with_passt_as_a_plain_user(guests):
    """`asyncvmm run -s 3,virtio-net,passt` as nobody in the kvm group: no TAP, no root; the
    log names passt's pid and user, and passt is gone when the VM is."""
    run_dir = Path(tempfile.mkdtemp(prefix="avmm-passt-user-"))
    try:
        os.chown(run_dir, 65534, 65534)
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=kvm", sys.executable, "-m",
                            "asyncvmm", "run", "-m", "64", "--no-reboot", "--kernel", str(guests / "hello.elf"),
                            "-s", "3,virtio-net,passt,fwd=tcp:127.0.0.1:" + str(free_port()) + ":22"],
                           capture_output=True, text=True, timeout=60, cwd=HERE.parents[1],
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ASYNCVMM_RUN_DIR": str(run_dir)})
        assert r.returncode == 0, r.stderr
        assert "hello from the guest" in r.stdout
        m = re.search(r"devices: 3:0 virtio-net passt \(pid (\d+), as nobody, tcp \d+->22\)", r.stderr)
        assert m, r.stderr
        assert not os.path.exists(f"/proc/{m.group(1)}"), "passt outlived the VM"
        assert not os.path.exists("/sys/class/net/passt")
        assert not os.listdir(run_dir)  # the control socket went with the VM
    finally:
        shutil.rmtree(run_dir)


@needs_passt
def test_passt_outlives_a_machine_reset_and_the_stream_carries_over():
    """A guest reset builds a new device on the same passt (the VM keeps it): what the old
    device had read and not delivered — passt's DHCP OFFER, while no RX buffers were
    posted — reaches the new one, the framing intact."""
    mac = stable_mac("test", "carry")

    async def device(passt):
        h = Harness()
        dev = h.add(VirtioNet(NetOptions.parse("passt"), h.mem, mac=mac, queues=1, tap=passt))
        drv = VirtioDriver(h, dev)
        await drv.setup()
        return h, dev.device, Guest(NetClient(drv), mac)

    async def go():
        passt = Passt(PasstOptions())
        try:
            h, net, guest = await device(passt)
            try:
                xid = 0x5EED
                guest._dhcp(xid, bytes([Dhcp.MSG_TYPE, 1, Dhcp.DISCOVER, Dhcp.END]))
                async with asyncio.timeout(5):
                    while net.stats()["pairs"][0]["rx_no_buffers"] == 0:
                        await asyncio.sleep(0.005)
            finally:
                h.close()
            assert passt.carry is not None and len(passt.carry[0]) > 300  # the OFFER, framed
            h, net, guest = await device(passt)
            try:
                guest.c.post_rx(16)
                offered, opts, _ = await guest._dhcp_reply(xid, Dhcp.OFFER)
                assert offered in host_addresses()
                assert net.stats()["passt"]["link"] == "up"
            finally:
                h.close()
        finally:
            passt.close()
    run(go())


# -- the stream framing itself, against a plain socket (no passt) --------------------------

class SocketPeer:
    """The device's side of a socketpair, in the place of a Passt."""

    name, created, uso, carry = "socketpair", False, False, None

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds = [sock.fileno()]

    def set_offload(self, flags: int) -> None:
        pass

    def set_active_queues(self, n: int) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class StreamNet:
    def __init__(self, *, sndbuf: int = 0):
        self.sndbuf = sndbuf

    async def __aenter__(self) -> "StreamNet":
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.sndbuf)
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.h = Harness()
        self.dev = self.h.add(VirtioNet(NetOptions.parse("passt"), self.h.mem, mac=stable_mac("t", "s"), queues=1,
                                        tap=SocketPeer(ours)))
        self.drv = VirtioDriver(self.h, self.dev)
        await self.drv.setup()
        self.c = NetClient(self.drv)
        return self

    async def __aexit__(self, *exc) -> None:
        self.h.close()
        self.dev.device.tap.close()
        self.peer.close()

    @property
    def stats(self) -> dict:
        return self.dev.device.stats()["pairs"][0]


def frames_of(stream: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(stream):
        n = int.from_bytes(stream[at : at + 4], "big")
        out.append(stream[at + 4 : at + 4 + n])
        at += 4 + n
    assert at == len(stream), "the stream ends inside a frame"
    return out


def test_stream_tx_a_socket_that_takes_frames_in_part():
    """A small socket buffer and a slow reader: frames are sent in part, their tails kept and
    sent first when the socket is writable; every frame arrives whole, in order."""
    rng = __import__("random").Random(17)
    frames = [os.urandom(rng.randint(60, 9000)) for _ in range(150)]

    async def go():
        async with StreamNet(sndbuf=4096) as n:
            for f in frames:
                n.c.send(f, split=False)  # one descriptor each: the ring holds them all
            got = bytearray()
            loop = asyncio.get_running_loop()
            want = sum(4 + len(f) for f in frames)
            async with asyncio.timeout(20):
                while len(got) < want:
                    got += await loop.sock_recv(n.peer, 3000)
                    await asyncio.sleep(0.001)  # slower than the device would send
            assert frames_of(bytes(got)) == frames
            assert n.stats["tx_packets"] == len(frames)
            assert n.stats["tx_partial"] >= 1 and n.stats["tx_blocked"] >= 1, n.stats
    run(go())


def test_stream_rx_frames_split_anywhere_and_a_broken_length():
    rng = __import__("random").Random(18)
    frames = [os.urandom(rng.randint(14, 4000)) for _ in range(60)]
    stream = b"".join(len(f).to_bytes(4, "big") + f for f in frames)

    async def go():
        async with StreamNet() as n:
            n.c.post_rx(128)
            at = 0
            while at < len(stream):  # in pieces that cut lengths and frames anywhere
                step = rng.randint(1, 700)
                n.peer.send(stream[at : at + step])
                at += step
                await asyncio.sleep(0)
            got = await n.c.receive(len(frames), timeout=10)
            assert [f for _, f in got] == frames
            n.peer.send((1 << 20).to_bytes(4, "big") + bytes(20))  # no frame is that long
            async with asyncio.timeout(5):
                while n.dev.device.link_up:
                    await asyncio.sleep(0.005)
            assert n.drv.config_read(6, 2) & lib.VIRTIO_NET_S_LINK_UP == 0
            assert n.stats["rx_errors"] == 1 and n.stats["rx_bad_length"] == 1
            assert n.dev.device.peer_gone == "the VMM took the link down: the peer sent a frame length no frame has"
    run(go())


def test_stream_gone_with_a_tail_kept_drops_what_follows_without_blocking():
    """The peer goes while a frame's tail waits to be sent: the tail is dropped with the
    stream, and every later frame is consumed and counted at once — not one per batch,
    each batch reporting the dead socket blocked and watching it for writing again."""
    async def go():
        async with StreamNet(sndbuf=4096) as n:
            for _ in range(3):
                n.c.send(os.urandom(9000), split=False)
            async with asyncio.timeout(5):
                while n.stats["tx_partial"] == 0:
                    await asyncio.sleep(0.005)
            n.peer.close()  # never read: the tail is still ours
            async with asyncio.timeout(5):
                while n.dev.device.link_up:
                    await asyncio.sleep(0.005)
            await n.c.sent(3)
            n.c.tx.take_used()
            before = n.stats
            for _ in range(6):
                n.c.send(os.urandom(100), kick=False)
            n.c.tx.kick()
            await n.c.sent(6)
            after = n.stats
            assert after["tx_errors"] == before["tx_errors"] + 6
            assert after["tx_blocked"] == before["tx_blocked"], after
    run(go())


def _poll_ms(n: StreamNet, ms: int, stop: int | None = None) -> tuple[int, float]:
    """avmm_net_poll for `ms`, as the device's busy-poll calls it (with a stop word holding
    `stop`, as a device thread's, if given): what it returned, and when."""
    from asyncvmm._native import ffi  # noqa: PLC0415

    state, pair = ffi.new("uint32_t *"), ffi.new("int *")
    word = ffi.NULL if stop is None else ffi.new("int *", stop)
    t = time.monotonic()
    got = lib.avmm_net_poll(n.dev.device._net, 1, ms * 1_000_000, word, state, pair)
    return got, time.monotonic() - t


def test_stream_poll_waits_over_a_partial_frame_and_a_gone_stream():
    """A frame not yet whole in the buffer, and a stream that is gone, are nothing to
    deliver: avmm_net_poll spins its whole time for them, rather than returning at once
    (which ends the device's busy-poll on every call)."""
    async def go():
        async with StreamNet() as n:
            n.c.post_rx(16)
            n.peer.send((1000).to_bytes(4, "big") + bytes(40))  # 44 of 1004 bytes
            async with asyncio.timeout(5):
                while n.stats["rx_reads"] == 0:
                    await asyncio.sleep(0.005)
            got, took = _poll_ms(n, 40)
            assert got == 0 and took >= 0.035, took
            got, took = _poll_ms(n, 2000, stop=1)  # a device thread asked to park: at once
            assert got == 0 and took < 0.5, took
            n.peer.send(bytes(960))  # the rest: delivered
            assert len(await n.c.receive(1)) == 1
            n.peer.close()
            async with asyncio.timeout(5):
                while n.dev.device.link_up:
                    await asyncio.sleep(0.005)
            got, took = _poll_ms(n, 40)
            assert got == 0 and took >= 0.035, took
    run(go())


@needs_passt
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_cli_starts_passt_before_the_seccomp_filter(guests):
    """`--seccomp=kill` refuses fork and exec once the VMM runs: passt is started before."""
    r = subprocess.run([sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--no-reboot", "--seccomp=kill",
                        "--kernel", str(guests / "hello.elf"), "-s", "3,virtio-net,passt"],
                       capture_output=True, text=True, timeout=60, cwd=HERE.parents[1])
    assert r.returncode == 0, r.stderr
    assert "hello from the guest" in r.stdout
    m = re.search(r"virtio-net passt \(pid (\d+),", r.stderr)
    assert m, r.stderr
    assert not os.path.exists(f"/proc/{m.group(1)}")


@needs_passt
def test_a_forward_of_a_port_in_use_is_refused_in_one_line():
    from asyncvmm.config import parse_slot  # noqa: PLC0415

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = VmConfig(kernel="/dev/null", slots=[parse_slot(f"3,virtio-net,passt,fwd=tcp:{port}:22")])
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert f"the host's TCP port {port} cannot be bound" in str(e.value) and "\n" not in str(e.value)
