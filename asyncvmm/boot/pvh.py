"""PVH boot: load an ELF kernel that carries a Xen PHYS32_ENTRY note.

The kernel is entered in 32-bit protected mode with %ebx pointing at a
`struct hvm_start_info` (Xen's xen/include/public/arch-x86/hvm/start_info.h), which
carries the command line, the modules (the first is the initrd for Linux) and the
memory map. No firmware, no real-mode setup code: the fastest way into a Linux guest.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum

from ..errors import BootError
from ..vstate.memory import MMIO_HOLE_START, MiB
from . import layout
from .cpu_state import BootCpuState, protected_mode_32, write_gdt
from .elf import parse_elf


class XenElfNote(IntEnum):  # xen/include/public/elfnote.h
    XEN_ELFNOTE_GUEST_OS = 6  # "linux" in a Linux kernel built with Xen support
    XEN_ELFNOTE_PHYS32_ENTRY = 18


XEN_NOTE_NAME = "Xen"
XEN_HVM_START_MAGIC_VALUE = 0x336EC578  # "xEn3" with the 0x80 bit of the "E" set
HVM_START_INFO_VERSION = 1  # version 1 added memmap_paddr/memmap_entries

# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
# cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved (56 bytes).
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
# struct hvm_memmap_table_entry: addr, size, type, reserved.
HVM_MEMMAP_TABLE_ENTRY = struct.Struct("<QQII")

MAX_MODULES = layout.PVH_MODLIST_SIZE // HVM_MODLIST_ENTRY.size
MAX_MEMMAP_ENTRIES = layout.PVH_MEMMAP_SIZE // HVM_MEMMAP_TABLE_ENTRY.size


def pvh_entry(image: bytes | memoryview) -> int | None:
    """The PVH 32-bit entry address from the image's Xen note, or None if it has none."""
    note = parse_elf(image).find_note(XEN_NOTE_NAME, XenElfNote.XEN_ELFNOTE_PHYS32_ENTRY)
    return None if note is None else _entry_from_desc(note.desc)


def _entry_from_desc(desc: bytes) -> int:
    # A 32-bit kernel emits .long; older 64-bit kernels emit a .quad (_ASM_PTR).
    if len(desc) == 4:
        return struct.unpack("<I", desc)[0]
    if len(desc) == 8:
        entry = struct.unpack("<Q", desc)[0]
        if entry >> 32:
            raise BootError(f"kernel's PVH entry {entry:#x} (XEN_ELFNOTE_PHYS32_ENTRY) is not a 32-bit address")
        return entry
    raise BootError(f"kernel's XEN_ELFNOTE_PHYS32_ENTRY note has a {len(desc)}-byte value, expected 4 or 8")


def _encode_cmdline(cmdline: str, what: str) -> bytes:
    if "\0" in cmdline:
        raise BootError(f"{what} contains a NUL character")
    return cmdline.encode() + b"\0"


def _needs_ram(what: str, start: int, end: int, mem) -> BootError:
    """The error for [start, end) not being guest RAM."""
    if end <= MMIO_HOLE_START:
        need = -(-end // MiB)
        return BootError(
            f"{what} at {start:#x}-{end:#x} needs at least {need} MiB of guest memory; the guest has {mem.size // MiB} MiB"
        )
    return BootError(f"{what} at {start:#x}-{end:#x} is not in guest RAM (RAM below 4 GiB ends at {MMIO_HOLE_START:#x})")


def kernel_segments(elf, mem, ram_end: int | None = None) -> list:
    """The ELF's PT_LOAD segments, each checked to lie in guest RAM (below `ram_end`, if
    given) and clear of the boot structures."""
    segments = elf.load_segments()
    if not segments:
        raise BootError("kernel ELF has no PT_LOAD segments: nothing to load")
    for seg in segments:
        start, end = seg.p_paddr, seg.p_paddr + seg.p_memsz
        if layout.overlaps(start, seg.p_memsz, layout.BOOT_AREA_START, layout.BOOT_AREA_END - layout.BOOT_AREA_START):
            raise BootError(
                f"kernel segment {seg.index} at {start:#x}-{end:#x} overlaps the boot structures at "
                f"{layout.BOOT_AREA_START:#x}-{layout.BOOT_AREA_END:#x}"
            )
        if not mem.contains(start, seg.p_memsz) or (ram_end is not None and end > ram_end):
            raise _needs_ram(f"kernel segment {seg.index}", start, end, mem)
    return segments


def load_pvh(
    mem,
    image: bytes | memoryview,
    cmdline: str,
    modules: Sequence[tuple[bytes, str]] = (),
    rsdp: int = 0,
) -> BootCpuState:
    """Load a PVH ELF kernel, its modules and command line; return the entry CPU state.

    `modules` are (contents, command line) pairs; Linux takes the first as its initrd.
    Everything is checked before guest memory is written.
    """
    elf = parse_elf(image)
    note = elf.find_note(XEN_NOTE_NAME, XenElfNote.XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        raise BootError("kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); it is not a PVH-bootable ELF")
    entry = _entry_from_desc(note.desc)

    segments = kernel_segments(elf, mem)
    if not mem.contains(entry):
        raise _needs_ram("kernel's PVH entry point", entry, entry + 1, mem)
    image_end = max(seg.p_paddr + seg.p_memsz for seg in segments)

    cmdline_bytes = _encode_cmdline(cmdline, "kernel command line")
    if len(cmdline_bytes) > layout.CMDLINE_SIZE:
        raise BootError(
            f"kernel command line is {len(cmdline_bytes) - 1} bytes; at most {layout.CMDLINE_SIZE - 1} fit"
        )

    # Modules go page-aligned right after the kernel image, in order.
    if len(modules) > MAX_MODULES:
        raise BootError(f"{len(modules)} modules given; at most {MAX_MODULES} fit in the module list")
    placed = []  # (paddr, data, cmdline_paddr)
    module_cmdlines = bytearray()
    next_addr = layout.align_up(image_end, layout.PAGE_SIZE)
    for i, (data, mod_cmdline) in enumerate(modules):
        paddr = next_addr
        if not mem.contains(paddr, len(data)):
            raise _needs_ram(f"module {i} ({len(data)} bytes)", paddr, paddr + len(data), mem)
        cmdline_paddr = 0  # start_info.h: 0 means "not present"
        if mod_cmdline:
            cmdline_paddr = layout.MODULE_CMDLINES_START + len(module_cmdlines)
            module_cmdlines += _encode_cmdline(mod_cmdline, f"module {i}'s command line")
        placed.append((paddr, data, cmdline_paddr))
        next_addr = layout.align_up(paddr + len(data), layout.PAGE_SIZE)
    if len(module_cmdlines) > layout.MODULE_CMDLINES_SIZE:
        raise BootError(
            f"module command lines take {len(module_cmdlines)} bytes; at most {layout.MODULE_CMDLINES_SIZE} fit"
        )

    # The memory map is the machine's e820 as is: the kernel's own ranges stay RAM,
    # as a firmware would report them; the kernel reserves its image itself.
    e820 = mem.e820()
    if len(e820) > MAX_MEMMAP_ENTRIES:
        raise BootError(f"memory map has {len(e820)} entries; at most {MAX_MEMMAP_ENTRIES} fit")

    # -- everything checked: write --------------------------------------------------
    for seg in segments:
        mem.write(seg.p_paddr, elf.segment_data(seg))
        tail = seg.p_memsz - seg.p_filesz
        if tail:
            mem.write(seg.p_paddr + seg.p_filesz, bytes(tail))  # .bss

    mem.write(layout.CMDLINE_START, cmdline_bytes)
    if module_cmdlines:
        mem.write(layout.MODULE_CMDLINES_START, module_cmdlines)

    modlist = bytearray()
    for paddr, data, cmdline_paddr in placed:
        mem.write(paddr, data)
        modlist += HVM_MODLIST_ENTRY.pack(paddr, len(data), cmdline_paddr, 0)
    if modlist:
        mem.write(layout.PVH_MODLIST_START, modlist)

    memmap = b"".join(HVM_MEMMAP_TABLE_ENTRY.pack(addr, size, type_, 0) for addr, size, type_ in e820)
    mem.write(layout.PVH_MEMMAP_START, memmap)

    start_info = HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE,
        HVM_START_INFO_VERSION,
        0,  # flags: no SIF_* apply (not privileged, not dom0)
        len(placed),
        layout.PVH_MODLIST_START if placed else 0,
        layout.CMDLINE_START,
        rsdp,
        layout.PVH_MEMMAP_START,
        len(e820),
        0,
    )
    mem.write(layout.PVH_START_INFO_START, start_info)

    # pvh.pandoc leaves selectors unspecified but the kernel may reload them from the
    # GDTR it finds, so the GDT must really be there.
    write_gdt(mem, layout.GDT_START)
    return protected_mode_32(entry, ebx=layout.PVH_START_INFO_START, gdt_base=layout.GDT_START)
