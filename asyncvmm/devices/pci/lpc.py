"""bhyve's `-s N,lpc`: the LPC/ISA bridge behind which a PC's legacy devices live.

A PCI function with the ISA bridge class and no BARs, as bhyve's pci_lpc: vendor and
device are bhyve's (Intel's 8086:7000, a PIIX3's ISA bridge), so a guest that knows
bhyve's machine sees the same bridge. The devices "behind" it — the COM ports, the i8042,
the RTC — are decoded at their fixed ports whatever the bridge's configuration space
holds (device_manager/legacy.py), so `-l com1,...` works with or without it, and the
bridge only tells the guest that an ISA bus is there. Its PIRQ routing registers are
not emulated: the DSDT's _PRT routes the PCI interrupts.
"""

from __future__ import annotations

from ...config import PciSlot, VmConfig
from ...errors import ConfigError
from .config_space import ConfigSpace
from .device import PciDevice
from .regs import ClassCode, VendorId

PIIX3_ISA_BRIDGE = 0x7000  # bhyve's LPC_DEV


class LpcBridge(PciDevice):
    """The ISA bridge function: identification only."""

    def __init__(self, name: str = "lpc"):
        super().__init__(
            ConfigSpace(vendor_id=VendorId.INTEL, device_id=PIIX3_ISA_BRIDGE, class_code=ClassCode.ISA_BRIDGE),
            name,
        )


def check(slot: PciSlot, cfg: VmConfig) -> None:
    where = f"-s {slot.slot}:{slot.function},lpc" if slot.function else f"-s {slot.slot},lpc"
    if slot.options:
        raise ConfigError(f"{where},{slot.options}: lpc takes no options (COM ports are -l comN,...)")
    others = [s for s in cfg.slots if s.driver == "lpc"]
    if len(others) > 1:
        raise ConfigError(f"{where}: only one LPC bridge may exist")


def build(slot: PciSlot, ctx) -> LpcBridge:
    return LpcBridge(f"lpc@{slot.slot}.{slot.function}")
