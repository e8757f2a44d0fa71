"""The Q35 chipset's registers (devices/pci/q35.py, devices/pci/lpc.py) through the PCI root,
as SeaBIOS's pciinit.c and OVMF's PlatformPei program them."""

from __future__ import annotations

import pytest

from asyncvmm import platform
from asyncvmm.bus import Bus, Sink
from asyncvmm.devices.pci.device import PciBuses
from asyncvmm.devices.pci.lpc import ICH9_LPC, AcpiCntl, LpcBridge
from asyncvmm.devices.pci.lpc import Reg as LpcReg
from asyncvmm.devices.pci.q35 import Q35_MCH, Esmramc, Smram, pciexbar_window
from asyncvmm.devices.pci.q35 import Reg as MchReg
from asyncvmm.devices.pci.root import PciRoot

ECAM = platform.PCI_ECAM_START


def make_root(firmware_set_up: bool) -> PciRoot:
    return PciRoot(PciBuses(Bus("mmio"), Bus("pio")), firmware_set_up=firmware_set_up)


def ecam_read(root: PciRoot, base: int, slot: int = 0, offset: int = 0, bus: int = 0) -> int:
    return root.buses.mmio.access(base + (bus << 20 | slot << 15) + offset, 4, False)


def test_the_host_bridge_is_the_q35_mch_and_ecam_starts_as_firmware_leaves_it():
    root = make_root(True)
    mch = root.host_bridge
    assert mch.config_read(0, 4) == Q35_MCH << 16 | 0x8086
    assert mch.pciexbar == ECAM | 1  # PCIEXBAREN, 256 MiB: what the MCFG says
    assert ecam_read(root, ECAM) == Q35_MCH << 16 | 0x8086


def test_pciexbar_moves_the_ecam_window():
    root = make_root(False)  # a firmware boot: the reset value, ECAM not decoded
    mch = root.host_bridge
    assert mch.pciexbar == ECAM and ecam_read(root, ECAM) == 0xFFFF_FFFF
    # SeaBIOS's mch_mmconfig_setup: 0 to the low dword, the high one, then base | enable
    mch.config_write(MchReg.PCIEXBAR, 4, 0)
    mch.config_write(MchReg.PCIEXBAR + 4, 4, 0)
    mch.config_write(MchReg.PCIEXBAR, 4, ECAM | 1)
    assert mch.ecam_window == (ECAM, 256 << 20) and ecam_read(root, ECAM) == Q35_MCH << 16 | 0x8086
    # 128 MiB at 0xE0000000: buses 0-127 there, nothing at the old base
    mch.config_write(MchReg.PCIEXBAR, 4, 0xE000_0000 | 1 << 1 | 1)
    assert ecam_read(root, 0xE000_0000) == Q35_MCH << 16 | 0x8086
    assert ecam_read(root, ECAM) == 0xFFFF_FFFF
    assert ecam_read(root, 0xE000_0000, bus=128) == 0xFFFF_FFFF
    # 64 MiB: the base's bits 27:26 count; LENGTH 3 is reserved: nothing decoded
    assert pciexbar_window(0x8C00_0000 | 2 << 1 | 1) == (0x8C00_0000, 64 << 20)
    assert pciexbar_window(0x8C00_0000 | 1) == (0x8000_0000, 256 << 20)  # bits below 256 MiB ignored
    mch.config_write(MchReg.PCIEXBAR, 4, 0xE000_0000 | 3 << 1 | 1)
    assert mch.ecam_window is None and ecam_read(root, 0xE000_0000) == 0xFFFF_FFFF
    # above 4 GiB (bits 38:32), then disabled
    mch.config_write(MchReg.PCIEXBAR + 4, 4, 0xFF)
    mch.config_write(MchReg.PCIEXBAR, 4, 1)
    assert mch.pciexbar == 0x7F_0000_0001 and ecam_read(root, 0x7F_0000_0000) == Q35_MCH << 16 | 0x8086
    mch.config_write(MchReg.PCIEXBAR, 4, 0)
    assert mch.ecam_window is None and not root.buses.mmio.find(0x7F_0000_0000)


def test_an_ecam_window_over_another_device_is_not_decoded():
    root = make_root(False)
    root.buses.mmio.register(0xC000_0000, 0x1000, Sink(), "a-bar")
    mch = root.host_bridge
    mch.config_write(MchReg.PCIEXBAR, 4, 0xC000_0000 | 1)
    assert mch.ecam_window is None and mch.ecam_conflicts == 1
    mch.config_write(MchReg.PCIEXBAR, 4, ECAM | 1)  # and it can be placed again
    assert ecam_read(root, ECAM) == Q35_MCH << 16 | 0x8086


def test_pam_smram_esmramc_and_ext_tseg_are_stored_as_the_chipset_masks_them():
    mch = make_root(True).host_bridge
    # SeaBIOS's make_bios_writable: two dwords over PAM0-6
    mch.config_write(MchReg.PAM0, 4, 0x3333_33FF)
    mch.config_write(MchReg.PAM0 + 4, 4, 0xFF33_3333)
    assert mch.pam() == bytes([0x30] + [0x33] * 6)
    assert mch.config_read(MchReg.PAM0 + 4, 4) == 0x0033_3333  # 0x97 is not a PAM register
    mch.config_write(MchReg.PAM0 + 3, 1, 0xFF)
    assert mch.pam()[3] == 0x33
    assert mch.config_read(MchReg.SMRAM, 1) == 0x02  # C_BASE_SEG: 0xA0000
    mch.config_write(MchReg.SMRAM, 1, Smram.D_OPEN | Smram.G_SMRAME | 0x7)
    assert mch.config_read(MchReg.SMRAM, 1) == Smram.D_OPEN | Smram.G_SMRAME | 0x2
    mch.config_write(MchReg.SMRAM, 1, Smram.D_LCK | Smram.D_OPEN | Smram.G_SMRAME)  # locked: D_OPEN drops
    assert mch.config_read(MchReg.SMRAM, 1) == Smram.D_LCK | Smram.G_SMRAME | 0x2
    mch.config_write(MchReg.SMRAM, 1, 0)
    assert mch.config_read(MchReg.SMRAM, 1) == Smram.D_LCK | Smram.G_SMRAME | 0x2  # until reset
    # no SM_CACHE/SM_L1/SM_L2: OVMF's SmmAccessPei reads "this Q35 implementation lacks SMRAM"
    assert mch.config_read(MchReg.ESMRAMC, 1) == 0
    mch.config_write(MchReg.ESMRAMC, 1, 0xFF)
    assert mch.config_read(MchReg.ESMRAMC, 1) == Esmramc.T_EN | Esmramc.TSEG_SZ | Esmramc.H_SMRAME
    # OVMF's extended-TSEG query reads back 0xFFFF: "no extended TSEG"
    mch.config_write(MchReg.EXT_TSEG_MBYTES, 2, 0xFFFF)
    assert mch.config_read(MchReg.EXT_TSEG_MBYTES, 2) == 0xFFFF


def test_a_restored_config_space_puts_ecam_where_it_says():
    root = make_root(False)
    mch = root.host_bridge
    mch.config_write(MchReg.PCIEXBAR, 4, 0xE000_0000 | 1)
    saved = bytes(mch.config.data)
    other = make_root(False)
    other.host_bridge.config.data[:] = saved  # as snapshot/devices.py's restore_pci
    other.host_bridge.update_mappings()
    assert ecam_read(other, 0xE000_0000) == Q35_MCH << 16 | 0x8086


def test_a_restored_smram_lock_still_locks():
    root = make_root(False)
    root.host_bridge.config_write(MchReg.SMRAM, 1, Smram.D_LCK | Smram.G_SMRAME)
    saved = bytes(root.host_bridge.config.data)
    other = make_root(False).host_bridge
    other.config.data[:] = saved  # as snapshot/devices.py's restore_pci: the data, not the masks
    other.update_mappings()
    other.config_write(MchReg.SMRAM, 1, Smram.D_OPEN)
    assert other.config_read(MchReg.SMRAM, 1) == Smram.D_LCK | Smram.G_SMRAME | 0x2


class PmPlacement:
    """LegacyDevices.place_acpi_pm's part: where the PM block is, ports taken by others."""

    def __init__(self, taken: set[int] = frozenset()):  # type: ignore[assignment]
        self.at: int | None = None
        self.calls: list[int | None] = []
        self.taken = taken

    def __call__(self, port: int | None) -> bool:
        self.calls.append(port)
        if port in self.taken:
            return False
        self.at = port
        return True


@pytest.fixture
def lpc() -> LpcBridge:
    root = make_root(False)
    dev = LpcBridge("lpc", firmware_set_up=False)
    root.add(31, 0, dev)
    return dev


def test_lpc_reset_values_and_identity(lpc: LpcBridge):
    assert lpc.config_read(0, 4) == ICH9_LPC << 16 | 0x8086
    assert lpc.config_read(0x08, 4) >> 8 == 0x06_01_00  # ISA bridge
    assert lpc.config_read(LpcReg.PMBASE, 4) == 1  # RTE: I/O space
    assert lpc.config_read(LpcReg.ACPI_CNTL, 1) == 0
    assert lpc.pirq_routes() == bytes([0x80] * 8)  # IRQEN: not routed


def test_pmbase_and_acpi_en_place_the_pm_block(lpc: LpcBridge):
    place = PmPlacement()
    lpc.connect_pm(place)
    assert place.at is None and lpc.pm_port is None  # not decoded until firmware enables it
    lpc.config_write(LpcReg.PMBASE, 4, 0x601)  # SeaBIOS: acpi_pm_base | RTE
    assert place.at is None  # ACPI_EN still clear
    lpc.config_write(LpcReg.ACPI_CNTL, 1, AcpiCntl.ACPI_EN)
    assert place.at == 0x600 == lpc.pm_port
    lpc.config_write(LpcReg.PMBASE, 4, 0xB07F)  # 128-port aligned: bits 6:1 are not writable
    assert lpc.config_read(LpcReg.PMBASE, 4) == 0xB001 and place.at == 0xB000
    lpc.config_write(LpcReg.ACPI_CNTL, 1, 0)
    assert place.at is None and lpc.pm_port is None
    n = len(place.calls)
    lpc.config_write(LpcReg.PIRQA_ROUT, 1, 0x0B)  # other registers do not move it
    assert len(place.calls) == n


def test_a_pm_block_over_taken_ports_is_not_decoded(lpc: LpcBridge):
    place = PmPlacement(taken={0x300})
    lpc.connect_pm(place)
    lpc.config_write(LpcReg.PMBASE, 4, 0x301)
    lpc.config_write(LpcReg.ACPI_CNTL, 1, AcpiCntl.ACPI_EN)
    assert lpc.pm_port is None and lpc.pm_conflicts == 1 and place.at is None
    lpc.config_write(LpcReg.PMBASE, 4, 0x601)
    assert lpc.pm_port == 0x600


def test_a_direct_boot_starts_with_the_pm_block_where_the_fadt_says():
    dev = LpcBridge("lpc", firmware_set_up=True)
    make_root(True).add(31, 0, dev)
    place = PmPlacement()
    dev.connect_pm(place)
    assert place.at == platform.ACPI_PM_PORT
    assert dev.config_read(LpcReg.ACPI_CNTL, 1) == AcpiCntl.ACPI_EN


def test_pirq_gen_pmcon_and_rcba_are_stored(lpc: LpcBridge):
    for i in range(4):  # SeaBIOS's mch_isa_bridge_setup: A-D and E-H to IRQ 10, 10, 11, 11
        lpc.config_write(LpcReg.PIRQA_ROUT + i, 1, (10, 10, 11, 11)[i])
        lpc.config_write(LpcReg.PIRQE_ROUT + i, 1, (10, 10, 11, 11)[i])
    lpc.config_write(LpcReg.PIRQA_ROUT + 3, 1, 0xFF)  # bits 6:4 are reserved
    assert lpc.pirq_routes() == bytes([10, 10, 11, 0x8F, 10, 10, 11, 11])
    lpc.config_write(LpcReg.GEN_PMCON_1, 2, 1 << 4)  # SMI_LOCK
    assert lpc.config_read(LpcReg.GEN_PMCON_1, 2) == 1 << 4
    lpc.config_write(LpcReg.RCBA, 4, 0xFED1_C000 | 1 | 0x3FFE)  # bits 13:1 are reserved
    assert lpc.config_read(LpcReg.RCBA, 4) == 0xFED1_C001


def test_a_snapshot_of_another_host_bridge_is_refused():
    from asyncvmm.errors import ConfigError
    from asyncvmm.snapshot.devices import check_pci, save_pci

    root = make_root(True)
    state = save_pci(root)
    check_pci(root, state)  # the same machine
    old = bytearray(bytes.fromhex(state[0]["config"]))
    old[0:4] = (0x0008_1B36).to_bytes(4, "little")  # an older asyncvmm's generic host bridge
    state[0]["config"] = old.hex()
    with pytest.raises(ConfigError, match=r"the snapshot's PCI 00:00.0 \(host-bridge\) is 1b36:0008, this machine's 8086:29c0"):
        check_pci(root, state)
