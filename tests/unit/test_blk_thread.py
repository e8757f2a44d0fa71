"""virtio-blk's own thread (cext/blk_thread.h): an io_uring disk on eventfd vectors is served
by a thread of its own, which waits in io_uring for doorbells and completions; the loop
only parks it (reset, queue set-up, a snapshot's hold) and hears from it when a ring broke."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
from asyncvmm._native import lib
from conftest import ROOT, threads_named
from test_virtio_blk import S_OK, T_FLUSH, T_IN, T_OUT, Blk, image  # noqa: F401 (the fixture)

from asyncvmm.devices.virtio.block import device as blk_device
from asyncvmm.devices.virtio.block.device import VirtioBlk
from asyncvmm.devices.virtio.block.image import BlockOptions
from asyncvmm.testing.mock_driver import BlkClient, Harness, VirtioDriver


def test_an_io_uring_disk_is_served_by_its_own_thread(image):  # noqa: F811
    before = threads_named("blk")

    async def go():
        async with Blk(image, "uring") as b:
            dev = b.dev.device
            assert dev.stats()["thread"]["serving"]
            # No reader on the loop for its doorbells or its completions: the thread has them.
            assert not any(dev.worker.watching(q.kick_fd) for q in dev.queues)
            assert not dev.worker.watching(lib.avmm_engine_fd(dev._engine))
            assert len(threads_named("blk")) == len(before) + 1
            for i in range(20):
                assert (await b.c.run(T_OUT, 8 * i, data=bytes([i]) * 4096))[0] == S_OK
            for i in range(20):
                st, _, data = await b.c.run(T_IN, 8 * i, in_len=4096)
                assert st == S_OK and data == bytes([i]) * 4096
            assert (await b.c.run(T_FLUSH))[0] == S_OK
            assert b.stats["reads"] == 20 and b.stats["writes"] == 20
            assert dev.stats()["thread"]["turns"] >= 41

    asyncio.run(go())
    assert threads_named("blk") == before  # joined at close


def test_the_sync_engine_and_thread_off_are_served_on_the_loop(image, monkeypatch):  # noqa: F811
    async def go(engine):
        async with Blk(image, engine) as b:
            dev = b.dev.device
            assert dev.stats()["thread"] == {}
            assert all(dev.worker.watching(q.kick_fd) for q in dev.queues)
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK

    asyncio.run(go("sync"))
    monkeypatch.setattr(blk_device, "THREAD", False)
    asyncio.run(go("uring"))


def test_a_held_device_serves_nothing_until_released(image):  # noqa: F811
    async def go():
        async with Blk(image, "uring") as b:
            dev = b.dev.device
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK
            dev.worker.hold()  # a snapshot's: the thread parks
            assert dev.stats()["thread"]["parks"] >= 1
            b.c.build(T_IN, 8, in_len=512)
            used = b.c.q.used_idx()
            b.c.q.kick()
            await asyncio.sleep(0.05)
            assert b.c.q.used_idx() == used and dev.quiesced()
            dev.worker.release()
            (_, length), = await b.c.q.wait_used()
            assert length == 513

    asyncio.run(go())


def test_the_thread_polls_when_allowed():
    """The thread polls for the guest's next request when the guest answers within the
    window: the C driver (perf/'s) sends its next request µs after its interrupt. Only waits
    for the guest adapt the window (a slow guest, or the disk's own completions, do not grow it)."""
    sys.path.insert(0, str(ROOT / "perf"))
    import blk as perf_blk  # noqa: PLC0415 (perf/blk.py)

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        disk = os.path.join(d, "disk.img")
        perf_blk.make_image(disk, 16 << 20)
        w = perf_blk.Workload("randread-4k-qd1", "randread", 4096, 1, 0)
        r = perf_blk.run_asyncvmm(disk, w, 2000, direct=False, poll=True, halt_poll_ns=perf_blk.HALT_POLL_NS)
    t = r["thread"]
    assert t["polls"] > 0 and t["poll_hits"] > 0  # after a batch that left nothing in flight
    # While it polls the thread asks for no doorbells (the last completion turned them off
    # before the driver saw it): a request a poll found was not kicked. Before, the driver
    # kicked for ~9 requests in 10 whatever the poll found.
    assert r["kicks"] < 2000 - t["poll_hits"] // 2, (r["kicks"], t)


@pytest.mark.parametrize("poll", [False, True], ids=["sleeping", "polling"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "cached"])
@pytest.mark.parametrize("rw, qd", [("randread", 32), ("randwrite", 32), ("randread", 1)])
def test_the_c_driver_gets_every_request_through(rw, qd, direct, poll):
    """The C driver (cext/testdrv.c, as perf/ uses it) in a thread of its own, against the
    device's thread: no doorbell or completion is lost between them (a lost one stalls the
    queue and the driver times out: run_asyncvmm raises)."""
    sys.path.insert(0, str(ROOT / "perf"))
    import blk as perf_blk  # noqa: PLC0415 (perf/blk.py)

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:  # a disk, not tmpfs: O_DIRECT works
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(16 << 20))
        w = perf_blk.Workload(f"{rw}-4k-qd{qd}", rw, 4096, qd, 0)
        r = perf_blk.run_asyncvmm(disk, w, 20000 if qd > 1 else 3000, direct=direct, poll=poll)
    assert r["iops"] > 0


def test_the_thread_runs_under_its_own_seccomp_filter(image):  # noqa: F811
    """In a child (a filter can never be removed): the device's thread installs the
    IOTHREAD filter in kill mode and serves reads, writes and a flush; the process lives."""
    code = textwrap.dedent(f"""
        import asyncio
        from asyncvmm.devices.virtio.block.device import VirtioBlk
        from asyncvmm.devices.virtio.block.image import BlockOptions
        from asyncvmm._native import lib
        from asyncvmm.testing.mock_driver import BlkRig
        T_IN, T_OUT, T_FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH
        async def go():
            rig = BlkRig(lambda mem: VirtioBlk(BlockOptions({str(image)!r}, engine="uring"), mem, queues=1,
                                               thread_poll=True, seccomp="kill"))
            async with rig as b:
                for i in range(10):
                    assert (await b.c.run(T_OUT, 8 * i, data=b"x" * 4096))[0] == 0
                    assert (await b.c.run(T_IN, 8 * i, in_len=4096))[0] == 0
                assert (await b.c.run(T_FLUSH))[0] == 0
                assert not b.dev.device.stats()["thread"]["seccomp_failed"]
        asyncio.run(go())
        print("survived", flush=True)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("call", ['os.open("/etc/hostname", os.O_RDONLY)', "fcntl.ioctl(0, lib.KVM_RUN, 0)",
                                  "socket.socket(socket.AF_UNIX)"], ids=["openat", "ioctl", "socket"])
def test_the_device_thread_filter_kills_on_anything_else(call):
    code = textwrap.dedent(f"""
        import fcntl, os, socket, threading
        from asyncvmm import seccomp
        from asyncvmm._native import lib
        def thread():
            seccomp.install(seccomp.Kind.IOTHREAD, "kill")
            print("filtered", flush=True)
            {call}
            print("survived", flush=True)
        t = threading.Thread(target=thread); t.start(); t.join()
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == -31 and "filtered" in r.stdout and "survived" not in r.stdout, (r.returncode, r.stderr)


def test_an_intx_disk_is_served_on_the_loop(image):  # noqa: F811
    """INTx: the loop lowers the line and reads the ISR, so the queues stay on the loop."""
    async def go():
        h = Harness()
        try:
            dev = h.add(VirtioBlk(BlockOptions(str(image), engine="uring"), h.mem, queues=1), msix=False)
            drv = VirtioDriver(h, dev)
            await drv.setup()
            assert dev.device.stats()["thread"] == {}
            st, _, data = await BlkClient(drv).run(T_IN, 0, in_len=512)
            assert st == S_OK and data == bytes(range(256)) * 2
        finally:
            h.close()

    asyncio.run(go())


def test_the_loop_that_serves_after_the_thread_keeps_doorbells_on(image, monkeypatch):  # noqa: F811
    """A disk its polling thread served, reset and set up again for the loop to serve (as on
    INTx, whose line the loop lowers; here the thread turned off for the second set-up): the
    loop never turns doorbells off, since nothing of it would turn them on again. After each
    of its completions the driver's next request must kick."""

    async def go():
        h = Harness()
        try:
            dev = h.add(VirtioBlk(BlockOptions(str(image), engine="uring"), h.mem, queues=1, thread_poll=True))
            drv = VirtioDriver(h, dev)
            await drv.setup()
            assert dev.device.stats()["thread"]["serving"]
            c = BlkClient(drv)
            # The thread's window open (this Python driver answers too slowly to open it; the
            # C driver does), so its last turns ask for doorbells off before its polls.
            for _ in range(3):
                lib.avmm_blk_thread_stats(dev.device._thread).poll_ns = 50_000
                assert (await c.run(T_IN, 0, in_len=512))[0] == S_OK
            assert dev.device.stats()["thread"]["polls"] >= 3
            monkeypatch.setattr(blk_device, "THREAD", False)
            await drv.setup()
            assert not dev.device.stats()["thread"].get("serving")
            c = BlkClient(drv)
            for _ in range(20):
                st, _, _ = await asyncio.wait_for(c.run(T_IN, 0, in_len=512), 5)
                assert st == S_OK and c.q.kick_wanted()
        finally:
            h.close()

    asyncio.run(go())
