"""virtio-net's own thread on a TAP (cext/net_thread.h, asyncvmm/devices/virtio/net/thread.py):
it serves the doorbells and the TAP with no loop in between; the loop parks it (reset, queue
set-up, a snapshot's hold, the TAP's active queues) and hears from it when a ring broke. The
data path's own tests (test_virtio_net.py) run with it and without it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, threads_named
from test_virtio_net import ETHERTYPE, Net, run

from asyncvmm.devices.virtio.net import device as net_device
from asyncvmm.devices.virtio.spec import Status
from asyncvmm.testing.mock_driver import NetClient

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun") or os.geteuid() != 0,
                                reason="needs /dev/net/tun and root (network namespaces)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_tap_device_is_served_by_its_own_thread():
    before, fds = threads_named("net"), open_fds()

    async def go():
        async with Net() as n:
            dev = n.dev.device
            assert n.threaded
            # No reader on the loop for the doorbells or the TAP: the thread has them.
            assert not any(dev.worker.watching(q.kick_fd) for q in dev.queues)
            assert not dev.worker.watching(dev.tap.fds[0])
            assert len(threads_named("net")) == len(before) + 1
            n.c.post_rx(32)
            frames = [n.frame(b"in %d" % i, to_host=False) for i in range(20)]
            n.peer.send(frames)
            assert [f for _, f in await n.c.receive(20, ethertype=ETHERTYPE)] == frames
            for i in range(20):
                n.c.send(n.frame(b"out %d" % i))
            await n.c.sent(20)
            got = n.peer.recv(20, ethertype=ETHERTYPE, data=True)
            assert [bytes.fromhex(d)[14:] for _, _, d, _ in got] == [b"out %d" % i for i in range(20)]
            t = dev.stats()["thread"]
            assert t["serving"] and t["turns"] >= 2 and not t["broken"]

    run(go())
    assert threads_named("net") == before  # joined at close
    assert open_fds() == fds  # its wake-up and notify eventfds closed


async def _one_frame_in(n, payload: bytes) -> bytes:
    """A frame from the host's side of the TAP, received by the driver: what it got."""
    n.c.post_rx(4)
    n.peer.send([n.frame(payload, to_host=False)])
    (_, f), = await n.c.receive(1, ethertype=ETHERTYPE)
    return f


def test_thread_off_keeps_the_loop(monkeypatch):
    monkeypatch.setattr(net_device, "THREAD", False)

    async def go():
        async with Net() as n:
            dev = n.dev.device
            assert dev.stats()["thread"] == {} and all(dev.worker.watching(q.kick_fd) for q in dev.queues)
            assert (await _one_frame_in(n, b"loop")).endswith(b"loop")

    run(go())


def test_a_held_device_moves_no_frames_until_released():
    """A snapshot holds the devices: the thread is parked, the rings stay as they are while
    frames keep coming both ways, and nothing is lost after the release."""
    async def go():
        async with Net() as n:
            dev = n.dev.device
            n.c.post_rx(64)
            await asyncio.sleep(0.05)
            parks, rx0 = dev.stats()["thread"]["parks"], n.stats["rx_packets"]  # (the host's own chatter)
            dev.worker.hold()
            assert dev.stats()["thread"]["parks"] == parks + 1
            saved = dev.save()
            frames = [n.frame(b"held %d" % i, to_host=False) for i in range(10)]
            n.peer.send(frames)
            for i in range(5):
                n.c.send(n.frame(b"held out %d" % i))
            await asyncio.sleep(0.2)
            assert dev.save() == saved  # nothing touched the rings: what a snapshot writes is whole
            assert n.stats["tx_packets"] == 0 and n.stats["rx_packets"] == rx0, (n.stats, dev.stats()["thread"])
            dev.worker.release()
            assert [f for _, f in await n.c.receive(10, ethertype=ETHERTYPE)] == frames
            await n.c.sent(5)
            assert len(n.peer.recv(5, ethertype=ETHERTYPE)) == 5

    run(go())


def test_a_reset_with_frames_in_flight_parks_the_thread_and_the_next_setup_serves():
    async def go():
        async with Net() as n:
            dev = n.dev.device
            n.c.post_rx(16)
            n.peer.send([n.frame(b"before %d" % i, to_host=False) for i in range(40)])  # more than the buffers
            for _ in range(10):
                n.c.send(n.frame(b"x" * 1000), kick=False)
            n.c.tx.kick()
            n.drv.set_status(0)  # mid-flight: the thread parked, the rings forgotten
            assert n.drv.status == 0
            assert not dev.stats()["thread"]["serving"]
            await n.drv.setup()
            assert dev.stats()["thread"]["serving"]
            n.c = NetClient(n.drv)
            n.c.post_rx(64)
            frames = [n.frame(b"after %d" % i, to_host=False) for i in range(10)]
            n.peer.send(frames)
            got = [f for _, f in await n.c.receive(10, ethertype=ETHERTYPE) if b"after" in f]
            assert got[-10:] == frames
            assert n.drv.status & Status.NEEDS_RESET == 0
            assert len(threads_named("net")) >= 1

    run(go())


def test_a_broken_ring_is_reported_to_the_loop():
    async def go():
        async with Net() as n:
            dev = n.dev.device
            n.c.tx.set_avail_idx(1000)  # more than the ring's size ahead: broken (2.7.13.3)
            n.c.tx.kick()
            for _ in range(200):
                if n.drv.status & Status.NEEDS_RESET:
                    break
                await asyncio.sleep(0.01)
            assert n.drv.status & Status.NEEDS_RESET
            assert dev.stats()["thread"]["broken"]
            waits = dev.stats()["thread"]["waits"]
            await asyncio.sleep(0.1)
            assert dev.stats()["thread"]["waits"] <= waits + 1  # it waits, it does not spin
            await n.drv.setup()  # the driver resets the device: served again
            n.c = NetClient(n.drv)
            for _ in range(100):  # the thread looks at the new rings once it is let go
                if not dev.stats()["thread"]["broken"]:
                    break
                await asyncio.sleep(0.01)
            assert not dev.stats()["thread"]["broken"]
            n.c.send(n.frame(b"after reset"))
            await n.c.sent(1)
            (_, _, d, _), = n.peer.recv(1, ethertype=ETHERTYPE, data=True)
            assert bytes.fromhex(d).endswith(b"after reset")

    run(go())


def test_the_thread_polls_when_allowed():
    """Frames close together: the window opens, and the thread spins for the next frame
    after a batch before it sleeps (asyncvmm.poll: only when the host has a CPU for it)."""
    async def go():
        async with Net(thread_poll=True) as n:
            for i in range(300):
                n.c.send(n.frame(b"%d" % i))  # a doorbell each, microseconds apart
                if i % 50 == 49:
                    await n.c.sent(50)
            t = n.dev.device.stats()["thread"]
            assert t["polls"] > 0 and t["poll_hits"] >= 0, t
            assert len(n.peer.recv(300, ethertype=ETHERTYPE)) == 300

    run(go())


def test_the_thread_runs_under_its_own_seccomp_filter():
    """In a child (a filter can never be removed): the device's thread installs the IOTHREAD
    filter in kill mode, polls, and moves frames both ways; the process lives."""
    code = textwrap.dedent("""
        import asyncio, os, sys
        sys.path.insert(0, "tests/integration")
        from netns import Netns, Peer
        from asyncvmm.devices.virtio.net.device import VirtioNet
        from asyncvmm.devices.virtio.net.tap import NetOptions, stable_mac
        from asyncvmm.testing.mock_driver import Harness, NetClient, VirtioDriver
        ET = b"\\x88\\xb5"
        async def go():
            name = f"avs{os.getpid() % 100000}"
            with Netns("net") as ns:
                h = Harness()
                try:
                    dev = h.add(VirtioNet(NetOptions(name), h.mem, mac=stable_mac("t", name), queues=1,
                                          thread_poll=True, seccomp="kill"))
                    ns.take(name, mtu=1500)
                    peer = Peer(ns, name)
                    try:
                        drv = VirtioDriver(h, dev)
                        await drv.setup()
                        c = NetClient(drv)
                        mac = dev.device.mac
                        c.post_rx(16)
                        for i in range(10):
                            peer.send([mac + bytes.fromhex("020000000001") + ET + b"in %d" % i])
                            await c.receive(1, ethertype=0x88B5)
                            c.send(bytes.fromhex("020000000001") + mac + ET + b"out %d" % i)
                            await c.sent(1)
                        assert len(peer.recv(10, ethertype=0x88B5)) == 10
                        t = dev.device.stats()["thread"]
                        assert t["serving"] and not t["seccomp_failed"], t
                    finally:
                        peer.close()
                finally:
                    h.close()
        asyncio.run(go())
        print("survived", flush=True)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_a_detached_tap_queue_does_not_make_the_thread_spin():
    """Two pairs, one active: the TAP's second queue is detached (TUNSETQUEUE); the thread
    still waits on it and sleeps (and leaves out a TAP that says POLLERR, until the loop
    parks it for the next MQ change)."""
    async def go():
        async with Net(queues=2) as n:
            t0 = n.dev.device.stats()["thread"]["waits"]
            await asyncio.sleep(0.3)
            assert n.dev.device.stats()["thread"]["waits"] - t0 <= 5
            assert (await _one_frame_in(n, b"one pair")).endswith(b"one pair")

    run(go())


def test_a_reset_during_a_hold_leaves_no_park_behind():
    async def go():
        async with Net() as n:
            dev = n.dev.device
            dev.worker.hold()
            n.drv.set_status(0)  # the reset parks it once more, for itself
            dev.worker.release()  # lets go of the hold's park only
            await n.drv.setup()  # the activation lets go of the reset's: it serves again
            n.c = NetClient(n.drv)
            assert (await _one_frame_in(n, b"after")).endswith(b"after") and dev.stats()["thread"]["serving"]

    run(go())
