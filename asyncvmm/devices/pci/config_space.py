"""A function's configuration space: the type 0 header, BARs and the capability list.

The space is bytes with a write mask and a write-1-to-clear mask per byte, as hardware
does it: a guest write changes only the writable bits. BAR sizing falls out of that — a
BAR's address bits below its size are read-only zeros, so writing all ones reads back the
size mask (PCI 3.0, 6.2.5.1). What a write means beyond the bytes (decode switched on or
off, a BAR moved, MSI-X enabled) is told to the device through `on_write`, after the
bytes changed.

Accesses are 1, 2 or 4 bytes, naturally aligned; anything else (and anything past the
space) reads all ones and is dropped, as a PCI host bridge answers a bad access.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .regs import (
    CAP_LIST_NEXT,
    CAPABILITIES_START,
    COMMAND_WRITABLE,
    CONFIG_SPACE_EXP_SIZE,
    HEADER_TYPE_NORMAL,
    NUM_BARS,
    STATUS_W1C,
    BarBits,
    Command,
    Reg,
    Status,
)


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"  # takes this BAR and the next
    IO = "io"


@dataclass
class Bar:
    """A base address register a function implements: its index, size and kind."""

    index: int
    size: int  # a power of two: at least 16 for memory, 4 for I/O
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_memory(self) -> bool:
        return self.kind is not BarKind.IO

    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BarBits.SPACE_IO
        bits = BarBits.MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return bits | (BarBits.MEM_PREFETCH if self.prefetchable else 0)


class ConfigSpace:
    """4096 bytes (PCI Express: ECAM reaches all of it; ports 0xCF8/0xCFC the first 256)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ):
        self.data = bytearray(CONFIG_SPACE_EXP_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_EXP_SIZE)
        self.w1c = bytearray(CONFIG_SPACE_EXP_SIZE)
        self.bars: dict[int, Bar] = {}
        self._last_cap = 0
        self._cap_end = CAPABILITIES_START
        self.on_write: Callable[[int, int], None] | None = None  # (offset, size) after a write

        self._set(Reg.VENDOR_ID, 2, vendor_id)
        self._set(Reg.DEVICE_ID, 2, device_id)
        self._set(Reg.REVISION_ID, 1, revision)
        self._set(Reg.CLASS_PROG, 3, class_code)
        self._set(Reg.HEADER_TYPE, 1, HEADER_TYPE_NORMAL)
        self._set(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        self._set(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(Reg.COMMAND, 2, COMMAND_WRITABLE)
        self._mask(Reg.STATUS, 2, 0, w1c=STATUS_W1C)
        self._mask(Reg.CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(Reg.LATENCY_TIMER, 1, 0xFF)
        self._mask(Reg.INTERRUPT_LINE, 1, 0xFF)  # firmware's note to the OS: plain storage

    # -- building (before the guest sees it) -------------------------------------------
    def _set(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def _mask(self, offset: int, size: int, mask: int, *, w1c: int = 0) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")
        self.w1c[offset : offset + size] = w1c.to_bytes(size, "little")

    def add_bar(self, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < (16 if bar.is_memory else 4):
            raise ValueError(f"BAR {bar.index}: size {bar.size:#x} is not a power of two of at least 16/4")
        last = bar.index + (1 if bar.kind is BarKind.MEM64 else 0)
        if bar.index < 0 or last >= NUM_BARS or any(i in self.bars for i in (bar.index, last)):
            raise ValueError(f"BAR {bar.index}: taken or out of range")
        offset = Reg.BASE_ADDRESS_0 + 4 * bar.index
        self._set(offset, 4, bar.type_bits())
        mask = ~(bar.size - 1)
        low_fixed = 0x3 if bar.kind is BarKind.IO else 0xF
        self._mask(offset, 4, mask & ~low_fixed & 0xFFFF_FFFF)
        if bar.kind is BarKind.MEM64:
            self._mask(offset + 4, 4, (mask >> 32) & 0xFFFF_FFFF)
            self.bars[last] = bar  # the upper half belongs to the same BAR
        self.bars[bar.index] = bar

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None) -> int:
        """Append a capability (its bytes after ID and next); returns its offset."""
        offset = self._cap_end
        length = 2 + len(body)
        if offset + length > 0x100:
            raise ValueError("capabilities do not fit in the first 256 bytes")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2 : offset + length] = body
        if writable is not None:
            self.wmask[offset + 2 : offset + 2 + len(writable)] = writable
        if self._last_cap:
            self.data[self._last_cap + CAP_LIST_NEXT] = offset
        else:
            self.data[Reg.CAPABILITY_LIST] = offset
            self._set(Reg.STATUS, 2, self.get(Reg.STATUS, 2) | Status.CAP_LIST)
        self._last_cap = offset
        self._cap_end = (offset + length + 3) & ~3
        return offset

    # -- the guest's accesses ----------------------------------------------------------
    @staticmethod
    def _valid(offset: int, size: int) -> bool:
        return size in (1, 2, 4) and offset % size == 0 and 0 <= offset and offset + size <= CONFIG_SPACE_EXP_SIZE

    def read(self, offset: int, size: int) -> int:
        if not self._valid(offset, size):
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not self._valid(offset, size):
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            o = offset + i
            old = self.data[o]
            new = (old & ~self.wmask[o]) | (b & self.wmask[o])
            new &= ~(b & self.w1c[o])
            self.data[o] = new & 0xFF
        if self.on_write is not None:
            self.on_write(offset, size)

    # -- what the device model asks ----------------------------------------------------
    def bar_list(self) -> list[Bar]:
        """Each BAR once (a 64-bit BAR holds two registers)."""
        return sorted({b.index: b for b in self.bars.values()}.values(), key=lambda b: b.index)

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Set read-only state the device owns (status bits, capability fields)."""
        self._set(offset, size, value)

    @property
    def command(self) -> Command:
        return Command(self.get(Reg.COMMAND, 2) & COMMAND_WRITABLE)

    def bar_address(self, bar: Bar) -> int:
        offset = Reg.BASE_ADDRESS_0 + 4 * bar.index
        low = self.get(offset, 4) & ~(0x3 if bar.kind is BarKind.IO else 0xF)
        high = self.get(offset + 4, 4) if bar.kind is BarKind.MEM64 else 0
        return (high << 32) | low

    def set_bar_address(self, bar: Bar, address: int) -> None:
        """Where firmware (the VMM, before boot) puts the BAR."""
        if address & (bar.size - 1):
            raise ValueError(f"BAR {bar.index} at {address:#x} is not aligned to its size {bar.size:#x}")
        offset = Reg.BASE_ADDRESS_0 + 4 * bar.index
        self._set(offset, 4, (address & 0xFFFF_FFFF) | bar.type_bits())
        if bar.kind is BarKind.MEM64:
            self._set(offset + 4, 4, address >> 32)

    def decoding(self, bar: Bar) -> bool:
        """Whether the guest has this BAR's address space decoded (COMMAND.MEMORY/IO)."""
        return bool(self.command & (Command.MEMORY if bar.is_memory else Command.IO))

    def touches_bars(self, offset: int, size: int) -> bool:
        end = offset + size
        bars_start, bars_end = Reg.BASE_ADDRESS_0, Reg.BASE_ADDRESS_0 + 4 * NUM_BARS
        return (offset < Reg.COMMAND + 2 and end > Reg.COMMAND) or (offset < bars_end and end > bars_start)
