"""virtio-blk with a vhost-user back-end: the guest's rings are served by another process.

The front-end is the transport and this device model; the data path is the back-end's.
At DRIVER_OK the device hands the back-end what it needs to serve the rings on its own:
guest RAM (the memfd, SET_MEM_TABLE), each ring's addresses, its doorbell (the transport's
ioeventfd: SET_VRING_KICK) and its interrupt (the MSI-X vector's irqfd: SET_VRING_CALL).
From then on a request goes guest → KVM → back-end → KVM → guest without this process.

Interrupts other than MSI-X (one MSI message with -W, INTx) need the ISR set beside the
interrupt, so for them the back-end's call eventfd is relayed on the loop. So is an MSI-X
vector's while the driver masks it (the back-end is given the relay with SET_VRING_CALL,
and the relay sets the pending bit; unmasked, it gets the irqfd back), as QEMU does.

A reset from the driver stops every ring (GET_VRING_BASE; the status reads back 0 once the
back-end has answered each). A back-end that goes away (EOF, an error on a ring's ERR
eventfd, a refused request) sets DEVICE_NEEDS_RESET with a configuration interrupt; the
VMM carries on.
"""

from __future__ import annotations

import functools
import os

from ...._native import ffi, lib
from ....errors import GuestMemoryError
from ....irq import MsiVector
from ....log import get_logger
from ....vstate.memory import GuestMemory
from ...pci.regs import ClassCode
from ..device import DeviceError, QueueConfig, VirtioDevice
from ..spec import DeviceId, avail_ring_bytes, desc_table_bytes, used_ring_bytes
from .backend import Backend
from .protocol import (
    F_PROTOCOL_FEATURES,
    VRING_ADDR,
    Request,
    VhostUserError,
    mem_table,
    parse_u64,
    u64,
    vring_fd,
    vring_state,
)

log = get_logger(__name__)

QUEUE_SIZE = 256  # the largest ring offered (qemu-storage-daemon's export takes up to 1024)
# The device-specific bits (0-23) but CONFIG_WCE: a write to `writeback` would need SET_CONFIG.
DEVICE_FEATURES = ((1 << 24) - 1) & ~(1 << lib.VIRTIO_BLK_F_CONFIG_WCE)
# The configuration space up to write_zeroes_may_unmap and its padding (virtio 1.1): what
# back-ends know (QEMU 7.2's refuses a longer GET_CONFIG); the zoned fields need F_ZONED.
CONFIG_SIZE = ffi.offsetof("struct virtio_blk_config", "write_zeroes_may_unmap") + 4
NUM_QUEUES_OFFSET = ffi.offsetof("struct virtio_blk_config", "num_queues")
VIRTIO_BLK_F_MQ = lib.VIRTIO_BLK_F_MQ


class VhostUserBlk(VirtioDevice):
    device_id = DeviceId.BLOCK
    pci_class = ClassCode.MASS_STORAGE_OTHER
    # The back-end writes guest RAM itself: no dirty log of ours sees it (the protocol's
    # LOG_SHMFD is not spoken) and no hold stops it, so a snapshot or a migration could
    # copy a page before a read lands in it. snapshot/take.py refuses them.
    writes_guest_ram_unseen = True

    def __init__(self, backend: Backend, mem: GuestMemory, *, queues: int, name: str = "virtio-blk"):
        nq = max(1, min(queues, backend.queues))
        super().__init__(nq, QUEUE_SIZE)
        self.name = name
        self.backend = backend
        self.mem = mem
        config = bytearray(backend.config)
        if backend.features >> VIRTIO_BLK_F_MQ & 1:
            config[NUM_QUEUES_OFFSET : NUM_QUEUES_OFFSET + 2] = nq.to_bytes(2, "little")
        self._config = bytes(config)
        self.config_size = len(self._config)
        self._calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq)]  # relayed interrupts
        self._errs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq)]
        self._watched: list[int] = []
        self._unwatch_masks: list = []
        self._active: list[int] = []  # the queues the back-end serves
        self._stopping = 0  # GET_VRING_BASE replies still to come
        self.counters = {"activations": 0, "resets": 0, "relayed_interrupts": 0, "ring_errors": 0}
        self._unsubscribe = backend.conn.on_lost(self._lost)

    # -- what the transport asks -----------------------------------------------------------
    def features(self) -> int:
        return self.backend.features & DEVICE_FEATURES

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size], "little")

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        conn, mem = self.backend.conn, self.mem
        if conn.lost is not None:  # (and it stays in NEEDS_RESET: nothing to serve the rings)
            raise DeviceError(f"vhost-user back-end {self.backend.what} is gone ({conn.lost})")
        if mem.memfd < 0:
            raise DeviceError("guest memory is not shared (a vhost-user device needs it made so)")
        try:
            rings = [(q, mem.hva(q.desc, desc_table_bytes(q.size)), mem.hva(q.driver, avail_ring_bytes(q.size)),
                      mem.hva(q.device, used_ring_bytes(q.size))) for q in queues]
        except GuestMemoryError as e:
            raise DeviceError(f"a ring is outside guest RAM: {e}") from None
        try:
            self._hand_over(features, rings)
        except VhostUserError as e:  # the back-end went away just now
            raise DeviceError(str(e)) from None
        self.counters["activations"] += 1

    def _hand_over(self, features: int, rings: list) -> None:
        """Guest RAM and each ring to the back-end: from now on it serves them."""
        mem = self.mem
        self._send(Request.SET_FEATURES, u64(features | 1 << F_PROTOCOL_FEATURES))
        regions = [(r.gpa, r.size, r.hva, r.offset) for r in mem.regions]
        self._send(Request.SET_MEM_TABLE, mem_table(regions), [mem.memfd] * len(regions))
        for q, desc, avail, used in rings:
            i = q.index
            self._send(Request.SET_VRING_NUM, vring_state(i, q.size))
            self._send(Request.SET_VRING_ADDR, VRING_ADDR.pack(i, 0, desc, used, avail, 0))
            self._send(Request.SET_VRING_BASE, vring_state(i, 0))
            self._send(Request.SET_VRING_KICK, *vring_fd(i, q.kick_fd))
            self._send(Request.SET_VRING_CALL, *vring_fd(i, self._call_fd(q)))
            self._send(Request.SET_VRING_ERR, *vring_fd(i, self._errs[i]))
            self._watch(self._errs[i], self._ring_error, i)
            self._send(Request.SET_VRING_ENABLE, vring_state(i, 1))
            self._active.append(i)

    def _call_fd(self, q: QueueConfig) -> int | None:
        v = q.vector
        if v is None:
            return None
        fd = self._calls[q.index]
        self._watch(fd, self._relay, (fd, v))
        if isinstance(v, MsiVector) and v.c.isr == ffi.NULL:  # MSI-X
            self._unwatch_masks.append(v.watch_mask(functools.partial(self._mask_changed, q.index, v)))
            if not v.masked:
                return v.efd  # the back-end writes the irqfd itself
        return fd

    def _mask_changed(self, index: int, vector: MsiVector, masked: bool) -> None:
        """The driver (un)masked a queue's MSI-X vector: the back-end calls the relay
        while it is masked, the irqfd while it is not."""
        if self.backend.conn.lost is not None or index not in self._active:
            return
        fd = self._calls[index]
        self._send(Request.SET_VRING_CALL, *vring_fd(index, fd if masked else vector.efd))
        if not masked and _drain(fd):  # came while masked, not yet relayed: pending (unmask delivers it once)
            self.counters["relayed_interrupts"] += 1
            vector.c.pending = 1

    def _send(self, request: Request, payload: bytes = b"", fds=()) -> None:
        """A setup message; with REPLY_ACK a refusal puts the device in NEEDS_RESET."""
        fut = self.backend.conn.send(request, payload, fds, need_reply=self.backend.reply_ack)
        if fut is not None:
            fut.add_done_callback(functools.partial(self._acked, request))

    def _acked(self, request: Request, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # a lost back-end is reported once, by _lost
        try:
            status = parse_u64(fut.result(), f"{request.name}'s REPLY_ACK")
        except VhostUserError as e:  # a short reply is no success
            self.needs_reset(f"vhost-user back-end {self.backend.what}: {e}")
            return
        if status:
            self.needs_reset(f"vhost-user back-end {self.backend.what} refused {request.name} ({status})")

    # -- the loop's side: relayed interrupts, ring errors ----------------------------------
    def _watch(self, fd: int, cb, arg) -> None:
        self.backend.conn.loop.add_reader(fd, cb, arg)
        self._watched.append(fd)

    def _unwatch(self) -> None:
        for fd in self._watched:
            self.backend.conn.loop.remove_reader(fd)
        self._watched.clear()
        for unwatch in self._unwatch_masks:
            unwatch()
        self._unwatch_masks.clear()

    def _relay(self, arg) -> None:
        fd, vector = arg
        if _drain(fd):
            self.counters["relayed_interrupts"] += 1
            lib.avmm_irq_raise(vector.c)

    def _ring_error(self, index: int) -> None:
        if _drain(self._errs[index]):
            self.counters["ring_errors"] += 1
            self.needs_reset(f"vhost-user back-end {self.backend.what} reported an error on queue {index}")

    def _lost(self, why: str) -> None:
        self._unwatch()
        self._stopping = 0
        self.needs_reset(f"vhost-user back-end {self.backend.what} is gone: {why}")

    # -- reset and close -------------------------------------------------------------------
    def _stop_rings(self) -> None:
        """GET_VRING_BASE on every ring the back-end serves: it stops them and answers."""
        self._unwatch()
        active, self._active = self._active, []
        if self.backend.conn.lost is not None:
            return
        for i in active:
            fut = self.backend.conn.send(Request.GET_VRING_BASE, vring_state(i, 0))
            if fut is not None:
                self._stopping += 1
                fut.add_done_callback(self._stopped)

    def _stopped(self, fut) -> None:
        self._stopping = max(0, self._stopping - 1)
        if not fut.cancelled():
            fut.exception()  # a lost back-end: reported by _lost

    def reset(self) -> None:
        self.counters["resets"] += 1
        self._stop_rings()

    def quiesced(self) -> bool:
        return self._stopping == 0 or self.backend.conn.lost is not None

    def stats(self) -> dict:
        conn = self.backend.conn
        return {"vhost_user": self.backend.what, "backend_features": f"{self.backend.features:#x}",
                "backend_queues": self.backend.queues, "messages": conn.messages, "lost": conn.lost,
                **self.counters}

    def close(self) -> None:
        self._unsubscribe()
        try:
            self._stop_rings()  # before guest RAM goes: the back-end keeps the connection
        except VhostUserError:
            pass
        for fd in self._calls + self._errs:
            os.close(fd)
        self._calls, self._errs = [], []


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
