"""fw_cfg from the guest's side: the selector and data ports, the DMA interface, the file
directory, the items a firmware boot gets (and the table loader's ACPI files)."""

import struct

import pytest

from asyncvmm.boot import acpi, fw_cfg_items
from asyncvmm.bus import Bus
from asyncvmm.config import VmConfig
from asyncvmm.devices.legacy.fw_cfg import (
    DMA_ACCESS,
    FILE_ENTRY,
    FW_CFG_DMA_PORT,
    FW_CFG_DMA_PORTS,
    FW_CFG_PORT,
    FW_CFG_PORTS,
    DmaControl,
    FwCfg,
    Key,
)
from asyncvmm.vstate.memory import GuestMemory

MiB = 1 << 20
DESC = 0x1000
BUF = 0x2000


@pytest.fixture
def machine():
    mem = GuestMemory(16 * MiB)
    fw = FwCfg(mem)
    pio = Bus("pio")
    pio.register(FW_CFG_PORT, FW_CFG_PORTS, fw.control_port(), "fw-cfg")
    pio.register(FW_CFG_DMA_PORT, FW_CFG_DMA_PORTS, fw.dma_port(), "fw-cfg-dma")
    yield fw, mem, pio
    mem.close()


def be32_port(value: int) -> int:
    """What a guest's outl of cpu_to_be32(value) puts on the port (x86 is little-endian)."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def read_item(pio, key: int, n: int) -> bytes:
    pio.access(FW_CFG_PORT, 2, True, key)
    return bytes(pio.access(FW_CFG_PORT + 1, 1, False) for _ in range(n))


def dma(pio, mem, control: int, length: int, address: int, desc: int = DESC) -> int:
    mem.write(desc, DMA_ACCESS.pack(control, length, address))
    pio.access(FW_CFG_DMA_PORT, 4, True, be32_port(desc >> 32))
    pio.access(FW_CFG_DMA_PORT + 4, 4, True, be32_port(desc & 0xFFFF_FFFF))
    return struct.unpack(">I", mem.read(desc, 4))[0]


def test_signature_and_features_through_the_ports(machine):
    fw, mem, pio = machine
    assert read_item(pio, Key.SIGNATURE, 4) == b"QEMU"
    (features,) = struct.unpack("<I", read_item(pio, Key.ID, 4))
    assert features == 0b11  # traditional interface and DMA
    # past the end: zeros; an unknown key: nothing but zeros
    assert read_item(pio, Key.SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(pio, 0x1234, 4) == b"\0\0\0\0"


def test_selecting_rewinds_and_data_writes_are_ignored(machine):
    fw, mem, pio = machine
    assert read_item(pio, Key.SIGNATURE, 2) == b"QE"
    pio.access(FW_CFG_PORT + 1, 1, True, 0x55)  # ignored
    assert bytes([pio.access(FW_CFG_PORT + 1, 1, False)]) == b"M"
    assert read_item(pio, Key.SIGNATURE, 1) == b"Q"


def test_dma_signature_reads_back(machine):
    fw, mem, pio = machine
    raw = b"".join(pio.access(FW_CFG_DMA_PORT + i, 1, False).to_bytes(1, "little") for i in range(8))
    assert raw == b"QEMU CFG"


def test_file_directory_lists_files_by_name(machine):
    fw, mem, pio = machine
    key_b = fw.add_file("etc/b", b"bbbb")
    key_a = fw.add_file("etc/a", b"aa")
    raw = read_item(pio, Key.FILE_DIR, 4 + 2 * FILE_ENTRY.size)
    assert struct.unpack(">I", raw[:4]) == (2,)
    entries = [FILE_ENTRY.unpack_from(raw, 4 + i * FILE_ENTRY.size) for i in range(2)]
    assert [(size, sel, name.rstrip(b"\0")) for size, sel, _, name in entries] == [
        (2, key_a, b"etc/a"), (4, key_b, b"etc/b"),
    ]
    assert read_item(pio, key_b, 4) == b"bbbb"
    with pytest.raises(ValueError):
        fw.add_file("x" * 56, b"")


def test_dma_select_read_and_skip(machine):
    fw, mem, pio = machine
    key = fw.add_file("etc/data", bytes(range(16)))
    mem.write(BUF, b"\xee" * 32)
    assert dma(pio, mem, DmaControl.SELECT | DmaControl.READ | key << 16, 4, BUF) == 0
    assert mem.read(BUF, 5) == b"\0\1\2\3\xee"
    assert dma(pio, mem, DmaControl.SKIP, 4, 0) == 0
    assert dma(pio, mem, DmaControl.READ, 4, BUF) == 0
    assert mem.read(BUF, 4) == b"\x08\x09\x0a\x0b"
    # past the end: zeros fill the rest
    assert dma(pio, mem, DmaControl.READ, 8, BUF) == 0
    assert mem.read(BUF, 8) == b"\x0c\x0d\x0e\x0f\0\0\0\0"
    # the data port continues from where DMA left off
    assert fw.offset == 20


def test_dma_outside_ram_is_an_error_and_touches_nothing(machine):
    fw, mem, pio = machine
    key = fw.add_file("etc/data", b"x" * 64)
    before = mem.read(0, 16 * MiB)
    # a buffer in the MMIO hole, one that runs off the end of RAM, a length that wraps
    for address, length in ((0xF000_0000, 16), (16 * MiB - 8, 16), ((1 << 64) - 8, 16), (BUF, 0xFFFF_FFFF)):
        status = dma(pio, mem, DmaControl.SELECT | DmaControl.READ | key << 16, length, address)
        assert status == DmaControl.ERROR, (hex(address), length)
    after = mem.read(0, 16 * MiB)
    changed = [i for i in range(0, 16 * MiB, 4096) if before[i : i + 4096] != after[i : i + 4096]]
    assert changed == [DESC], "only the descriptor's control word may change"
    assert fw.counters["dma_errors"] == 4


def test_dma_writes_are_refused(machine):
    fw, mem, pio = machine
    key = fw.add_file("etc/data", b"abcd")
    mem.write(BUF, b"zzzz")
    assert dma(pio, mem, DmaControl.SELECT | DmaControl.WRITE | key << 16, 4, BUF) == DmaControl.ERROR
    assert read_item(pio, key, 4) == b"abcd"


def test_dma_descriptor_outside_ram_is_dropped(machine):
    fw, mem, pio = machine
    pio.access(FW_CFG_DMA_PORT, 4, True, 0)
    pio.access(FW_CFG_DMA_PORT + 4, 4, True, be32_port(0xF000_0000))  # no RAM there: nowhere to answer
    pio.access(FW_CFG_DMA_PORT, 4, True, be32_port(0xFFFF_FFFF))  # high half beyond any RAM
    pio.access(FW_CFG_DMA_PORT + 4, 4, True, be32_port(DESC))
    assert fw.counters == {"selects": 0, "dma": 2, "dma_errors": 2}


def test_a_firmware_boot_gets_memory_cpus_and_acpi():
    with GuestMemory(64 * MiB) as mem:
        fw = FwCfg(mem)
        fw_cfg_items.populate(fw, mem, VmConfig(kernel="", cpus=2, memory=64 * MiB))
        assert struct.unpack("<Q", fw.items[Key.RAM_SIZE]) == (64 * MiB,)
        assert struct.unpack("<H", fw.items[Key.NB_CPUS]) == (2,)
        e820 = fw.items[fw.files["etc/e820"]]
        assert [fw_cfg_items.E820_ENTRY.unpack_from(e820, i) for i in range(0, len(e820), 20)] == [(0, 64 * MiB, 1)]
        assert {"etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader"} <= set(fw.files)


def link(files: dict[str, bytes], where: dict[str, int]) -> dict[str, bytearray]:
    """Run a table loader's commands as a firmware does, with each file at `where`."""
    out = {name: bytearray(data) for name, data in files.items() if name != fw_cfg_items.LOADER_FILE}
    script = files[fw_cfg_items.LOADER_FILE]
    for at in range(0, len(script), fw_cfg_items.LOADER_COMMAND_SIZE):
        cmd = script[at : at + fw_cfg_items.LOADER_COMMAND_SIZE]
        (kind,) = struct.unpack_from("<I", cmd)
        name = cmd[4:60].rstrip(b"\0").decode()
        if kind == fw_cfg_items.LoaderCommand.ADD_POINTER:
            src = cmd[60:116].rstrip(b"\0").decode()
            offset, size = struct.unpack_from("<IB", cmd, 116)
            value = int.from_bytes(out[name][offset : offset + size], "little") + where[src]
            out[name][offset : offset + size] = value.to_bytes(size, "little")
        elif kind == fw_cfg_items.LoaderCommand.ADD_CHECKSUM:
            result, start, length = struct.unpack_from("<III", cmd, 60)
            out[name][result] = 0
            out[name][result] = acpi.checksum(bytes(out[name][start : start + length]))
    return out


def test_the_table_loader_links_the_tables_anywhere():
    tables = acpi.build([0, 1], 256 * MiB, base=0)
    files = fw_cfg_items.acpi_files(tables)
    where = {fw_cfg_items.RSDP_FILE: 0xF5A40, fw_cfg_items.TABLES_FILE: 0xE0000}
    linked = link(files, where)
    base = where[fw_cfg_items.TABLES_FILE]
    rsdp = linked[fw_cfg_items.RSDP_FILE]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    (xsdt,) = struct.unpack_from("<Q", rsdp, 24)
    assert xsdt == base + tables.addresses["XSDT"]
    blob = linked[fw_cfg_items.TABLES_FILE]
    # the same tables as a kernel boot gets at `base`, pointer for pointer
    direct = acpi.build([0, 1], 256 * MiB, base=base)
    for sig in ("XSDT", "FACP", "APIC", "MCFG", "DSDT", "FACS"):
        off = direct.addresses[sig] - base
        assert bytes(blob[off : off + len(direct.table(sig))]) == direct.table(sig), sig
