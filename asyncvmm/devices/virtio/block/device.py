"""virtio-blk (virtio 1.2, 5.2): configuration, features, and the queues handed to C.

Python builds the device and answers the driver's setup; the requests themselves never
reach Python. At DRIVER_OK each queue's ioeventfd becomes a reader on the loop that calls
avmm_blk_kick (cext/blk.c: pop the batch, one submit), and the engine's eventfd one that
calls avmm_blk_complete (reap the whole batch, one interrupt per queue). A queue that keeps
coming is served a budget at a time, the loop's other callbacks in between.

Features offered: SEG_MAX, SIZE_MAX, BLK_SIZE, TOPOLOGY, FLUSH, DISCARD, WRITE_ZEROES, MQ,
RO for `ro`, and the transport's VERSION_1, RING_EVENT_IDX, INDIRECT_DESC. A driver that
does not take FLUSH gets a write-through disk (every write is on stable storage when it
completes), as 5.2.6.1 asks. GET_ID answers the serial.
"""

from __future__ import annotations

import asyncio
import os
import time

from ...._native import ffi, lib
from ....errors import ConfigError
from ....vstate.memory import GuestMemory
from ...pci.regs import ClassCode
from ..device import DeviceError, QueueConfig, VirtioDevice
from ....poll import POLL_MAX_NS, POLL_SLICE_NS, PollWindow
from ..spec import DeviceId, Feature, VqError, bits
from .image import BlockOptions, DiskImage, default_serial

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # a request's header and status take two descriptors of a chain
SIZE_MAX = 1 << 20  # largest buffer per descriptor (any would do: it is one iovec)
MAX_DISCARD_SECTORS = 0xFFFF_FFFF
MAX_WRITE_ZEROES_SECTORS = 0xFFFF_FFFF
DISCARD_ALIGNMENT_SECTORS = 8  # 4 KiB: the block size of the file systems images live on


class BlkFeature:
    SIZE_MAX = lib.VIRTIO_BLK_F_SIZE_MAX
    SEG_MAX = lib.VIRTIO_BLK_F_SEG_MAX
    RO = lib.VIRTIO_BLK_F_RO
    BLK_SIZE = lib.VIRTIO_BLK_F_BLK_SIZE
    FLUSH = lib.VIRTIO_BLK_F_FLUSH
    TOPOLOGY = lib.VIRTIO_BLK_F_TOPOLOGY
    MQ = lib.VIRTIO_BLK_F_MQ
    DISCARD = lib.VIRTIO_BLK_F_DISCARD
    WRITE_ZEROES = lib.VIRTIO_BLK_F_WRITE_ZEROES


ENGINE_KINDS = {"uring": lib.AVMM_ENGINE_URING, "sync": lib.AVMM_ENGINE_SYNC}
# Prototype, off by default: io_uring watches the doorbells beside the I/O, and after
# serving a batch the loop sleeps in io_uring up to this long for the next completion or
# doorbell (cext/blk.h avmm_blk_watch_kicks, avmm_blk_wait). It blocks the loop's other
# work for that long: measured, not yet the default (perf/README.md).
URING_WAIT_NS = int(os.environ.get("ASYNCVMM_BLK_URING_WAIT_NS", "0") or 0)


class VirtioBlk(VirtioDevice):
    device_id = DeviceId.BLOCK
    pci_class = ClassCode.MASS_STORAGE_OTHER

    def __init__(self, opts: BlockOptions, mem: GuestMemory, *, queues: int, name: str = "virtio-blk",
                 poll: bool = False):
        super().__init__(opts.queues or queues, QUEUE_SIZE)
        self.window = PollWindow(POLL_MAX_NS if poll else 0)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.image = DiskImage(opts)
        self._engine = ffi.NULL
        self._blk = ffi.NULL
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        self._completion_reader = False
        self._uring_wait = False
        self._resume: asyncio.Handle | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        img, opts = self.image, self.opts
        entries = min(self.num_queues * QUEUE_SIZE, 32768)
        self._engine = lib.avmm_engine_new(ENGINE_KINDS[opts.engine], entries)
        if self._engine == ffi.NULL:
            raise ConfigError(f"disk {img.path}: cannot set up its I/O engine ({opts.engine}): {ffi.errno}")
        serial = (opts.serial or default_serial(img.path)).encode()
        cfg = ffi.new("struct avmm_blk_config *")
        cfg.fd = img.fd_direct if opts.direct else img.fd
        cfg.fd_buffered = img.fd
        cfg.dio_align = img.dio_align
        cfg.flags = lib.AVMM_BLK_RO if opts.readonly else 0
        cfg.capacity = img.sectors
        cfg.seg_max = SEG_MAX
        cfg.max_discard_sectors = MAX_DISCARD_SECTORS
        cfg.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
        cfg.nqueues = self.num_queues
        cfg.queue_size_max = QUEUE_SIZE
        ffi.memmove(cfg.serial, serial.ljust(20, b"\0"), 20)
        self._blk = lib.avmm_blk_new(cfg, self.mem.c_table(), self._engine)
        if self._blk == ffi.NULL:
            raise ConfigError(f"disk {img.path}: cannot allocate its request slots")
        self._config = self._build_config()
        self.config_size = len(self._config)

    def _build_config(self) -> bytes:
        img = self.image
        c = ffi.new("struct virtio_blk_config *")
        c.capacity = img.sectors
        c.size_max = SIZE_MAX
        c.seg_max = SEG_MAX
        c.blk_size = img.logical_block
        exp = 0
        while (img.logical_block << (exp + 1)) <= img.physical_block:
            exp += 1
        c.physical_block_exp = exp
        c.alignment_offset = 0
        c.min_io_size = min(img.min_io // img.logical_block, 0xFFFF)
        c.opt_io_size = img.opt_io // img.logical_block
        c.num_queues = self.num_queues
        c.max_discard_sectors = MAX_DISCARD_SECTORS
        c.max_discard_seg = 1
        c.discard_sector_alignment = DISCARD_ALIGNMENT_SECTORS
        c.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
        c.max_write_zeroes_seg = 1
        c.write_zeroes_may_unmap = 1
        return bytes(ffi.buffer(c))

    # -- what the transport asks -----------------------------------------------------------
    def features(self) -> int:
        f = bits(BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.TOPOLOGY,
                 BlkFeature.FLUSH, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES)
        if self.opts.readonly:
            f |= bits(BlkFeature.RO)
        return f

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size], "little")

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        vq_flags = (lib.AVMM_VQ_EVENT_IDX if features & bits(Feature.RING_EVENT_IDX) else 0) | (
            lib.AVMM_VQ_INDIRECT if features & bits(Feature.RING_INDIRECT_DESC) else 0
        )
        writethrough = not features & bits(BlkFeature.FLUSH)
        lib.avmm_blk_set_flags(self._blk, lib.AVMM_BLK_WRITETHROUGH if writethrough else 0)
        for q in queues:
            irq = q.vector.c if q.vector is not None else ffi.NULL
            r = lib.avmm_blk_queue_setup(self._blk, q.index, q.size, q.desc, q.driver, q.device, vq_flags, irq,
                                         q.kick_fd)
            if r < 0:
                lib.avmm_blk_reset(self._blk)
                why = "not aligned" if r == -22 else "not in guest RAM"
                raise DeviceError(f"queue {q.index}: its rings at {q.desc:#x}/{q.driver:#x}/{q.device:#x} are {why}")
        self._loop = loop = asyncio.get_running_loop()
        if not self._completion_reader:
            loop.add_reader(lib.avmm_engine_fd(self._engine), self._complete)
            self._completion_reader = True
        if URING_WAIT_NS and self.opts.engine == "uring":
            self._uring_wait = lib.avmm_blk_watch_kicks(self._blk) == 0
        for q in queues:
            if not self._uring_wait:  # else io_uring watches the doorbells (see URING_WAIT_NS)
                loop.add_reader(q.kick_fd, self._kick, q.index)
                self._readers.append(q.kick_fd)
            self._kick(q.index)  # doorbells rung before DRIVER_OK

    def _kick(self, qi: int) -> None:
        self.window.woken(time.monotonic_ns())
        self._served(lib.avmm_blk_kick(self._blk, qi))

    def _complete(self) -> None:
        self.window.woken(time.monotonic_ns())
        self._served(lib.avmm_blk_complete(self._blk))

    def _served(self, n: int) -> None:
        """After a C call that served a batch: poll for the next, and come back soon to a
        queue that spent its budget (other callbacks run first)."""
        if n < 0:
            self._broken()
            return
        self._poll()
        if self._uring_wait:
            self._wait_in_uring()
        if self._resume is None and self._blk != ffi.NULL and lib.avmm_blk_again(self._blk):
            self._resume = self._loop.call_soon(self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        self._served(lib.avmm_blk_resume(self._blk))

    def _poll(self) -> None:
        """Spin briefly for the next kick or completion (asyncvmm.poll) while work comes."""
        w, blk = self.window, self._blk
        deadline = time.monotonic_ns() + POLL_SLICE_NS
        while w.ns and time.monotonic_ns() < deadline:
            n = lib.avmm_blk_poll(blk, w.ns)
            if n < 0:
                self._broken()
                return
            if n == 0:
                break
        w.gave_up()

    def _wait_in_uring(self) -> None:
        """Prototype (URING_WAIT_NS): sleep in io_uring for the completion of what was just
        submitted or the next doorbell, whichever comes first, and serve it; up to
        URING_WAIT_NS per wait, POLL_SLICE_NS in all, then back to the loop."""
        blk = self._blk
        deadline = time.monotonic_ns() + POLL_SLICE_NS
        while time.monotonic_ns() < deadline:
            n = lib.avmm_blk_wait(blk, URING_WAIT_NS)
            if n < 0:
                self._broken()
                return
            if n == 0:
                break

    def _broken(self) -> None:
        broken = [qi for qi in range(self.num_queues) if lib.avmm_blk_queue(self._blk, qi).broken]
        self._stop_queues()
        for qi in broken:
            vq = lib.avmm_blk_queue(self._blk, qi)
            self.needs_reset(f"queue {qi}: the driver broke the ring ({VqError(vq.last_error).name.lower()})")

    def _stop_queues(self) -> None:
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    def reset(self) -> None:
        self._stop_queues()
        if self._blk != ffi.NULL:
            lib.avmm_blk_reset(self._blk)

    def quiesced(self) -> bool:
        return self._blk == ffi.NULL or lib.avmm_blk_inflight(self._blk) == 0

    def stats(self) -> dict:
        if self._blk == ffi.NULL:
            return {}
        s = lib.avmm_blk_stats(self._blk)
        e = lib.avmm_engine_stats(self._engine)
        fields = ("reads", "writes", "flushes", "get_ids", "discards", "write_zeroes", "bytes_read",
                  "bytes_written", "unsupported", "bad_requests", "out_of_range", "ro_writes", "host_errors",
                  "short_retries", "bounced", "batches", "completion_batches")
        queues = []
        for qi in range(self.num_queues):
            vq = lib.avmm_blk_queue(self._blk, qi)
            st = vq.stats
            errors = {VqError(i).name.lower(): st.errors[i] for i in range(1, lib.AVMM_VQ_NR_ERRORS) if st.errors[i]}
            queues.append({"chains": st.chains, "notifies": st.notifies, "interrupts": st.interrupts,
                           "suppressed": st.suppressed, "errors": errors})
        return {
            "disk": self.image.path,
            "engine": self.opts.engine,
            "requests": {f: getattr(s, f) for f in fields},
            "engine_ops": {"ops": e.ops, "submits": e.submits, "reaps": e.reaps},
            "inflight": lib.avmm_blk_inflight(self._blk),
            "poll_window_ns": self.window.ns,
            "queues": queues,
        }

    def close(self) -> None:
        self._stop_queues()
        if self._loop is not None and self._completion_reader and self._engine != ffi.NULL:
            self._loop.remove_reader(lib.avmm_engine_fd(self._engine))
            self._completion_reader = False
        if self._blk != ffi.NULL:
            lib.avmm_blk_free(self._blk)  # waits for I/O still in flight into guest RAM
            self._blk = ffi.NULL
        if self._engine != ffi.NULL:
            lib.avmm_engine_free(self._engine)
            self._engine = ffi.NULL
        self.image.close()
