"""The prototype of one wait for doorbells and completions (cext/blk.h avmm_blk_watch_kicks,
avmm_blk_wait; asyncvmm.devices.virtio.block.device.URING_WAIT_NS): io_uring watches the
doorbells, the loop has no reader on them, and every request is still served."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_virtio_blk import S_OK, T_FLUSH, T_IN, T_OUT, Blk, image  # noqa: F401 (the fixture)

from asyncvmm.devices.virtio.block import device as blk_device


@pytest.fixture
def uring_wait(monkeypatch):
    monkeypatch.setattr(blk_device, "URING_WAIT_NS", 50_000)


def test_doorbells_through_io_uring_serve_every_request(image, uring_wait):  # noqa: F811
    async def go():
        async with Blk(image, "uring") as b:
            dev = b.dev.device
            assert dev._uring_wait and not any(dev.worker.watching(q.kick_fd) for q in dev.queues)  # no loop reader on them
            for i in range(50):
                st, n, _ = await b.c.run(T_OUT, 8 * i, data=bytes([i]) * 4096)
                assert (st, n) == (S_OK, 1)
            for i in range(50):
                st, n, data = await b.c.run(T_IN, 8 * i, in_len=4096)
                assert st == S_OK and data == bytes([i]) * 4096
            st, n, _ = await b.c.run(T_FLUSH)
            assert st == S_OK
            assert b.stats["reads"] == 50 and b.stats["writes"] == 50

    asyncio.run(go())


def test_the_sync_engine_keeps_its_readers(image, uring_wait):  # noqa: F811
    async def go():
        async with Blk(image, "sync") as b:
            dev = b.dev.device
            assert not dev._uring_wait and all(dev.worker.watching(q.kick_fd) for q in dev.queues)
            st, _, _ = await b.c.run(T_IN, 0, in_len=512)
            assert st == S_OK

    asyncio.run(go())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "cached"])
@pytest.mark.parametrize("rw, qd", [("randread", 32), ("randwrite", 32), ("randread", 1)])
def test_the_c_driver_gets_every_request_through(uring_wait, rw, qd, direct):
    """The C driver (cext/testdrv.c, as perf/ uses it) at queue depth 32 and 1 in its own
    thread: no doorbell is lost between io_uring's watch and the device (a lost one stalls
    the queue and the driver times out)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "perf"))
    import tempfile

    import blk as perf_blk  # perf/blk.py

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:  # a disk, not tmpfs: O_DIRECT works
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(16 << 20))
        w = perf_blk.Workload(f"{rw}-4k-qd{qd}", rw, 4096, qd, 0)
        r = perf_blk.run_asyncvmm(disk, w, 20000 if qd > 1 else 3000, direct=direct, poll=False)
    assert r["iops"] > 0  # run_asyncvmm raises when a request is lost or late
