"""virtio-blk whose disk is a Python object with coroutines: the block backend API for
embedders (`asyncvmm.VM` in an asyncio service that serves the guest's disk itself).

    class MyDisk(BlockBackend):
        size = 64 << 20                      # bytes, a multiple of 512
        readonly = False
        async def read(self, offset, length) -> bytes: ...
        async def write(self, offset, data) -> None: ...
        async def flush(self) -> None: ...   # optional: what was written is durable
        async def discard(self, offset, length) -> None: ...  # optional: reads as zeros after

    VmConfig(..., block_backends={"data": MyDisk()},
             slots=[PciSlot(0, 4, 0, "virtio-blk-backend", "data")])

Requests stay batched, and the guest's side of them stays in C: the walker (cext/blk.c)
pops every request of a doorbell, checks it (buffers in guest RAM, sectors in range, a
write to a read-only disk, GET_ID) and turns it into ops, exactly as for a file; the
device's engine is an EXTERNAL one (cext/ioengine.c), which hands the batch to Python once
per doorbell instead of to io_uring. Python runs the batch's coroutines concurrently
(asyncio.gather), copies between them and guest memory, and completes the batch at once:
one reap in C, one interrupt. A coroutine that raises fails its request with
VIRTIO_BLK_S_IOERR (counted as a host error), and the device carries on — whatever it
raises, even CancelledError of its own: only the device's close cancels a batch.

A driver that does not negotiate FLUSH gets a write-through disk: each write is followed
by flush() before it completes (5.2.6.1), as the file engine uses RWF_DSYNC.
"""

from __future__ import annotations

import abc
import asyncio
import errno
from dataclasses import dataclass
from typing import Any

from ...._native import ffi, lib
from ....config import PciSlot, VmConfig
from ....errors import ConfigError
from ....log import get_logger
from ....vstate.memory import GuestMemory
from ...registry import register, slot_name
from ..transport_pci import virtio_pci_function
from .device import VirtioBlk
from .image import BlockOptions

log = get_logger(__name__)

SECTOR = 512
TAKE_MAX = 256  # ops taken from C per call (a doorbell's batch is at most a queue's size)
ZERO_CHUNK = 1 << 20  # write_zeroes' default writes zeros this much at a time


class BlockBackend(abc.ABC):
    """A disk served by coroutines. `size` (bytes, a multiple of 512) and `readonly` are
    read once, when the device is made. Offsets and lengths are bytes, always whole
    sectors and within `size` (the device checks them before the backend is asked)."""

    size: int
    readonly: bool = False

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer is an I/O error to the guest)."""

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes) -> None:
        """`data` at `offset`."""

    async def flush(self) -> None:
        """Everything written so far is durable. (Default: nothing to do.)"""
        return None

    async def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range; it must read as zeros afterwards (the device
        also uses this for WRITE_ZEROES with the UNMAP flag). Default: write_zeroes."""
        await self.write_zeroes(offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros over the range. Default: write() a MiB of zeros at a time."""
        zeros = bytes(min(length, ZERO_CHUNK))
        for at in range(offset, offset + length, ZERO_CHUNK):
            await self.write(at, zeros[: min(ZERO_CHUNK, offset + length - at)])


def check_backend(backend: Any, what: str) -> None:
    """A backend the device can serve, or ConfigError (one line)."""
    missing = [m for m in ("read", "write") if not callable(getattr(backend, m, None))]
    if missing:
        raise ConfigError(f"{what}: {type(backend).__name__} has no {' or '.join(missing)} coroutine "
                          "(see asyncvmm.BlockBackend)")
    size = getattr(backend, "size", None)
    if not isinstance(size, int) or size < SECTOR or size % SECTOR:
        raise ConfigError(f"{what}: size={size!r}: a disk is a whole number of 512-byte sectors, at least one")


@dataclass
class BackendImage:
    """What VirtioBlk reads of a disk image, for a backend (no file, no fds)."""

    path: str
    sectors: int
    fd: int = -1
    fd_direct: int = -1
    dio_align: int = 0
    logical_block: int = SECTOR
    physical_block: int = SECTOR
    min_io: int = SECTOR
    opt_io: int = 0

    def close(self) -> None:
        pass


@dataclass
class _Op:
    opcode: int
    off: int
    length: int
    flags: int
    user_data: int
    bufs: list  # the guest's buffers (cffi buffers into guest RAM)


class BackendBlk(VirtioBlk):
    """virtio-blk on a BlockBackend (see the module docstring)."""

    def __init__(self, backend: BlockBackend, mem: GuestMemory, *, queues: int = 1, name: str = "virtio-blk",
                 label: str = "backend", serial: str = ""):
        check_backend(backend, name)
        self.backend = backend
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._take = ffi.new("struct avmm_io_op[]", TAKE_MAX)
        self.counters = {"batches": 0, "ops": 0, "errors": 0}
        opts = BlockOptions(label, bool(getattr(backend, "readonly", False)), False, serial, queues, "external")
        # No busy-polling: a request's completion comes from the loop itself, never from a
        # device the loop could spin on.
        super().__init__(opts, mem, queues=queues, name=name, poll=False)

    def _open_image(self, opts: BlockOptions) -> BackendImage:
        return BackendImage(opts.path, self.backend.size // SECTOR)

    # -- the batch, from C to the coroutines and back ----------------------------------------
    def _served(self, n: int) -> None:
        super()._served(n)
        self._dispatch()

    def _dispatch(self) -> None:
        """Take what C submitted (a doorbell's batch) and start it as one task."""
        if self._closed or self._engine == ffi.NULL:
            return
        ops: list[_Op] = []
        while (n := lib.avmm_engine_take(self._engine, self._take, TAKE_MAX)) > 0:
            for i in range(n):
                o = self._take[i]
                bufs = [ffi.buffer(o.iov[k].iov_base, o.iov[k].iov_len) for k in range(o.niov)]
                ops.append(_Op(o.opcode, o.off, o.len, o.flags, o.user_data, bufs))
        if ops:
            task = asyncio.get_running_loop().create_task(self._run(ops))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, ops: list[_Op]) -> None:
        results: list[int | BaseException]
        if len(ops) == 1:  # nothing to overlap: no task per op
            results = [await self._one(ops[0])]
        else:
            # Every op's result, whatever another one raised: a batch is completed whole.
            results = await asyncio.gather(*(self._one(op) for op in ops), return_exceptions=True)
        if self._closed:
            return
        for op, res in zip(ops, results):
            if isinstance(res, BaseException):  # only what _one re-raises: KeyboardInterrupt, SystemExit
                res = -errno.EIO
            lib.avmm_engine_complete(self._engine, op.user_data, res)
        self.counters["batches"] += 1
        self.counters["ops"] += len(ops)
        # Reaped here, at once (used entries, one interrupt), not one trip around the loop
        # later through the engine's eventfd; it may start what waited for slots.
        self._complete()

    async def _one(self, op: _Op) -> int:
        """One op through the backend: bytes moved, 0, or -EIO."""
        b = self.backend
        try:
            if op.opcode == lib.AVMM_IO_READV:
                total = sum(len(buf) for buf in op.bufs)
                data = await b.read(op.off, total)
                if len(data) != total:
                    raise OSError(errno.EIO, f"read {len(data)} of {total} bytes at {op.off}")
                if self._closed:
                    return -errno.EIO  # the guest's RAM may be gone: touch nothing
                at = 0
                for buf in op.bufs:
                    buf[:] = data[at : at + len(buf)]
                    at += len(buf)
                return total
            if op.opcode == lib.AVMM_IO_WRITEV:
                data = b"".join(buf[:] for buf in op.bufs)  # taken before the first await
                await b.write(op.off, data)
                if op.flags & lib.RWF_DSYNC:  # write-through: durable before it completes
                    await b.flush()
                return len(data)
            if op.opcode == lib.AVMM_IO_FSYNC:
                await b.flush()
                return 0
            if op.opcode == lib.AVMM_IO_FALLOCATE:
                if op.flags & lib.FALLOC_FL_PUNCH_HOLE:
                    await b.discard(op.off, op.length)
                else:
                    await b.write_zeroes(op.off, op.length)
                return 0
            return -errno.EINVAL
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if self._closed or (task is not None and task.cancelling()):
                raise  # the device is closing: nothing completes
            return self._failed(e)  # the backend's own cancellation: this request's failure
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the backend's failure is the guest's I/O error, not the VMM's
            return self._failed(e)

    def _failed(self, e: BaseException) -> int:
        self.counters["errors"] += 1
        if self.counters["errors"] == 1:
            log.warning(f"{self.name}: the backend failed a request (I/O error to the guest; "
                        f"later ones only counted): {type(e).__name__}: {e}")
        return -errno.EIO

    # -- stats, close -------------------------------------------------------------------
    def stats(self) -> dict:
        s = super().stats()
        if s:
            s["backend"] = {"type": type(self.backend).__name__, **self.counters, "pending_batches": len(self._tasks)}
        return s

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()  # none completes into the device from now on
        self._tasks.clear()
        super().close()


# -- `-s N,virtio-blk-backend,NAME[,serial=ID][,queues=N]` (VmConfig.block_backends[NAME]) ----
def _parse(slot: PciSlot) -> tuple[str, str, int]:
    what = f"-s {slot_name(slot)}virtio-blk-backend,{slot.options}"
    parts = slot.options.split(",") if slot.options else []
    if not parts or not parts[0]:
        raise ConfigError(f"{what}: say which backend: virtio-blk-backend,NAME (a key of VmConfig.block_backends)")
    serial, queues = "", 1
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if key == "serial" and sep and len(value.encode()) <= 20 and value.isprintable():
            serial = value
        elif key == "queues" and value.isdigit() and 1 <= int(value) <= 64:
            queues = int(value)
        else:
            raise ConfigError(f"{what}: unknown option {p!r} (serial=ID of up to 20 bytes, queues=1-64)")
    return parts[0], serial, queues


def _check(slot: PciSlot, cfg: VmConfig) -> None:
    name, _, _ = _parse(slot)
    what = f"-s {slot_name(slot)}virtio-blk-backend,{slot.options}"
    backends = getattr(cfg, "block_backends", {})
    if name not in backends:
        raise ConfigError(f"{what}: no block backend {name!r} (an embedder gives them: "
                          "VmConfig(block_backends={NAME: a BlockBackend}))")
    check_backend(backends[name], what)


def _build(slot: PciSlot, ctx):
    name, serial, queues = _parse(slot)
    where = f"{slot.slot}.{slot.function}"
    blk = BackendBlk(ctx.config.block_backends[name], ctx.mem, queues=queues, name=f"virtio-blk@{where}",
                     label=f"backend:{name}", serial=serial or f"avmm-{name}"[:20])
    return virtio_pci_function(blk, ctx)


register("virtio-blk-backend", _check, _build)
