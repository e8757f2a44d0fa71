"""A PCI function: its configuration space, and its BARs on the machine's buses.

The guest moves BARs and switches decoding on and off through configuration space;
after every such write the function recomputes where each BAR is decoded and moves its
window on the MMIO (or port) bus to match. A subclass serves the BARs' registers
(`bar_read`/`bar_write`) and hears when a BAR appears or goes (`bar_mapped`/
`bar_unmapped`: where a device binds its ioeventfds). Like every device model this runs on
the loop's thread and knows no fd of its own beyond what its subclass adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...bus import Bus, BusConflict
from ...log import get_logger
from .config_space import Bar, BarKind, ConfigSpace

log = get_logger(__name__)


@dataclass
class PciBuses:
    """Where BARs are decoded: the MMIO and port buses of the machine."""

    mmio: Bus
    pio: Bus


class _BarWindow:
    """A BAR as a bus range: accesses go to the device with the offset inside the BAR."""

    def __init__(self, device: "PciDevice", bar: Bar):
        self.device = device
        self.index = bar.index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)


@dataclass
class BarMapping:
    """Where a BAR is mapped now: its address on `bus`."""

    address: int
    bus: Bus


class PciDevice:
    """Base of the functions on the root bus."""

    def __init__(self, config: ConfigSpace, name: str):
        self.config = config
        self.name = name
        self.buses: PciBuses | None = None
        self.mapped: dict[int, BarMapping] = {}
        self.conflicts = 0  # BAR placements the guest chose over another device's range
        self.location: tuple[int, int, int] = (0, 0, 0)
        config.on_write = self._config_written

    # -- wiring ------------------------------------------------------------------------
    def attach(self, buses: PciBuses, location: tuple[int, int, int]) -> None:
        self.buses = buses
        self.location = location
        self.update_mappings()

    def detach(self) -> None:
        for index in list(self.mapped):
            self._unmap(self.config.bars[index])
        self.buses = None

    # -- configuration space -----------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def _config_written(self, offset: int, size: int) -> None:
        if self.config.touches_bars(offset, size):
            self.update_mappings()
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """A subclass's hook: the guest wrote configuration space."""

    # -- BAR placement -----------------------------------------------------------------
    def _wanted(self, bar: Bar) -> int | None:
        """Where the BAR decodes now, or None."""
        if not self.config.decoding(bar):
            return None
        address = self.config.bar_address(bar)
        limit = 1 << (64 if bar.kind is BarKind.MEM64 else 16 if bar.kind is BarKind.IO else 32)
        if address == 0 or address + bar.size > limit:
            return None  # unassigned, or the sizing pattern left in place
        return address

    def update_mappings(self) -> None:
        if self.buses is None:
            return
        for bar in self.config.bar_list():
            want = self._wanted(bar)
            have = self.mapped.get(bar.index)
            if have is not None and have.address == want:
                continue
            if have is not None:
                self._unmap(bar)
            if want is not None:
                self._map(bar, want)

    def _map(self, bar: Bar, address: int) -> None:
        bus = self.buses.pio if bar.kind is BarKind.IO else self.buses.mmio
        try:
            bus.register(address, bar.size, _BarWindow(self, bar), f"{self.name} BAR{bar.index}")
        except BusConflict as e:
            # A real bus would answer both devices and corrupt the reads; we answer the
            # first, and say so once per placement.
            self.conflicts += 1
            log.guest(f"{self.name}: BAR{bar.index} at {address:#x} not decoded: {e}")
            return
        self.mapped[bar.index] = BarMapping(address, bus)
        self.bar_mapped(bar, address)

    def _unmap(self, bar: Bar) -> None:
        m = self.mapped.pop(bar.index)
        m.bus.unregister(m.address)
        self.bar_unmapped(bar, m.address)

    # -- a subclass's BARs -------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def bar_mapped(self, bar: Bar, address: int) -> None:
        """The BAR now decodes at `address`."""

    def bar_unmapped(self, bar: Bar, address: int) -> None:
        """The BAR no longer decodes at `address`."""

    def close(self) -> None:
        """Release what the device holds (fds, C state); idempotent."""
