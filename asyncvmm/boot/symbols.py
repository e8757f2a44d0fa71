"""A kernel's symbols, to name guest RIPs: from a System.map or an ELF's .symtab.

A System.map is `nm -n vmlinux`: "ffffffff81000000 T _text" per line. An unstripped
vmlinux has the same in its SHT_SYMTAB section (Elf64_Sym, <elf.h>); a bzImage has
neither, so for it the System.map beside it is used (Debian installs
/boot/System.map-VERSION next to /boot/vmlinuz-VERSION).
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass

from .elf import is_elf

# Text symbol types in nm's output: t/T code, w/W weak (code here), and the init/exit
# text Linux marks with the same letters.
TEXT_TYPES = frozenset("tTwW")
SHT_SYMTAB = 2
STT_FUNC = 2
# Per ELF class: the file header (from the start), a section header (name type flags
# addr offset size link info addralign entsize) and a symbol, with the index of each
# field read. ELF32 test guests have symbols too.
_LAYOUT = {
    2: (struct.Struct("<16xHHIQQQIHHHHHH"), struct.Struct("<IIQQQQIIQQ"), struct.Struct("<IBBHQQ"), (0, 1, 3, 4)),
    1: (struct.Struct("<16xHHIIIIIHHHHHH"), struct.Struct("<IIIIIIIIII"), struct.Struct("<IIIBBH"), (0, 3, 5, 1)),
}


@dataclass
class Symbols:
    addresses: list[int]
    names: list[str]
    source: str

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(name, offset) of the symbol at or below `addr`, or None below the first."""
        i = bisect.bisect_right(self.addresses, addr) - 1
        if i < 0:
            return None
        return self.names[i], addr - self.addresses[i]

    def __len__(self) -> int:
        return len(self.addresses)


def _build(pairs: list[tuple[int, str]], source: str) -> Symbols:
    pairs.sort()
    return Symbols([a for a, _ in pairs], [n for _, n in pairs], source)


def parse_system_map(text: str, source: str = "System.map") -> Symbols:
    pairs = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in TEXT_TYPES:
            try:
                pairs.append((int(parts[0], 16), parts[2]))
            except ValueError:
                continue
    return _build(pairs, source)


def elf_symbols(image: bytes | memoryview, source: str = "the kernel's .symtab") -> Symbols | None:
    """The function symbols of an ELF's .symtab, or None if it has none."""
    view = memoryview(image)
    if not is_elf(view) or view[4] not in _LAYOUT or len(view) < _LAYOUT[view[4]][0].size:
        return None
    ehdr, shdr, sym, (i_name, i_info, i_shndx, i_value) = _LAYOUT[view[4]]
    fields = ehdr.unpack_from(view)
    shoff, shentsize, shnum = fields[5], fields[10], fields[11]
    if not shoff or shentsize < shdr.size or shoff + shnum * shentsize > len(view):
        return None
    sections = [shdr.unpack_from(view, shoff + i * shentsize) for i in range(shnum)]
    pairs = []
    for sh in sections:
        if sh[1] != SHT_SYMTAB or sh[6] >= shnum or sh[9] < sym.size:
            continue
        offset, size, entsize = sh[4], sh[5], sh[9]
        strtab = sections[sh[6]]
        str_off, str_size = strtab[4], strtab[5]
        if offset + size > len(view) or str_off + str_size > len(view):
            return None
        strings = bytes(view[str_off : str_off + str_size])
        for pos in range(offset, offset + size - sym.size + 1, entsize):
            entry = sym.unpack_from(view, pos)
            name_at, info, shndx, value = entry[i_name], entry[i_info], entry[i_shndx], entry[i_value]
            if info & 0xF != STT_FUNC or not value or not shndx:
                continue
            end = strings.find(b"\0", name_at)
            pairs.append((value, strings[name_at : end if end >= 0 else None].decode(errors="replace")))
    return _build(pairs, source) if pairs else None


def find_symbols(kernel_path: str, kernel: bytes | memoryview, override: str = "") -> Symbols | None:
    """The symbols to name RIPs with: `override` (a System.map or vmlinux), the kernel's
    own .symtab, or a System.map beside the kernel (System.map, System.map-VERSION)."""
    if override:
        return load(override)
    own = elf_symbols(kernel, f"{kernel_path} (.symtab)")
    if own is not None:
        return own
    directory, name = os.path.split(os.path.abspath(kernel_path))
    candidates = ["System.map"]
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
        if name.startswith(prefix):
            candidates.insert(0, "System.map-" + name[len(prefix):])
    for candidate in candidates:
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return load(path)
    return None


def load(path: str) -> Symbols | None:
    """Symbols from a file: a vmlinux with .symtab, or a System.map."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if is_elf(data):
        return elf_symbols(data, f"{path} (.symtab)")
    symbols = parse_system_map(data.decode(errors="replace"), path)
    # Debian ships a placeholder System.map ("The real System.map is in the ...-dbg package").
    return symbols if len(symbols) else None
