"""The Linux/x86 boot protocol for a bzImage, entered through its 64-bit entry point.

Field names and offsets are those of Documentation/arch/x86/boot.rst (the setup header)
and zero-page.rst (struct boot_params). The real-mode setup code never runs: we build
boot_params ourselves, load the protected-mode kernel at 1 MiB and start the CPU in
long mode at load address + 0x200 (boot.rst "64-bit Boot Protocol").

`load_vmlinux` enters a kernel proper (a vmlinux ELF, or a bzImage's payload the VMM
unpacked, boot/unpack.py) the way the bzImage's decompressor would have: its segments
at their physical addresses, then startup_64 (the ELF entry) in long mode with %rsi =
boot_params — what Firecracker does for a vmlinux.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from typing import Literal

from ..errors import BootError
from ..vstate.memory import MiB
from . import layout
from .cpu_state import BootCpuState, long_mode_64, write_gdt, write_identity_page_tables
from .elf import ElfMachine, is_elf, parse_elf
from .pvh import XEN_NOTE_NAME, XenElfNote, kernel_segments

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = b"HdrS"
SECTOR_SIZE = 512
SETUP_HEADER_START = 0x1F1
JUMP_OFFSET = 0x200  # jump: 0xEB, then a signed offset from 0x202 = the header's end
HEADER_MAGIC_OFFSET = 0x202
# The 64-bit entry and xloadflags arrived with protocol 2.12.
MIN_PROTOCOL_64 = 0x020C
# The last field load_bzimage reads (init_size, 2.10) ends at 0x264; a 2.12 header
# also holds handover_offset (2.11), so it is at least this long.
MIN_HEADER_END_64 = 0x268
ENTRY_64_OFFSET = 0x200  # the 64-bit entry: start of the loaded kernel + 0x200
DEFAULT_SETUP_SECTS = 4  # boot.rst: setup_sects 0 means 4
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF  # before protocol 2.03

ZERO_PAGE_SIZE = 4096
E820_MAX_ENTRIES_ZEROPAGE = 128
BOOT_E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry {addr, size, type}, packed: 20 bytes

TYPE_OF_LOADER_UNDEFINED = 0xFF  # no assigned boot loader ID
VID_MODE_NORMAL = 0xFFFF  # "vga=normal"
# boot.rst's sample configuration for a 2.02+ kernel loaded high: heap up to 0xE000
# of the real-mode segment, heap_end_ptr = heap_end - 0x200. Only the 16-bit setup
# code would use it and that never runs here, but the field is obligatory.
HEAP_END = 0xE000
HEAP_END_PTR = HEAP_END - 0x200


class LoadFlags(IntFlag):  # loadflags, 0x211
    LOADED_HIGH = 1 << 0
    KASLR_FLAG = 1 << 1
    QUIET_FLAG = 1 << 5
    KEEP_SEGMENTS = 1 << 6
    CAN_USE_HEAP = 1 << 7


class XLoadFlags(IntFlag):  # xloadflags, 0x236
    XLF_KERNEL_64 = 1 << 0
    XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
    XLF_EFI_HANDOVER_32 = 1 << 2
    XLF_EFI_HANDOVER_64 = 1 << 3
    XLF_EFI_KEXEC = 1 << 4
    XLF_5LEVEL = 1 << 5
    XLF_5LEVEL_ENABLED = 1 << 6


class Compression(StrEnum):
    """How the payload (the real kernel, an ELF) is stored inside the bzImage."""

    NONE = "none"  # the payload is the ELF itself
    GZIP = "gzip"
    BZIP2 = "bzip2"
    LZMA = "lzma"
    XZ = "xz"
    LZO = "lzo"
    LZ4 = "lz4"
    ZSTD = "zstd"


# Magic numbers at the payload's start (boot.rst payload_offset, plus lzop's header).
_PAYLOAD_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\x7fELF", Compression.NONE),
    (b"\x1f\x8b", Compression.GZIP),
    (b"\x1f\x9e", Compression.GZIP),  # old gzip
    (b"BZh", Compression.BZIP2),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x5d\x00", Compression.LZMA),
    (b"\x02\x21\x4c\x18", Compression.LZ4),  # lz4 legacy frame, as the kernel builds it
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"\x89LZO\x00\r\n\x1a\n", Compression.LZO),
)

# name -> (offset, struct format): the setup header (boot.rst) at its offsets in the
# image, which are also its offsets inside boot_params, plus the boot_params fields
# we write (zero-page.rst).
FIELDS: dict[str, tuple[int, str]] = {
    # struct boot_params
    "acpi_rsdp_addr": (0x070, "Q"),
    "ext_ramdisk_image": (0x0C0, "I"),
    "ext_ramdisk_size": (0x0C4, "I"),
    "ext_cmd_line_ptr": (0x0C8, "I"),
    "e820_entries": (0x1E8, "B"),
    "sentinel": (0x1EF, "B"),
    # struct setup_header
    "setup_sects": (0x1F1, "B"),
    "root_flags": (0x1F2, "H"),
    "syssize": (0x1F4, "I"),
    "ram_size": (0x1F8, "H"),
    "vid_mode": (0x1FA, "H"),
    "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "realmode_swtch": (0x208, "I"),
    "start_sys_seg": (0x20C, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "setup_move_size": (0x212, "H"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "bootsect_kludge": (0x220, "I"),
    "heap_end_ptr": (0x224, "H"),
    "ext_loader_ver": (0x226, "B"),
    "ext_loader_type": (0x227, "B"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "hardware_subarch_data": (0x240, "Q"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
    "handover_offset": (0x264, "I"),
    "kernel_info_offset": (0x268, "I"),
}
E820_TABLE_OFFSET = 0x2D0  # boot_params.e820_table[E820_MAX_ENTRIES_ZEROPAGE]


def get_field(buf: bytes | bytearray | memoryview, name: str) -> int:
    offset, fmt = FIELDS[name]
    return struct.unpack_from("<" + fmt, buf, offset)[0]


def put_field(buf: bytearray, name: str, value: int) -> None:
    offset, fmt = FIELDS[name]
    struct.pack_into("<" + fmt, buf, offset, value)


@dataclass(frozen=True)
class BzImageInfo:
    """What the setup header says about a bzImage (fields a protocol lacks read 0)."""

    version: int  # boot protocol, (major << 8) | minor
    header_end: int  # 0x202 + the jump's offset byte: the copy's end
    setup_sects: int  # with 0 already read as 4
    kernel_offset: int  # file offset of the protected-mode kernel, (setup_sects+1)*512
    kernel_size: int  # its length: the rest of the file
    loadflags: LoadFlags
    xloadflags: XLoadFlags
    relocatable_kernel: int
    kernel_alignment: int
    pref_address: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    payload_offset: int  # from the start of the protected-mode kernel (boot.rst meaning)
    payload_length: int
    compression: Compression | None  # None: payload absent or of unknown format

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def payload_file_offset(self) -> int:
        return self.kernel_offset + self.payload_offset


def kernel_kind(image: bytes | memoryview) -> Literal["elf", "bzimage"] | None:
    """"elf", "bzimage", or None when `image` (or its first KiB) is neither."""
    if is_elf(image):
        return "elf"
    if (
        len(image) >= HEADER_MAGIC_OFFSET + 4
        and get_field(image, "boot_flag") == BOOT_FLAG_MAGIC
        and bytes(image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4]) == HDRS_MAGIC
    ):
        return "bzimage"
    return None


LINUX_NOTE_NAME = "Linux"  # include/linux/elfnote.h: Linux's own notes (build salt, LTO info)


def is_linux(image: bytes | memoryview) -> bool:
    """Is `image` a Linux kernel: a bzImage with a kernel payload, or a vmlinux ELF?

    Linux's bzImages (protocol 2.08+) carry the kernel proper as a payload in one of the
    formats of Compression; a freestanding program in bzImage form has none. A vmlinux
    carries ELF notes owned by "Linux" (LINUX_ELFNOTE_BUILD_SALT and others; older
    Xen-enabled kernels a Xen GUEST_OS note saying "linux"); a freestanding PVH guest has
    only the Xen entry note.
    """
    kind = kernel_kind(image)
    if kind == "bzimage":
        try:
            return bzimage_info(image).compression is not None
        except BootError:
            return False
    if kind != "elf":
        return False
    try:
        notes = parse_elf(image).notes()
    except BootError:
        return False
    return any(
        n.name == LINUX_NOTE_NAME
        or (n.name == XEN_NOTE_NAME and n.type == XenElfNote.XEN_ELFNOTE_GUEST_OS and n.desc.rstrip(b"\0") == b"linux")
        for n in notes
    )


def _detect_compression(payload: bytes | memoryview) -> Compression | None:
    head = bytes(payload[:16])
    return next((kind for magic, kind in _PAYLOAD_MAGIC if head.startswith(magic)), None)


def bzimage_info(image: bytes | memoryview) -> BzImageInfo:
    """Parse and sanity-check a bzImage's setup header; BootError if it is not one."""
    size = len(image)
    if size < 0x208:
        raise BootError(f"kernel image is {size} bytes, too short to be a bzImage")
    if get_field(image, "boot_flag") != BOOT_FLAG_MAGIC:
        raise BootError("kernel image is not a bzImage: no boot_flag 0xAA55 at offset 0x1FE")
    if bytes(image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4]) != HDRS_MAGIC:
        raise BootError('kernel image has no "HdrS" setup header at 0x202: a pre-2.00 zImage, not supported')
    jump = image[JUMP_OFFSET + 1]
    header_end = HEADER_MAGIC_OFFSET + (jump - 256 if jump >= 128 else jump)
    if header_end < 0x208:
        raise BootError(f"bzImage setup header length (jump offset {jump:#x} at 0x201) is invalid")
    if header_end > size:
        raise BootError(f"bzImage is truncated: its setup header ends at {header_end:#x}, the file at {size:#x}")

    def field(name: str) -> int:
        offset, fmt = FIELDS[name]
        return get_field(image, name) if offset + struct.calcsize(fmt) <= header_end else 0

    version = field("version")
    setup_sects = field("setup_sects") or DEFAULT_SETUP_SECTS
    kernel_offset = (setup_sects + 1) * SECTOR_SIZE
    if kernel_offset >= size:
        raise BootError(
            f"bzImage is truncated: setup_sects {setup_sects} puts the kernel at {kernel_offset:#x}, "
            f"but the file is {size} bytes"
        )
    kernel_size = size - kernel_offset

    payload_offset = field("payload_offset") if version >= 0x0208 else 0
    payload_length = field("payload_length") if version >= 0x0208 else 0
    compression = None
    if payload_length:
        if payload_offset + payload_length > kernel_size:
            raise BootError(
                f"bzImage is truncated: its payload (payload_offset {payload_offset:#x}, payload_length "
                f"{payload_length:#x}) runs past the {kernel_size}-byte protected-mode kernel"
            )
        start = kernel_offset + payload_offset
        compression = _detect_compression(image[start : start + min(payload_length, 16)])

    return BzImageInfo(
        version=version,
        header_end=header_end,
        setup_sects=setup_sects,
        kernel_offset=kernel_offset,
        kernel_size=kernel_size,
        loadflags=LoadFlags(field("loadflags")),
        xloadflags=XLoadFlags(field("xloadflags")),
        relocatable_kernel=field("relocatable_kernel"),
        kernel_alignment=field("kernel_alignment"),
        pref_address=field("pref_address"),
        init_size=field("init_size"),
        initrd_addr_max=field("initrd_addr_max") if version >= 0x0203 else DEFAULT_INITRD_ADDR_MAX,
        cmdline_size=field("cmdline_size") if version >= 0x0206 else 255,
        payload_offset=payload_offset,
        payload_length=payload_length,
        compression=compression,
    )


def runtime_range(info: BzImageInfo, load_address: int = layout.KERNEL_START) -> tuple[int, int]:
    """[start, end) the kernel decompresses into and runs from: init_size bytes.

    boot.rst: runtime_start = align_up(load_address, kernel_alignment) for a
    relocatable kernel, else pref_address. The x86-64 decompressor also never goes
    below LOAD_PHYSICAL_ADDR (= pref_address), so take the higher of the two.
    """
    alignment = max(info.kernel_alignment, 1)
    if info.relocatable_kernel:
        start = max(layout.align_up(load_address, alignment), info.pref_address)
    else:
        start = info.pref_address or load_address
    return start, start + info.init_size


def _check_64bit_kernel(info: BzImageInfo) -> None:
    if info.version < MIN_PROTOCOL_64:
        raise BootError(
            f"kernel uses boot protocol {info.version_str}; booting it needs 2.12 or newer (Linux 3.8+), "
            "the first with a 64-bit entry point"
        )
    if not info.loadflags & LoadFlags.LOADED_HIGH:
        raise BootError("kernel is a zImage (loadflags LOADED_HIGH clear), not a bzImage; not supported")
    if not info.xloadflags & XLoadFlags.XLF_KERNEL_64:
        raise BootError("kernel is not a 64-bit kernel (xloadflags XLF_KERNEL_64 clear): no 64-bit entry point")
    if info.header_end < MIN_HEADER_END_64:
        raise BootError(
            f"bzImage setup header ends at {info.header_end:#x}, before the protocol 2.12 fields (to {MIN_HEADER_END_64:#x})"
        )
    if info.kernel_size <= ENTRY_64_OFFSET:
        raise BootError(f"bzImage's protected-mode kernel is only {info.kernel_size} bytes: no 64-bit entry in it")


def load_bzimage(
    mem,
    image: bytes | memoryview,
    cmdline: str,
    initrd: bytes | memoryview | None = None,
    *,
    rsdp: int = 0,
) -> BootCpuState:
    """Load a bzImage (+ initrd) for the 64-bit boot protocol; return the entry CPU state.

    Everything is checked before guest memory is written. `rsdp`, if nonzero, goes in
    boot_params.acpi_rsdp_addr so the kernel need not scan for the RSDP.
    """
    info = bzimage_info(image)
    _check_64bit_kernel(info)

    # Where the kernel goes. boot.rst: a bzImage (LOADED_HIGH) loads at 0x100000, and
    # code32_start already says so. We keep that standard address rather than loading
    # at pref_address: it needs no (reloc) fields, works the same for relocatable and
    # fixed kernels, and costs nothing, since the decompressor moves itself to its
    # runtime address (pref_address or the aligned load address) anyway. What memory
    # it needs is therefore both the loaded file and init_size at the runtime start.
    load_address = layout.KERNEL_START
    run_start, run_end = runtime_range(info, load_address)
    kernel_end = max(load_address + info.kernel_size, run_end)
    ram_end = layout.low_ram_end(mem)
    if kernel_end > ram_end:
        raise BootError(
            f"kernel needs at least {-(-kernel_end // MiB)} MiB of guest memory (it loads at {load_address:#x} "
            f"and decompresses into {run_start:#x}-{run_end:#x}); the guest has {mem.size // MiB} MiB"
        )

    cmdline_bytes = _cmdline_bytes(info, cmdline)

    initrd_addr, initrd_size = _place_initrd(mem, info, initrd, kernel_end, ram_end)
    e820 = _e820(mem)

    zero_page = build_boot_params(image, info, layout.CMDLINE_START, initrd_addr, initrd_size, e820, rsdp)

    # -- everything checked: write --------------------------------------------------
    mem.write(load_address, memoryview(image)[info.kernel_offset :])
    mem.write(layout.ZERO_PAGE_START, zero_page)
    mem.write(layout.CMDLINE_START, cmdline_bytes + b"\0")
    if initrd_size:
        mem.write(initrd_addr, initrd)
    write_gdt(mem, layout.GDT_START)
    cr3 = write_identity_page_tables(mem, layout.PML4_START)
    return long_mode_64(
        entry=load_address + ENTRY_64_OFFSET, rsi=layout.ZERO_PAGE_START, gdt_base=layout.GDT_START, pml4=cr3
    )



def _cmdline_bytes(info: "BzImageInfo", cmdline: str) -> bytes:
    """The command line as the kernel gets it (NUL added by the caller), checked."""
    cmdline_bytes = cmdline.encode()
    if b"\0" in cmdline_bytes:
        raise BootError("kernel command line contains a NUL character")
    limit = min(info.cmdline_size, layout.CMDLINE_SIZE - 1)
    if len(cmdline_bytes) > limit:
        raise BootError(f"kernel command line is {len(cmdline_bytes)} bytes; this kernel accepts at most {limit}")
    return cmdline_bytes


def _place_initrd(mem, info: "BzImageInfo", initrd, kernel_end: int, ram_end: int) -> tuple[int, int]:
    """(address, size) of the initrd, (0, 0) without one. It goes as high as it can: below
    initrd_addr_max (the highest byte it may occupy) and the end of low RAM, above
    everything the kernel uses."""
    if not initrd:
        return 0, 0
    size = len(initrd)
    ceiling = min(info.initrd_addr_max + 1, ram_end)
    floor = layout.align_up(kernel_end, layout.PAGE_SIZE)
    placed = layout.place_high(size, floor, ceiling)
    if placed is None:
        if ceiling < ram_end:
            raise BootError(
                f"initrd of {size} bytes does not fit between the kernel's end at {floor:#x} and "
                f"the kernel's initrd_addr_max {info.initrd_addr_max:#x}"
            )
        need = -(-(floor + size) // MiB)
        raise BootError(
            f"kernel and initrd ({size} bytes) need at least {need} MiB of guest memory; "
            f"the guest has {mem.size // MiB} MiB"
        )
    return placed, size


def _e820(mem) -> list[tuple[int, int, int]]:
    e820 = mem.e820()
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"memory map has {len(e820)} entries; boot_params holds at most {E820_MAX_ENTRIES_ZEROPAGE}")
    return e820

def build_boot_params(
    image: bytes | memoryview,
    info: BzImageInfo,
    cmd_line_ptr: int,
    ramdisk_image: int,
    ramdisk_size: int,
    e820: list[tuple[int, int, int]],
    acpi_rsdp_addr: int = 0,
) -> bytearray:
    """struct boot_params: zeroed, the image's setup header copied in, our fields set."""
    bp = bytearray(ZERO_PAGE_SIZE)
    # boot.rst (32/64-bit protocol): copy the setup header, 0x1F1 up to
    # 0x202 + the byte at 0x201. Everything else starts zero, sentinel included, so the
    # kernel's sanitize_boot_params() trusts what we set.
    bp[SETUP_HEADER_START : info.header_end] = image[SETUP_HEADER_START : info.header_end]

    put_field(bp, "vid_mode", VID_MODE_NORMAL)
    put_field(bp, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    # KEEP_SEGMENTS is obsolete and meaningless for the 64-bit entry.
    put_field(bp, "loadflags", info.loadflags | LoadFlags.CAN_USE_HEAP)
    put_field(bp, "heap_end_ptr", HEAP_END_PTR)
    put_field(bp, "cmd_line_ptr", cmd_line_ptr & 0xFFFF_FFFF)
    put_field(bp, "ext_cmd_line_ptr", cmd_line_ptr >> 32)
    put_field(bp, "ramdisk_image", ramdisk_image & 0xFFFF_FFFF)
    put_field(bp, "ext_ramdisk_image", ramdisk_image >> 32)
    put_field(bp, "ramdisk_size", ramdisk_size & 0xFFFF_FFFF)
    put_field(bp, "ext_ramdisk_size", ramdisk_size >> 32)
    put_field(bp, "acpi_rsdp_addr", acpi_rsdp_addr)

    put_field(bp, "e820_entries", len(e820))
    for i, (addr, size, type_) in enumerate(e820):
        BOOT_E820_ENTRY.pack_into(bp, E820_TABLE_OFFSET + i * BOOT_E820_ENTRY.size, addr, size, type_)
    return bp


# A setup header for a vmlinux booted without its bzImage (Firecracker's choice of fields):
# what the kernel proper reads from boot_params.hdr. Protocol 2.15 (Linux 5.5+).
SYNTHETIC_PROTOCOL = 0x020F
SYNTHETIC_CMDLINE_SIZE = 2047  # COMMAND_LINE_SIZE (2048) less the NUL, as x86 kernels say
SYNTHETIC_KERNEL_ALIGNMENT = 0x20_0000  # CONFIG_PHYSICAL_ALIGN's default
SYNTHETIC_INITRD_ADDR_MAX = 0x7FFF_FFFF


def synthetic_setup_header(cmdline_size: int = SYNTHETIC_CMDLINE_SIZE) -> bytes:
    """The first sectors of a bzImage with only a setup header in them."""
    hdr = bytearray((DEFAULT_SETUP_SECTS + 2) * SECTOR_SIZE)
    put_field(hdr, "boot_flag", BOOT_FLAG_MAGIC)
    hdr[JUMP_OFFSET] = 0xEB  # jmp: its offset byte gives the header's end
    hdr[JUMP_OFFSET + 1] = MIN_HEADER_END_64 + 4 - HEADER_MAGIC_OFFSET
    hdr[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] = HDRS_MAGIC
    put_field(hdr, "version", SYNTHETIC_PROTOCOL)
    put_field(hdr, "loadflags", LoadFlags.LOADED_HIGH)
    put_field(hdr, "xloadflags", XLoadFlags.XLF_KERNEL_64 | XLoadFlags.XLF_CAN_BE_LOADED_ABOVE_4G)
    put_field(hdr, "kernel_alignment", SYNTHETIC_KERNEL_ALIGNMENT)
    put_field(hdr, "initrd_addr_max", SYNTHETIC_INITRD_ADDR_MAX)
    put_field(hdr, "cmdline_size", cmdline_size)
    return bytes(hdr)


def _physical_entry(elf) -> int:
    """The ELF's entry as a physical address (x86-64 vmlinux: phys_startup_64 already)."""
    for seg in elf.load_segments():
        if seg.p_vaddr <= elf.e_entry < seg.p_vaddr + seg.p_memsz:
            return seg.p_paddr + (elf.e_entry - seg.p_vaddr)
    return elf.e_entry


def load_vmlinux(
    mem,
    image: bytes | memoryview,
    cmdline: str,
    initrd: bytes | memoryview | None = None,
    *,
    setup: bytes | memoryview | None = None,
    rsdp: int = 0,
) -> BootCpuState:
    """Load a 64-bit vmlinux ELF (+ initrd) and enter startup_64 with boot_params.

    `setup` is the image whose setup header goes into boot_params: the bzImage the
    vmlinux came from, or None for a synthetic header (a bare vmlinux). Segments load at
    their physical addresses, where an unrelocated kernel expects to run. Everything is
    checked before guest memory is written.
    """
    elf = parse_elf(image)
    if elf.e_machine != ElfMachine.EM_X86_64:
        raise BootError("kernel ELF is not an x86-64 vmlinux (e_machine): its 64-bit entry cannot be used")
    header_source = setup if setup is not None else synthetic_setup_header()
    info = bzimage_info(header_source)
    if setup is not None:
        _check_64bit_kernel(info)
    ram_end = layout.low_ram_end(mem)
    segments = kernel_segments(elf, mem, ram_end)
    entry = _physical_entry(elf)
    if not any(s.p_paddr <= entry < s.p_paddr + s.p_memsz for s in segments):
        raise BootError(f"kernel ELF entry {elf.e_entry:#x} is in none of its segments")
    kernel_end = max(s.p_paddr + s.p_memsz for s in segments)

    cmdline_bytes = _cmdline_bytes(info, cmdline)

    initrd_addr, initrd_size = _place_initrd(mem, info, initrd, kernel_end, ram_end)
    e820 = _e820(mem)
    zero_page = build_boot_params(header_source, info, layout.CMDLINE_START, initrd_addr, initrd_size, e820, rsdp)

    # -- everything checked: write --------------------------------------------------
    for seg in segments:
        mem.write(seg.p_paddr, elf.segment_data(seg))
        tail = seg.p_memsz - seg.p_filesz
        if tail:
            mem.write(seg.p_paddr + seg.p_filesz, bytes(tail))  # .bss, .brk
    mem.write(layout.ZERO_PAGE_START, zero_page)
    mem.write(layout.CMDLINE_START, cmdline_bytes + b"\0")
    if initrd_size:
        mem.write(initrd_addr, initrd)
    write_gdt(mem, layout.GDT_START)
    cr3 = write_identity_page_tables(mem, layout.PML4_START)
    return long_mode_64(entry=entry, rsi=layout.ZERO_PAGE_START, gdt_base=layout.GDT_START, pml4=cr3)
