"""The C split-ring walker (cext/virtq.c) against rings built by hand in guest memory."""

from __future__ import annotations

import os
import struct

import pytest
from asyncvmm._native import ffi, lib

from asyncvmm.devices.virtio.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    VqError,
)
from asyncvmm.testing.mock_driver import DESC, Heap, MockQueue, need_event

SIZE = 8


class Ring:
    """A queue of SIZE entries, the C queue over it, and an interrupt eventfd."""

    def __init__(self, mem, flags=lib.AVMM_VQ_INDIRECT | lib.AVMM_VQ_EVENT_IDX, iov_cap=16):
        self.mem = mem
        self.heap = Heap(mem)
        self.q = MockQueue.create(mem, self.heap, SIZE)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.irq = ffi.new("struct avmm_irq *", {"efd": self.efd, "masked": 0})
        self.vq = ffi.new("struct avmm_vq *")
        r = lib.avmm_vq_setup(self.vq, mem.c_table(), SIZE, self.q.desc, self.q.avail, self.q.used, flags, self.irq, -1)
        assert r == 0
        self.iov = ffi.new("struct iovec[]", iov_cap)
        self.chain = ffi.new("struct avmm_chain *", {"iov": self.iov, "iov_cap": iov_cap})

    def pop(self) -> int:
        return lib.avmm_vq_pop(self.vq, self.mem.c_table(), self.chain)

    def buffers(self) -> list[tuple[int, int]]:
        c = self.chain
        return [(int(ffi.cast("uintptr_t", self.iov[i].iov_base)), self.iov[i].iov_len) for i in range(c.nout + c.nin)]

    def interrupts(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def close(self):
        os.close(self.efd)


@pytest.fixture
def ring(mem):
    r = Ring(mem)
    yield r
    r.close()


def test_a_chain_becomes_readable_then_writable_buffers(ring, mem):
    a, b, c = ring.heap.alloc(16), ring.heap.alloc(4096), ring.heap.alloc(1)
    head = ring.q.add([(a, 16, False), (b, 4096, True), (c, 1, True)])
    assert ring.pop() == 1
    ch = ring.chain
    assert (ch.head, ch.nout, ch.nin, ch.out_len, ch.in_len, ch.err, ch.ndesc) == (head, 1, 2, 16, 4097, 0, 3)
    assert ring.buffers() == [(mem.hva(a), 16), (mem.hva(b), 4096), (mem.hva(c), 1)]
    assert int(ffi.cast("uintptr_t", ch.last_in)) == mem.hva(c)
    assert ring.pop() == 0  # nothing more


def test_used_entries_and_event_idx_interrupts(ring):
    bufs = [ring.heap.alloc(64) for _ in range(4)]
    heads = [ring.q.add([(b, 64, True)]) for b in bufs]
    for _ in heads:
        assert ring.pop() == 1
    # The driver asks to hear about the 3rd used entry only (used_event = 2).
    ring.q.set_used_event(2)
    lib.avmm_vq_push(ring.vq, heads[0], 10)
    lib.avmm_vq_publish(ring.vq)  # the first publish always signals
    assert ring.interrupts() == 1
    lib.avmm_vq_push(ring.vq, heads[1], 11)
    lib.avmm_vq_publish(ring.vq)
    assert ring.interrupts() == 0  # used idx 2: not past used_event yet
    lib.avmm_vq_push(ring.vq, heads[2], 12)
    lib.avmm_vq_push(ring.vq, heads[3], 13)
    lib.avmm_vq_publish(ring.vq)  # idx 2 -> 4 crosses used_event 2: one interrupt for the batch
    assert ring.interrupts() == 1
    assert ring.q.take_used() == [(heads[0], 10), (heads[1], 11), (heads[2], 12), (heads[3], 13)]
    assert ring.vq.stats.interrupts == 2 and ring.vq.stats.suppressed == 1


def test_no_interrupt_flag_without_event_idx(mem):
    r = Ring(mem, flags=0)
    try:
        b = r.heap.alloc(8)
        h = r.q.add([(b, 8, True)])
        r.q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        assert r.pop() == 1
        lib.avmm_vq_push(r.vq, h, 8)
        lib.avmm_vq_publish(r.vq)
        assert r.interrupts() == 0
        assert r.q.take_used() == [(h, 8)]
    finally:
        r.close()


def test_masked_vector_sets_pending_instead(ring):
    ring.irq.masked = 1
    h = ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1
    lib.avmm_vq_push(ring.vq, h, 1)
    lib.avmm_vq_publish(ring.vq)
    assert ring.interrupts() == 0 and ring.irq.pending == 1 and ring.irq.held == 1


def test_enable_notify_publishes_avail_event_and_sees_late_buffers(ring):
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1
    assert lib.avmm_vq_enable_notify(ring.vq) == 0
    assert ring.q.avail_event() == 1  # "notify me when you make entry 1 available"
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert lib.avmm_vq_enable_notify(ring.vq) == 1  # the re-check after the barrier
    assert lib.avmm_vq_pending(ring.vq) == 1


def test_disable_notify_with_event_idx_spares_the_next_doorbell(ring):
    """A device that polls asks for no doorbell: the driver's next publish, and the ones
    after it, do not cross avail_event; enabling asks for the next one again."""
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1
    assert lib.avmm_vq_enable_notify(ring.vq) == 0
    assert need_event(ring.q.avail_event(), new=2, old=1)  # enabled: the next one kicks
    lib.avmm_vq_disable_notify(ring.vq)
    for old in range(1, 1 + SIZE - 1):  # however many the driver publishes while it polls
        assert not need_event(ring.q.avail_event(), new=old + 1, old=old)
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert lib.avmm_vq_enable_notify(ring.vq) == 1  # on again: the one that came is seen
    assert ring.pop() == 1
    assert lib.avmm_vq_enable_notify(ring.vq) == 0
    assert need_event(ring.q.avail_event(), new=3, old=2)


def test_disable_notify_without_event_idx_sets_no_notify(mem):
    r = Ring(mem, flags=0)

    def used_flags() -> int:
        return struct.unpack("<H", mem.read(r.q.used, 2))[0]

    lib.avmm_vq_disable_notify(r.vq)
    assert used_flags() & VRING_USED_F_NO_NOTIFY
    assert lib.avmm_vq_enable_notify(r.vq) == 0
    assert not used_flags() & VRING_USED_F_NO_NOTIFY


def test_unpop_gives_chains_back(ring):
    h = ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1
    lib.avmm_vq_unpop(ring.vq, 1)
    assert ring.pop() == 1 and ring.chain.head == h


def test_indirect_table(ring, mem):
    a, b = ring.heap.alloc(16), ring.heap.alloc(512)
    head = ring.q.add([(a, 16, False), (b, 512, True)], indirect=True)
    assert ring.pop() == 1
    assert (ring.chain.head, ring.chain.err, ring.chain.nout, ring.chain.nin) == (head, 0, 1, 1)
    assert ring.buffers() == [(mem.hva(a), 16), (mem.hva(b), 512)]


def test_zero_length_buffers_are_dropped(ring):
    a, b = ring.heap.alloc(16), ring.heap.alloc(16)
    ring.q.add([(a, 0, False), (b, 16, True)])
    assert ring.pop() == 1 and (ring.chain.nout, ring.chain.nin, ring.chain.ndesc) == (0, 1, 2)


# -- a request that is wrong: the chain is consumed with an error, the ring goes on ------
def _error_chain(ring, expected: VqError):
    assert ring.pop() == 1
    assert ring.chain.err == expected
    assert ring.vq.broken == 0
    assert ring.vq.stats.errors[expected] == 1
    # the next request is served normally
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1 and ring.chain.err == 0


def test_buffer_outside_guest_ram_fails_the_request(ring, mem):
    status = ring.heap.alloc(1)
    ring.q.add([(mem.size + 4096, 512, False), (status, 1, True)])
    assert ring.pop() == 1
    assert ring.chain.err == VqError.BUFFER
    assert int(ffi.cast("uintptr_t", ring.chain.last_in)) == mem.hva(status)  # the status can still be written
    ring.q.add([(ring.heap.alloc(8), 8, True)])
    assert ring.pop() == 1 and ring.chain.err == 0


@pytest.mark.parametrize("addr,length", [
    ((1 << 64) - 16, 32),  # wraps around the address space
    (0x2000, 0xFFFF_FFFF),  # runs off the end of RAM
    (64 << 20, 1),  # the first byte past RAM
])
def test_lengths_that_wrap_or_run_past_ram(ring, addr, length):
    ring.q.add([(addr, length, True)])
    _error_chain(ring, VqError.BUFFER)


def test_status_outside_ram_leaves_no_status_byte(ring, mem):
    ring.q.add([(ring.heap.alloc(16), 16, False), (mem.size, 1, True)])
    assert ring.pop() == 1
    assert ring.chain.err == VqError.BUFFER and ring.chain.last_in == ffi.NULL


def test_readable_after_writable(ring):
    ring.q.add([(ring.heap.alloc(8), 8, True), (ring.heap.alloc(8), 8, False)])
    _error_chain(ring, VqError.ORDER)


def test_more_buffers_than_the_device_takes(mem):
    r = Ring(mem, iov_cap=2)
    try:
        r.q.add([(r.heap.alloc(8), 8, False)] * 3 + [(r.heap.alloc(1), 1, True)])
        _error_chain(r, VqError.TOO_MANY)
    finally:
        r.close()


def test_indirect_not_negotiated(mem):
    r = Ring(mem, flags=0)
    try:
        r.q.add([(r.heap.alloc(8), 8, True)], indirect=True)
        _error_chain(r, VqError.INDIRECT)
    finally:
        r.close()


def _indirect_head(ring, table: int, length: int, flags: int = VRING_DESC_F_INDIRECT) -> int:
    head = ring.q.free.pop(0)
    ring.q.chains[head] = [head]
    ring.q.write_desc(ring.q.desc, head, table, length, flags, 0)
    ring.q.publish(head)
    return head


def test_indirect_table_errors(ring, mem):
    buf = ring.heap.alloc(8)
    table = ring.heap.alloc(64, 16)
    ring.q.write_desc(table, 0, buf, 8, VRING_DESC_F_WRITE, 0)
    cases = [
        (table, 24, VRING_DESC_F_INDIRECT),  # not a whole number of descriptors
        (table, 0, VRING_DESC_F_INDIRECT),  # empty
        (mem.size, 16, VRING_DESC_F_INDIRECT),  # outside RAM
        (table, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT),  # indirect and next
    ]
    for addr, length, flags in cases:
        _indirect_head(ring, addr, length, flags)
        assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT, (addr, length, flags)
    assert ring.vq.broken == 0


def test_nested_indirect_and_loops_inside_a_table_fail_the_request(ring):
    inner = ring.heap.alloc(16, 16)
    ring.q.write_desc(inner, 0, ring.heap.alloc(8), 8, VRING_DESC_F_WRITE, 0)
    nested = ring.heap.alloc(16, 16)
    ring.q.write_desc(nested, 0, inner, 16, VRING_DESC_F_INDIRECT, 0)
    _indirect_head(ring, nested, 16)
    assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT
    looping = ring.heap.alloc(32, 16)
    buf = ring.heap.alloc(8)
    ring.q.write_desc(looping, 0, buf, 8, VRING_DESC_F_NEXT, 1)
    ring.q.write_desc(looping, 1, buf, 8, VRING_DESC_F_NEXT, 0)
    _indirect_head(ring, looping, 32)
    assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT
    huge = ring.heap.alloc(32 << 20, 16)  # a self-loop in a 2M-entry table: refused before any walk
    ring.q.write_desc(huge, 0, buf, 8, VRING_DESC_F_NEXT, 0)
    _indirect_head(ring, huge, 32 << 20)
    assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT and ring.chain.ndesc == 1
    longest = ring.heap.alloc(16 * lib.AVMM_CHAIN_MAX_IOV, 16)  # the longest table: walked to its end at most
    ring.q.write_desc(longest, 0, buf, 0, VRING_DESC_F_NEXT, 0)  # empty buffers: no iovs run out first
    _indirect_head(ring, longest, 16 * lib.AVMM_CHAIN_MAX_IOV)
    assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT and ring.chain.ndesc == 1 + lib.AVMM_CHAIN_MAX_IOV
    escaping = ring.heap.alloc(16, 16)
    ring.q.write_desc(escaping, 0, buf, 8, VRING_DESC_F_NEXT, 5)  # next past the table's 1 entry
    _indirect_head(ring, escaping, 16)
    assert ring.pop() == 1 and ring.chain.err == VqError.INDIRECT
    assert ring.vq.broken == 0


# -- a ring that is wrong: the queue stops, the device must be reset ----------------------
def _broken(ring, expected: VqError):
    assert ring.pop() == -1
    assert ring.vq.broken == 1 and ring.vq.last_error == expected
    assert ring.pop() == -1  # and it stays so


def test_head_past_the_table(ring):
    ring.q.mem.write(ring.q.avail + 4, struct.pack("<H", SIZE))
    ring.q.set_avail_idx(1)
    _broken(ring, VqError.HEAD_RANGE)


def test_next_past_the_table(ring):
    head = ring.q.free.pop(0)
    ring.q.write_desc(ring.q.desc, head, ring.heap.alloc(8), 8, VRING_DESC_F_NEXT, SIZE + 3)
    ring.q.publish(head)
    _broken(ring, VqError.NEXT_RANGE)


def test_looping_chain(ring):
    buf = ring.heap.alloc(8)
    ring.q.write_desc(ring.q.desc, 0, buf, 8, VRING_DESC_F_NEXT, 1)
    ring.q.write_desc(ring.q.desc, 1, buf, 8, VRING_DESC_F_NEXT, 0)
    ring.q.publish(0)
    _broken(ring, VqError.LOOP)


def test_avail_index_jumping_past_the_queue_size(ring):
    ring.q.set_avail_idx(SIZE + 1)
    _broken(ring, VqError.AVAIL_IDX)


def test_rings_outside_ram_or_misaligned_are_refused(mem):
    vq = ffi.new("struct avmm_vq *")
    t = mem.c_table()
    top = mem.size
    assert lib.avmm_vq_setup(vq, t, SIZE, top - 64, 0x1000, 0x2000, 0, ffi.NULL, -1) == -14  # -EFAULT: desc runs past RAM
    assert lib.avmm_vq_setup(vq, t, SIZE, 0x1000, 0x2000, top, 0, ffi.NULL, -1) == -14
    assert lib.avmm_vq_setup(vq, t, SIZE, 0x1008, 0x2000, 0x3000, 0, ffi.NULL, -1) == -22  # -EINVAL: desc not 16-aligned
    assert lib.avmm_vq_setup(vq, t, 6, 0x1000, 0x2000, 0x3000, 0, ffi.NULL, -1) == -22  # size not a power of two
    assert lib.avmm_vq_setup(vq, t, 0, 0x1000, 0x2000, 0x3000, 0, ffi.NULL, -1) == -22


def test_descriptor_snapshot_is_what_is_used(ring, mem):
    """The walker reads each descriptor once: what it checked is what it returns."""
    a = ring.heap.alloc(64)
    ring.q.add([(a, 64, True)])
    assert ring.pop() == 1
    ring.q.write_desc(ring.q.desc, ring.chain.head, mem.size + 4096, 64, VRING_DESC_F_WRITE, 0)  # changed afterwards
    assert ring.buffers() == [(mem.hva(a), 64)]


def test_desc_struct_layout_matches_the_header():
    assert DESC.size == ffi.sizeof("struct vring_desc") == 16
