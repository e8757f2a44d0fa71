"""virtio-blk (virtio 1.2, 5.2): configuration, features, and the queues handed to C.

Python builds the device and answers the driver's setup; the requests themselves never
reach Python. An io_uring disk whose queues interrupt through eventfds (MSI-X, MSI) is
served by a thread of its own (cext/blk_thread.h, QEMU's iothread model): io_uring watches
the doorbells beside the I/O, so one io_uring_enter submits a batch and waits for the next
doorbell or completion, and the thread polls a little for the next request when the host
has a CPU for it. The loop only parks it (reset, queue set-up, a snapshot's hold) and hears from
it when a ring broke. Otherwise (the sync engine, INTx, ASYNCVMM_BLK_THREAD=0) the loop
serves the device: each queue's ioeventfd a reader (the device's QueueWorker, ../worker.py)
that calls avmm_blk_kick (cext/blk.c: pop the batch, one submit), the engine's eventfd one
that calls avmm_blk_complete (reap the whole batch, one interrupt per queue); a queue that
keeps coming is served a budget at a time, the loop's other callbacks in between.

Features offered: SEG_MAX, SIZE_MAX, BLK_SIZE, TOPOLOGY, FLUSH, DISCARD, WRITE_ZEROES, MQ,
RO for `ro`, and the transport's VERSION_1, RING_EVENT_IDX, INDIRECT_DESC. A driver that
does not take FLUSH gets a write-through disk (every write is on stable storage when it
completes), as 5.2.6.1 asks. GET_ID answers the serial.
"""

from __future__ import annotations

import os
import shutil
import stat
import time

from .... import seccomp
from ...._native import ffi, lib
from ....config import PciSlot, VmConfig, check_readable
from ....errors import ConfigError
from ....log import get_logger
from ....poll import POLL_MAX_NS, POLL_SLICE_NS
from ....vstate.memory import GuestMemory
from ...pci.regs import ClassCode
from ...registry import register, slot_name
from ...slots import may_poll, thread_may_poll
from ..device import DeviceError, QueueConfig, VirtioDevice
from ..queue import RingSetupError, Virtqueue, VqState, check_setup, ring_flags
from ..spec import DeviceId, bits
from ..transport_pci import virtio_pci_function
from ..worker import QueueWorker
from .formats import MAGICS, QCOW_MAGIC, RAW, check_format
from .image import SECTOR, BlockOptions, DiskImage, default_serial, disk_options, needs_backend

log = get_logger(__name__)

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


# Prototype, off by default (perf/README): io_uring watches the doorbells beside the I/O, so
# one wait in io_uring (up to this many ns) serves both. Measured slower at QD1, so off.
URING_WAIT_NS = int(os.environ.get("ASYNCVMM_BLK_URING_WAIT_NS", "0") or 0)

# The device's own thread (cext/blk_thread.h) for io_uring disks on eventfd vectors; 0: the
# loop serves them (the model before it, kept for comparison: perf/ab.py --b-env).
THREAD = os.environ.get("ASYNCVMM_BLK_THREAD", "1") != "0"

# "external": the ops go to Python coroutines (backend.py), never a `-s` option.
ENGINE_KINDS = {"uring": lib.AVMM_ENGINE_URING, "sync": lib.AVMM_ENGINE_SYNC, "external": lib.AVMM_ENGINE_EXTERNAL}


class VirtioBlk(VirtioDevice):
    device_id = DeviceId.BLOCK
    pci_class = ClassCode.MASS_STORAGE_OTHER

    def __init__(self, opts: BlockOptions, mem: GuestMemory, *, queues: int, name: str = "virtio-blk",
                 poll: bool = False, thread_poll: bool = False, seccomp: str = "off"):
        """`poll`: the loop may busy-poll for this device; `thread_poll`: its own thread may
        (asyncvmm.poll); `seccomp`: the mode of its thread's filter (asyncvmm.seccomp)."""
        super().__init__(opts.queues or queues, QUEUE_SIZE)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.worker = QueueWorker(name, self.needs_reset, poll=poll)
        self.queues: list[Virtqueue] = []  # the active ones (C's), for counters, state, breakdown
        self.image = self._open_image(opts)
        self._engine = ffi.NULL
        self._blk = ffi.NULL
        self._uring_wait = False  # io_uring watches the doorbells (URING_WAIT_NS)
        self._thread_poll = thread_poll
        self._seccomp = seccomp
        self._thread = ffi.NULL  # the device's own thread (blk_thread.h), once started
        self._threaded = False  # this activation is served by it (else it is parked, if it exists)
        self._notify_fd = -1  # the thread's word to the loop: a ring broke, a write was refused
        self._hold_parked = False  # parked by _park, to be let go by _unpark
        self.worker.on_hold(self._park, self._unpark)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _open_image(self, opts: BlockOptions):
        """What the device serves (a subclass may serve something else than a file)."""
        return DiskImage(opts)

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
        self._format_writes = ffi.new("uint64_t *")
        self._format_writes_said = 0
        if opts.probed and opts.format == RAW:
            _guard_format(cfg, self._format_writes)
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
        if self._threaded:  # parked while the loop sets the queues up; _start_thread lets it go
            lib.avmm_blk_thread_park(self._thread)
            self._threaded = False
        writethrough = not features & bits(BlkFeature.FLUSH)
        lib.avmm_blk_set_flags(self._blk, lib.AVMM_BLK_WRITETHROUGH if writethrough else 0)
        self.queues = []
        for q in queues:
            irq = q.vector.c if q.vector is not None else ffi.NULL
            r = lib.avmm_blk_queue_setup(self._blk, q.index, q.size, q.desc, q.driver, q.device,
                                         ring_flags(features), irq, q.kick_fd)
            try:
                check_setup(r, q)
            except RingSetupError as e:
                lib.avmm_blk_reset(self._blk)
                raise DeviceError(str(e)) from None
            self.queues.append(Virtqueue(lib.avmm_blk_queue(self._blk, q.index), self.mem, q))
        state = self.take_restored()
        if state is not None:
            self._apply_state(state)
        w = self.worker
        w.start()
        if self._can_thread(queues):
            self._start_thread()
            return
        self._stop_threading()
        w.watch(lib.avmm_engine_fd(self._engine), self._complete, persistent=True)
        self._uring_wait = bool(URING_WAIT_NS) and self.opts.engine == "uring" and \
            lib.avmm_blk_watch_kicks(self._blk) == 0
        for q in queues:
            if not self._uring_wait:
                w.watch(q.kick_fd, self._kick, q.index)
            self._kick(q.index)  # doorbells rung before DRIVER_OK

    # -- the device's own thread ---------------------------------------------------------
    def _can_thread(self, queues: list[QueueConfig]) -> bool:
        """io_uring, and every queue interrupts through an eventfd (a level INTx line or an
        ISR byte is the loop's to lower and read)."""
        return THREAD and not URING_WAIT_NS and self.opts.engine == "uring" and all(
            q.vector is None or (q.vector.c.set_line == ffi.NULL and q.vector.c.isr == ffi.NULL) for q in queues)

    def _start_thread(self) -> None:
        """Activate on the device's thread: called with the queues set up (the thread, if it
        exists, parked by activate())."""
        w = self.worker
        w.unwatch(lib.avmm_engine_fd(self._engine))  # an earlier activation's, on the loop
        if lib.avmm_engine_set_threaded(self._engine, 1) < 0:  # the thread arms the doorbells' watches
            raise DeviceError(f"{self.name}: cannot hand its queues to io_uring")
        if self._notify_fd < 0:
            self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        w.watch(self._notify_fd, self._notified)
        if self._thread == ffi.NULL:
            cfg = ffi.new("struct avmm_blk_thread_config *")
            cfg.poll_max_ns = POLL_MAX_NS if self._thread_poll else 0
            cfg.notify_fd = self._notify_fd
            cfg.seccomp_action = seccomp.action(self._seccomp)
            ffi.memmove(cfg.name, (b"blk" + self.name.removeprefix("virtio-blk").encode())[:15].ljust(16, b"\0"), 16)
            t = lib.avmm_blk_thread_start(self._blk, self._engine, cfg)
            if t == ffi.NULL:
                raise DeviceError(f"{self.name}: cannot start its thread: {os.strerror(ffi.errno)}")
            self._thread = t
        else:
            lib.avmm_blk_thread_unpark(self._thread)  # it serves every queue once: doorbells before DRIVER_OK
        self._threaded = True

    def _stop_threading(self) -> None:
        """This activation is the loop's: the thread (if any) stays parked, the engine
        signals its eventfd again."""
        if lib.avmm_engine_set_threaded(self._engine, 0) < 0:
            raise DeviceError(f"{self.name}: cannot hand its queues back to the loop")

    def _park(self) -> None:
        """A hold: parked if it serves; _unpark undoes exactly that park, whatever came
        between (an activation during the hold changes _threaded)."""
        if self._threaded and not self._hold_parked:
            lib.avmm_blk_thread_park(self._thread)
            self._hold_parked = True

    def _unpark(self) -> None:
        if self._hold_parked:
            self._hold_parked = False
            lib.avmm_blk_thread_unpark(self._thread)

    def _notified(self) -> None:
        """The thread's word: a ring broke, or a guest write was refused."""
        try:
            os.eventfd_read(self._notify_fd)
        except BlockingIOError:
            pass
        if self._format_writes[0] != self._format_writes_said:
            self._say_format_writes()
        if lib.avmm_blk_needs_reset(self._blk):
            self.worker.broken(self.queues)

    # -- served on the loop ----------------------------------------------------------------
    def _kick(self, qi: int) -> None:
        self.worker.woken()
        self._served(lib.avmm_blk_kick(self._blk, qi))

    def _complete(self) -> None:
        self.worker.woken()
        self._served(lib.avmm_blk_complete(self._blk))

    def _served(self, n: int) -> None:
        """After a C call that served a batch: poll for the next, and come back soon to a
        queue that spent its budget (other callbacks run first)."""
        if self._format_writes[0] != self._format_writes_said:
            self._say_format_writes()
        if n < 0 or not self.worker.poll(self._poll_step):
            self.worker.broken(self.queues)
            return
        if self._uring_wait and not self._wait_in_uring():
            self.worker.broken(self.queues)
            return
        if self._blk != ffi.NULL and lib.avmm_blk_again(self._blk):
            self.worker.soon("resume", self._resumed)

    def _say_format_writes(self) -> None:
        if not self._format_writes_said:
            log.warning(f"{self.name}: refused a guest write that would make {self.image.path} look like another "
                        "format's image (its format was detected raw; format=raw lets the guest write it)")
        self._format_writes_said = self._format_writes[0]

    def _poll_step(self, max_ns: int) -> int:
        return lib.avmm_blk_poll(self._blk, max_ns)

    def _wait_in_uring(self) -> bool:
        """Prototype (URING_WAIT_NS): sleep in io_uring for the completion of what was just
        submitted or the next doorbell, whichever comes first, and serve it; up to
        URING_WAIT_NS per wait, POLL_SLICE_NS in all, then back to the loop. False: the
        ring broke."""
        deadline = time.monotonic_ns() + POLL_SLICE_NS
        while time.monotonic_ns() < deadline:
            n = lib.avmm_blk_wait(self._blk, URING_WAIT_NS)
            if n < 0:
                return False
            if n == 0:
                break
        return True

    def _resumed(self) -> None:
        self._served(lib.avmm_blk_resume(self._blk))

    # -- state -------------------------------------------------------------------------
    def save(self) -> dict:
        """The device's state as plain data (with no request in flight: after quiesced())."""
        return {"queues": [vq.state().to_dict() for vq in self.queues]}

    def _apply_state(self, state: dict) -> None:
        """save()'s data onto the queues the driver has set up the same way."""
        by_index = {vq.index: vq for vq in self.queues}
        for d in state["queues"]:
            s = VqState.from_dict(d)
            if s.index not in by_index:
                raise ValueError(f"{self.name}: queue {s.index} is not active")
            by_index[s.index].restore(s)

    def reset(self) -> None:
        self.worker.stop()
        self.queues = []
        if self._blk == ffi.NULL:
            return
        if self._threaded:
            # Parked for the reset itself; then it reaps the requests in flight, which complete
            # into nothing (as the loop's persistent reader does when the loop serves).
            lib.avmm_blk_thread_park(self._thread)
            lib.avmm_blk_reset(self._blk)
            lib.avmm_blk_thread_unpark(self._thread)
            return
        lib.avmm_blk_reset(self._blk)  # requests in flight still complete (the persistent reader)

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
        queues = [Virtqueue(lib.avmm_blk_queue(self._blk, qi), self.mem,
                            QueueConfig(qi, 0, 0, 0, 0, None, -1)).stats() for qi in range(self.num_queues)]
        return {
            "disk": self.image.path,
            "engine": self.opts.engine,
            "requests": {**{f: getattr(s, f) for f in fields}, "format_writes": self._format_writes[0]},
            # depth_ns: the integral of the requests submitted and not yet reaped over time
            "engine_ops": {"ops": e.ops, "submits": e.submits, "reaps": e.reaps, "depth_ns": e.depth_ns},
            "inflight": lib.avmm_blk_inflight(self._blk),
            "poll_window_ns": self._thread_stats()["poll_ns"] if self._thread != ffi.NULL else self.worker.window.ns,
            "thread": self._thread_stats(),
            "queues": queues,
        }

    def _thread_stats(self) -> dict:
        if self._thread == ffi.NULL:
            return {}
        t = lib.avmm_blk_thread_stats(self._thread)
        return {"serving": self._threaded, "turns": t.turns, "waits": t.waits, "polls": t.polls,
                "poll_hits": t.poll_hits, "poll_ns": t.poll_ns, "poll_preempted": t.poll_preempted, "parks": t.parks,
                "seccomp_failed": bool(t.seccomp_failed)}

    def close(self) -> None:
        self.worker.stop(closing=True)
        if self._thread != ffi.NULL:
            lib.avmm_blk_thread_stop(self._thread)  # joined: nothing but this thread touches the device now
            self._thread = ffi.NULL
            self._threaded = False
        if self._notify_fd >= 0:
            os.close(self._notify_fd)
            self._notify_fd = -1
        if self._blk != ffi.NULL:
            lib.avmm_blk_free(self._blk)  # waits for I/O still in flight into guest RAM
            self._blk = ffi.NULL
        if self._engine != ffi.NULL:
            lib.avmm_engine_free(self._engine)
            self._engine = ffi.NULL
        self.image.close()


def _guard_format(cfg, counter) -> None:
    """A disk detected raw (no format=raw): C refuses the guest's writes that would put another
    format's magic where formats.py looks, as QEMU's raw driver does for a probed image; else
    the next VM would serve the guest's own header (a qcow2 naming a host file as backing)."""
    magics = [(0, False, QCOW_MAGIC)] + [(m.offset % SECTOR, m.offset < 0, m.magic) for m in MAGICS]
    assert len(magics) <= lib.AVMM_BLK_MAX_MAGICS
    for i, (offset, tail, magic) in enumerate(magics):
        cfg.magics[i].offset, cfg.magics[i].tail, cfg.magics[i].len = offset, tail, len(magic)
        ffi.memmove(cfg.magics[i].bytes, magic, len(magic))
    cfg.nmagics = len(magics)
    cfg.format_writes = counter


# -- `-s N,virtio-blk,PATH[,ro][,direct][,serial=ID][,queues=N][,engine=uring|sync]` ------
def _check(slot: PciSlot, cfg: VmConfig) -> None:
    opts = BlockOptions.parse(slot.options, slot_name(slot))
    if opts.vhost_user:
        _check_socket(opts.vhost_user, slot)
        return
    check_readable(opts.path, "disk")
    found = check_format(opts.path, opts.format)
    if not found.raw and shutil.which("qemu-storage-daemon") is None:
        raise ConfigError(f"disk {opts.path} is a {found.what} image: asyncvmm serves raw images itself and other "
                          "formats through qemu-storage-daemon, which is not installed (apt-get install "
                          "qemu-system-common); format=raw serves its bytes as they are")
    for other in cfg.slots:  # the image's lock would refuse it at start, as if another VM held it
        if other is slot:
            break
        if other.driver == "virtio-blk":
            theirs = BlockOptions.parse(other.options, slot_name(other))
            if _same_file(theirs.path, opts.path) and not (theirs.readonly and opts.readonly):
                raise ConfigError(f"-s {slot_name(slot)}virtio-blk,{slot.options}: {opts.path} is already the disk in "
                                  f"slot {other.slot}:{other.function} (one image, one writable disk; "
                                  "read-only ones, ,ro, may share it)")


def _check_socket(path: str, slot: PciSlot) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"-s {slot_name(slot)}virtio-blk,vhost-user={path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"-s {slot_name(slot)}virtio-blk,vhost-user={path}: not a Unix socket")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _build(slot: PciSlot, ctx):
    opts = disk_options(slot, ctx.host)
    where = f"{slot.slot}.{slot.function}"
    if needs_backend(opts):
        from ..vhost_user.blk import VhostUserBlk  # noqa: PLC0415 (only VMs with such a disk load it)

        backend = ctx.host.backends.get((slot.slot, slot.function)) if ctx.host is not None else None
        if backend is None:
            raise ConfigError(f"-s {slot_name(slot)}virtio-blk,{slot.options}: its vhost-user back-end was not "
                              "connected (HostResources.prepare)")
        return virtio_pci_function(VhostUserBlk(backend, ctx.mem, queues=opts.queues or ctx.config.cpus,
                                                name=f"virtio-blk@{where}"), ctx)
    blk = VirtioBlk(opts, ctx.mem, queues=ctx.config.cpus, name=f"virtio-blk@{slot.slot}.{slot.function}",
                    poll=may_poll(ctx), thread_poll=thread_may_poll(ctx), seccomp=ctx.config.seccomp)
    return virtio_pci_function(blk, ctx)


def _shares_memory(slot: PciSlot, host=None) -> bool:
    return needs_backend(disk_options(slot, host))


register("virtio-blk", _check, _build, shares_memory=_shares_memory)
