"""A split virtqueue as Python sees it: the C ring (cext/virtq.c) behind a small class.

The ring work — walking descriptors, checking every guest address, writing used entries,
deciding whether the driver wants an interrupt (NO_INTERRUPT / EVENT_IDX) — is C. This
module turns it into Python terms:

    vq = Virtqueue.setup(mem, queue_config, features)   # RingSetupError if the rings are bad
    chain = vq.pop()          # a Chain, or None; RingBroken if the driver broke the ring
    data = chain.read()       # the device-readable bytes
    n = chain.write(b"...")   # into the device-writable buffers
    vq.push(chain, n)         # a used entry, seen by the driver at
    vq.publish()              # ... which also raises the queue's interrupt if wanted
    vq.enable_notify()        # True: buffers came meanwhile, pop again

A queue whose data path is C (virtio-blk, virtio-net) is wrapped too (`Virtqueue(ptr)`):
its counters and its state come out the same way.

A chain the driver got wrong (a buffer outside RAM, readable after writable, too many
buffers) has `error` set; the ring itself is still sound. A ring that is not (a head or
next index out of range, a loop, an avail index that jumped) raises RingBroken: the
device must be reset by the driver (DEVICE_NEEDS_RESET).

Thread ownership: the loop's thread.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from enum import IntEnum

from ..._native import ffi, lib
from ...vstate.memory import GuestMemory
from .device import QueueConfig
from .spec import Feature, VqError, bits

DEFAULT_IOV_MAX = 64  # buffers per chain a Python-served queue takes (more: the chain fails)


class RingFlag:
    """enum avmm_vq_flags: what the driver negotiated that changes how the ring is run."""

    EVENT_IDX = lib.AVMM_VQ_EVENT_IDX  # VIRTIO_RING_F_EVENT_IDX: used_event / avail_event
    INDIRECT = lib.AVMM_VQ_INDIRECT  # VIRTIO_RING_F_INDIRECT_DESC: indirect tables allowed


# Negotiated feature -> ring flag.
FEATURE_FLAGS = {Feature.RING_EVENT_IDX: RingFlag.EVENT_IDX, Feature.RING_INDIRECT_DESC: RingFlag.INDIRECT}


def ring_flags(features: int) -> int:
    """The enum avmm_vq_flags for a queue of a device the driver gave `features`."""
    flags = 0
    for feature, flag in FEATURE_FLAGS.items():
        if features & bits(feature):
            flags |= flag
    return flags


class SetupFailure(IntEnum):
    """Why avmm_vq_setup (or a device's queue setup) refused a queue: its negated errno."""

    MISALIGNED = -errno.EINVAL  # a ring not aligned as 2.7 says, or a size not a power of two
    OUTSIDE_RAM = -errno.EFAULT  # a ring not wholly in guest RAM

    @property
    def why(self) -> str:
        return "not aligned" if self is SetupFailure.MISALIGNED else "not in guest RAM"


class RingSetupError(Exception):
    """The driver configured a queue whose rings cannot be used (the device needs a reset)."""

    def __init__(self, q: QueueConfig, failure: SetupFailure, what: str = "queue"):
        self.failure = failure
        name = f"queue {q.index}" if what == "queue" else what
        super().__init__(f"{name}: its rings at {q.desc:#x}/{q.driver:#x}/{q.device:#x} are {failure.why}")


def check_setup(r: int, q: QueueConfig, what: str = "queue") -> None:
    """Turn a C queue setup's return code into RingSetupError."""
    if r < 0:
        try:
            failure = SetupFailure(r)
        except ValueError:
            raise RingSetupError(q, SetupFailure.OUTSIDE_RAM, what) from None
        raise RingSetupError(q, failure, what)


class RingBroken(Exception):
    """The driver broke a ring's rules; `error` says how (VqError)."""

    def __init__(self, index: int, error: VqError):
        self.index = index
        self.error = error
        super().__init__(f"queue {index}: the driver broke the ring ({error.name.lower()})")


@dataclass
class VqState:
    """A queue's state as plain data: where its rings are and how far both sides got.

    Restored into a queue set up on the same rings, it carries on where it stopped: the
    next chain popped is the one after the last popped, used entries go after the last
    pushed, and interrupt suppression (EVENT_IDX) remembers what was last signalled."""

    index: int
    size: int
    desc: int
    driver: int
    device: int
    flags: int
    last_avail: int
    used_idx: int
    signalled_used: int
    signalled_valid: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VqState":
        return cls(**d)


class Chain:
    """One popped chain: `head`, the device-readable bytes and the device-writable room.

    `error` (a VqError, or None): a buffer the driver got wrong — the chain must be given
    back unused (push it with 0 bytes written)."""

    __slots__ = ("head", "nout", "nin", "out_len", "in_len", "error", "_iov", "_table")

    def __init__(self, c, iov, table):
        self.head = c.head
        self.nout, self.nin = c.nout, c.nin
        self.out_len, self.in_len = c.out_len, c.in_len
        self.error = VqError(c.err) if c.err else None
        self._iov = iov
        self._table = table  # guest RAM's C table: where a write is marked dirty

    def read(self, limit: int | None = None) -> bytes:
        """The device-readable buffers, concatenated (at most `limit` bytes)."""
        n = self.out_len if limit is None else min(limit, self.out_len)
        buf = ffi.new("uint8_t[]", n)
        got = lib.avmm_iov_to_buf(self._iov, self.nout, 0, buf, n)
        return ffi.buffer(buf, got)[:]

    def write(self, data: bytes, offset: int = 0) -> int:
        """Copy `data` into the device-writable buffers from `offset`: bytes written (and
        marked so in the data path's dirty log while one is kept: snapshot/dirty.py)."""
        n = lib.avmm_buf_to_iov(self._iov + self.nout, self.nin, offset, data, len(data))
        lib.avmm_gmem_mark_iov(self._table, self._iov + self.nout, self.nin, offset, n)
        return n


class Virtqueue:
    """One split virtqueue: Python's handle on a `struct avmm_vq`. See the module docstring."""

    def __init__(self, ptr, mem: GuestMemory, config: QueueConfig, *, iov_max: int = DEFAULT_IOV_MAX, keep=None):
        """`ptr`: a set-up struct avmm_vq * (a C data path's: avmm_blk_queue, avmm_net_queue)."""
        self._vq = ptr
        self._keep = keep  # what owns ptr's memory (ffi.new), kept alive with this object
        self.mem = mem
        self.config = config
        self.index = config.index
        self.iov_max = iov_max
        self.kick_fd = ptr.kick_fd

    @classmethod
    def setup(cls, mem: GuestMemory, q: QueueConfig, features: int, *, iov_max: int = DEFAULT_IOV_MAX,
              what: str = "queue") -> "Virtqueue":
        """A queue of the driver's configuration `q`, served from Python."""
        ptr = ffi.new("struct avmm_vq *")
        irq = q.vector.c if q.vector is not None else ffi.NULL
        r = lib.avmm_vq_setup(ptr, mem.c_table(), q.size, q.desc, q.driver, q.device, ring_flags(features), irq,
                              q.kick_fd)
        check_setup(r, q, what)
        ptr.index = q.index
        return cls(ptr, mem, q, iov_max=iov_max, keep=(irq, q.vector))

    @property
    def c(self):
        """The struct avmm_vq * (for the C data path)."""
        return self._vq

    @property
    def size(self) -> int:
        return self._vq.size

    @property
    def broken(self) -> VqError | None:
        return VqError(self._vq.last_error) if self._vq.broken else None

    # -- the ring ----------------------------------------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, or None; RingBroken if the ring broke."""
        iov = ffi.new("struct iovec[]", self.iov_max)
        c = ffi.new("struct avmm_chain *", {"iov": iov, "iov_cap": self.iov_max})
        table = self.mem.c_table()
        r = lib.avmm_vq_pop(self._vq, table, c)
        if r < 0:
            raise RingBroken(self.index, VqError(self._vq.last_error or VqError.AVAIL_IDX))
        if r == 0:
            return None
        return Chain(c, iov, table)

    def unpop(self, n: int = 1) -> None:
        """Give back the last `n` popped chains, not pushed: they are popped again later."""
        lib.avmm_vq_unpop(self._vq, n)

    def push(self, chain: Chain | int, written: int) -> None:
        """A used entry: the chain (or head) with `written` bytes in its writable buffers."""
        lib.avmm_vq_push(self._vq, chain if isinstance(chain, int) else chain.head, written)

    def publish(self) -> None:
        """Show the driver the used entries pushed so far; interrupt it if it wants that."""
        lib.avmm_vq_publish(self._vq)

    def pending(self) -> int:
        return lib.avmm_vq_pending(self._vq)

    # -- notifications -------------------------------------------------------------------
    def drain_kick(self) -> None:
        """Reset the doorbell eventfd (counted as a notification)."""
        lib.avmm_vq_drain_kick(self._vq)

    def enable_notify(self) -> bool:
        """Ask for a doorbell at the next buffer; True if buffers arrived meanwhile."""
        return bool(lib.avmm_vq_enable_notify(self._vq))

    def disable_notify(self) -> None:
        """Ask for no doorbells while the device polls; enable_notify before it sleeps."""
        lib.avmm_vq_disable_notify(self._vq)

    # -- state and counters --------------------------------------------------------------
    def state(self) -> VqState:
        v, q = self._vq, self.config
        return VqState(self.index, v.size, q.desc, q.driver, q.device, v.flags, v.last_avail, v.used_idx,
                       v.signalled_used, bool(v.signalled_valid))

    def restore(self, s: VqState) -> None:
        """Carry on from `s` (a queue set up on the same rings, not yet used)."""
        v = self._vq
        if (v.size, v.flags) != (s.size, s.flags):
            raise ValueError(f"queue {self.index}: state of a {s.size}-entry queue (flags {s.flags}), "
                             f"this one has {v.size} (flags {v.flags})")
        v.last_avail = s.last_avail & 0xFFFF
        v.used_idx = s.used_idx & 0xFFFF
        v.signalled_used = s.signalled_used & 0xFFFF
        v.signalled_valid = int(s.signalled_valid)

    def stats(self) -> dict:
        st = self._vq.stats
        errors = {VqError(i).name.lower(): st.errors[i] for i in range(1, lib.AVMM_VQ_NR_ERRORS) if st.errors[i]}
        return {"chains": st.chains, "notifies": st.notifies, "interrupts": st.interrupts,
                "suppressed": st.suppressed, "errors": errors}
