"""What a firmware boot (-l bootrom) finds in fw_cfg (devices/legacy/fw_cfg.py).

SeaBIOS (src/fw/paravirt.c) and OVMF (QemuFwCfgLib, PlatformPei, AcpiPlatformDxe) ask QEMU's
machine for: the signature and features, the CPU count (NB_CPUS, MAX_CPUS), the RAM
(RAM_SIZE, and "etc/e820": the memory map), "no graphics" (NOGRAPHIC: SeaBIOS then puts its
console on COM1), the boot order, and the ACPI tables through the table loader:

    "etc/acpi/tables"   the tables, linked as if at address 0 (every pointer is an offset)
    "etc/acpi/rsdp"     the RSDP alone (it must be found in the F segment)
    "etc/table-loader"  commands, 128 bytes each (QEMU's hw/acpi/bios-linker-loader.c
                        describes them): ALLOCATE a file in a zone, ADD_POINTER (add a
                        file's address to a pointer field of another), ADD_CHECKSUM

so the firmware places the tables where it likes and patches their pointers and checksums.
The tables are the ones boot/acpi.py builds for a kernel boot, laid out at base 0.

With --kernel, the kernel, its setup header, the initrd and the command line go in as QEMU
gives them to its linuxboot option ROM (KERNEL_*, SETUP_*, INITRD_*, CMDLINE_*).
"""

from __future__ import annotations

import struct
from enum import IntEnum

from .. import platform
from ..devices.legacy.fw_cfg import FwCfg, Key
from . import acpi

LOADER_COMMAND_SIZE = 128
LOADER_FILE_SIZE = 56
E820_ENTRY = struct.Struct("<QQI")  # address, length, type (QEMU's struct e820_entry)
TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"


class LoaderCommand(IntEnum):
    ALLOCATE = 1
    ADD_POINTER = 2
    ADD_CHECKSUM = 3


class LoaderZone(IntEnum):
    HIGH = 1  # anywhere in 32-bit RAM
    FSEG = 2  # the F segment, 0xF0000-0xFFFFF (where an OS looks for the RSDP)


def _name(name: str) -> bytes:
    return name.encode().ljust(LOADER_FILE_SIZE, b"\0")


def _command(kind: LoaderCommand, body: bytes) -> bytes:
    return struct.pack("<I", kind) + body.ljust(LOADER_COMMAND_SIZE - 4, b"\0")


def allocate(name: str, align: int, zone: LoaderZone) -> bytes:
    return _command(LoaderCommand.ALLOCATE, _name(name) + struct.pack("<IB", align, zone))


def add_pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    return _command(LoaderCommand.ADD_POINTER, _name(dest) + _name(src) + struct.pack("<IB", offset, size))


def add_checksum(name: str, result_offset: int, start: int, length: int) -> bytes:
    return _command(LoaderCommand.ADD_CHECKSUM, _name(name) + struct.pack("<III", result_offset, start, length))


# Pointer fields of the tables boot/acpi.py builds (ACPI 6.5: RSDP table 5.3, FADT table 5.9).
RSDP_XSDT_OFFSET = 24
RSDP_CHECKSUM, RSDP_EXT_CHECKSUM = 8, 32
SDT_CHECKSUM = 9
FADT_FIRMWARE_CTRL, FADT_DSDT, FADT_X_DSDT = 36, 40, 140


def acpi_files(tables: acpi.Tables) -> dict[str, bytes]:
    """The three files of a table set built at base 0."""
    assert tables.base == 0
    image = tables.image
    a = tables.addresses
    rsdp = image[: acpi.RSDP.size]
    blob = bytes(acpi.RSDP.size) + image[acpi.RSDP.size :]  # offsets stay the tables' own
    cmds = [allocate(RSDP_FILE, 16, LoaderZone.FSEG), allocate(TABLES_FILE, 64, LoaderZone.HIGH)]
    cmds.append(add_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT_OFFSET, 8))
    cmds.append(add_checksum(RSDP_FILE, RSDP_CHECKSUM, 0, acpi.RSDP_V1_LENGTH))
    cmds.append(add_checksum(RSDP_FILE, RSDP_EXT_CHECKSUM, 0, acpi.RSDP.size))
    xsdt = a["XSDT"]
    (xsdt_len,) = struct.unpack_from("<I", image, xsdt + 4)
    for entry in range(xsdt + acpi.HEADER.size, xsdt + xsdt_len, 8):
        cmds.append(add_pointer(TABLES_FILE, TABLES_FILE, entry, 8))
    fadt = a["FACP"]
    cmds.append(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_FIRMWARE_CTRL, 4))
    cmds.append(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_DSDT, 4))
    cmds.append(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_X_DSDT, 8))
    for sig in ("XSDT", "FACP", "APIC", "MCFG", "DSDT"):  # the FACS has no checksum
        off = a[sig]
        (length,) = struct.unpack_from("<I", image, off + 4)
        cmds.append(add_checksum(TABLES_FILE, off + SDT_CHECKSUM, off, length))
    return {RSDP_FILE: rsdp, TABLES_FILE: blob, LOADER_FILE: b"".join(cmds)}


def e820(mem) -> bytes:
    """The RAM as QEMU's "etc/e820" lists it: below and above the hole (the firmware
    reserves its own areas)."""
    return b"".join(E820_ENTRY.pack(r.gpa, r.size, 1) for r in mem.regions)


def populate(fw: FwCfg, mem, config, serial_ports=platform.COM_PORTS[:1]) -> None:
    """The items of one machine (the kernel's, if any, are add_kernel's)."""
    topology = config.cpu_topology
    fw.add(Key.RAM_SIZE, struct.pack("<Q", mem.size))
    fw.add(Key.NB_CPUS, struct.pack("<H", config.cpus))
    fw.add(Key.MAX_CPUS, struct.pack("<H", config.cpus))
    fw.add(Key.NOGRAPHIC, struct.pack("<H", 1))  # no VGA: SeaBIOS's console is COM1
    fw.add(Key.BOOT_MENU, struct.pack("<H", 0))
    fw.add(Key.NUMA, struct.pack("<Q", 0))
    fw.add(Key.X86_IRQ0_OVERRIDE, struct.pack("<I", 1))  # the MADT routes ISA IRQ 0 to GSI 2
    fw.add_file("etc/e820", e820(mem))
    fw.add_file("etc/boot-fail-wait", struct.pack("<I", 5))  # seconds before SeaBIOS retries
    if config.acpi:
        tables = acpi.build(topology.apic_ids(), platform.ram_top(mem.regions), base=0, serial_ports=serial_ports)
        for name, data in acpi_files(tables).items():
            fw.add_file(name, data)


# -- --kernel with a bootrom: QEMU's layout for its linuxboot option ROM ---------------------
LINUXBOOT_ROMS = ("/usr/share/qemu/linuxboot_dma.bin", "/usr/share/seabios/linuxboot_dma.bin")
LINUXBOOT_FILE = "genroms/linuxboot_dma.bin"
REAL_MODE_ADDR = 0x1_0000  # the setup code (boot protocol 2.02+, loaded high)
CMDLINE_ADDR = 0x2_0000
PROTECTED_MODE_ADDR = 0x10_0000
TYPE_OF_LOADER_QEMU = 0xB0  # boot.rst's loader ID 0xB (QEMU)
INITRD_TOP_MARGIN = 1 << 20  # below the top of low RAM: the firmware keeps its tables there


def linuxboot_rom() -> bytes:
    """QEMU's linuxboot_dma.bin (Debian's qemu-system-data); BootError if it is not here."""
    from ..errors import BootError  # noqa: PLC0415

    for path in LINUXBOOT_ROMS:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            continue
    raise BootError(f"--kernel with -l bootrom needs QEMU's linuxboot_dma.bin option ROM ({' or '.join(LINUXBOOT_ROMS)}; "
                    "Debian's qemu-system-data package)")


def add_kernel(fw: FwCfg, mem, kernel: bytes, initrd: bytes | None, cmdline: str) -> None:
    """The kernel, its setup code, initrd and command line, where the linuxboot option ROM
    (which SeaBIOS runs as a boot device) copies them before entering the setup code."""
    from . import linux  # noqa: PLC0415

    info = linux.bzimage_info(kernel)
    setup = bytearray(kernel[: info.kernel_offset])
    linux.put_field(setup, "type_of_loader", TYPE_OF_LOADER_QEMU)
    linux.put_field(setup, "cmd_line_ptr", CMDLINE_ADDR)
    linux.put_field(setup, "heap_end_ptr", CMDLINE_ADDR - REAL_MODE_ADDR - 0x200)
    linux.put_field(setup, "loadflags", info.loadflags | linux.LoadFlags.CAN_USE_HEAP)
    if initrd:
        top = min(info.initrd_addr_max, mem.regions[0].size - INITRD_TOP_MARGIN)
        initrd_addr = (top - len(initrd)) & ~0xFFF
        linux.put_field(setup, "ramdisk_image", initrd_addr)
        linux.put_field(setup, "ramdisk_size", len(initrd))
        fw.add(Key.INITRD_ADDR, struct.pack("<I", initrd_addr))
        fw.add(Key.INITRD_SIZE, struct.pack("<I", len(initrd)))
        fw.add(Key.INITRD_DATA, initrd)
    line = cmdline.encode() + b"\0"
    fw.add(Key.CMDLINE_ADDR, struct.pack("<I", CMDLINE_ADDR))
    fw.add(Key.CMDLINE_SIZE, struct.pack("<I", len(line)))
    fw.add(Key.CMDLINE_DATA, line)
    fw.add(Key.KERNEL_ADDR, struct.pack("<I", PROTECTED_MODE_ADDR))
    fw.add(Key.KERNEL_SIZE, struct.pack("<I", info.kernel_size))
    fw.add(Key.KERNEL_DATA, kernel[info.kernel_offset :])
    fw.add(Key.SETUP_ADDR, struct.pack("<I", REAL_MODE_ADDR))
    fw.add(Key.SETUP_SIZE, struct.pack("<I", len(setup)))
    fw.add(Key.SETUP_DATA, bytes(setup))
    fw.add_file(LINUXBOOT_FILE, linuxboot_rom())
    fw.add_file("bootorder", b"/rom@" + LINUXBOOT_FILE.encode() + b"\n")  # the kernel before any disk
