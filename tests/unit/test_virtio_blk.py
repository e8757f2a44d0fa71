"""virtio-blk through its PCI transport, driven by the host-side driver (no guest CPU).

Every test runs against both engines (io_uring and plain syscalls): the device code is
the same, so a difference between them is a bug in one.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess

import pytest
from asyncvmm._native import lib

from asyncvmm.devices.virtio.block.backend import BackendImage
from asyncvmm.devices.virtio.block.device import SEG_MAX, VirtioBlk
from asyncvmm.devices.virtio.block.image import BlockOptions
from asyncvmm.devices.virtio.device import QueueConfig
from asyncvmm.devices.virtio.spec import Common, Feature, Status, bits
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import BLK_SEGMENT, BlkClient, BlkRig, DeviceLog, Harness, VirtioDriver

T_IN, T_OUT, T_FLUSH, T_GET_ID = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH, lib.VIRTIO_BLK_T_GET_ID
T_DISCARD, T_WZ = lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES
S_OK, S_IOERR, S_UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP
DISK = 4 << 20


@pytest.fixture(params=["uring", "sync"])
def engine(request):
    return request.param


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK)
        f.seek(0)
        f.write(bytes(range(256)) * 16)  # sector 0..7: a pattern
    return path


def run(coro):
    return asyncio.run(coro)


class Blk(BlkRig):
    """A harness with one virtio-blk, set up by the driver."""

    def __init__(self, path, engine, **opts):
        super().__init__(lambda mem: VirtioBlk(BlockOptions(str(path), engine=engine, **opts), mem,
                                               queues=opts.get("queues", 1) or 1))

    @property
    def stats(self):
        return self.dev.device.stats()["requests"]


def test_read_write_flush_get_id(image, engine):
    async def go():
        async with Blk(image, engine, serial="disk-7") as b:
            st, n, data = await b.c.run(T_IN, 0, in_len=1024)
            assert (st, n, data) == (S_OK, 1025, (bytes(range(256)) * 4))
            st, n, _ = await b.c.run(T_OUT, 100, data=b"A" * 4096)
            assert (st, n) == (S_OK, 1)
            st, n, _ = await b.c.run(T_FLUSH)
            assert (st, n) == (S_OK, 1)
            st, n, data = await b.c.run(T_IN, 100, in_len=4096)
            assert st == S_OK and data == b"A" * 4096
            st, n, data = await b.c.run(T_GET_ID, in_len=20)
            assert (st, n, data) == (S_OK, 21, b"disk-7".ljust(20, b"\0"))
            st, n, data = await b.c.run(T_GET_ID, in_len=4)  # a short buffer gets what fits
            assert (st, n, data) == (S_OK, 5, b"disk")
            s = b.stats
            assert (s["reads"], s["writes"], s["flushes"], s["get_ids"]) == (2, 1, 1, 2)
    run(go())
    with open(image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(4096) == b"A" * 4096


def test_scattered_buffers_and_indirect_chains(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            mem, heap, q = b.h.mem, b.h.heap, b.c.q
            hdr, status = heap.alloc(16), heap.alloc(1)
            parts = [heap.alloc(512) for _ in range(5)]
            for i, p in enumerate(parts):
                mem.write(p, bytes([0x10 + i]) * 512)
            mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, 40))
            q.add([(hdr, 16, False)] + [(p, 512, False) for p in parts] + [(status, 1, True)], indirect=True)
            q.kick()
            await q.wait_used()
            assert mem.read(status, 1) == b"\0"
            st, _, data = await b.c.run(T_IN, 40, in_len=5 * 512, indirect=True)
            assert st == S_OK and data == b"".join(bytes([0x10 + i]) * 512 for i in range(5))
    run(go())


def test_what_a_request_wrote_is_marked_dirty_once_written(image, engine):
    """With a dirty log kept (a diff snapshot, a migration), each request marks the pages
    it wrote — a read's data and status byte, GET_ID's serial, a write's or a failed
    request's status byte only — and nothing it was handed and did not write."""
    async def go():
        async with Blk(image, engine, serial="marked") as b:
            log = DeviceLog(b.h.mem)
            pages = DeviceLog.pages

            async def one(type_, sector, **kw):
                _, status, addr = b.c.build(type_, sector, **kw)
                b.c.q.kick()
                await b.c.q.wait_used()
                return status, addr

            try:
                status, addr = await one(T_IN, 0, in_len=2 * 4096)
                assert b.h.mem.read(addr, 512) == bytes(range(256)) * 2
                assert log.take() == pages(addr, 2 * 4096) | pages(status, 1)
                status, addr = await one(T_GET_ID, 0, in_len=3 * 4096)  # 20 bytes of it written
                assert log.take() == pages(addr, 20) | pages(status, 1)
                status, _ = await one(T_OUT, 8, data=b"w" * 4096)
                assert log.take() == pages(status, 1)
                status, _ = await one(T_IN, DISK // 512, in_len=4096)  # past the end: fails
                assert b.h.mem.read(status, 1)[0] == S_IOERR and log.take() == pages(status, 1)
            finally:
                log.stop()
    run(go())


class PipeBlk(VirtioBlk):
    """A virtio-blk whose disk is a pipe: a read stays in flight, in io_uring, until the test
    writes the data (the kernel then writes the guest's buffers, long after the pop)."""

    def __init__(self, fd, mem):
        self._fd = fd
        super().__init__(BlockOptions("pipe", engine="uring"), mem, queues=1)

    def _open_image(self, opts):
        return BackendImage(opts.path, DISK // 512, fd=self._fd)


def test_a_read_in_flight_across_a_pass_is_marked_when_the_kernel_completes_it():
    """The disk's own thread pops a read and io_uring waits on the (pipe) disk; a migration's
    pre-copy pass takes the dirty log meanwhile. When the kernel has written the data the
    pages are marked again, so the next pass sends them: else the destination's guest would
    read what was there before the read."""
    r, w = os.pipe()

    async def go():
        async with BlkRig(lambda mem: PipeBlk(r, mem)) as b:
            assert b.dev.device.stats()["thread"]["serving"]
            log = DeviceLog(b.h.mem)
            try:
                _, status, addr = b.c.build(T_IN, 0, in_len=3 * 4096)
                b.c.q.kick()
                async with asyncio.timeout(5):
                    while b.dev.device.stats()["requests"]["reads"] < 1:  # popped: in io_uring now
                        await asyncio.sleep(0.001)
                await asyncio.sleep(0.01)
                log.take()  # the pass
                data = os.urandom(3 * 4096)
                os.write(w, data)
                await b.c.q.wait_used()
                assert b.h.mem.read(addr, 3 * 4096) == data and b.h.mem.read(status, 1)[0] == S_OK
                assert log.take() == DeviceLog.pages(addr, 3 * 4096) | DeviceLog.pages(status, 1)
            finally:
                log.stop()
    try:
        run(go())
    finally:
        os.close(r)
        os.close(w)


def test_requests_the_guest_got_wrong(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            sectors = DISK // 512
            assert (await b.c.run(T_IN, sectors, in_len=512))[0] == S_IOERR  # past the end
            assert (await b.c.run(T_IN, sectors - 1, in_len=1024))[0] == S_IOERR  # runs past the end
            assert (await b.c.run(T_IN, (1 << 64) - 1, in_len=512))[0] == S_IOERR  # sector * 512 overflows
            assert (await b.c.run(T_IN, 0, in_len=100))[0] == S_IOERR  # not whole sectors
            assert (await b.c.run(0x77, 0, in_len=512))[0] == S_UNSUPP  # unknown type
            assert b.stats["out_of_range"] == 3 and b.stats["bad_requests"] == 1 and b.stats["unsupported"] == 1
            # A buffer outside guest RAM: that request fails, the status byte says so.
            mem, heap, q = b.h.mem, b.h.heap, b.c.q
            hdr, status = heap.alloc(16), heap.alloc(1)
            mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
            mem.write(status, b"\xff")
            q.add([(hdr, 16, False), (mem.size - 256, 512, True), (status, 1, True)])
            q.kick()
            await q.wait_used()
            assert mem.read(status, 1)[0] == S_IOERR
            # A request with no header at all.
            q.add([(status, 1, True)])
            q.kick()
            await q.wait_used()
            assert mem.read(status, 1)[0] == S_IOERR
            # ... and the device goes on.
            st, _, data = await b.c.run(T_IN, 0, in_len=512)
            assert st == S_OK and data == bytes(range(256)) * 2
            assert b.drv.status & Status.NEEDS_RESET == 0
    run(go())


def test_a_broken_ring_needs_reset_and_other_devices_go_on(image, engine, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(b"B" * 8192)

    async def go():
        h = Harness()
        try:
            d1 = h.add(VirtioBlk(BlockOptions(str(image), engine=engine), h.mem, queues=1))
            d2 = h.add(VirtioBlk(BlockOptions(str(other), engine=engine), h.mem, queues=1))
            drv1, drv2 = VirtioDriver(h, d1), VirtioDriver(h, d2)
            await drv1.setup()
            await drv2.setup()
            q = drv1.queues[0]
            buf = h.heap.alloc(512)
            q.write_desc(q.desc, 0, buf, 512, 1, 1)  # 0 -> 1 -> 0: a loop
            q.write_desc(q.desc, 1, buf, 512, 1, 0)
            q.publish(0)
            config_irqs_before = drv1.interrupts(0)
            q.kick()
            for _ in range(100):
                await asyncio.sleep(0.001)
                if drv1.status & Status.NEEDS_RESET:
                    break
            assert drv1.status & Status.NEEDS_RESET
            assert drv1.interrupts(0) == config_irqs_before + 1  # the config-change interrupt
            assert d1.device.stats()["queues"][0]["errors"] == {"loop": 1}
            st, _, data = await BlkClient(drv2).run(T_IN, 0, in_len=512)
            assert st == S_OK and data == b"B" * 512
            # A reset brings the broken device back.
            await drv1.setup()
            st, _, _ = await BlkClient(drv1).run(T_IN, 0, in_len=512)
            assert st == S_OK
        finally:
            h.close()
    run(go())


def test_read_only_disk(image, engine):
    before = image.read_bytes()

    async def go():
        async with Blk(image, engine, readonly=True) as b:
            assert b.drv.has(lib.VIRTIO_BLK_F_RO)
            assert (await b.c.run(T_OUT, 0, data=b"X" * 512))[0] == S_IOERR
            seg = BLK_SEGMENT.pack(0, 8, 0)
            assert (await b.c.run(T_DISCARD, payload=seg))[0] == S_IOERR
            assert (await b.c.run(T_WZ, payload=seg))[0] == S_IOERR
            assert (await b.c.run(T_FLUSH))[0] == S_OK
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK
            assert b.stats["ro_writes"] == 3
    run(go())
    assert image.read_bytes() == before


def test_discard_and_write_zeroes(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            assert (await b.c.run(T_OUT, 64, data=b"Z" * 8192))[0] == S_OK
            assert (await b.c.run(T_WZ, payload=BLK_SEGMENT.pack(64, 8, 0)))[0] == S_OK
            assert (await b.c.run(T_IN, 64, in_len=8192))[2] == bytes(4096) + b"Z" * 4096
            assert (await b.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(72, 8, 0)))[0] == S_OK
            assert (await b.c.run(T_IN, 72, in_len=4096))[2] == bytes(4096)  # a hole in a raw image reads zeros
            assert (await b.c.run(T_WZ, payload=BLK_SEGMENT.pack(0, 8, lib.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))[0] == S_OK
            assert (await b.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(0, 8, 1)))[0] == S_UNSUPP  # UNMAP on a discard
            assert (await b.c.run(T_WZ, payload=BLK_SEGMENT.pack(0, 8, 2)))[0] == S_UNSUPP  # unknown flag
            assert (await b.c.run(T_WZ, payload=BLK_SEGMENT.pack(DISK // 512 - 4, 8, 0)))[0] == S_IOERR
            two = BLK_SEGMENT.pack(0, 8, 0) * 2  # max_discard_seg is 1
            assert (await b.c.run(T_DISCARD, payload=two))[0] == S_IOERR
    run(go())


def test_config_space(image, engine):
    async def go():
        async with Blk(image, engine, queues=2) as b:
            d = b.drv
            assert struct.unpack("<Q", struct.pack("<II", d.config_read(0, 4), d.config_read(4, 4)))[0] == DISK // 512
            assert d.config_read(12, 4) == SEG_MAX
            assert d.config_read(20, 4) == 512  # blk_size
            assert d.config_read(34, 2) == 2  # num_queues
            assert d.config_read(40, 4) == 1  # max_discard_seg
            capacity = d.config_read(0, 4)
            d.write(0x2000, 4, 12345)  # config is read-only: dropped and counted
            assert d.config_read(0, 4) == capacity
            assert b.dev.counters["config_writes"] == 1
            for f in (lib.VIRTIO_BLK_F_SEG_MAX, lib.VIRTIO_BLK_F_SIZE_MAX, lib.VIRTIO_BLK_F_BLK_SIZE,
                      lib.VIRTIO_BLK_F_TOPOLOGY, lib.VIRTIO_BLK_F_FLUSH, lib.VIRTIO_BLK_F_DISCARD,
                      lib.VIRTIO_BLK_F_WRITE_ZEROES, lib.VIRTIO_BLK_F_MQ, Feature.VERSION_1,
                      Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC):
                assert d.has(f), f
            assert not d.has(lib.VIRTIO_BLK_F_RO)
    run(go())


def test_a_batch_is_one_submit_and_one_interrupt(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            q = b.c.q
            # One request first: the device has started (its own thread may take the first
            # turn later than the driver's set-up) and has signalled once (EVENT_IDX's
            # signalled_used is valid from then on: completions reaped in two goes still make
            # one interrupt).
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK
            s0 = b.dev.device.stats()
            q.set_used_event(q.used_idx() + 31)  # the driver wants to hear once the 32nd completes
            q.interrupts()
            for i in range(32):
                b.c.build(T_IN, 8 * i, in_len=4096)
            q.kick()
            await q.wait_used(32)
            await asyncio.sleep(0.01)
            assert q.interrupts() == 1
            s = b.dev.device.stats()
            assert s["requests"]["batches"] - s0["requests"]["batches"] == 1
            assert s["engine_ops"]["submits"] - s0["engine_ops"]["submits"] == 1
    run(go())


def test_a_full_ring_is_served_a_budget_at_a_time(image, engine):
    # A guest that keeps the ring full (bad requests are answered at once, their slots come
    # straight back) must not keep the loop to itself: the loop runs between batches.
    async def go():
        async with Blk(image, engine) as b:
            q = b.c.q
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK  # started: nothing is served before the kick
            batches = b.stats["batches"]
            statuses = [b.c.build(0x77, 0, in_len=512, indirect=True)[1] for _ in range(200)]
            watch = q.watch_used()
            q.kick()
            await q.wait_used(200)
            seen = watch.stop()
            if not b.dev.device.stats()["thread"].get("serving"):  # the device's own thread keeps no loop busy
                assert any(0 < idx < 200 for idx in seen), seen  # the guest saw a batch before the rest
            assert all(b.h.mem.read(st, 1)[0] == S_UNSUPP for st in statuses)
            assert b.stats["unsupported"] == 200 and b.stats["batches"] - batches == 2
            assert (await b.c.run(T_IN, 0, in_len=512))[0] == S_OK
    run(go())


def test_multiqueue(image, engine):
    async def go():
        async with Blk(image, engine, queues=4) as b:
            assert len(b.drv.queues) == 4
            for i in range(4):
                c = BlkClient(b.drv, i)
                assert (await c.run(T_OUT, 200 + i, data=bytes([i]) * 512))[0] == S_OK
            for i in range(4):
                assert (await BlkClient(b.drv, 3 - i).run(T_IN, 200 + i, in_len=512))[2] == bytes([i]) * 512
            assert [q["chains"] for q in b.dev.device.stats()["queues"]] == [2, 2, 2, 2]
    run(go())


def test_host_io_error_reaches_the_guest(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            os.truncate(image, 4096)  # the image shrinks under the VM: reads past its end fail
            st, n, _ = await b.c.run(T_IN, 64, in_len=512)
            assert st == S_IOERR
            assert b.stats["host_errors"] == 1
    run(go())


def test_full_host_disk_is_an_io_error_not_success(tmp_path, engine):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        img = mnt / "sparse.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)  # 16 MiB image on a 1 MiB file system

        async def go():
            async with Blk(img, engine) as b:
                statuses = [(await b.c.run(T_OUT, 2048 * i, data=b"F" * 262144))[0] for i in range(8)]
                assert S_IOERR in statuses and statuses[0] == S_OK
                assert b.stats["host_errors"] >= 1
        run(go())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_direct_io_and_unaligned_buffers(tmp_path, engine):
    img = tmp_path / "direct.img"
    img.write_bytes(b"D" * (1 << 20))

    async def go():
        try:
            b = Blk(img, engine, direct=True)
        except ConfigError as e:
            pytest.skip(str(e))
        async with b:
            assert (await b.c.run(T_OUT, 8, data=b"q" * 4096))[0] == S_OK  # heap buffers are 512-aligned
            mem, heap, q = b.h.mem, b.h.heap, b.c.q
            hdr, status = heap.alloc(16), heap.alloc(1)
            buf = heap.alloc(8192) + 3  # an odd address: O_DIRECT refuses it, the page cache takes it
            mem.write(buf, b"u" * 4096)
            mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, 16))
            q.add([(hdr, 16, False), (buf, 4096, False), (status, 1, True)])
            q.kick()
            await q.wait_used()
            assert mem.read(status, 1)[0] == S_OK
            assert b.stats["bounced"] == 1
            assert (await b.c.run(T_IN, 8, in_len=8192))[2] == b"q" * 4096 + b"u" * 4096
    run(go())


def test_without_flush_negotiated_the_disk_is_write_through(image, engine):
    async def go():
        async with Blk(image, engine):
            pass
        h = Harness()
        try:
            dev = h.add(VirtioBlk(BlockOptions(str(image), engine=engine), h.mem, queues=1))
            drv = VirtioDriver(h, dev)
            offered = bits(Feature.VERSION_1, Feature.RING_EVENT_IDX)
            await drv.setup(features=offered)
            st, _, _ = await BlkClient(drv).run(T_OUT, 8, data=b"w" * 512)
            assert st == S_OK
        finally:
            h.close()
    run(go())
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(512) == b"w" * 512


@pytest.mark.parametrize("conf,message", [
    ("missing.img", "no such file"),
    ("odd.img", "not a whole number"),
    ("dir", "is a directory"),
])
def test_images_that_cannot_be_disks(tmp_path, conf, message):
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    (tmp_path / "dir").mkdir()
    h = Harness()
    try:
        with pytest.raises(ConfigError, match=message):
            VirtioBlk(BlockOptions(str(tmp_path / conf)), h.mem, queues=1)
    finally:
        h.close()


def test_an_image_in_use_by_another_vm_is_refused(image):
    h = Harness()
    try:
        first = VirtioBlk(BlockOptions(str(image)), h.mem, queues=1)
        with pytest.raises(ConfigError, match="in use by another VM"):
            VirtioBlk(BlockOptions(str(image)), h.mem, queues=1)
        with pytest.raises(ConfigError, match="in use by another VM"):
            VirtioBlk(BlockOptions(str(image), readonly=True), h.mem, queues=1)
        first.close()
        ro1 = VirtioBlk(BlockOptions(str(image), readonly=True), h.mem, queues=1)
        ro2 = VirtioBlk(BlockOptions(str(image), readonly=True), h.mem, queues=1)  # readers share
        ro1.close()
        ro2.close()
    finally:
        h.close()


def test_options():
    assert BlockOptions.parse("a.img,ro,direct,serial=xyz,queues=3,engine=sync") == BlockOptions(
        "a.img", True, True, "xyz", 3, "sync")
    for bad in ("", ",ro", "a.img,rw", "a.img,serial=" + "x" * 21, "a.img,queues=0", "a.img,engine=aio"):
        with pytest.raises(ConfigError):
            BlockOptions.parse(bad)


def test_queue_registers_after_driver_ok_need_reset(image, engine):
    async def go():
        async with Blk(image, engine) as b:
            b.drv.common_write(Common.QUEUE_SELECT, 2, 0)
            b.drv.common_write(Common.QUEUE_SIZE, 2, 16)
            assert b.drv.status & Status.NEEDS_RESET
            assert b.drv.common_read(Common.QUEUE_SIZE, 2) != 16
    run(go())


@pytest.fixture
def loop_device(tmp_path):
    """A block device (a loop device over a file), detached afterwards."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


def test_a_block_device_as_the_disk(loop_device, engine):
    async def go():
        async with Blk(loop_device, engine) as b:
            capacity = b.drv.config_read(0, 4) | b.drv.config_read(4, 4) << 32
            assert capacity == (8 << 20) // 512
            assert (await b.c.run(T_OUT, 2048, data=b"L" * 4096))[0] == S_OK
            assert (await b.c.run(T_FLUSH))[0] == S_OK
            assert (await b.c.run(T_IN, 2048, in_len=4096))[2] == b"L" * 4096
            assert (await b.c.run(T_DISCARD, payload=BLK_SEGMENT.pack(2048, 8, 0)))[0] == S_OK
            assert (await b.c.run(T_IN, 2048, in_len=4096))[2] == bytes(4096)
            assert (await b.c.run(T_IN, capacity, in_len=512))[0] == S_IOERR
    run(go())
    with open(loop_device, "rb") as f:
        assert f.read(512) == bytes(512)


def test_state_out_and_back_in(image, engine):
    """A second virtio-blk restored from the first's state carries on on the same rings:
    no request is served twice, the used ring goes on where it was."""
    async def go():
        async with Blk(image, engine) as b:
            for i in range(3):
                st, _, _ = await b.c.run(T_OUT, 200 + i, data=bytes([i]) * 512)
                assert st == S_OK
            state = json.loads(json.dumps(b.dev.device.save()))  # plain data
            assert state["queues"][0]["last_avail"] == 3 and state["queues"][0]["used_idx"] == 3
            b.dev.device.reset()
            b.dev.device.close()  # the image's lock goes with it
            second = VirtioBlk(BlockOptions(str(image), engine=engine), b.h.mem, queues=1)
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                q = b.c.q
                second.restore(state)  # taken at activate, before the queue is served
                second.activate(b.drv.features, [QueueConfig(0, q.size, q.desc, q.avail, q.used, None, kick)])
                head, status, data = b.c.build(T_IN, 201, in_len=512)
                os.eventfd_write(kick, 1)
                assert await q.wait_used(1) == [(head, 513)]
                assert b.h.mem.read(status, 1)[0] == S_OK and b.h.mem.read(data, 512) == bytes([1]) * 512
                assert q.used_idx() == 4
                assert second.stats()["requests"]["writes"] == 0  # the three writes were not done again
            finally:
                second.close()
                os.close(kick)
    run(go())


def test_a_probed_raw_disk_keeps_looking_raw(image, engine):
    """Detected raw (no format=raw): the guest cannot write another format's magic where the
    next probe looks (sector 0, the last sector), as QEMU's raw driver refuses for a probed
    image; other writes there, and any write with format=raw, go through."""
    last = DISK // 512 - 1
    before = image.read_bytes()

    async def go(fmt):
        async with Blk(image, engine, format="raw", probed=fmt == "") as b:
            refused = [
                await b.c.run(T_OUT, 0, data=b"QFI\xfb\0\0\0\3".ljust(512, b"\0")),
                await b.c.run(T_OUT, 0, data=bytes(0x40) + struct.pack("<I", 0xBEDA107F) + bytes(4028)),
                await b.c.run(T_OUT, last, data=b"koly".ljust(512, b"\0")),
                await b.c.run(T_OUT, last - 7, data=bytes(7 * 512) + b"conectix".ljust(512, b"\0")),
            ]
            ok = await b.c.run(T_OUT, 0, data=b"\x55\xaa" * 256)  # an MBR, say
            return [r[0] for r in refused], ok[0], b.stats["format_writes"]

    statuses, ok, n = run(go(""))
    assert statuses == [S_IOERR] * 4 and ok == S_OK and n == 4
    after = image.read_bytes()
    assert after[:512] == b"\x55\xaa" * 256 and after[512:] == before[512:]
    statuses, ok, n = run(go("raw"))  # said explicitly: the guest's bytes, whatever they are
    assert statuses == [S_OK] * 4 and n == 0
