"""Just enough ELF to boot: the file header, program headers and notes of an x86 executable.

Names follow <elf.h>. Every offset and size read from the file is checked against the
file before it is used, so a truncated or hostile image raises BootError naming the
broken part instead of an IndexError or struct.error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import BootError

ELFMAG = b"\x7fELF"


class ElfClass(IntEnum):  # e_ident[EI_CLASS]
    ELFCLASS32 = 1
    ELFCLASS64 = 2


class ElfData(IntEnum):  # e_ident[EI_DATA]
    ELFDATA2LSB = 1
    ELFDATA2MSB = 2


class ElfType(IntEnum):  # e_type
    ET_REL = 1
    ET_EXEC = 2
    ET_DYN = 3
    ET_CORE = 4


class ElfMachine(IntEnum):  # e_machine
    EM_386 = 3
    EM_X86_64 = 62


class SegmentType(IntEnum):  # p_type
    PT_NULL = 0
    PT_LOAD = 1
    PT_DYNAMIC = 2
    PT_INTERP = 3
    PT_NOTE = 4


EI_CLASS = 4
EI_DATA = 5
EI_VERSION = 6
EV_CURRENT = 1
EI_NIDENT = 16
PN_XNUM = 0xFFFF  # e_phnum escape to section 0's sh_info; no kernel needs it

# After e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = {ElfClass.ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), ElfClass.ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
# ELF32: p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
# ELF64: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = {ElfClass.ELFCLASS32: struct.Struct("<IIIIIIII"), ElfClass.ELFCLASS64: struct.Struct("<IIQQQQQQ")}
_NHDR = struct.Struct("<III")  # n_namesz, n_descsz, n_type (same in both classes)


@dataclass(frozen=True)
class ProgramHeader:
    """One entry of the program header table (Elf32_Phdr or Elf64_Phdr) and its index."""

    index: int
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass(frozen=True)
class Note:
    """One ELF note of a PT_NOTE segment."""

    name: str  # n_name without its NUL
    type: int  # n_type
    desc: bytes


@dataclass(frozen=True)
class ElfFile:
    """An ELF image's header fields and program headers (parse_elf makes one)."""

    data: bytes | memoryview
    ei_class: ElfClass
    e_type: int
    e_machine: int
    e_entry: int
    e_phoff: int
    e_phentsize: int
    e_phnum: int
    program_headers: tuple[ProgramHeader, ...]

    def load_segments(self) -> list[ProgramHeader]:
        """The PT_LOAD segments that occupy memory, in file order."""
        return [p for p in self.program_headers if p.p_type == SegmentType.PT_LOAD and p.p_memsz > 0]

    def segment_data(self, phdr: ProgramHeader) -> memoryview:
        """The file bytes of a segment (p_filesz of them; already bounds-checked)."""
        return memoryview(self.data)[phdr.p_offset : phdr.p_offset + phdr.p_filesz]

    def notes(self) -> list[Note]:
        """Every note in every PT_NOTE segment."""
        found = []
        for phdr in self.program_headers:
            if phdr.p_type == SegmentType.PT_NOTE:
                found.extend(_parse_notes(self.segment_data(phdr), phdr))
        return found

    def find_note(self, name: str, type_: int) -> Note | None:
        return next((n for n in self.notes() if n.name == name and n.type == type_), None)


def is_elf(image: bytes | memoryview) -> bool:
    return bytes(image[:4]) == ELFMAG


def parse_elf(image: bytes | memoryview) -> ElfFile:
    """Parse an x86 ELF32/ELF64 executable's headers; BootError if malformed."""
    size = len(image)
    if size < EI_NIDENT or not is_elf(image):
        raise BootError("not an ELF file (no \\x7fELF magic)")
    ident = bytes(image[:EI_NIDENT])
    try:
        ei_class = ElfClass(ident[EI_CLASS])
    except ValueError:
        raise BootError(f"ELF file has an unknown class {ident[EI_CLASS]} (e_ident[EI_CLASS])") from None
    if ident[EI_DATA] != ElfData.ELFDATA2LSB:
        raise BootError("ELF file is not little-endian (e_ident[EI_DATA]), so not an x86 kernel")
    if ident[EI_VERSION] != EV_CURRENT:
        raise BootError(f"ELF file has unknown version {ident[EI_VERSION]} (e_ident[EI_VERSION])")

    ehdr = _EHDR[ei_class]
    if size < EI_NIDENT + ehdr.size:
        raise BootError(f"ELF file is truncated: {size} bytes, shorter than its {EI_NIDENT + ehdr.size}-byte header")
    (e_type, e_machine, _e_version, e_entry, e_phoff, _e_shoff, _e_flags, _e_ehsize,
     e_phentsize, e_phnum, _e_shentsize, _e_shnum, _e_shstrndx) = ehdr.unpack_from(image, EI_NIDENT)  # fmt: skip

    if e_type != ElfType.ET_EXEC:
        raise BootError(f"ELF file is not an executable (e_type {e_type}, expected ET_EXEC)")
    if e_machine not in (ElfMachine.EM_386, ElfMachine.EM_X86_64):
        raise BootError(f"ELF file is not for x86 (e_machine {e_machine})")
    if e_phnum == 0:
        raise BootError("ELF file has no program headers (e_phnum is 0)")
    if e_phnum == PN_XNUM:
        raise BootError("ELF file uses extended program header numbering (e_phnum PN_XNUM), not supported")
    phdr = _PHDR[ei_class]
    if e_phentsize < phdr.size:
        raise BootError(f"ELF program header size e_phentsize {e_phentsize} is below the {phdr.size} bytes of an entry")
    if e_phoff + e_phnum * e_phentsize > size:
        raise BootError(
            f"ELF program headers ({e_phnum} x {e_phentsize} bytes at e_phoff {e_phoff:#x}) run past the end of "
            f"the {size}-byte file"
        )

    headers = []
    for i in range(e_phnum):
        fields = phdr.unpack_from(image, e_phoff + i * e_phentsize)
        if ei_class == ElfClass.ELFCLASS32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = fields
        else:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
        ph = ProgramHeader(i, p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
        _check_segment(ph, size)
        headers.append(ph)

    return ElfFile(image, ei_class, e_type, e_machine, e_entry, e_phoff, e_phentsize, e_phnum, tuple(headers))


def _check_segment(ph: ProgramHeader, size: int) -> None:
    if ph.p_type not in (SegmentType.PT_LOAD, SegmentType.PT_NOTE):
        return  # never read, so never trusted
    what = "PT_LOAD" if ph.p_type == SegmentType.PT_LOAD else "PT_NOTE"
    if ph.p_offset + ph.p_filesz > size:
        raise BootError(
            f"ELF {what} segment {ph.index} (p_offset {ph.p_offset:#x}, p_filesz {ph.p_filesz:#x}) runs past "
            f"the end of the {size}-byte file: the file is truncated"
        )
    if ph.p_type == SegmentType.PT_LOAD and ph.p_filesz > ph.p_memsz:
        raise BootError(
            f"ELF PT_LOAD segment {ph.index} has p_filesz {ph.p_filesz:#x} larger than p_memsz {ph.p_memsz:#x}"
        )


def _parse_notes(data: memoryview, ph: ProgramHeader) -> list[Note]:
    # Notes are 4-byte aligned in practice (the gABI's 8 for ELF64 is used only when
    # the segment itself says p_align 8, as GNU property notes do).
    align = 8 if ph.p_align == 8 else 4
    notes = []
    pos = 0
    while pos + _NHDR.size <= len(data):
        namesz, descsz, n_type = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _round_up(namesz, align)
        end = desc_at + _round_up(descsz, align)
        # The final padding may be missing at the very end of the segment.
        if desc_at + descsz > len(data) or name_at + namesz > len(data):
            raise BootError(
                f"ELF note at offset {pos:#x} of PT_NOTE segment {ph.index} (n_namesz {namesz}, n_descsz {descsz}) "
                f"runs past the segment's {len(data)} bytes"
            )
        name = bytes(data[name_at : name_at + namesz]).split(b"\0", 1)[0].decode("latin-1")
        notes.append(Note(name, n_type, bytes(data[desc_at : desc_at + descsz])))
        pos = end
    return notes


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align
