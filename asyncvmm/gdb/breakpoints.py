"""Breakpoints: int3 patched into guest memory (Z0), and the debug registers (Z1-Z4).

Software breakpoints are kept by guest *physical* address (translated when inserted): the
original byte is saved, 0xCC written, and memory reads through the stub show the
original byte (gdb must never see its own int3s). Removal writes the byte back.

Hardware ones take DR0-DR3: an address each, and in DR7 a local-enable bit, the kind
(R/W: 00 execute, 01 write, 11 read or write) and the length (LEN: 00 1 byte, 01 2,
11 4, 10 8) — SDM vol. 3, 18.2 "Debug Registers".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

INT3 = 0xCC
NUM_DEBUG_REGS = 4


class Kind(enum.IntEnum):
    """gdb's Z/z packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4


class Dr7(enum.IntFlag):
    L0 = 1 << 0  # local enable of DR0; DRn's is bit 2n
    LE = 1 << 8  # exact data breakpoints (recommended with any data breakpoint)
    RESERVED1 = 1 << 10  # reads as 1


class Dr6(enum.IntFlag):
    B0 = 1 << 0  # DR0's condition was met; DRn's is bit n
    BS = 1 << 14  # single step


DR7_RW = {Kind.HARDWARE: 0b00, Kind.WRITE_WATCH: 0b01, Kind.ACCESS_WATCH: 0b11, Kind.READ_WATCH: 0b11}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


class BreakpointError(Exception):
    """What gdb is told with an error reply."""


@dataclass
class SoftwareBreakpoint:
    linear: int
    gpa: int
    original: int


@dataclass(frozen=True)
class HardwareBreakpoint:
    kind: Kind
    addr: int
    length: int


class SoftwareBreakpoints:
    """int3s in guest memory; `mem` is the GuestMemory (bounds-checked)."""

    def __init__(self, mem):
        self.mem = mem
        self.by_gpa: dict[int, SoftwareBreakpoint] = {}
        self.by_linear: dict[int, SoftwareBreakpoint] = {}

    def insert(self, linear: int, gpa: int) -> None:
        if linear in self.by_linear:
            return  # gdb may insert one twice: once is enough
        if gpa in self.by_gpa:  # another linear alias of the same byte: share it
            self.by_linear[linear] = self.by_gpa[gpa]
            return
        original = self.mem.read(gpa, 1)[0]
        self.mem.write(gpa, bytes((INT3,)))
        bp = SoftwareBreakpoint(linear, gpa, original)
        self.by_gpa[gpa] = bp
        self.by_linear[linear] = bp

    def remove(self, linear: int) -> bool:
        bp = self.by_linear.pop(linear, None)
        if bp is None:
            return False
        if not any(other is bp for other in self.by_linear.values()):
            del self.by_gpa[bp.gpa]
            if self.mem.read(bp.gpa, 1)[0] == INT3:  # the guest may have rewritten it
                self.mem.write(bp.gpa, bytes((bp.original,)))
        return True

    def remove_all(self) -> None:
        for linear in list(self.by_linear):
            self.remove(linear)

    def shadow(self, gpa: int, data: bytearray) -> None:
        """Put the original bytes back into `data`, read from guest memory at `gpa`."""
        for bp in self.by_gpa.values():
            if gpa <= bp.gpa < gpa + len(data) and data[bp.gpa - gpa] == INT3:
                data[bp.gpa - gpa] = bp.original

    def covering(self, gpa: int, length: int) -> list[SoftwareBreakpoint]:
        return [bp for bp in self.by_gpa.values() if gpa <= bp.gpa < gpa + length]


class DebugRegisters:
    """DR0-DR3 shared by hardware breakpoints and watchpoints; the same on every vCPU."""

    def __init__(self):
        self.slots: list[HardwareBreakpoint | None] = [None] * NUM_DEBUG_REGS

    def insert(self, bp: HardwareBreakpoint) -> None:
        if bp in self.slots:
            return
        if bp.kind is not Kind.HARDWARE:
            if bp.length not in DR7_LEN:
                raise BreakpointError(f"a watchpoint covers 1, 2, 4 or 8 bytes, not {bp.length}")
            if bp.addr % bp.length:
                raise BreakpointError(f"a {bp.length}-byte watchpoint must be aligned ({bp.addr:#x} is not)")
        try:
            free = self.slots.index(None)
        except ValueError:
            raise BreakpointError("all four debug registers are in use") from None
        self.slots[free] = bp

    def remove(self, bp: HardwareBreakpoint) -> bool:
        if bp not in self.slots:
            return False
        self.slots[self.slots.index(bp)] = None
        return True

    def clear(self) -> None:
        self.slots = [None] * NUM_DEBUG_REGS

    def __bool__(self) -> bool:
        return any(self.slots)

    def debugreg(self) -> list[int]:
        """DR0-DR7 as KVM_SET_GUEST_DEBUG takes them (DR4, DR5 and DR6 unused)."""
        dr7 = Dr7.RESERVED1
        regs = [0] * 8
        for i, bp in enumerate(self.slots):
            if bp is None:
                continue
            regs[i] = bp.addr
            dr7 |= 1 << (2 * i)
            length = 1 if bp.kind is Kind.HARDWARE else bp.length
            dr7 |= (DR7_RW[bp.kind] | DR7_LEN[length] << 2) << (16 + 4 * i)
            if bp.kind is not Kind.HARDWARE:
                dr7 |= Dr7.LE
        regs[7] = int(dr7)
        return regs

    def hit(self, dr6: int) -> HardwareBreakpoint | None:
        """The breakpoint DR6 says fired, if one of ours."""
        for i, bp in enumerate(self.slots):
            if bp is not None and dr6 & (1 << i):
                return bp
        return None
