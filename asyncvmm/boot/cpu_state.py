"""The boot CPU's state at the kernel entry, independent of KVM.

A loader returns a `BootCpuState`; the vCPU code turns it into KVM_SET_SREGS/REGS.
Two start states exist:

* `protected_mode_32` — the PVH entry (Xen's docs/misc/pvh.pandoc): 32-bit protected
  mode, paging off, flat segments, a busy 32-bit TSS in TR, %ebx = hvm_start_info.
* `long_mode_64` — the Linux 64-bit boot protocol (boot.rst): long mode with identity
  paging, CS = __BOOT_CS (0x10), DS/ES/SS = __BOOT_DS (0x18), %rsi = boot_params.

Both use the one GDT `write_gdt` puts in guest memory, so a segment reload in the
guest finds the same descriptor the hidden registers hold.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..vstate.registers import Cr0, Cr4, Efer, Rflags
from . import layout


class SegmentType(IntEnum):
    """Code/data descriptor type (S=1; SDM vol. 3 table 3-1), accessed bit set: VM
    entry requires it for usable segments, and the CPU would set it anyway."""

    DATA_RW_ACCESSED = 0x3
    CODE_XR_ACCESSED = 0xB


class SystemSegmentType(IntEnum):
    """System descriptor type (S=0; SDM vol. 3 table 3-2)."""

    LDT = 0x2
    TSS_BUSY = 0xB  # 32-bit busy TSS; in long mode the same value means 64-bit busy TSS


class Selector(IntEnum):
    """The boot GDT's selectors. 0x10/0x18 are the ones boot.rst names __BOOT_CS and
    __BOOT_DS; PVH leaves selector values unspecified so it uses 0x08 for its 32-bit CS."""

    NULL = 0x00
    CODE32 = 0x08
    BOOT_CS = 0x10  # 64-bit code
    BOOT_DS = 0x18  # flat data, both modes
    TSS = 0x20  # 16 bytes: a 64-bit TSS descriptor has a second (zero) half


# The TSS is never used (no privilege changes before the kernel loads its own), but VM
# entry wants a usable busy TSS in TR; base 0 and the minimum 32-bit TSS limit (0x67)
# are what the PVH spec asks for.
TSS_LIMIT = 0x67
GDT_ENTRIES = 6


class PageFlags(IntFlag):
    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PAGE_SIZE = 1 << 7  # PS: a PDE maps a 2 MiB page directly


@dataclass(frozen=True)
class Segment:
    """A segment register as the CPU caches it (the shape of struct kvm_segment).

    `limit` is the byte-granular limit (0xFFFFFFFF for a flat 4 GiB segment with g=1),
    not the 20-bit descriptor field.
    """

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (the SDM's name)
    g: int
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """This segment as an 8-byte GDT descriptor (SDM vol. 3 figure 3-8)."""
        if self.g:
            if self.limit & 0xFFF != 0xFFF:
                raise ValueError(f"limit {self.limit:#x} is not a whole number of 4 KiB pages")
            raw_limit = self.limit >> 12
        else:
            raw_limit = self.limit
        if raw_limit > 0xFFFFF or self.base > 0xFFFF_FFFF:
            raise ValueError(f"segment base {self.base:#x} / limit {self.limit:#x} does not fit a descriptor")
        return (
            (raw_limit & 0xFFFF)
            | (self.base & 0xFF_FFFF) << 16
            | (self.type & 0xF) << 40
            | (self.s & 1) << 44
            | (self.dpl & 3) << 45
            | (self.present & 1) << 47
            | (raw_limit >> 16) << 48
            | (self.avl & 1) << 52
            | (self.l & 1) << 53
            | (self.db & 1) << 54
            | (self.g & 1) << 55
            | (self.base >> 24) << 56
        )


@dataclass(frozen=True)
class DescriptorTable:
    """A GDTR or IDTR: the table's base and limit."""

    base: int
    limit: int


@dataclass(frozen=True, kw_only=True)
class BootCpuState:
    """The boot vCPU's registers as a boot protocol hands the kernel over."""

    rip: int
    rsp: int = 0
    rsi: int = 0
    rbx: int = 0
    rflags: int = Rflags.FIXED
    cr0: int
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable


def _flat(selector: int, type_: int, *, db: int, l: int) -> Segment:  # noqa: E741
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0, db=db, s=1, l=l, g=1)


CODE32_SEGMENT = _flat(Selector.CODE32, SegmentType.CODE_XR_ACCESSED, db=1, l=0)
# L=1 requires D=0 (D=1 with L=1 is reserved).
CODE64_SEGMENT = _flat(Selector.BOOT_CS, SegmentType.CODE_XR_ACCESSED, db=0, l=1)
DATA_SEGMENT = _flat(Selector.BOOT_DS, SegmentType.DATA_RW_ACCESSED, db=1, l=0)
TSS_SEGMENT = Segment(
    base=0, limit=TSS_LIMIT, selector=Selector.TSS, type=SystemSegmentType.TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0
)
# No LDT: selector 0 and marked unusable, so VM entry does not check it.
NULL_LDT = Segment(base=0, limit=0, selector=0, type=SystemSegmentType.LDT, present=0, dpl=0, db=0, s=0, l=0, g=0, unusable=1)

# An empty IDT: interrupts are off at entry and an exception before the kernel loads
# its own IDT triple-faults, which the VMM sees as a shutdown exit.
EMPTY_IDT = DescriptorTable(0, 0)


def gdt_entries() -> list[int]:
    """The boot GDT's descriptors, indexed by selector >> 3."""
    entries = [0] * GDT_ENTRIES
    entries[Selector.CODE32 >> 3] = CODE32_SEGMENT.descriptor()
    entries[Selector.BOOT_CS >> 3] = CODE64_SEGMENT.descriptor()
    entries[Selector.BOOT_DS >> 3] = DATA_SEGMENT.descriptor()
    entries[Selector.TSS >> 3] = TSS_SEGMENT.descriptor()
    # entries[TSS + 1] stays 0: the upper half of the 16-byte long-mode TSS descriptor
    # (base bits 63:32 = 0).
    return entries


def _gdt_table(gdt_base: int) -> DescriptorTable:
    return DescriptorTable(gdt_base, GDT_ENTRIES * 8 - 1)


def write_gdt(mem, gdt_base: int = layout.GDT_START) -> DescriptorTable:
    """Write the boot GDT at `gdt_base`; returns the GDTR value that loads it."""
    mem.write(gdt_base, struct.pack(f"<{GDT_ENTRIES}Q", *gdt_entries()))
    return _gdt_table(gdt_base)


def write_identity_page_tables(mem, pml4_base: int = layout.PML4_START) -> int:
    """Identity-map guest physical [0, 4 GiB) with 2 MiB pages; returns CR3.

    PML4 at `pml4_base`, the PDPT in the next page, then `layout.PD_COUNT` page
    directories. The kernel replaces these early; they only need to cover its image,
    boot_params and the command line, and 4 GiB covers all of low RAM.
    """
    pdpt = pml4_base + layout.PAGE_SIZE
    pd = pdpt + layout.PAGE_SIZE
    table = PageFlags.PRESENT | PageFlags.WRITABLE
    pml4 = bytearray(layout.PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, pdpt | table)
    pdpte = bytearray(layout.PAGE_SIZE)
    for i in range(layout.PD_COUNT):
        struct.pack_into("<Q", pdpte, 8 * i, (pd + i * layout.PAGE_SIZE) | table)
    pdes = bytearray(layout.PD_COUNT * layout.PAGE_SIZE)
    huge = table | PageFlags.PAGE_SIZE
    for n in range(layout.PD_COUNT * 512):
        struct.pack_into("<Q", pdes, 8 * n, (n << 21) | huge)
    mem.write(pml4_base, pml4)
    mem.write(pdpt, pdpte)
    mem.write(pd, pdes)
    return pml4_base


def _flat_state(gdt_base: int) -> dict:
    """What both start states share: flat data segments, a TSS, no LDT, no IDT yet."""
    return dict(
        ds=DATA_SEGMENT, es=DATA_SEGMENT, fs=DATA_SEGMENT, gs=DATA_SEGMENT, ss=DATA_SEGMENT,
        tr=TSS_SEGMENT, ldt=NULL_LDT, gdt=_gdt_table(gdt_base), idt=EMPTY_IDT,
    )


def protected_mode_32(entry: int, ebx: int, gdt_base: int = layout.GDT_START) -> BootCpuState:
    """The PVH start state: 32-bit protected mode, paging off, flat segments."""
    return BootCpuState(
        rip=entry,
        rbx=ebx,
        rflags=Rflags.FIXED,
        # pvh.pandoc: PE set, every other writable bit clear (ET is not writable).
        cr0=Cr0.PE | Cr0.ET,
        cs=CODE32_SEGMENT,
        **_flat_state(gdt_base),
    )


def long_mode_64(entry: int, rsi: int, gdt_base: int = layout.GDT_START, pml4: int = layout.PML4_START) -> BootCpuState:
    """The Linux 64-bit boot protocol's start state: long mode, identity-mapped paging."""
    return BootCpuState(
        rip=entry,
        rsi=rsi,
        rflags=Rflags.FIXED,
        # NE as every modern OS runs (and VMX requires of the real CR0); no WP, no
        # caching bits: the kernel writes its own CR0 soon after entry.
        cr0=Cr0.PE | Cr0.ET | Cr0.NE | Cr0.PG,
        cr3=pml4,
        cr4=Cr4.PAE,
        efer=Efer.LME | Efer.LMA,
        cs=CODE64_SEGMENT,
        **_flat_state(gdt_base),
    )
