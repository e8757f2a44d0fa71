"""Guest page-table walks: a linear address to a guest physical one, as the vCPU's MMU
would in its current paging mode (SDM vol. 3, chapter 4 "Paging").

    mode          CR0.PG  CR4.PAE  EFER.LMA  CR4.LA57   levels  entry
    none            0                                    -       (linear = physical)
    32-bit          1       0                            2       4 bytes (PSE: 4 MiB pages)
    PAE             1       1        0                   3       8 bytes (PDPT of 4)
    4-level         1       1        1         0         4       8 bytes
    5-level         1       1        1         1         5       8 bytes

A debugger reads memory page by page: translate() answers for one address, and the
caller stops at the first page that is not present. Accessed and dirty bits are left
alone (a debugger's look must not change what the guest sees), and the walk ignores
protection: gdb may read what the guest's kernel may read.

The walk is a pure function over `read_phys(gpa, size) -> bytes` (GuestMemory.read), so
tests build page tables in a plain buffer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..vstate.registers import Cr0, Cr4, Efer


class Pte(enum.IntFlag):
    P = 1 << 0  # present
    PS = 1 << 7  # in a directory entry: it maps a large page, the walk ends there


class Mode(enum.Enum):
    NONE = "none"
    BITS32 = "32-bit"
    PAE = "PAE"
    LEVEL4 = "4-level"
    LEVEL5 = "5-level"


PAGE_SIZE = 4096
ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000  # bits 51:12 of an 8-byte entry: the next table or the page
ReadPhys = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Paging:
    """The registers a walk depends on (from KVM_GET_SREGS)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def mode(self) -> Mode:
        if not self.cr0 & Cr0.PG:
            return Mode.NONE
        if not self.cr4 & Cr4.PAE:
            return Mode.BITS32
        if not self.efer & Efer.LMA:
            return Mode.PAE
        return Mode.LEVEL5 if self.cr4 & Cr4.LA57 else Mode.LEVEL4


def _entry(read_phys: ReadPhys, gpa: int, size: int) -> int | None:
    try:
        return int.from_bytes(read_phys(gpa, size), "little")
    except Exception:  # a table outside guest RAM: nothing is mapped there
        return None


def translate(paging: Paging, linear: int, read_phys: ReadPhys) -> int | None:
    """The guest physical address of `linear`, or None if no page is mapped there."""
    mode = paging.mode
    if mode is Mode.NONE:
        return linear & 0xFFFF_FFFF_FFFF_FFFF
    if mode is Mode.BITS32:
        return _walk32(paging, linear & 0xFFFF_FFFF, read_phys)
    if mode is Mode.PAE:
        linear &= 0xFFFF_FFFF
        pdpte = _entry(read_phys, (paging.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8, 8)
        if pdpte is None or not pdpte & Pte.P:
            return None
        return _walk64(pdpte & ADDR_MASK_64, linear, (21, 12), read_phys)
    levels = (48, 39, 30, 21, 12) if mode is Mode.LEVEL5 else (39, 30, 21, 12)
    # A non-canonical address maps nothing.
    top = levels[0] + 9
    upper = linear >> (top - 1)
    if upper not in (0, (1 << (64 - top + 1)) - 1):
        return None
    return _walk64(paging.cr3 & ADDR_MASK_64, linear, levels, read_phys)


def _walk32(paging: Paging, linear: int, read_phys: ReadPhys) -> int | None:
    pde = _entry(read_phys, (paging.cr3 & 0xFFFF_F000) + (linear >> 22) * 4, 4)
    if pde is None or not pde & Pte.P:
        return None
    if pde & Pte.PS and paging.cr4 & Cr4.PSE:
        # 4 MiB page: bits 31:22 from the entry, and PSE-36's bits 39:32 from its 20:13.
        base = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32)
        return base | (linear & 0x3F_FFFF)
    pte = _entry(read_phys, (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4, 4)
    if pte is None or not pte & Pte.P:
        return None
    return (pte & 0xFFFF_F000) | (linear & 0xFFF)


def _walk64(table: int, linear: int, shifts: tuple[int, ...], read_phys: ReadPhys) -> int | None:
    """Walk 8-byte entries from `table`, one level per shift (the last one is 12)."""
    for shift in shifts:
        entry = _entry(read_phys, table + ((linear >> shift) & 0x1FF) * 8, 8)
        if entry is None or not entry & Pte.P:
            return None
        if shift == 12 or (entry & Pte.PS and shift in (21, 30)):
            size_mask = (1 << shift) - 1
            return (entry & ADDR_MASK_64 & ~size_mask) | (linear & size_mask)
        table = entry & ADDR_MASK_64
    return None


def pages(linear: int, length: int):
    """(linear, length) pieces of [linear, linear+length), none crossing a page."""
    end = linear + length
    while linear < end:
        n = min(end, (linear | (PAGE_SIZE - 1)) + 1) - linear
        yield linear, n
        linear += n
