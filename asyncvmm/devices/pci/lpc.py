"""bhyve's `-s N,lpc`: the LPC bridge behind which a PC's legacy devices live — here Intel's
ICH9 LPC interface (8086:2918), the south bridge of the Q35 chipset whose host bridge
(q35.py) every machine has, so firmware written for Q35 (SeaBIOS's mch_isa_bridge_setup,
OVMF's PlatformPei and AcpiTimerLib, which read it at 00:1F.0: hence `-s 31,lpc`, and
-l bootrom needs it there, as bhyve's bootrom needs its LPC) finds what it programs.

The devices behind it — the COM ports, the i8042, the RTC — are decoded at their fixed
ports whatever the bridge's configuration space holds (device_manager/legacy.py), so
`-l com1,...` works with or without it. Registers (ICH9 datasheet, "LPC Interface Bridge
Registers (D31:F0)"; the fields QEMU's hw/isa/lpc_ich9.c models):

    PMBASE       0x40  32 bits  the ACPI I/O block's base (bits 15:7, 128 ports; bit 0
                                reads 1: I/O space)
    ACPI_CNTL    0x44  8 bits   ACPI_EN (bit 7): the block is decoded at PMBASE;
                                SCI_IRQ_SEL (2:0): stored, the SCI is IRQ 9 (the FADT's)
    PIRQA-D_ROUT 0x60  4 bytes  PCI interrupt routing to ISA IRQs (IRQEN bit 7 = off).
    PIRQE-H_ROUT 0x68  4 bytes  Stored and read back only: INTx here goes to IOAPIC pins
                                16-23 as the DSDT's _PRT says (platform.pci_intx_gsi)
    GEN_PMCON_1-3 0xA0 6 bytes  power-management configuration: stored (SeaBIOS sets
                                SMI_LOCK; there is no SMM to lock)
    RCBA         0xF0  32 bits  root complex register block base + enable: stored; the
                                block itself (chipset configuration registers at
                                0xFED1C000 by firmware's convention) is not decoded

PMBASE + ACPI_EN place the ACPI PM block (devices/legacy/acpi_pm.py) through
`connect_pm(place)`. A direct kernel boot starts as firmware leaves the chipset (PMBASE
platform.ACPI_PM_PORT, ACPI_EN, where the FADT says); a firmware boot from the reset
values (nothing decoded until the firmware programs it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ... import platform
from ...config import PciSlot, VmConfig
from ...errors import ConfigError
from ...log import get_logger
from ..registry import register
from .config_space import ConfigSpace
from .device import PciDevice
from .regs import ClassCode, VendorId

log = get_logger(__name__)

ICH9_LPC = 0x2918  # 8086:2918, the ICH9 LPC interface controller
Q35_LPC_SLOT = 31  # 00:1F.0, where Q35 firmware looks for it


class Reg(enum.IntEnum):
    PMBASE = 0x40
    ACPI_CNTL = 0x44
    PIRQA_ROUT = 0x60  # ..0x63
    PIRQE_ROUT = 0x68  # ..0x6B
    GEN_PMCON_1 = 0xA0  # GEN_PMCON_1..3: 0xA0..0xA5
    RCBA = 0xF0


class AcpiCntl(enum.IntFlag):
    SCI_IRQ_SEL = 0b111
    ACPI_EN = 1 << 7


PMBASE_RTE = 1  # bit 0, read-only 1: the base is an I/O address
PMBASE_ADDRESS = 0xFF80  # bits 15:7: 128-port aligned
PIRQ_ROUT_IRQEN = 0x80  # set: the PIRQ is not routed to an ISA IRQ (the reset value)
PIRQ_ROUT_WRITABLE = 0x8F
GEN_PMCON_LEN = 6
RCBA_EN = 1
RCBA_WRITABLE = 0xFFFF_C000 | RCBA_EN


class LpcBridge(PciDevice):
    """The ICH9 LPC function at 00:1F.0 (or wherever -s puts it)."""

    def __init__(self, name: str = "lpc", *, firmware_set_up: bool = True):
        config = ConfigSpace(vendor_id=VendorId.INTEL, device_id=ICH9_LPC, class_code=ClassCode.ISA_BRIDGE)
        super().__init__(config, name)
        self._place: Callable[[int | None], bool] | None = None
        self.pm_port: int | None = None  # where the ACPI PM block decodes now
        self.pm_conflicts = 0
        config._set(Reg.PMBASE, 4, PMBASE_RTE)
        config._mask(Reg.PMBASE, 4, PMBASE_ADDRESS)
        config._mask(Reg.ACPI_CNTL, 1, AcpiCntl.ACPI_EN | AcpiCntl.SCI_IRQ_SEL)
        for first in (Reg.PIRQA_ROUT, Reg.PIRQE_ROUT):
            config._set(first, 4, int.from_bytes(bytes([PIRQ_ROUT_IRQEN]) * 4, "little"))
            config._mask(first, 4, int.from_bytes(bytes([PIRQ_ROUT_WRITABLE]) * 4, "little"))
        config._mask(Reg.GEN_PMCON_1, GEN_PMCON_LEN, (1 << (8 * GEN_PMCON_LEN)) - 1)
        config._mask(Reg.RCBA, 4, RCBA_WRITABLE)
        if firmware_set_up:
            config._set(Reg.PMBASE, 4, platform.ACPI_PM_PORT | PMBASE_RTE)
            config._set(Reg.ACPI_CNTL, 1, AcpiCntl.ACPI_EN)

    @property
    def pmbase(self) -> int:
        return self.config.get(Reg.PMBASE, 4) & PMBASE_ADDRESS

    @property
    def acpi_enabled(self) -> bool:
        return bool(self.config.get(Reg.ACPI_CNTL, 1) & AcpiCntl.ACPI_EN)

    def pirq_routes(self) -> bytes:
        """PIRQA..H_ROUT as the guest wrote them."""
        c = self.config
        return bytes(c.data[Reg.PIRQA_ROUT : Reg.PIRQA_ROUT + 4] + c.data[Reg.PIRQE_ROUT : Reg.PIRQE_ROUT + 4])

    def connect_pm(self, place: Callable[[int | None], bool]) -> None:
        """`place(port or None)` decodes the ACPI PM block there (False: the ports are
        taken); called now and whenever PMBASE or ACPI_EN change."""
        self._place = place
        self.pm_port = -1  # unknown: place it now
        self.update_mappings()

    def config_written(self, offset: int, size: int) -> None:
        if offset < Reg.ACPI_CNTL + 1 and offset + size > Reg.PMBASE:
            self.update_mappings()

    def update_mappings(self) -> None:
        """The PM block where PMBASE/ACPI_EN say (after a write, a restore)."""
        super().update_mappings()
        if self._place is None:
            return
        want = self.pmbase if self.acpi_enabled and self.pmbase else None
        if want == self.pm_port:
            return
        if self._place(want):
            self.pm_port = want
        else:  # over another device's ports: not decoded, as a BAR placed over another
            self.pm_conflicts += 1
            self.pm_port = None  # place() left it nowhere
            log.guest(f"{self.name}: PMBASE {want:#x}: the ACPI PM block's ports are taken; not decoded")


def check(slot: PciSlot, cfg: VmConfig) -> None:
    where = f"-s {slot.slot}:{slot.function},lpc" if slot.function else f"-s {slot.slot},lpc"
    if slot.options:
        raise ConfigError(f"{where},{slot.options}: lpc takes no options (COM ports are -l comN,...)")
    others = [s for s in cfg.slots if s.driver == "lpc"]
    if len(others) > 1:
        raise ConfigError(f"{where}: only one LPC bridge may exist")


def build(slot: PciSlot, ctx) -> LpcBridge:
    return LpcBridge(f"lpc@{slot.slot}.{slot.function}", firmware_set_up=not ctx.config.bootrom)


register("lpc", check, build)
