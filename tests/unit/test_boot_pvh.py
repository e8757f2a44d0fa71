"""PVH loading: synthetic ELF kernels with a Xen PHYS32_ENTRY note, checked byte by byte."""

import struct

import pytest

from asyncvmm.boot import cpu_state, elf
from asyncvmm.boot.pvh import load_pvh, pvh_entry
from asyncvmm.errors import BootError, ConfigError
from asyncvmm.vstate.memory import GuestMemory

MiB = 1 << 20


ENTRY = 0x1000040
XEN_ENTRY_NOTE = ("Xen", 18, struct.pack("<I", ENTRY))


def note_bytes(name, n_type, desc):
    raw_name = name.encode() + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(raw_name), len(desc), n_type) + pad(raw_name) + pad(desc)


def build_elf(segments=((0x1000000, b"\xf4" * 0x100, 0x2345),), notes=(XEN_ENTRY_NOTE,), *, bits=64,
              e_type=2, e_machine=None, e_entry=0xFFFFFFFF81000000, data_enc=1):  # fmt: skip
    """An ELF executable: header, program headers, the notes, then each segment's bytes.

    segments: (p_paddr, file bytes, p_memsz).
    """
    if e_machine is None:
        e_machine = 62 if bits == 64 else 3
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phnum = len(segments) + (1 if notes else 0)
    offset = ehsize + phnum * phentsize
    note_blob = b"".join(note_bytes(*n) for n in notes)
    phdrs, blobs = [], []
    if notes:
        phdrs.append((4, offset, 0, 0, len(note_blob), len(note_blob), 4, 4))
        blobs.append(note_blob)
        offset += len(note_blob)
    for paddr, data, memsz in segments:
        phdrs.append((1, offset, (paddr + 0xFFFFFFFF80000000) % (1 << 64) if bits == 64 else paddr, paddr, len(data), memsz, 7, 0x1000))
        blobs.append(data)
        offset += len(data)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, data_enc, 1]) + bytes(9)
    if bits == 64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, e_machine, 1, e_entry, ehsize, 0, 0, ehsize, phentsize, phnum, 64, 0, 0)
        ph = b"".join(struct.pack("<IIQQQQQQ", t, fl, off, va, pa, fs, ms, al) for t, off, va, pa, fs, ms, fl, al in phdrs)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", e_type, e_machine, 1, e_entry & 0xFFFFFFFF, ehsize, 0, 0, ehsize, phentsize, phnum, 40, 0, 0)
        ph = b"".join(struct.pack("<IIIIIIII", t, off, va & 0xFFFFFFFF, pa, fs, ms, fl, al) for t, off, va, pa, fs, ms, fl, al in phdrs)
    return ehdr + ph + b"".join(blobs)


# -- ELF parsing ---------------------------------------------------------------------------


def test_parse_elf64_headers_and_notes():
    image = build_elf(notes=(XEN_ENTRY_NOTE, ("GNU", 3, b"\x01\x02\x03")))
    f = elf.parse_elf(image)
    assert f.ei_class == elf.ElfClass.ELFCLASS64
    assert (f.e_type, f.e_machine, f.e_entry, f.e_phoff, f.e_phentsize, f.e_phnum) == (2, 62, 0xFFFFFFFF81000000, 64, 56, 2)
    (load,) = f.load_segments()
    assert (load.p_type, load.p_paddr, load.p_filesz, load.p_memsz) == (1, 0x1000000, 0x100, 0x2345)
    assert load.p_vaddr == 0xFFFFFFFF81000000
    assert bytes(f.segment_data(load)) == b"\xf4" * 0x100
    assert f.notes() == [elf.Note("Xen", 18, struct.pack("<I", ENTRY)), elf.Note("GNU", 3, b"\x01\x02\x03")]


def test_parse_elf32():
    f = elf.parse_elf(build_elf(bits=32))
    assert f.ei_class == elf.ElfClass.ELFCLASS32
    assert (f.e_machine, f.e_phoff, f.e_phentsize, f.e_phnum) == (3, 52, 32, 2)
    (load,) = f.load_segments()
    assert (load.p_paddr, load.p_filesz, load.p_memsz) == (0x1000000, 0x100, 0x2345)
    assert f.find_note("Xen", 18).desc == struct.pack("<I", ENTRY)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:40], "truncated"),
        (lambda b: b"MZ" + b[2:], "not an ELF"),
        (lambda b: b[:4] + b"\x03" + b[5:], "unknown class"),
        (lambda b: b[:5] + b"\x02" + b[6:], "not little-endian"),
        (lambda b: b[:64 + 56], "program headers"),  # only one of two phdrs present
        (lambda b: b[:-1], "PT_LOAD segment 1"),  # segment's bytes cut short
    ],
    ids=["header", "magic", "class", "endian", "phdrs", "segment"],
)
def test_malformed_elf(mutate, message):
    with pytest.raises(BootError, match=message):
        elf.parse_elf(mutate(build_elf()))


def test_elf_wrong_type_and_machine():
    with pytest.raises(BootError, match="not an executable"):
        elf.parse_elf(build_elf(e_type=3))
    with pytest.raises(BootError, match="not for x86"):
        elf.parse_elf(build_elf(e_machine=183))


def test_elf_no_program_headers():
    image = bytearray(build_elf())
    struct.pack_into("<H", image, 56, 0)  # e_phnum
    with pytest.raises(BootError, match="no program headers"):
        elf.parse_elf(bytes(image))


def test_elf_phentsize_too_small():
    image = bytearray(build_elf())
    struct.pack_into("<H", image, 54, 40)  # e_phentsize
    with pytest.raises(BootError, match="e_phentsize 40"):
        elf.parse_elf(bytes(image))


def test_elf_filesz_above_memsz():
    with pytest.raises(BootError, match="p_filesz 0x100 larger than p_memsz 0x80"):
        elf.parse_elf(build_elf(segments=((0x1000000, b"\0" * 0x100, 0x80),)))


def test_elf_note_past_segment():
    image = bytearray(build_elf())
    # The note header sits right after the 2 phdrs: n_descsz claims 64 bytes.
    struct.pack_into("<I", image, 64 + 2 * 56 + 4, 64)
    with pytest.raises(BootError, match="runs past the segment"):
        elf.parse_elf(bytes(image)).notes()


# -- load_pvh ------------------------------------------------------------------------------


def test_load_pvh_writes_segments_and_start_info(mem):
    payload = bytes(range(256)) * 2
    mem.write(0x1000000 + len(payload), b"\xaa" * 0x100)  # the .bss must be zeroed
    image = build_elf(segments=((0x1000000, payload, 0x2345), (0x1400000, b"DATA", 0x1000)))
    state = load_pvh(mem, image, "console=ttyS0 reboot=t")

    assert mem.read(0x1000000, len(payload)) == payload
    assert mem.read(0x1000000 + len(payload), 0x2345 - len(payload)) == bytes(0x2345 - len(payload))
    assert mem.read(0x1400000, 0x1000) == b"DATA" + bytes(0x1000 - 4)

    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, reserved = struct.unpack(
        "<IIIIQQQQII", mem.read(0x3000, 56)
    )
    assert magic == 0x336EC578
    assert version == 1
    assert flags == 0
    assert nr_modules == 0
    assert modlist == 0
    assert cmdline == 0x20000
    assert rsdp == 0
    assert memmap == 0x5000
    assert memmap_entries == 3
    assert reserved == 0

    assert mem.read(0x20000, 23) == b"console=ttyS0 reboot=t\0"
    entries = [struct.unpack("<QQII", mem.read(0x5000 + 24 * i, 24)) for i in range(3)]
    assert entries == [
        (0x0, 0x9FC00, 1, 0),
        (0x9FC00, 0x60400, 2, 0),
        (0x100000, 63 * MiB, 1, 0),  # the kernel's own range is still RAM
    ]

    assert state.rip == ENTRY
    assert state.rbx == 0x3000
    assert state.rsi == 0 and state.rsp == 0
    assert state.rflags == 0x2
    assert state.cr0 == 0x11  # PE | ET
    assert (state.cr3, state.cr4, state.efer) == (0, 0, 0)


def test_load_pvh_cpu_state_segments(mem):
    state = load_pvh(mem, build_elf(), "")
    cs = state.cs
    assert (cs.base, cs.limit, cs.selector, cs.type, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g) == (
        0, 0xFFFFFFFF, 0x08, 0xB, 1, 0, 1, 1, 0, 1
    )
    for seg in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert (seg.base, seg.limit, seg.selector, seg.type, seg.present, seg.db, seg.s, seg.l, seg.g) == (
            0, 0xFFFFFFFF, 0x18, 0x3, 1, 1, 1, 0, 1
        )
    tr = state.tr
    assert (tr.base, tr.limit, tr.selector, tr.type, tr.present, tr.s, tr.g) == (0, 0x67, 0x20, 0xB, 1, 0, 0)
    assert state.ldt.unusable == 1
    assert (state.gdt.base, state.gdt.limit) == (0x1000, 47)
    assert (state.idt.base, state.idt.limit) == (0, 0)
    # The GDT in guest memory matches the cached segments.
    gdt = struct.unpack("<6Q", mem.read(0x1000, 48))
    assert gdt == (0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067, 0)
    assert gdt[cs.selector >> 3] == cs.descriptor()
    assert gdt[state.ds.selector >> 3] == state.ds.descriptor()
    assert gdt[tr.selector >> 3] == tr.descriptor()


def test_load_pvh_empty_cmdline_and_rsdp(mem):
    load_pvh(mem, build_elf(), "", rsdp=0xE0000)
    assert struct.unpack("<Q", mem.read(0x3000 + 24, 8))[0] == 0x20000
    assert struct.unpack("<Q", mem.read(0x3000 + 32, 8))[0] == 0xE0000
    assert mem.read(0x20000, 1) == b"\0"


def test_load_pvh_modules(mem):
    initrd = b"\x07" * 0x1800
    extra = b"module-two"
    load_pvh(mem, build_elf(), "root=/dev/ram0", modules=[(initrd, ""), (extra, "opt=1")])

    nr_modules, modlist = struct.unpack("<IQ", mem.read(0x3000 + 12, 12))
    assert (nr_modules, modlist) == (2, 0x4000)
    # Kernel image ends at 0x1000000 + 0x2345: modules start at the next page.
    assert struct.unpack("<QQQQ", mem.read(0x4000, 32)) == (0x1003000, 0x1800, 0, 0)
    assert struct.unpack("<QQQQ", mem.read(0x4020, 32)) == (0x1005000, len(extra), 0x30000, 0)
    assert mem.read(0x1003000, 0x1800) == initrd
    assert mem.read(0x1005000, len(extra)) == extra
    assert mem.read(0x30000, 6) == b"opt=1\0"


def test_load_pvh_8_byte_entry_note(mem):
    image = build_elf(notes=(("Xen", 18, struct.pack("<Q", 0x1000100)),))
    assert load_pvh(mem, image, "").rip == 0x1000100
    assert pvh_entry(image) == 0x1000100


def test_load_pvh_elf32(mem):
    state = load_pvh(mem, build_elf(bits=32), "x")
    assert state.rip == ENTRY
    assert mem.read(0x1000000, 0x100) == b"\xf4" * 0x100


def test_other_xen_notes_are_not_the_entry(mem):
    image = build_elf(notes=(("Xen", 1, b"\0" * 8), ("Linux", 18, struct.pack("<I", ENTRY))))
    assert pvh_entry(image) is None
    with pytest.raises(BootError, match=r"has no PVH entry note \(XEN_ELFNOTE_PHYS32_ENTRY\)"):
        load_pvh(mem, image, "")


def test_no_note(mem):
    with pytest.raises(BootError, match=r"has no PVH entry note \(XEN_ELFNOTE_PHYS32_ENTRY\)"):
        load_pvh(mem, build_elf(notes=()), "")


def test_boot_error_is_config_error(mem):
    with pytest.raises(ConfigError):
        load_pvh(mem, build_elf(notes=()), "")


@pytest.mark.parametrize("desc", [b"\0\0", b"\0" * 12])
def test_bad_entry_note_size(mem, desc):
    with pytest.raises(BootError, match=f"{len(desc)}-byte value"):
        load_pvh(mem, build_elf(notes=(("Xen", 18, desc),)), "")


def test_entry_above_4g(mem):
    with pytest.raises(BootError, match="not a 32-bit address"):
        load_pvh(mem, build_elf(notes=(("Xen", 18, struct.pack("<Q", 1 << 32)),)), "")


def test_segment_outside_ram(mem):
    image = build_elf(segments=((100 * MiB, b"x", 0x1000),))
    with pytest.raises(BootError, match="needs at least 101 MiB of guest memory; the guest has 64 MiB"):
        load_pvh(mem, image, "")


def test_segment_straddling_end_of_ram(mem):
    image = build_elf(segments=((64 * MiB - 0x800, b"x", 0x1000),))
    with pytest.raises(BootError, match="needs at least 65 MiB"):
        load_pvh(mem, image, "")


def test_segment_in_mmio_hole():
    big = GuestMemory(4 * 1024 * MiB)  # MAP_NORESERVE: costs nothing until touched
    try:
        with pytest.raises(BootError, match="not in guest RAM"):
            load_pvh(big, build_elf(segments=((0xC0000000, b"x", 0x1000),)), "")
    finally:
        big.close()


def test_entry_outside_ram(mem):
    image = build_elf(notes=(("Xen", 18, struct.pack("<I", 80 * MiB)),))
    with pytest.raises(BootError, match="entry point .* needs at least 81 MiB"):
        load_pvh(mem, image, "")


def test_segment_over_boot_structures(mem):
    image = build_elf(segments=((0x10000, b"x", 0x20000),))
    with pytest.raises(BootError, match="overlaps the boot structures at 0x1000-0x40000"):
        load_pvh(mem, image, "")


def test_segment_past_eof(mem):
    with pytest.raises(BootError, match="runs past the end of the .*file"):
        load_pvh(mem, build_elf()[:-10], "")


def test_no_load_segments(mem):
    with pytest.raises(BootError, match="no PT_LOAD"):
        load_pvh(mem, build_elf(segments=()), "")


def test_cmdline_too_long_leaves_memory_untouched(mem):
    with pytest.raises(BootError, match="command line is 65536 bytes; at most 65535 fit"):
        load_pvh(mem, build_elf(), "a" * 0x10000)
    assert mem.read(0x1000000, 0x100) == bytes(0x100)
    assert mem.read(0x3000, 56) == bytes(56)
    load_pvh(mem, build_elf(), "a" * 0xFFFF)  # the longest that fits
    assert mem.read(0x2FFFF, 1) == b"\0"


def test_cmdline_with_nul(mem):
    with pytest.raises(BootError, match="NUL"):
        load_pvh(mem, build_elf(), "a\0b")


def test_module_does_not_fit(mem):
    with pytest.raises(BootError, match="module 0 .* needs at least 65 MiB"):
        load_pvh(mem, build_elf(), "", modules=[(bytes(48 * MiB), "")])


def test_too_many_modules(mem):
    with pytest.raises(BootError, match="129 modules given; at most 128"):
        load_pvh(mem, build_elf(), "", modules=[(b"m", "")] * 129)


def test_segment_descriptor_encoding():
    assert cpu_state.CODE32_SEGMENT.descriptor() == 0x00CF9B000000FFFF
    assert cpu_state.CODE64_SEGMENT.descriptor() == 0x00AF9B000000FFFF
    assert cpu_state.DATA_SEGMENT.descriptor() == 0x00CF93000000FFFF
    assert cpu_state.TSS_SEGMENT.descriptor() == 0x00008B0000000067
    seg = cpu_state.Segment(base=0x12345678, limit=0xABCDE, selector=0, type=0x3, present=1, dpl=3, db=0, s=1, l=0, g=0)
    assert seg.descriptor() == 0x120AF3345678BCDE
    with pytest.raises(ValueError):
        cpu_state.Segment(0, 0x1000, 0, 3, 1, 0, 1, 1, 0, g=1).descriptor()
