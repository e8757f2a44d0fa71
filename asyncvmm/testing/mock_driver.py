"""A virtio driver played from the host: the guest's side of a device, with no guest CPU.

After rust-vmm's virtio-queue `mock.rs` and Firecracker's VirtioTestHelper: rings and
buffers are built in guest memory by hand, the device is set up through its registers as
a guest driver would (through the machine's MMIO bus and ECAM, so BAR placement is tested
too), doorbells are the queues' notify eventfds and interrupts are read from the MSI-X
vectors' eventfds. Everything the device sees is what a guest could have written —
including what a guest should not write, which is what the tests need.

    h = Harness(mem_size=64 << 20)
    dev = h.add(VirtioBlk(opts, h.mem, queues=1))
    drv = VirtioDriver(h, dev)
    await drv.setup()                     # reset .. DRIVER_OK, MSI-X on
    q = drv.queues[0]
    head = q.add([(hdr, 16, False), (buf, 4096, True), (status, 1, True)])
    q.kick(); await q.wait_used()

Runs on an asyncio loop (the device's readers are on it).
"""

from __future__ import annotations

import asyncio
import os
import select
import struct
import time
from dataclasses import dataclass, field

from .. import platform
from ..bus import Bus
from ..devices.pci.device import PciBuses
from ..devices.pci.regs import Command, MsixCap, MsixFlags, Reg
from ..devices.pci.root import PciRoot, install
from ..devices.virtio.spec import (
    COMMON_CFG_SIZE,
    NO_VECTOR,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Common,
    Feature,
    Status,
    avail_ring_bytes,
    bits,
    desc_table_bytes,
    used_ring_bytes,
)
from ..devices.virtio.transport_pci import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    MSIX_TABLE_OFFSET,
    NotifyBinder,
    VirtioPciDevice,
)
from ..irq import IrqRouter
from ..vstate.memory import GuestMemory

DESC = struct.Struct("<QIHH")  # struct vring_desc
USED_ELEM = struct.Struct("<II")  # struct vring_used_elem
MSI_ADDRESS = 0xFEE0_0000  # what a guest would program: the LAPIC's MSI window, APIC ID 0
HEAP_START = 0x10_0000


def guest_write(mem, gpa: int, data: bytes | bytearray | memoryview) -> None:
    """The guest (this driver) writes its RAM: through the mapping, as a vCPU's store, which
    the device-side dirty log never counts (GuestMemory.write is the VMM's and is counted)."""
    mem.view(gpa, len(data))[:] = data


class Heap:
    """Bump allocation of guest memory for rings and buffers."""

    def __init__(self, mem: GuestMemory, start: int = HEAP_START):
        self.mem = mem
        self.next = start

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = -(-self.next // align) * align
        self.next = addr + size
        if not self.mem.contains(addr, size):
            raise MemoryError(f"harness heap: {size} bytes at {addr:#x} do not fit in guest RAM")
        guest_write(self.mem, addr, bytes(size))
        return addr


class Harness:
    """The machine around one or more devices, minus KVM: RAM, buses, PCI root, vectors."""

    def __init__(self, mem_size: int = 64 << 20, *, shared: bool = False):
        self.mem = GuestMemory(mem_size, shared=shared)  # shared: a vhost-user back-end maps it
        self.router = IrqRouter(None)
        self.notify = NotifyBinder(None)
        self.buses = PciBuses(Bus("mmio"), Bus("pio"))
        self.root = PciRoot(self.buses)
        install(self.root, self.buses.pio, self.buses.mmio)
        self.heap = Heap(self.mem)
        self.devices: list[VirtioPciDevice] = []
        self._next_slot = 1

    def add(self, device, *, msix: bool = True, slot: int | None = None) -> VirtioPciDevice:
        dev = VirtioPciDevice(device, self.router, self.notify, msix=msix)
        slot = self._next_slot if slot is None else slot
        self._next_slot = max(self._next_slot, slot + 1)
        self.root.add(slot, 0, dev)
        self.devices.append(dev)
        self.root.assign_bars(platform.pci_mmio64_window(platform.ram_top(self.mem.regions)))
        return dev

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.devices.clear()
        self.router.close()
        self.mem.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def need_event(event: int, new: int, old: int) -> bool:
    """The driver's side of EVENT_IDX (vring_need_event, virtio 1.2 2.7.10): whether moving
    its index from `old` to `new` crosses the device's `event`."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass
class MockQueue:
    """The driver's side of one split virtqueue, in guest memory."""

    mem: GuestMemory
    heap: Heap
    index: int
    size: int
    desc: int
    avail: int
    used: int
    vector: int = NO_VECTOR
    kick_fd: int = -1
    vector_fd: int = -1
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    chains: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        self.free = list(range(self.size))

    @classmethod
    def create(cls, mem: GuestMemory, heap: Heap, size: int, index: int = 0, **kw) -> "MockQueue":
        """Rings for `size` entries, zeroed, aligned as 2.7 requires."""
        desc = heap.alloc(desc_table_bytes(size), 16)
        avail = heap.alloc(avail_ring_bytes(size), 2)
        used = heap.alloc(used_ring_bytes(size), 4)
        return cls(mem, heap, index, size, desc, avail, used, **kw)

    # -- building chains ---------------------------------------------------------------
    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        guest_write(self.mem, table + DESC.size * i, DESC.pack(addr, length, flags, nxt))

    def add(self, buffers: list[tuple[int, int, bool]], *, indirect: bool = False, publish: bool = True) -> int:
        """Chain (gpa, length, device-writable) buffers, put the head on the avail ring."""
        if indirect:
            table = self.heap.alloc(DESC.size * len(buffers), 16)
            for i, (addr, length, w) in enumerate(buffers):
                last = i == len(buffers) - 1
                self.write_desc(table, i, addr, length, (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT), 0 if last else i + 1)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, table, DESC.size * len(buffers), VRING_DESC_F_INDIRECT, 0)
            self.chains[head] = [head]
        else:
            ids = [self.free.pop(0) for _ in buffers]
            for n, (i, (addr, length, w)) in enumerate(zip(ids, buffers)):
                last = n == len(ids) - 1
                self.write_desc(self.desc, i, addr, length, (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT), 0 if last else ids[n + 1])
            head = ids[0]
            self.chains[head] = ids
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring and move avail->idx past it."""
        slot = self.avail_idx % self.size
        guest_write(self.mem, self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        guest_write(self.mem, self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        guest_write(self.mem, self.avail, struct.pack("<H", flags))

    def set_used_event(self, idx: int) -> None:
        guest_write(self.mem, self.avail + 4 + 2 * self.size, struct.pack("<H", idx & 0xFFFF))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def kick_wanted(self) -> bool:
        """Whether the device wants a doorbell for the next buffer published (EVENT_IDX)."""
        return need_event(self.avail_event(), (self.avail_idx + 1) & 0xFFFF, self.avail_idx)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- completions -------------------------------------------------------------------
    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """(head, len) of every used entry since the last call; their descriptors freed."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.size
            head, length = USED_ELEM.unpack(self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def interrupts(self) -> int:
        """Interrupts raised on this queue's vector since the last call."""
        if self.vector_fd < 0:
            return 0
        try:
            return os.eventfd_read(self.vector_fd)
        except BlockingIOError:
            return 0

    def watch_used(self) -> "UsedWatch":
        """Record used->idx once per turn of the loop (stop() the watch when done)."""
        return UsedWatch(self)

    async def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.take_used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: {len(got)} of {count} used entries after {timeout} s")
            await asyncio.sleep(0.0005)
        return got


class VirtioDriver:
    """The transport-level driver: registers through the bus, as a guest reaches them."""

    def __init__(self, h: Harness, dev: VirtioPciDevice):
        self.h = h
        self.dev = dev
        self.queues: list[MockQueue] = []
        self.features = 0

    # -- register access as the guest has it ---------------------------------------------
    @property
    def bar(self) -> int:
        return self.dev.bar_address

    def read(self, offset: int, size: int) -> int:
        return self.h.buses.mmio.access(self.bar + offset, size, False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.h.buses.mmio.access(self.bar + offset, size, True, value)

    def common_read(self, field: Common, size: int) -> int:
        return self.read(COMMON_OFFSET + field, size)

    def common_write(self, field: Common, size: int, value: int) -> None:
        self.write(COMMON_OFFSET + field, size, value)

    def config_read(self, offset: int, size: int) -> int:
        """The device-specific configuration."""
        return self.read(DEVICE_OFFSET + offset, size)

    def ecam(self, offset: int) -> int:
        b, s, f = self.dev.location
        return platform.PCI_ECAM_START + (b << 20 | s << 15 | f << 12) + offset

    def pci_read(self, offset: int, size: int) -> int:
        return self.h.buses.mmio.access(self.ecam(offset), size, False)

    def pci_write(self, offset: int, size: int, value: int) -> None:
        self.h.buses.mmio.access(self.ecam(offset), size, True, value)

    @property
    def status(self) -> Status:
        return Status(self.common_read(Common.DEVICE_STATUS, 1))

    def set_status(self, s: int) -> None:
        self.common_write(Common.DEVICE_STATUS, 1, s)

    def device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.common_write(Common.DEVICE_FEATURE_SELECT, 4, sel)
            f |= self.common_read(Common.DEVICE_FEATURE, 4) << (32 * sel)
        return f

    # -- MSI-X -----------------------------------------------------------------------------
    def enable_msix(self) -> None:
        cap = self.dev.msix.cap
        flags = self.pci_read(cap + MsixCap.FLAGS, 2)
        self.pci_write(cap + MsixCap.FLAGS, 2, flags | MsixFlags.ENABLE)
        for i in range(self.dev.msix.nvectors):
            entry = MSIX_TABLE_OFFSET + 16 * i
            self.write(entry, 4, MSI_ADDRESS)
            self.write(entry + 4, 4, 0)
            self.write(entry + 8, 4, 0x40 + i)  # data: a vector number
            self.write(entry + 12, 4, 0)  # unmask

    def interrupts(self, vector: int) -> int:
        if vector == NO_VECTOR or self.dev.msix is None:
            return 0
        try:
            return os.eventfd_read(self.dev.msix.vectors[vector].efd)
        except BlockingIOError:
            return 0

    def wait_interrupt(self, vector: int, timeout: float = 5.0) -> bool:
        efd = self.dev.msix.vectors[vector].efd
        r, _, _ = select.select([efd], [], [], timeout)
        return bool(r)

    # -- bring-up ------------------------------------------------------------------------
    async def setup(self, *, features: int | None = None, nqueues: int | None = None, queue_size: int | None = None,
                    msix: bool = True) -> int:
        """Reset .. DRIVER_OK (virtio 1.2, 3.1.1); returns the negotiated features."""
        cmd = self.pci_read(Reg.COMMAND, 2)
        self.pci_write(Reg.COMMAND, 2, cmd | Command.MEMORY | Command.MASTER)
        self.set_status(0)
        if self.status != 0:
            raise RuntimeError("the device did not finish its reset")
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        offered = self.device_features()
        want = offered if features is None else features
        for sel in (0, 1):
            self.common_write(Common.DRIVER_FEATURE_SELECT, 4, sel)
            self.common_write(Common.DRIVER_FEATURE, 4, (want >> (32 * sel)) & 0xFFFF_FFFF)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if not self.status & Status.FEATURES_OK:
            raise RuntimeError(f"device refused features {want:#x}")
        self.features = want
        if msix and self.dev.msix is not None:
            self.enable_msix()
            self.common_write(Common.CONFIG_MSIX_VECTOR, 2, 0)
        n = self.common_read(Common.NUM_QUEUES, 2) if nqueues is None else nqueues
        self.queues = []
        for i in range(n):
            self.common_write(Common.QUEUE_SELECT, 2, i)
            size = min(self.common_read(Common.QUEUE_SIZE, 2), queue_size or 1 << 16)
            self.common_write(Common.QUEUE_SIZE, 2, size)
            vector = i + 1 if msix and self.dev.msix is not None else NO_VECTOR
            self.common_write(Common.QUEUE_MSIX_VECTOR, 2, vector)
            vector_fd = self.dev.msix.vectors[vector].efd if vector != NO_VECTOR else -1
            q = MockQueue.create(self.h.mem, self.h.heap, size, i, vector=vector, kick_fd=self.dev.kick_fds[i],
                                 vector_fd=vector_fd)
            for field_lo, addr in ((Common.QUEUE_DESC_LO, q.desc), (Common.QUEUE_DRIVER_LO, q.avail),
                                   (Common.QUEUE_DEVICE_LO, q.used)):
                self.common_write(field_lo, 4, addr & 0xFFFF_FFFF)
                self.common_write(Common(field_lo + 4), 4, addr >> 32)
            self.common_write(Common.QUEUE_ENABLE, 2, 1)
            self.queues.append(q)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
        await asyncio.sleep(0)
        return want

    def has(self, feature: int) -> bool:
        return bool(self.features & bits(feature))


class UsedWatch:
    """A queue's used index as the guest sees it between the loop's callbacks: a device that
    serves a long batch in steps shows the steps, one that serves it in one callback does not."""

    def __init__(self, q: MockQueue):
        self.q = q
        self.seen: list[int] = []
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        idx = self.q.used_idx()
        if not self.seen or self.seen[-1] != idx:
            self.seen.append(idx)
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> list[int]:
        self._handle.cancel()
        return self.seen


BLK_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector
BLK_SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes


class BlkRig:
    """A harness with one virtio-blk (made by `make(guest memory)`): the driver set up on
    entry, a BlkClient as `.c`, the harness closed on exit."""

    def __init__(self, make):
        self.h = Harness()
        self.dev = self.h.add(make(self.h.mem))
        self.drv = VirtioDriver(self.h, self.dev)

    async def __aenter__(self):
        await self.drv.setup()
        self.c = BlkClient(self.drv)
        return self

    async def __aexit__(self, *exc):
        self.h.close()


class BlkClient:
    """virtio-blk requests as the Linux driver builds them: header, data, status."""

    def __init__(self, drv: VirtioDriver, queue: int = 0):
        self.drv = drv
        self.q = drv.queues[queue]
        self.heap = drv.h.heap

    def build(self, type_: int, sector: int = 0, *, data: bytes | None = None, in_len: int = 0,
              payload: bytes | None = None, indirect: bool = False, publish: bool = True) -> tuple[int, int, int]:
        """Queue one request; returns (head, status address, data address)."""
        mem = self.drv.h.mem
        hdr = self.heap.alloc(BLK_OUTHDR.size, 16)
        guest_write(mem, hdr, BLK_OUTHDR.pack(type_, 0, sector))
        bufs = [(hdr, BLK_OUTHDR.size, False)]
        data_addr = 0
        if data is not None or payload is not None:
            body = data if data is not None else payload
            data_addr = self.heap.alloc(len(body), 512)
            guest_write(mem, data_addr, body)
            bufs.append((data_addr, len(body), False))
        if in_len:
            data_addr = self.heap.alloc(in_len, 512)
            guest_write(mem, data_addr, b"\xee" * in_len)
            bufs.append((data_addr, in_len, True))
        status = self.heap.alloc(1, 1)
        guest_write(mem, status, b"\xff")
        bufs.append((status, 1, True))
        head = self.q.add(bufs, indirect=indirect, publish=publish)
        return head, status, data_addr

    async def run(self, type_: int, sector: int = 0, **kw) -> tuple[int, int, bytes]:
        """One request, kicked and waited for: (status, used length, bytes read)."""
        head, status, data_addr = self.build(type_, sector, **kw)
        self.q.kick()
        (got_head, length), = await self.q.wait_used()
        if got_head != head:
            raise RuntimeError(f"used head {got_head}, expected {head}")
        mem = self.drv.h.mem
        in_len = kw.get("in_len", 0)
        return mem.read(status, 1)[0], length, mem.read(data_addr, in_len) if in_len else b""


NET_HDR = struct.Struct("<BBHHHHH")  # struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
#                                        csum_start, csum_offset, num_buffers


class NetClient:
    """virtio-net as the Linux driver uses it: RX buffers posted ahead, frames with a header."""

    def __init__(self, drv: VirtioDriver, pair: int = 0):
        self.drv = drv
        self.rx = drv.queues[2 * pair]
        self.tx = drv.queues[2 * pair + 1]
        self.mem = drv.h.mem
        self.heap = drv.h.heap
        self.rx_buffers: dict[int, tuple[int, int]] = {}  # head -> (address, size)
        self._pending: list[tuple[int, int]] = []  # used RX entries not yet made into frames

    def post_rx(self, n: int, size: int = 2048, *, kick: bool = True) -> None:
        for _ in range(n):
            addr = self.heap.alloc(size, 64)
            head = self.rx.add([(addr, size, True)])
            self.rx_buffers[head] = (addr, size)
        if kick:
            self.rx.kick()

    def repost(self, heads: list[int], *, kick: bool = True) -> None:
        for h in heads:
            addr, size = self.rx_buffers.pop(h)
            self.rx_buffers[self.rx.add([(addr, size, True)])] = (addr, size)
        if kick:
            self.rx.kick()

    def send(self, frame: bytes, header: bytes | None = None, *, kick: bool = True, split: bool = True) -> int:
        """Queue one frame (header in its own descriptor, as Linux does, unless split=False)."""
        header = header if header is not None else NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
        if split:
            h = self.heap.alloc(len(header), 16)
            guest_write(self.mem, h, header)
            f = self.heap.alloc(len(frame), 64)
            guest_write(self.mem, f, frame)
            head = self.tx.add([(h, len(header), False), (f, len(frame), False)])
        else:
            b = self.heap.alloc(len(header) + len(frame), 64)
            guest_write(self.mem, b, header + frame)
            head = self.tx.add([(b, len(header) + len(frame), False)])
        if kick:
            self.tx.kick()
        return head

    async def sent(self, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        return await self.tx.wait_used(n, timeout)

    async def receive(self, n: int, timeout: float = 5.0, *, repost: bool = True,
                      ethertype: int | None = None) -> list[tuple[bytes, bytes]]:
        """n frames as (header, frame): mergeable ones put back together by num_buffers.
        With `ethertype`, frames of other types (the host's own chatter) are skipped."""
        frames: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < n:
            self._pending += self.rx.take_used()
            while self._pending:
                head, length = self._pending[0]
                if head not in self.rx_buffers:  # a chain the test added by hand, answered empty
                    del self._pending[0]
                    continue
                addr, _ = self.rx_buffers[head]
                data = self.mem.read(addr, length)
                count = NET_HDR.unpack_from(data)[6] if self.drv.has(lib_net_mrg()) else 1
                if len(self._pending) < count:
                    break
                parts = self._pending[:count]
                del self._pending[:count]
                whole = b"".join(self.mem.read(self.rx_buffers[h][0], ln) for h, ln in parts)
                if ethertype is None or whole[NET_HDR.size + 12 : NET_HDR.size + 14] == ethertype.to_bytes(2, "big"):
                    frames.append((whole[: NET_HDR.size], whole[NET_HDR.size :]))
                if repost:
                    self.repost([h for h, _ in parts])
            if len(frames) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(frames)} of {n} frames received after {timeout} s")
            await asyncio.sleep(0.0005)
        return frames


class DeviceLog:
    """The data path's half of a dirty log (snapshot/dirty.py's, without KVM) on a harness's
    RAM: `take()` is a migration's pass over what the devices marked written since the last.
    `stop()` before the harness goes (a device thread may mark until it is joined)."""

    PAGE = 4096

    def __init__(self, mem: GuestMemory):
        from .._native import ffi  # noqa: PLC0415

        self.mem = mem
        self._ffi = ffi
        self._bits = []
        table = mem.c_table()
        for i, r in enumerate(mem.regions):
            bits = ffi.new("uint64_t[]", (r.size // self.PAGE + 63) // 64)
            self._bits.append(bits)
            table.r[i].dirty = bits

    def take(self) -> set[int]:
        """The guest addresses of the pages marked since the last take (cleared)."""
        from .._native import lib  # noqa: PLC0415

        pages: set[int] = set()
        table = self.mem.c_table()
        for i, r in enumerate(self.mem.regions):
            words = len(self._bits[i])
            out = self._ffi.new("uint64_t[]", words)
            lib.avmm_gmem_take_dirty(table, i, out, words)
            for w in range(words):
                word = out[w]
                while word:
                    low = word & -word
                    pages.add(r.gpa + (w * 64 + low.bit_length() - 1) * self.PAGE)
                    word ^= low
        return pages

    @classmethod
    def pages(cls, gpa: int, length: int) -> set[int]:
        """The pages [gpa, gpa+length) touches."""
        return set(range(gpa & ~(cls.PAGE - 1), gpa + length, cls.PAGE))

    def stop(self) -> None:
        table = self.mem.c_table()
        for i in range(len(self._bits)):
            table.r[i].dirty = self._ffi.NULL


def lib_net_mrg() -> int:
    from .._native import lib  # noqa: PLC0415

    return lib.VIRTIO_NET_F_MRG_RXBUF


__all__ = ["Harness", "VirtioDriver", "MockQueue", "Heap", "BlkClient", "NetClient", "NET_HDR", "COMMON_CFG_SIZE",
           "Feature", "DeviceLog"]
