"""QEMU's firmware configuration interface (fw_cfg), as SeaBIOS and OVMF read it.

The interface is QEMU's (its docs/specs/fw_cfg.rst); this model is written from that
description. On x86 it is three I/O registers:

    0x510  selector, 16 bits, written: chooses an item and rewinds its read offset
    0x511  data, 8 bits: the item's next byte (0 past its end); writes are ignored
    0x514  DMA address, 64 bits big-endian as two 32-bit writes (0x514 high, 0x518 low);
           the write of the low half starts the transfer the descriptor there describes.
           Reading the 8 bytes gives the signature "QEMU CFG".

A DMA descriptor (`FWCfgDmaAccess`, big-endian): control (32 bits), length (32), address
(64). Control's high 16 bits are a selector when SELECT is set; then SKIP moves the offset,
READ copies the item's next `length` bytes to `address` (zeros past its end), WRITE is
refused (no item here is writable). When done the device writes control back: 0, or ERROR.
A descriptor or a buffer outside guest RAM, or a length that wraps, is an ERROR and no
byte is moved: every access goes through GuestMemory, which checks it.

Items have a 16-bit key: the fixed ones below (`Key`), and files from FILE_FIRST on, listed
by name in the directory (FILE_DIR: a big-endian count, then {size BE32, select BE16,
reserved 16, name[56]} per file).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from ...errors import GuestMemoryError

FW_CFG_PORT = 0x510  # selector (16 bits); data at +1
FW_CFG_PORTS = 2
FW_CFG_DMA_PORT = 0x514  # 8 ports: the DMA address
FW_CFG_DMA_PORTS = 8

SIGNATURE = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"
FILE_NAME_SIZE = 56
FILE_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name
DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address


class Key(IntEnum):
    """Item selectors (fw_cfg.rst, "Selector Register"; the x86 ones are arch-local)."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    KERNEL_ADDR = 0x07
    KERNEL_SIZE = 0x08
    KERNEL_CMDLINE = 0x09
    INITRD_ADDR = 0x0A
    INITRD_SIZE = 0x0B
    BOOT_DEVICE = 0x0C
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    KERNEL_ENTRY = 0x10
    KERNEL_DATA = 0x11
    INITRD_DATA = 0x12
    CMDLINE_ADDR = 0x13
    CMDLINE_SIZE = 0x14
    CMDLINE_DATA = 0x15
    SETUP_ADDR = 0x16
    SETUP_SIZE = 0x17
    SETUP_DATA = 0x18
    FILE_DIR = 0x19
    FILE_FIRST = 0x20
    WRITE_CHANNEL = 0x4000  # selector bit: the item is to be written (legacy, unsupported here)
    ARCH_LOCAL = 0x8000
    X86_ACPI_TABLES = 0x8000
    X86_SMBIOS_ENTRIES = 0x8001
    X86_IRQ0_OVERRIDE = 0x8002
    X86_E820_TABLE = 0x8003


class Features(IntFlag):
    """The ID item's bits."""

    TRADITIONAL = 1 << 0  # the selector/data registers
    DMA = 1 << 1


class DmaControl(IntFlag):
    ERROR = 1 << 0
    READ = 1 << 1
    SKIP = 1 << 2
    SELECT = 1 << 3
    WRITE = 1 << 4


class FwCfg:
    """The items and the three registers. `mem` (GuestMemory) is what DMA reaches."""

    def __init__(self, mem):
        self.mem = mem
        self.items: dict[int, bytes] = {}
        self.files: dict[str, int] = {}  # name -> key
        self.selected = 0
        self.offset = 0
        self.dma_high = 0  # the DMA address's high half, until the low half is written
        self.counters = {"selects": 0, "dma": 0, "dma_errors": 0}
        self.add(Key.SIGNATURE, SIGNATURE)
        self.add(Key.ID, struct.pack("<I", Features.TRADITIONAL | Features.DMA))
        self._directory()

    # -- items ---------------------------------------------------------------------------
    def add(self, key: int, data: bytes) -> None:
        self.items[int(key)] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """A named item; returns its key. The directory is rewritten (sorted by name, as
        QEMU keeps it)."""
        encoded = name.encode()
        if not encoded or len(encoded) >= FILE_NAME_SIZE:
            raise ValueError(f"fw_cfg file name {name!r}: 1 to {FILE_NAME_SIZE - 1} bytes")
        key = self.files.get(name)
        if key is None:
            key = Key.FILE_FIRST + len(self.files)
            self.files[name] = key
        self.add(key, data)
        self._directory()
        return key

    def _directory(self) -> None:
        entries = [
            FILE_ENTRY.pack(len(self.items[key]), key, 0, name.encode())
            for name, key in sorted(self.files.items())
        ]
        self.items[Key.FILE_DIR] = struct.pack(">I", len(entries)) + b"".join(entries)

    def _item(self) -> bytes:
        return self.items.get(self.selected, b"")

    def select(self, key: int) -> None:
        self.selected = key & 0xFFFF
        self.offset = 0
        self.counters["selects"] += 1

    # -- the port bus's side (registered twice: at FW_CFG_PORT and at FW_CFG_DMA_PORT) ----
    def control_port(self):
        return _ControlPorts(self)

    def dma_port(self):
        return _DmaPorts(self)

    def read_data(self, size: int) -> int:
        item = self._item()
        chunk = item[self.offset : self.offset + size]
        self.offset = min(self.offset + size, max(len(item), self.offset))
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    # -- DMA ---------------------------------------------------------------------------
    def dma(self, address: int) -> None:
        """Run the descriptor at guest physical `address`; its control word gets the result."""
        self.counters["dma"] += 1
        try:
            control, length, buffer = DMA_ACCESS.unpack(self.mem.read(address, DMA_ACCESS.size))
        except GuestMemoryError:  # nowhere to report it: the guest sees its control unchanged
            self.counters["dma_errors"] += 1
            return
        result = 0 if self._transfer(control, length, buffer) else DmaControl.ERROR
        if result:
            self.counters["dma_errors"] += 1
        self.mem.write(address, struct.pack(">I", result))

    def _transfer(self, control: int, length: int, buffer: int) -> bool:
        if control & DmaControl.SELECT:
            self.select(control >> 16)
        if control & DmaControl.WRITE:
            return False  # no writable items
        if control & DmaControl.READ:
            if not self.mem.contains(buffer, length):  # checked before a byte is made: length is the guest's
                return False
            item = self._item()
            data = item[self.offset : self.offset + length].ljust(length, b"\0")
            try:
                self.mem.write(buffer, data)
            except GuestMemoryError:
                return False
            self.offset += length
        elif control & DmaControl.SKIP:
            self.offset += length
        return True


class _ControlPorts:
    """0x510 (selector, 16-bit write) and 0x511 (data, byte reads)."""

    def __init__(self, fw: FwCfg):
        self.fw = fw

    def read(self, offset: int, size: int) -> int:
        if offset == 1:
            return self.fw.read_data(size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 2:
            self.fw.select(value)
        # writes to the data register are ignored (fw_cfg.rst: since QEMU 2.4)


class _DmaPorts:
    """0x514-0x51B: the DMA address (big-endian halves), the signature when read."""

    def __init__(self, fw: FwCfg):
        self.fw = fw

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(DMA_SIGNATURE[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        half = int.from_bytes(value.to_bytes(4, "little"), "big")  # the guest wrote it big-endian
        if offset == 0:
            self.fw.dma_high = half
        elif offset == 4:
            address = self.fw.dma_high << 32 | half
            self.fw.dma_high = 0
            self.fw.dma(address)
