"""The PCI root complex: bus 0, the host bridge, and the two ways to reach config space.

  ports 0xCF8/0xCFC   configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): a dword written to
                      CONFIG_ADDRESS selects bus/device/function/register, CONFIG_DATA
                      (0xCFC-0xCFF) reads or writes it; the first 256 bytes only
  ECAM                PCI Express's memory-mapped configuration (PCIe 4.0, 7.2.2): 4 KiB
                      per function at base + (bus << 20 | device << 15 | function << 12),
                      described to the guest by the ACPI MCFG table; the host bridge (the
                      Q35 MCH, q35.py) decodes it where its PCIEXBAR says

Only bus 0 exists. A function nobody has reads all ones (the guest's probe for "no device").
`assign_bars` does what firmware does before the OS starts: every BAR gets an address in
its window, 32-bit BARs below 4 GiB, 64-bit ones above RAM, and memory decoding is on.
"""

from __future__ import annotations

from ... import platform
from ...bus import Bus
from .config_space import Bar, BarKind
from .device import PciBuses, PciDevice
from .q35 import Q35Mch
from .regs import Command, Reg

SLOTS = 32
FUNCTIONS = 8
HEADER_MULTI_FUNCTION = 0x80  # header type bit 7: the device has functions besides 0
CONFIG_ENABLE = 1 << 31  # CONFIG_ADDRESS bit 31: the next CONFIG_DATA access is a config cycle
CONFIG_SPACE_LEGACY = 0x100  # what ports 0xCF8/0xCFC reach

def _location(bus: int, slot: int, function: int) -> str:
    return f"{bus:02x}:{slot:02x}.{function}"


class PciRoot:
    """Bus 0 and its functions."""

    def __init__(self, buses: PciBuses, *, firmware_set_up: bool = True):
        """`firmware_set_up`: ECAM decoded from the start (a direct kernel boot), or only
        once firmware has programmed the host bridge's PCIEXBAR (-l bootrom)."""
        self.buses = buses
        self.functions: dict[tuple[int, int], PciDevice] = {}
        self.address = 0  # CONFIG_ADDRESS
        self.config_reads = 0
        self.config_writes = 0
        self.host_bridge = Q35Mch(Ecam(self), firmware_set_up=firmware_set_up)
        self.add(0, 0, self.host_bridge)

    def add(self, slot: int, function: int, device: PciDevice) -> None:
        if not (0 <= slot < SLOTS and 0 <= function < FUNCTIONS):
            raise ValueError(f"PCI {_location(0, slot, function)}: slot 0-31, function 0-7")
        if (slot, function) in self.functions:
            have = self.functions[(slot, function)].name
            raise ValueError(f"PCI {_location(0, slot, function)} is taken by {have}")
        self.functions[(slot, function)] = device
        device.attach(self.buses, (0, slot, function))
        self._mark_multifunction(slot)

    def _mark_multifunction(self, slot: int) -> None:
        first = self.functions.get((slot, 0))
        if first is None:
            return
        many = any(s == slot and f for s, f in self.functions)
        header = first.config.get(Reg.HEADER_TYPE, 1) & ~HEADER_MULTI_FUNCTION
        first.config.put(Reg.HEADER_TYPE, 1, header | (HEADER_MULTI_FUNCTION if many else 0))

    def devices(self) -> list[tuple[tuple[int, int], PciDevice]]:
        return sorted(self.functions.items())

    def lookup(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != 0:
            return None
        # Function 0 must exist for the others to be seen (PCI 3.0, 6.2.1).
        if (slot, 0) not in self.functions:
            return None
        return self.functions.get((slot, function))

    # -- configuration cycles ---------------------------------------------------------
    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        self.config_reads += 1
        dev = self.lookup(bus, slot, function)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int, value: int) -> None:
        self.config_writes += 1
        dev = self.lookup(bus, slot, function)
        if dev is not None:
            dev.config_write(offset, size, value)

    # -- firmware's part ----------------------------------------------------------------
    def assign_bars(self, mmio64_window: tuple[int, int]) -> None:
        """Place every BAR (largest first, each aligned to its size) and turn decoding on."""
        windows = {
            BarKind.MEM32: _Window(platform.PCI_MMIO32_START, platform.PCI_MMIO32_SIZE, "32-bit memory"),
            BarKind.MEM64: _Window(*mmio64_window, "64-bit memory"),
            BarKind.IO: _Window(platform.PCI_IO_START, platform.PCI_IO_END - platform.PCI_IO_START, "I/O"),
        }
        bars: list[tuple[PciDevice, Bar]] = [(d, b) for _, d in self.devices() for b in d.config.bar_list()]
        for dev, bar in sorted(bars, key=lambda db: -db[1].size):
            dev.config.set_bar_address(bar, windows[bar.kind].take(bar.size, f"{dev.name} BAR{bar.index}"))
        for _, dev in self.devices():
            if dev.config.bar_list():
                cmd = dev.config.get(Reg.COMMAND, 2)
                kinds = {b.kind for b in dev.config.bar_list()}
                cmd |= Command.MEMORY if kinds - {BarKind.IO} else 0
                cmd |= Command.IO if BarKind.IO in kinds else 0
                dev.config.put(Reg.COMMAND, 2, cmd)
            dev.update_mappings()


class _Window:
    def __init__(self, start: int, size: int, what: str):
        self.next = start
        self.end = start + size
        self.what = what

    def take(self, size: int, who: str) -> int:
        address = -(-self.next // size) * size
        if address + size > self.end:
            raise ValueError(f"{who} ({size:#x} bytes) does not fit in the PCI {self.what} window")
        self.next = address + size
        return address


class ConfigAddressPort:
    """0xCF8-0xCFB: CONFIG_ADDRESS, a dword register. Byte and word accesses are not config
    mechanism #1 (0xCF9 is the chipset's reset control on a PC): they go to `narrow`."""

    def __init__(self, root: PciRoot, narrow=None):
        self.root = root
        self.narrow = narrow

    def read(self, offset: int, size: int) -> int:
        if size == 4 and offset == 0:
            return self.root.address
        if self.narrow is not None:
            return self.narrow.read(offset, size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and offset == 0:
            self.root.address = value & 0x80FF_FFFC  # bits 30:24 reserved, 1:0 read 0
        elif self.narrow is not None:
            self.narrow.write(offset, size, value)


class ConfigDataPort:
    """0xCFC-0xCFF: CONFIG_DATA, the register CONFIG_ADDRESS selects."""

    def __init__(self, root: PciRoot):
        self.root = root

    def _target(self, offset: int) -> tuple[int, int, int, int] | None:
        a = self.root.address
        if not a & CONFIG_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + offset

    def read(self, offset: int, size: int) -> int:
        t = self._target(offset)
        if t is None:
            return (1 << (8 * size)) - 1
        return self.root.config_read(*t, size)

    def write(self, offset: int, size: int, value: int) -> None:
        t = self._target(offset)
        if t is not None:
            self.root.config_write(*t, size, value)


class Ecam:
    """The ECAM window on the MMIO bus."""

    def __init__(self, root: PciRoot):
        self.root = root

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        return self.root.config_read(*self._decode(offset), size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.root.config_write(*self._decode(offset), size, value)


def install(root: PciRoot, pio: Bus, mmio: Bus, *, narrow_cf8=None) -> None:
    """Put the root's config ports on the bus (ECAM is the host bridge's: PCIEXBAR)."""
    pio.register(platform.PCI_CONFIG_ADDRESS_PORT, 4, ConfigAddressPort(root, narrow_cf8), "pci-config-address")
    pio.register(platform.PCI_CONFIG_ADDRESS_PORT + 4, 4, ConfigDataPort(root), "pci-config-data")
