"""Buses: which device model answers a port or a guest physical address.

A bus holds non-overlapping ranges. `dispatch` is a pure function of an exit and a bus, so
exit handling is tested with a fake device and no KVM. Accesses nothing claims are
answered as an empty ISA bus does (reads all ones, writes dropped) and counted; on a
strict bus (bhyve's -e) they raise UnclaimedAccess instead, and the machine stops.

Device interface (synchronous, on the loop's thread):
    read(offset, size) -> int          offset from the range's start
    write(offset, size, value) -> None
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Protocol


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Range:
    """A device's addresses on a bus: [start, start + length)."""

    start: int
    length: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.start + self.length


class BusConflict(ValueError):
    pass


class UnclaimedAccess(Exception):
    """An access to an address nothing on a strict bus emulates."""

    def __init__(self, bus: str, addr: int, size: int, is_write: bool):
        super().__init__(bus, addr, size, is_write)
        self.bus, self.addr, self.size, self.is_write = bus, addr, size, is_write

    def __str__(self) -> str:
        where = f"port {self.addr:#x}" if self.bus == "pio" else f"address {self.addr:#x}"
        what = "write" if self.is_write else "read"
        return f"{what} of {self.size} byte{'s' if self.size != 1 else ''} at {where}, which nothing emulates"


class Bus:
    """Ranges of one address space (ports, or guest physical MMIO)."""

    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[Range] = []
        self.unclaimed: Counter[int] = Counter()  # address → accesses nobody answered
        self._cache: dict[int, Range | None] = {}  # address → range, for `access`
        self.accesses: Counter[str] = Counter()  # range name → accesses served
        self.unclaimed_other = 0  # unclaimed accesses past UNCLAIMED_KEYS addresses
        self.strict = False  # raise UnclaimedAccess instead of answering as an empty bus

    def register(self, start: int, length: int, device: Device, name: str) -> None:
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._ranges[i - 1].end > start:
            raise BusConflict(f"{name} at {start:#x} overlaps {self._ranges[i - 1].name}")
        if i < len(self._ranges) and start + length > self._ranges[i].start:
            raise BusConflict(f"{name} at {start:#x} overlaps {self._ranges[i].name}")
        self._starts.insert(i, start)
        self._ranges.insert(i, Range(start, length, device, name))
        self._cache.clear()

    def unregister(self, start: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start:
            del self._starts[i]
            del self._ranges[i]
        self._cache.clear()

    def find(self, addr: int) -> Range | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ranges[i].end:
            return self._ranges[i]
        return None

    UNCLAIMED_KEYS = 4096  # distinct addresses counted; a guest cannot grow this further
    CACHE_KEYS = 4096  # addresses remembered by `access` (a guest can touch 256 MiB of ECAM)

    def _count_unclaimed(self, addr: int, n: int, size: int, is_write: bool) -> None:
        if addr in self.unclaimed or len(self.unclaimed) < self.UNCLAIMED_KEYS:
            self.unclaimed[addr] += n
        else:
            self.unclaimed_other += n
        if self.strict:
            raise UnclaimedAccess(self.name, addr, size, is_write)

    def access(self, addr: int, size: int, is_write: bool, value: int = 0) -> int:
        """One access (the hot path): a write of `value`, or a read's result."""
        r = self._cache.get(addr)
        if r is None:
            r = self.find(addr)
            if r is None or addr + size > r.end:
                self._count_unclaimed(addr, 1, size, is_write)
                return 0 if is_write else (1 << (8 * size)) - 1
            if len(self._cache) < self.CACHE_KEYS:  # bounded: a guest picks the addresses
                self._cache[addr] = r
        elif addr + size > r.start + r.length:
            self._count_unclaimed(addr, 1, size, is_write)
            return 0 if is_write else (1 << (8 * size)) - 1
        self.accesses[r.name] += 1
        if is_write:
            r.device.write(addr - r.start, size, value)
            return 0
        return r.device.read(addr - r.start, size) & ((1 << (8 * size)) - 1)

    def dispatch(self, addr: int, size: int, is_write: bool, data, count: int = 1) -> bool:
        """Serve `count` accesses of `size` bytes at `addr`, with their bytes in `data`.

        Reads fill `data`; string I/O repeats the access at the same address. Returns
        False when nothing claims the address.
        """
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self._count_unclaimed(addr, count, size, is_write)
            if not is_write:
                data[: size * count] = b"\xff" * (size * count)
            return False
        self.accesses[r.name] += count
        offset = addr - r.start
        dev = r.device
        for i in range(count):
            chunk = slice(i * size, (i + 1) * size)
            if is_write:
                dev.write(offset, size, int.from_bytes(data[chunk], "little"))
            else:
                value = dev.read(offset, size) & ((1 << (8 * size)) - 1)
                data[chunk] = value.to_bytes(size, "little")
        return True


class ByteRegisters:
    """Adapts a byte-register model (read(offset) / write(offset, value)) to the bus.

    A wider access is split into byte accesses at consecutive offsets, as the ISA bus does
    for an 8-bit device.
    """

    def __init__(self, model, *, offset_base: int = 0):
        self.model = model
        self.offset_base = offset_base

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= (self.model.read(self.offset_base + offset + i) & 0xFF) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self.model.write(self.offset_base + offset + i, (value >> (8 * i)) & 0xFF)


class Sink:
    """Ports a PC has but whose writes mean nothing to a VM (POST codes, delays)."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass
