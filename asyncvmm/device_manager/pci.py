"""The PCI root of one boot and the `-s` devices behind it.

`PciDevices(vm, config, pio, mmio, host)` builds the GSI routing table, the root on bus 0
(0xCF8/0xCFC and ECAM), each `-s` slot's device through its driver (devices/registry.py),
and places their BARs in the 64-bit window above RAM. `close()` closes the devices first
(I/O in flight points into guest RAM), then the interrupt routes.
"""

from __future__ import annotations

from typing import cast

from .. import platform
from .._native import lib
from ..bus import Bus
from ..config import VmConfig
from ..irq import IrqRouter
from ..log import get_logger
from ..vstate.vm import Vm

log = get_logger("asyncvmm.machine")


class PciDevices:
    """The GSI router, the PCI root and its devices."""

    def __init__(self, vm: Vm, config: VmConfig, pio: Bus, mmio: Bus, host=None, reset_control=None, place_acpi_pm=None):
        """`place_acpi_pm(port or None)`: where the LPC's PMBASE puts the ACPI PM block
        (LegacyDevices.place_acpi_pm); without an LPC it stays where it is."""
        from ..devices import slots  # noqa: PLC0415 (device models load the data path)
        from ..devices.pci.device import PciBuses, PciDevice  # noqa: PLC0415
        from ..devices.pci.root import PciRoot, install  # noqa: PLC0415

        self.irq: IrqRouter | None = IrqRouter(vm.fd)
        self.root = None
        try:
            self.irq.commit()  # the default routes, before any MSI exists (KVM has them: no ioctl)
            built = [(s, d) for s, d in ((s, slots.lookup(s.driver)) for s in config.slots) if d.build is not None]
            notify = None
            if built:  # the doorbells' binder (and the virtio transport's imports): only for devices
                from ..devices.virtio.transport_pci import NotifyBinder  # noqa: PLC0415

                any_length = vm.kvm.check_extension(lib.KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0
                notify = NotifyBinder(vm.fd, any_length)
            ctx = slots.BuildContext(config, vm.mem, self.irq, notify, host)
            self.root = PciRoot(PciBuses(mmio, pio), firmware_set_up=not config.bootrom)
            install(self.root, pio, mmio, narrow_cf8=reset_control)  # 0xCF9: the reset control register
            for s, driver in built:
                dev = cast(PciDevice, driver.build(s, ctx))
                try:
                    self.root.add(s.slot, s.function, dev)
                except BaseException:
                    dev.close()
                    raise
                if s.driver == "lpc" and place_acpi_pm is not None:
                    dev.connect_pm(place_acpi_pm)  # type: ignore[attr-defined]  # PMBASE places the PM block
            self.root.assign_bars(platform.pci_mmio64_window(platform.ram_top(vm.mem.regions)))
            attached = [d for d in (slots.describe(s, config, host) for s in config.slots) if d]
            if attached:
                log.info(f"devices: {'; '.join(attached)}")
        except BaseException:
            self.close()
            raise

    def devices(self):
        return self.root.devices() if self.root is not None else []

    def stats(self) -> dict:
        return {dev.name: dev.stats() for _, dev in self.devices() if hasattr(dev, "stats")}

    def close(self) -> None:
        if self.root is not None:  # devices first: I/O in flight points into guest RAM
            for _, dev in self.root.devices():
                dev.close()
            self.root = None
        if self.irq is not None:
            self.irq.close()
            self.irq = None
