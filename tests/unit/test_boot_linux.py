"""bzImage loading (Linux 64-bit boot protocol): boot_params byte by byte, initrd, paging."""

import glob
import struct

import pytest

from asyncvmm.boot import cpu_state
from asyncvmm.boot.linux import Compression, bzimage_info, kernel_kind, load_bzimage
from asyncvmm.errors import BootError
from asyncvmm.vstate.memory import GuestMemory

MiB = 1 << 20


ZERO_PAGE = 0x2000
GZIP_PAYLOAD = b"\x1f\x8b\x08\x00" + b"compressed kernel" * 4
PAYLOAD_OFFSET = 0x300


def u(buf, offset, fmt):
    return struct.unpack_from("<" + fmt, buf, offset)[0]


def build_bzimage(*, version=0x020F, setup_sects=4, loadflags=0x01, xloadflags=0x03, relocatable=1,
                  kernel_alignment=0x200000, pref_address=0x1000000, init_size=0x800000, cmdline_size=2047,
                  initrd_addr_max=0x7FFFFFFF, jump=0x6A, payload=GZIP_PAYLOAD, pm_size=0x3000,
                  boot_flag=0xAA55, magic=b"HdrS"):  # fmt: skip
    """Boot sector + setup sectors with a setup header, then the protected-mode kernel."""
    sects = setup_sects or 4
    setup = bytearray(b"\x11" * ((sects + 1) * 512))  # filler: must not leak into boot_params
    setup[0x1F1:0x290] = bytes(0x290 - 0x1F1)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<H", setup, 0x1F2, 1)  # root_flags
    struct.pack_into("<I", setup, 0x1F4, pm_size // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FC, 0x0801)  # root_dev
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    struct.pack_into("<BB", setup, 0x200, 0xEB, jump)
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x3A00)  # kernel_version
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<B", setup, 0x235, 21)  # min_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x248, PAYLOAD_OFFSET)
    struct.pack_into("<I", setup, 0x24C, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x264, 0x190)  # handover_offset
    struct.pack_into("<I", setup, 0x268, 0x2A0)  # kernel_info_offset
    setup[0x202 + jump : 0x290] = b"\xcc" * (0x290 - 0x202 - jump)  # past the header: not copied
    pm = bytearray(pm_size)
    pm[0x200:0x204] = b"\x48\x31\xc0\x90"  # "the 64-bit entry"
    pm[PAYLOAD_OFFSET : PAYLOAD_OFFSET + len(payload)] = payload
    pm[-4:] = b"END!"
    return bytes(setup), bytes(pm)


def bzimage(**kw):
    setup, pm = build_bzimage(**kw)
    return setup + pm


# -- bzimage_info / kernel_kind ------------------------------------------------------------


def test_bzimage_info():
    info = bzimage_info(bzimage())
    assert info.version == 0x020F and info.version_str == "2.15"
    assert info.header_end == 0x26C
    assert info.setup_sects == 4
    assert info.kernel_offset == 5 * 512
    assert info.kernel_size == 0x3000
    assert info.loadflags == 0x01
    assert info.xloadflags == 0x03
    assert (info.relocatable_kernel, info.kernel_alignment, info.pref_address) == (1, 0x200000, 0x1000000)
    assert (info.init_size, info.initrd_addr_max, info.cmdline_size) == (0x800000, 0x7FFFFFFF, 2047)
    assert (info.payload_offset, info.payload_length) == (PAYLOAD_OFFSET, len(GZIP_PAYLOAD))
    assert info.payload_file_offset == 5 * 512 + PAYLOAD_OFFSET
    assert info.compression is Compression.GZIP


def test_setup_sects_zero_means_four():
    info = bzimage_info(bzimage(setup_sects=0))
    assert (info.setup_sects, info.kernel_offset) == (4, 0xA00)


@pytest.mark.parametrize(
    "magic, kind",
    [
        (b"\x1f\x8b\x08", Compression.GZIP),
        (b"\x1f\x9e", Compression.GZIP),
        (b"BZh91AY&SY", Compression.BZIP2),
        (b"\x5d\x00\x00\x80\x00", Compression.LZMA),
        (b"\xfd7zXZ\x00\x00", Compression.XZ),
        (b"\x02\x21\x4c\x18", Compression.LZ4),
        (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
        (b"\x89LZO\x00\r\n\x1a\n", Compression.LZO),
        (b"\x7fELF\x02\x01", Compression.NONE),
        (b"\x00\x00\x00\x00", None),
    ],
)
def test_compression_detection(magic, kind):
    assert bzimage_info(bzimage(payload=magic + b"\0" * 16)).compression == kind


def test_payload_past_end():
    setup, pm = build_bzimage()
    image = bytearray(setup + pm)
    struct.pack_into("<I", image, 0x24C, 0x3000)  # payload_length
    with pytest.raises(BootError, match="payload .* runs past"):
        bzimage_info(bytes(image))


def test_kernel_kind():
    assert kernel_kind(bzimage()) == "bzimage"
    assert kernel_kind(b"\x7fELF\x02\x01\x01" + bytes(64)) == "elf"
    assert kernel_kind(b"#!/bin/sh\necho hi\n") is None
    assert kernel_kind(b"") is None
    assert kernel_kind(bzimage(magic=b"HdrX")) is None
    assert kernel_kind(bzimage(boot_flag=0x1234)) is None


@pytest.mark.skipif(not glob.glob("/boot/vmlinuz-*"), reason="no /boot/vmlinuz-* on this machine")
def test_host_kernel():
    path = sorted(glob.glob("/boot/vmlinuz-*"))[-1]
    try:
        with open(path, "rb") as f:
            image = f.read()
    except PermissionError:
        pytest.skip(f"{path} is not readable")
    assert kernel_kind(image) == "bzimage"
    info = bzimage_info(image)
    assert info.version >= 0x020C
    assert info.xloadflags & 1  # XLF_KERNEL_64
    assert info.compression is not None
    assert info.payload_file_offset + info.payload_length <= len(image)


# -- load_bzimage: boot_params -------------------------------------------------------------


def test_boot_params_fields(mem):
    load_bzimage(mem, bzimage(), "console=ttyS0", initrd=b"\x5a" * 0x1800, rsdp=0xF0000)
    bp = mem.read(ZERO_PAGE, 4096)
    assert u(bp, 0x1FA, "H") == 0xFFFF  # vid_mode: normal
    assert u(bp, 0x210, "B") == 0xFF  # type_of_loader: undefined
    assert u(bp, 0x211, "B") == 0x81  # loadflags: LOADED_HIGH | CAN_USE_HEAP
    assert u(bp, 0x224, "H") == 0xDE00  # heap_end_ptr
    assert u(bp, 0x228, "I") == 0x20000  # cmd_line_ptr
    assert u(bp, 0x0C8, "I") == 0  # ext_cmd_line_ptr
    assert u(bp, 0x218, "I") == 0x3FFE000  # ramdisk_image: top of 64 MiB, page aligned
    assert u(bp, 0x21C, "I") == 0x1800  # ramdisk_size
    assert u(bp, 0x0C0, "I") == 0  # ext_ramdisk_image
    assert u(bp, 0x0C4, "I") == 0  # ext_ramdisk_size
    assert u(bp, 0x070, "Q") == 0xF0000  # acpi_rsdp_addr
    assert u(bp, 0x1EF, "B") == 0  # sentinel
    assert u(bp, 0x214, "I") == 0x100000  # code32_start: unchanged, the standard address
    assert u(bp, 0x1E8, "B") == 3  # e820_entries
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(3)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 63 * MiB, 1)]
    assert bp[0x2D0 + 60 : 0xD00] == bytes(0xD00 - 0x2D0 - 60)


def test_setup_header_copied_exactly(mem):
    image = bzimage()
    load_bzimage(mem, image, "")
    bp = mem.read(ZERO_PAGE, 4096)
    expected = bytearray(image[0x1F1:0x26C])
    # The fields the loader writes, at (offset - 0x1F1).
    struct.pack_into("<H", expected, 0x1FA - 0x1F1, 0xFFFF)
    struct.pack_into("<B", expected, 0x210 - 0x1F1, 0xFF)
    struct.pack_into("<B", expected, 0x211 - 0x1F1, 0x81)
    struct.pack_into("<H", expected, 0x224 - 0x1F1, 0xDE00)
    struct.pack_into("<I", expected, 0x228 - 0x1F1, 0x20000)
    assert bp[0x1F1:0x26C] == bytes(expected)
    # Nothing past 0x202 + image[0x201]; nothing of the setup code before 0x1F1.
    assert bp[0x26C:0x2D0] == bytes(0x2D0 - 0x26C)
    assert bp[:0x1E8] == bytes(0x1E8)
    assert bp[0x1E9:0x1F1] == bytes(8)


def test_no_initrd(mem):
    load_bzimage(mem, bzimage(), "")
    bp = mem.read(ZERO_PAGE, 4096)
    assert (u(bp, 0x218, "I"), u(bp, 0x21C, "I"), u(bp, 0x0C0, "I"), u(bp, 0x0C4, "I")) == (0, 0, 0, 0)
    assert u(bp, 0x070, "Q") == 0


def test_kernel_and_cmdline_in_memory(mem):
    setup, pm = build_bzimage()
    load_bzimage(mem, setup + pm, "root=/dev/vda rw")
    assert mem.read(0x100000, len(pm)) == pm
    assert mem.read(0x100200, 4) == b"\x48\x31\xc0\x90"
    assert mem.read(0x20000, 17) == b"root=/dev/vda rw\0"


def test_initrd_placement(mem):
    initrd = bytes(range(256)) * 16 + b"tail"  # 4100 bytes: not a page multiple
    load_bzimage(mem, bzimage(), "", initrd=initrd)
    bp = mem.read(ZERO_PAGE, 4096)
    addr = u(bp, 0x218, "I")
    assert addr == 0x3FFE000  # (64 MiB - 4100) rounded down to a page
    assert addr % 4096 == 0
    assert addr + len(initrd) <= 64 * MiB
    assert u(bp, 0x21C, "I") == 4100
    assert mem.read(addr, len(initrd)) == initrd


def test_initrd_below_initrd_addr_max(mem):
    # initrd_addr_max is the highest byte the initrd may occupy.
    load_bzimage(mem, bzimage(initrd_addr_max=0x27FFFFF), "", initrd=b"i" * 0x2000)
    assert u(mem.read(ZERO_PAGE, 4096), 0x218, "I") == 0x27FE000


def test_initrd_too_big(mem):
    # The kernel runs at 16 MiB with init_size 8 MiB: 40 MiB remain above 24 MiB.
    load_bzimage(mem, bzimage(), "", initrd=bytes(40 * MiB))
    assert u(mem.read(ZERO_PAGE, 4096), 0x218, "I") == 24 * MiB
    with pytest.raises(BootError, match=r"initrd \(41947136 bytes\) need at least 65 MiB of guest memory"):
        load_bzimage(mem, bzimage(), "", initrd=bytes(40 * MiB + 4096))


def test_initrd_above_initrd_addr_max(mem):
    with pytest.raises(BootError, match="initrd_addr_max 0x19fffff"):
        load_bzimage(mem, bzimage(initrd_addr_max=0x19FFFFF), "", initrd=bytes(4 * MiB))


def test_cmdline_size_limit(mem):
    load_bzimage(mem, bzimage(cmdline_size=255), "x" * 255)
    assert mem.read(0x20000 + 255, 1) == b"\0"
    with pytest.raises(BootError, match="command line is 256 bytes; this kernel accepts at most 255"):
        load_bzimage(mem, bzimage(cmdline_size=255), "x" * 256)


def test_cmdline_with_nul(mem):
    with pytest.raises(BootError, match="NUL"):
        load_bzimage(mem, bzimage(), "a\0b")


# -- load_bzimage: CPU state, GDT, page tables ---------------------------------------------


def test_cpu_state(mem):
    state = load_bzimage(mem, bzimage(), "")
    assert state.rip == 0x100200
    assert state.rsi == 0x2000
    assert (state.rbx, state.rsp) == (0, 0)
    assert state.rflags == 0x2
    assert state.cr0 == 0x80000031  # PG | NE | ET | PE
    assert state.cr3 == 0x6000
    assert state.cr4 == 0x20  # PAE
    assert state.efer == 0x500  # LME | LMA
    cs = state.cs
    assert (cs.base, cs.limit, cs.selector, cs.type, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g) == (
        0, 0xFFFFFFFF, 0x10, 0xB, 1, 0, 0, 1, 1, 1
    )
    for seg in (state.ds, state.es, state.ss, state.fs, state.gs):
        assert (seg.selector, seg.type, seg.db, seg.l, seg.limit, seg.base) == (0x18, 0x3, 1, 0, 0xFFFFFFFF, 0)
    assert (state.tr.selector, state.tr.type, state.tr.s, state.tr.limit) == (0x20, 0xB, 0, 0x67)
    assert (state.gdt.base, state.gdt.limit) == (0x1000, 47)


def test_gdt_has_boot_cs_and_boot_ds(mem):
    load_bzimage(mem, bzimage(), "")
    gdt = struct.unpack("<6Q", mem.read(0x1000, 48))
    assert gdt[0x10 >> 3] == 0x00AF9B000000FFFF  # __BOOT_CS: 64-bit code, execute/read
    assert gdt[0x18 >> 3] == 0x00CF93000000FFFF  # __BOOT_DS: flat read/write data
    assert gdt == (0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067, 0)


def translate(mem, cr3, va):
    """Walk 4-level paging as the CPU would, for the identity maps written here."""
    pml4e = u(mem.read(cr3 + 8 * ((va >> 39) & 511), 8), 0, "Q")
    assert pml4e & 1
    pdpte = u(mem.read((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511), 8), 0, "Q")
    assert pdpte & 1 and not pdpte & 0x80
    pde = u(mem.read((pdpte & ~0xFFF) + 8 * ((va >> 21) & 511), 8), 0, "Q")
    assert pde & 0x81 == 0x81  # present, 2 MiB page
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)


def test_identity_page_tables(mem):
    mem.write(0x6000, b"\xff" * 0x6000)  # stale garbage must be cleared
    state = load_bzimage(mem, bzimage(), "")
    pml4 = struct.unpack("<512Q", mem.read(0x6000, 4096))
    assert pml4[0] == 0x7003 and pml4[1:] == (0,) * 511
    pdpt = struct.unpack("<512Q", mem.read(0x7000, 4096))
    assert pdpt[:4] == (0x8003, 0x9003, 0xA003, 0xB003) and pdpt[4:] == (0,) * 508
    pd0 = struct.unpack("<512Q", mem.read(0x8000, 4096))
    assert pd0[0] == 0x83 and pd0[1] == 0x200083 and pd0[511] == 0x3FE00083
    pd3 = struct.unpack("<512Q", mem.read(0xB000, 4096))
    assert pd3[0] == 0xC0000083 and pd3[511] == 0xFFE00083
    for va in (0x0, 0x2000, 0x20000, 0x100200, 0x1234567, 0x3FFE000, 0xBFFFFFFF, 0xFFFFFFFF):
        assert translate(mem, state.cr3, va) == va


# -- load_bzimage: rejections --------------------------------------------------------------


def test_old_protocol_rejected(mem):
    with pytest.raises(BootError, match=r"boot protocol 2\.11; booting it needs 2\.12"):
        load_bzimage(mem, bzimage(version=0x020B), "")


def test_not_64bit_rejected(mem):
    with pytest.raises(BootError, match="not a 64-bit kernel"):
        load_bzimage(mem, bzimage(xloadflags=0x02), "")


def test_zimage_rejected(mem):
    with pytest.raises(BootError, match="zImage"):
        load_bzimage(mem, bzimage(loadflags=0), "")


def test_bad_magic_rejected(mem):
    with pytest.raises(BootError, match="boot_flag 0xAA55"):
        load_bzimage(mem, bzimage(boot_flag=0), "")
    with pytest.raises(BootError, match='"HdrS"'):
        load_bzimage(mem, bzimage(magic=b"HdrZ"), "")


def test_truncated_rejected(mem):
    setup, _ = build_bzimage()
    with pytest.raises(BootError, match="truncated: setup_sects 4"):
        load_bzimage(mem, setup, "")
    with pytest.raises(BootError, match="too short"):
        load_bzimage(mem, setup[:0x100], "")
    with pytest.raises(BootError, match="truncated: its setup header ends at 0x26c"):
        load_bzimage(mem, setup[:0x250], "")


def test_short_header_rejected(mem):
    with pytest.raises(BootError, match="before the protocol 2.12 fields"):
        load_bzimage(mem, bzimage(jump=0x40), "")


def test_too_little_memory():
    small = GuestMemory(16 * MiB)
    try:
        with pytest.raises(BootError, match="kernel needs at least 24 MiB of guest memory .*the guest has 16 MiB"):
            load_bzimage(small, bzimage(), "")
        assert small.read(0x100000, 16) == bytes(16)  # nothing written
    finally:
        small.close()


def test_non_relocatable_runs_at_pref_address():
    small = GuestMemory(32 * MiB)
    try:
        with pytest.raises(BootError, match="needs at least 40 MiB"):
            load_bzimage(small, bzimage(relocatable=0, pref_address=0x2000000), "")
        # Relocatable with a low pref_address: runs at align_up(1 MiB, 2 MiB) = 2 MiB.
        load_bzimage(small, bzimage(pref_address=0, init_size=0x1000000), "", initrd=b"x")
        assert u(small.read(ZERO_PAGE, 4096), 0x218, "I") == 32 * MiB - 4096
        with pytest.raises(BootError, match=r"needs at least 33 MiB .*0x200000-0x2100000"):
            load_bzimage(small, bzimage(pref_address=0, init_size=0x1F00000), "")
    finally:
        small.close()


def test_long_mode_state_matches_helpers():
    st = cpu_state.long_mode_64(0x100200, 0x2000, 0x1000, 0x6000)
    assert st.cs is cpu_state.CODE64_SEGMENT and st.ss is cpu_state.DATA_SEGMENT
    assert st.ldt.unusable == 1
