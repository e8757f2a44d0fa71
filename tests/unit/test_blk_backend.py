"""virtio-blk on a Python block backend (coroutines), driven by the host-side driver.

The backends here are real: an in-memory disk, and tools/examples/cow_disk.py's
copy-on-write overlay on a read-only file. Each request type goes through C's walker,
the batch to the coroutines and back; the data is checked both in the guest's buffers and
in the backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from asyncvmm._native import lib

import asyncvmm
from asyncvmm.config import PciSlot, VmConfig
from asyncvmm.devices.virtio.block.backend import BackendBlk, BlockBackend
from asyncvmm.devices.virtio.spec import Status
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import BLK_SEGMENT, BlkClient, BlkRig, DeviceLog, Harness, VirtioDriver

T_IN, T_OUT, T_FLUSH, T_GET_ID = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH, lib.VIRTIO_BLK_T_GET_ID
T_DISCARD, T_WZ = lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES
S_OK, S_IOERR = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR
UNMAP = lib.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
DISK = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


class MemDisk(BlockBackend):
    """An in-memory disk that records what it was asked."""

    def __init__(self, size: int = DISK, *, readonly: bool = False):
        self.size = size
        self.readonly = readonly
        self.data = bytearray(os.urandom(size))
        self.calls: list[tuple] = []
        self.fail_at: int | None = None  # an offset whose requests raise

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        await asyncio.sleep(0)  # a real await: the batch's others run meanwhile
        if offset == self.fail_at:
            raise OSError("the backing store is on fire")
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset, len(data)))
        await asyncio.sleep(0)
        if offset == self.fail_at:
            raise RuntimeError("refused")
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.calls.append(("write_zeroes", offset, length))
        self.data[offset : offset + length] = bytes(length)


class Dev(BlkRig):
    def __init__(self, backend, **kw):
        self.backend = backend
        super().__init__(lambda mem: BackendBlk(backend, mem, **kw))

    @property
    def stats(self):
        return self.dev.device.stats()


def run(coro):
    return asyncio.run(coro)


def test_every_request_type_with_the_data_checked():
    disk = MemDisk()

    async def go():
        async with Dev(disk, serial="mem-disk") as d:
            st, n, data = await d.c.run(T_IN, 3, in_len=2048)
            assert (st, n, data) == (S_OK, 2049, bytes(disk.data[1536 : 1536 + 2048]))
            payload = os.urandom(8192)
            st, n, _ = await d.c.run(T_OUT, 10, data=payload)
            assert (st, n) == (S_OK, 1) and disk.data[5120 : 5120 + 8192] == payload
            st, _, data = await d.c.run(T_IN, 10, in_len=8192)
            assert st == S_OK and data == payload
            assert (await d.c.run(T_FLUSH))[0] == S_OK
            st, n, data = await d.c.run(T_GET_ID, in_len=20)  # answered in C from the serial
            assert (st, data) == (S_OK, b"mem-disk".ljust(20, b"\0"))
            assert (await d.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(10, 8, 0)))[0] == S_OK
            assert disk.data[5120 : 5120 + 4096] == bytes(4096)
            assert (await d.c.run(T_WZ, payload=BLK_SEGMENT.pack(30, 8, 0)))[0] == S_OK
            assert (await d.c.run(T_WZ, payload=BLK_SEGMENT.pack(40, 8, UNMAP)))[0] == S_OK
            assert disk.data[30 * 512 : 38 * 512] == bytes(4096) and disk.data[40 * 512 : 48 * 512] == bytes(4096)
            st, _, data = await d.c.run(T_IN, 10, in_len=8192)
            assert st == S_OK and data == bytes(4096) + payload[4096:]
            # The walker checks what the backend never sees: past the end, GET_ID.
            assert (await d.c.run(T_IN, DISK // 512, in_len=512))[0] == S_IOERR
            s = d.stats
            assert s["requests"]["out_of_range"] == 1 and s["backend"]["errors"] == 0
        kinds = [c[0] for c in disk.calls]
        assert kinds == ["read", "write", "read", "flush", "discard", "write_zeroes", "discard", "read"], kinds
    run(go())


def test_a_batch_runs_concurrently_and_completes_with_one_interrupt():
    """Eight reads in one doorbell: the coroutines overlap (each waits until all eight have
    started), and the guest gets them back as one batch, one interrupt."""

    class Gate(MemDisk):
        def __init__(self):
            super().__init__()
            self.started = 0
            self.all_in = asyncio.Event()

        async def read(self, offset, length):
            self.started += 1
            if self.started == 8:
                self.all_in.set()
            async with asyncio.timeout(5):
                await self.all_in.wait()
            return bytes(self.data[offset : offset + length])

    async def go():
        disk = Gate()
        async with Dev(disk) as d:
            q = d.c.q
            q.interrupts()
            reqs = [d.c.build(T_IN, 8 * i, in_len=4096) for i in range(8)]
            q.kick()
            used = await q.wait_used(8)
            assert sorted(h for h, _ in used) == sorted(h for h, _, _ in reqs)
            for i, (_, status, addr) in enumerate(reqs):
                assert d.h.mem.read(status, 1)[0] == S_OK
                assert d.h.mem.read(addr, 4096) == bytes(disk.data[i * 4096 : (i + 1) * 4096])
            b = d.stats["backend"]
            assert (b["batches"], b["ops"]) == (1, 8), b
            assert q.interrupts() == 1
            assert d.stats["requests"]["completion_batches"] == 1
    run(go())


def test_a_read_completed_after_a_pass_took_the_log_is_marked_when_it_completes():
    """A live migration's pre-copy pass may take the data path's dirty log while a read is
    in flight (popped, the backend still reading): the pages the read then fills, and its
    status byte, are marked when it completes — a mark made at the pop was taken by that
    pass, which sent the pages stale, and no later pass would have sent them again. A write
    marks only its status byte."""

    class Held(MemDisk):
        def __init__(self):
            super().__init__()
            self.asked = asyncio.Event()
            self.go = asyncio.Event()

        async def read(self, offset, length):
            self.asked.set()
            async with asyncio.timeout(5):
                await self.go.wait()
            return bytes(self.data[offset : offset + length])

    async def go():
        disk = Held()
        async with Dev(disk) as d:
            log = DeviceLog(d.h.mem)
            try:
                _, status, addr = d.c.build(T_IN, 16, in_len=3 * 4096)
                d.c.q.kick()
                async with asyncio.timeout(5):
                    await disk.asked.wait()  # popped, and the backend is reading
                log.take()  # the pass
                disk.go.set()
                await d.c.q.wait_used()
                assert d.h.mem.read(addr, 3 * 4096) == bytes(disk.data[8192 : 8192 + 3 * 4096])
                assert log.take() == DeviceLog.pages(addr, 3 * 4096) | DeviceLog.pages(status, 1)
                _, status, _ = d.c.build(T_OUT, 16, data=os.urandom(4096))
                d.c.q.kick()
                await d.c.q.wait_used()
                assert log.take() == DeviceLog.pages(status, 1)
            finally:
                log.stop()
    run(go())


def test_a_backend_that_raises_is_an_io_error_to_the_guest():
    disk = MemDisk()
    disk.fail_at = 4096

    async def go():
        async with Dev(disk) as d:
            assert (await d.c.run(T_IN, 8, in_len=512))[0] == S_IOERR
            assert (await d.c.run(T_OUT, 8, data=b"x" * 512))[0] == S_IOERR
            st, _, data = await d.c.run(T_IN, 0, in_len=512)  # the device carries on
            assert st == S_OK and data == bytes(disk.data[:512])
            s = d.stats
            assert s["backend"]["errors"] == 2 and s["requests"]["host_errors"] == 2
            assert not d.drv.status & Status.NEEDS_RESET
    run(go())


def test_a_backend_that_raises_cancelled_or_a_base_exception_fails_only_that_request():
    """A coroutine's own CancelledError (or another BaseException) is its request's I/O
    error: the rest of the batch completes, the device quiesces and resets."""

    class Fatal(BaseException):
        pass

    class Odd(MemDisk):
        async def read(self, offset, length):
            await asyncio.sleep(0)
            if offset == 8 * 512:
                raise asyncio.CancelledError()  # not the device's doing
            if offset == 16 * 512:
                raise Fatal("not an Exception")
            return bytes(self.data[offset : offset + length])

    async def go():
        disk = Odd()
        async with Dev(disk) as d:
            for batch in ([0, 8, 16, 24], [8], [16]):  # in one batch, and each alone
                reqs = [d.c.build(T_IN, sector, in_len=512) for sector in batch]
                d.c.q.kick()
                await d.c.q.wait_used(len(reqs))
                for sector, (_, status, addr) in zip(batch, reqs):
                    want = S_IOERR if sector in (8, 16) else S_OK
                    assert d.h.mem.read(status, 1)[0] == want, sector
                    if want == S_OK:
                        assert d.h.mem.read(addr, 512) == bytes(disk.data[sector * 512 : (sector + 1) * 512])
            assert d.stats["backend"]["errors"] == 4 and d.stats["backend"]["pending_batches"] == 0
            assert d.dev.device.quiesced()
            d.drv.set_status(0)  # a reset waits for nothing
            assert d.drv.status == 0
    run(go())


def test_short_reads_and_read_only_backends():
    class Short(MemDisk):
        async def read(self, offset, length):
            return bytes(length - 1)

    async def go():
        async with Dev(Short()) as d:
            assert (await d.c.run(T_IN, 0, in_len=512))[0] == S_IOERR
        ro = MemDisk(readonly=True)
        async with Dev(ro) as d:
            assert (await d.c.run(T_OUT, 0, data=b"y" * 512))[0] == S_IOERR  # refused in C
            assert d.stats["requests"]["ro_writes"] == 1 and not [c for c in ro.calls if c[0] == "write"]
    run(go())


def test_write_through_without_flush_negotiated():
    disk = MemDisk()

    async def go():
        h = Harness()
        dev = h.add(BackendBlk(disk, h.mem))
        drv = VirtioDriver(h, dev)
        offered = dev.device.features() | (1 << 32)  # VERSION_1
        try:
            await drv.setup(features=offered & ~(1 << lib.VIRTIO_BLK_F_FLUSH))
            c = BlkClient(drv)
            assert (await c.run(T_OUT, 0, data=b"z" * 512))[0] == S_OK
            assert disk.calls[-2:] == [("write", 0, 512), ("flush",)]  # durable before it completes
        finally:
            h.close()
    run(go())


def test_bad_backends_and_slots_are_refused_in_one_line():
    class NoSize(MemDisk):
        pass

    bad = NoSize()
    bad.size = 1000
    for cfg, words in [
        (VmConfig(kernel="/dev/null", block_backends={"d": bad}, slots=[PciSlot(0, 4, 0, "virtio-blk-backend", "d")]),
         "512-byte sectors"),
        (VmConfig(kernel="/dev/null", block_backends={"d": object()}, slots=[PciSlot(0, 4, 0, "virtio-blk-backend", "d")]),
         "no read or write"),
        (VmConfig(kernel="/dev/null", slots=[PciSlot(0, 4, 0, "virtio-blk-backend", "nope")]), "no block backend 'nope'"),
        (VmConfig(kernel="/dev/null", block_backends={"d": MemDisk()},
                  slots=[PciSlot(0, 4, 0, "virtio-blk-backend", "d,bogus")]), "unknown option 'bogus'"),
    ]:
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert asyncvmm.BlockBackend is BlockBackend


def _cow_example():
    spec = importlib.util.spec_from_file_location("cow_disk", ROOT / "tools" / "examples" / "cow_disk.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cow_disk"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_cow_example_through_the_harness(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(DISK))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    cow = _cow_example().CowDisk(str(base))

    async def go():
        async with Dev(cow) as d:
            orig = base.read_bytes()
            st, _, data = await d.c.run(T_IN, 7, in_len=8192)  # across blocks, from the base
            assert st == S_OK and data == orig[7 * 512 : 7 * 512 + 8192]
            new = os.urandom(3 * 512)
            assert (await d.c.run(T_OUT, 9, data=new))[0] == S_OK  # inside one block, then the next
            st, _, data = await d.c.run(T_IN, 7, in_len=8192)
            assert data == orig[7 * 512 : 9 * 512] + new + orig[12 * 512 : 7 * 512 + 8192]
            assert (await d.c.run(T_FLUSH))[0] == S_OK
            assert (await d.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(16, 8, 0)))[0] == S_OK
            assert (await d.c.run(T_WZ, payload=BLK_SEGMENT.pack(100, 3, 0)))[0] == S_OK
            st, _, data = await d.c.run(T_IN, 96, in_len=8 * 512)
            assert data == orig[96 * 512 : 100 * 512] + bytes(3 * 512) + orig[103 * 512 : 104 * 512]
            assert (await d.c.run(T_IN, 16, in_len=4096))[2] == bytes(4096)
            assert sorted(cow.overlay) == [1, 2, 12]
        assert cow.counts["read"] == 4 and cow.counts["write"] == 1 and cow.counts["flush"] >= 1
    try:
        run(go())
    finally:
        cow.close()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest  # the base is never written


def test_the_cow_example_keeps_every_write_of_a_batch_to_one_block(tmp_path):
    """Writes to one 4 KiB block in one batch both copy it from the base while the other
    waits: the first copy is kept and each write's data lands in it. A discard or zeroing
    of whole blocks copies nothing from the base."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(DISK))
    mod = _cow_example()
    cow = mod.CowDisk(str(base))

    async def go():
        async with Dev(cow) as d:
            orig = base.read_bytes()
            parts = {s: os.urandom(512) for s in (0, 1, 3, 6)}  # sectors of block 0
            reqs = [d.c.build(T_OUT, s, data=p) for s, p in parts.items()]
            d.c.q.kick()
            await d.c.q.wait_used(len(reqs))
            assert all(d.h.mem.read(status, 1)[0] == S_OK for _, status, _ in reqs)
            assert d.stats["backend"]["batches"] == 1
            st, _, data = await d.c.run(T_IN, 0, in_len=4096)
            want = bytearray(orig[:4096])
            for s, p in parts.items():
                want[s * 512 : (s + 1) * 512] = p
            assert st == S_OK and data == bytes(want)
            # 64 blocks discarded, and zeroed: no block of them copied, every one reads as zeros.
            assert (await d.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(64, 512, 0)))[0] == S_OK
            assert (await d.c.run(T_WZ, payload=BLK_SEGMENT.pack(1024, 512 + 4, 0)))[0] == S_OK
            assert all(cow.overlay[n] is mod.ZERO for n in range(8, 8 + 64))
            assert all(cow.overlay[n] is mod.ZERO for n in range(128, 128 + 64))
            assert isinstance(cow.overlay[192], bytearray)  # the half block zeroed: copied
            st, _, data = await d.c.run(T_IN, 60, in_len=8192)
            assert data == orig[60 * 512 : 64 * 512] + bytes(8192 - 2048)
            assert (await d.c.run(T_OUT, 65, data=b"w" * 512))[0] == S_OK  # into a zero block
            st, _, data = await d.c.run(T_IN, 64, in_len=1536)
            assert data == bytes(512) + b"w" * 512 + bytes(512)
            assert mod.ZERO == bytes(4096)  # the shared marker itself untouched
    try:
        run(go())
    finally:
        cow.close()


def test_the_cow_example_refuses_bad_arguments_in_one_line(tmp_path):
    script = ROOT / "tools" / "examples" / "cow_disk.py"
    for args, words in (([], "usage: cow_disk.py BASE.img"), ([str(tmp_path / "nope.img")], "nope.img: no such file"),
                        ([str(tmp_path / "a"), str(tmp_path / "b")], "usage:")):
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""
