"""00:00.0 — the host bridge: Intel's Q35 memory controller hub (MCH, 8086:29C0), as QEMU's
q35 machine presents it, so firmware written for Q35 (SeaBIOS's pciinit.c, OVMF's
PlatformPei, which dead-loops on any host bridge but i440FX's and Q35's) finds the chipset
it knows. Every machine has it: one machine, as QEMU's q35 (a direct kernel boot starts with
PCIEXBAR already programmed, as firmware would leave it; a firmware boot starts from the
chipset's reset values).

Registers (Intel 3 Series Chipset Family datasheet, "Host Bridge/DRAM Controller
Registers (D0:F0)"; the fields QEMU's hw/pci-host/q35.c models):

    PCIEXBAR  0x60  64 bits  PCI Express (ECAM) window: base, LENGTH (bits 2:1: 256, 128
                             or 64 MiB = as many buses), PCIEXBAREN (bit 0). Writing it
                             moves the ECAM window on the MMIO bus, as on hardware.
    PAM0-6    0x90  7 bytes  attributes of 0xC0000-0xFFFFF (read/write enable per 16 KiB
                             half-segment). Stored and read back only: that range is
                             always RAM here, read and write (a KVM memory slot; the
                             firmware's copy of itself there is what the guest reads).
    SMRAM     0x9D  8 bits   the compatible SMRAM window (D_OPEN, D_CLS, D_LCK, G_SMRAME;
                             C_BASE_SEG reads 010b = 0xA0000). Stored: there is no SMM
                             here (no SMI is ever raised), so nothing is hidden.
    ESMRAMC   0x9E  8 bits   extended SMRAM (TSEG) control; stored, for the same reason.
                             Its cache bits (SM_CACHE, SM_L1, SM_L2), hard-wired 1 where
                             SMRAM exists, read 0: OVMF's SMM builds take that as "this
                             Q35 lacks SMRAM" (as with QEMU's q35 without SMM) instead of
                             relying on an SMM that never runs.
    EXT_TSEG_MBYTES 0x50 16  QEMU's extended-TSEG query: OVMF writes 0xFFFF and takes a
                             value read back as "0xFFFF" to mean "no extended TSEG".
                             Plain storage, so that is what it reads.

D_LCK locks SMRAM's other bits (and itself) until reset, as on hardware.
"""

from __future__ import annotations

import enum

from ... import platform
from ...bus import BusConflict
from ...log import get_logger
from .config_space import ConfigSpace
from .device import PciDevice
from .regs import ClassCode, VendorId

log = get_logger(__name__)

Q35_MCH = 0x29C0  # 8086:29C0, the 82G33/Q35 DRAM controller


class Reg(enum.IntEnum):
    """The MCH's own configuration registers (offsets)."""

    EXT_TSEG_MBYTES = 0x50  # 16 bits
    PCIEXBAR = 0x60  # 64 bits
    PAM0 = 0x90  # PAM0..PAM6: 0x90..0x96
    SMRAM = 0x9D
    ESMRAMC = 0x9E


PAM_COUNT = 7


class PciExBar(enum.IntFlag):
    PCIEXBAREN = 1 << 0
    LENGTH = 0b11 << 1


PCIEXBAR_LENGTH_SHIFT = 1
# LENGTH field -> MiB of ECAM (= buses); 3 is reserved (decodes nothing here).
PCIEXBAR_LENGTHS = {0: 256, 1: 128, 2: 64}
PCIEXBAR_ADDRESS_MASK = 0x7F_FC00_0000  # bits 38:26 (which of 28:26 count depends on LENGTH)
PCIEXBAR_RESET = platform.PCI_ECAM_START  # QEMU's default base; disabled (PCIEXBAREN 0)


class Smram(enum.IntFlag):
    C_BASE_SEG = 0b111  # read-only 010b: the compatible SMRAM at 0xA0000
    G_SMRAME = 1 << 3
    D_LCK = 1 << 4
    D_CLS = 1 << 5
    D_OPEN = 1 << 6


SMRAM_RESET = 0b010  # C_BASE_SEG
SMRAM_WRITABLE = Smram.G_SMRAME | Smram.D_LCK | Smram.D_CLS | Smram.D_OPEN


class Esmramc(enum.IntFlag):
    T_EN = 1 << 0
    TSEG_SZ = 0b11 << 1
    SM_L2 = 1 << 3  # read-only: 1 with SMRAM, 0 here (no SMM)
    SM_L1 = 1 << 4  # read-only, as SM_L2
    SM_CACHE = 1 << 5  # read-only, as SM_L2
    E_SMERR = 1 << 6  # write 1 to clear
    H_SMRAME = 1 << 7


ESMRAMC_RESET = 0  # no SM_CACHE/SM_L1/SM_L2: no SMRAM (see the module docstring)
ESMRAMC_WRITABLE = Esmramc.T_EN | Esmramc.TSEG_SZ | Esmramc.H_SMRAME
PAM0_WRITABLE = 0x30  # PAM0 has only the high nibble (0xF0000-0xFFFFF)
PAM_WRITABLE = 0x33


def pciexbar_window(value: int) -> tuple[int, int] | None:
    """(base, size) of the ECAM window a PCIEXBAR value decodes, or None."""
    if not value & PciExBar.PCIEXBAREN:
        return None
    mib = PCIEXBAR_LENGTHS.get((value & PciExBar.LENGTH) >> PCIEXBAR_LENGTH_SHIFT)
    if mib is None:
        return None
    size = mib << 20
    return value & PCIEXBAR_ADDRESS_MASK & ~(size - 1), size


class Q35Mch(PciDevice):
    """The MCH function. `ecam` is the config-space window (root.Ecam) it places."""

    def __init__(self, ecam, *, firmware_set_up: bool = True):
        """`firmware_set_up`: start with PCIEXBAR enabled at platform.PCI_ECAM_START (what
        firmware leaves for the OS: a direct kernel boot); otherwise the reset value."""
        config = ConfigSpace(vendor_id=VendorId.INTEL, device_id=Q35_MCH, class_code=ClassCode.HOST_BRIDGE)
        super().__init__(config, "host-bridge")
        self.ecam = ecam
        self.ecam_window: tuple[int, int] | None = None  # (base, size) decoded now
        self.ecam_conflicts = 0
        config._mask(Reg.EXT_TSEG_MBYTES, 2, 0xFFFF)
        config._mask(Reg.PCIEXBAR, 8, PCIEXBAR_ADDRESS_MASK | PciExBar.LENGTH | PciExBar.PCIEXBAREN)
        config._mask(Reg.PAM0, 1, PAM0_WRITABLE)
        config._mask(Reg.PAM0 + 1, PAM_COUNT - 1, int.from_bytes(bytes([PAM_WRITABLE]) * (PAM_COUNT - 1), "little"))
        config._set(Reg.SMRAM, 1, SMRAM_RESET)
        config._mask(Reg.SMRAM, 1, SMRAM_WRITABLE)
        config._set(Reg.ESMRAMC, 1, ESMRAMC_RESET)
        config._mask(Reg.ESMRAMC, 1, ESMRAMC_WRITABLE, w1c=Esmramc.E_SMERR)
        config._set(Reg.PCIEXBAR, 8, PCIEXBAR_RESET | (PciExBar.PCIEXBAREN if firmware_set_up else 0))

    @property
    def pciexbar(self) -> int:
        return self.config.get(Reg.PCIEXBAR, 8)

    def pam(self) -> bytes:
        return bytes(self.config.data[Reg.PAM0 : Reg.PAM0 + PAM_COUNT])

    def config_written(self, offset: int, size: int) -> None:
        if offset < Reg.PCIEXBAR + 8 and offset + size > Reg.PCIEXBAR:
            self.update_mappings()
        if offset <= Reg.SMRAM < offset + size and self.config.get(Reg.SMRAM, 1) & Smram.D_LCK:
            # D_LCK: SMRAM (and D_LCK itself) are read-only until reset; D_OPEN reads 0.
            self.config.wmask[Reg.SMRAM] = 0
            self.config.data[Reg.SMRAM] &= ~Smram.D_OPEN & 0xFF

    def update_mappings(self) -> None:
        """Place the ECAM window where PCIEXBAR says (after a write, a restore, attach);
        a restored D_LCK locks SMRAM again (the write mask is not part of the state)."""
        super().update_mappings()
        if self.config.get(Reg.SMRAM, 1) & Smram.D_LCK:
            self.config.wmask[Reg.SMRAM] = 0
        if self.buses is None:
            return
        want = pciexbar_window(self.pciexbar)
        if want == self.ecam_window:
            return
        mmio = self.buses.mmio
        if self.ecam_window is not None:
            mmio.unregister(self.ecam_window[0])
            self.ecam_window = None
        if want is None:
            return
        try:
            mmio.register(want[0], want[1], self.ecam, "pci-ecam")
        except BusConflict as e:  # over RAM's MMIO neighbours or a BAR: the first one answers
            self.ecam_conflicts += 1
            log.guest(f"host bridge: PCIEXBAR {self.pciexbar:#x}: ECAM not decoded: {e}")
            return
        self.ecam_window = want
        if want != (platform.PCI_ECAM_START, platform.PCI_ECAM_SIZE):  # the tables were built for that one
            log.guest(f"host bridge: ECAM at {want[0]:#x} ({want[1] >> 20} buses), the ACPI MCFG says "
                      f"{platform.PCI_ECAM_START:#x} ({platform.PCI_ECAM_BUSES} buses)")

    def detach(self) -> None:
        if self.buses is not None and self.ecam_window is not None:
            self.buses.mmio.unregister(self.ecam_window[0])
            self.ecam_window = None
        super().detach()
