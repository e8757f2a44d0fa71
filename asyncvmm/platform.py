"""The PC this VMM builds: where each part of the machine sits, in one table.

Guest physical addresses (x86-64):

    0x0000_0000 ..  RAM_LOW_END      RAM, at most up to 0xB000_0000 (the first MiB holds the
                                     boot structures, boot/layout.py; 0x9FC00-0x100000 is
                                     reserved)
      0x000E_0000 .. 0x0010_0000     ACPI tables (RSDP first), in the reserved BIOS area
    0xB000_0000 .. 0xC000_0000       PCI ECAM: config space of buses 0..255 (MCFG), where the
                                     Q35 MCH's PCIEXBAR puts it (devices/pci/q35.py): QEMU's
                                     q35 layout, the value SeaBIOS and OVMF program
    0xC000_0000 .. 0xFEC0_0000       PCI 32-bit memory window (32-bit BARs)
    0xFEC0_0000                      IOAPIC (in-kernel)
    0xFED0_0000 .. 0xFED0_1000       platform MMIO page (unused: ACPI has the PM1 port block)
    0xFEE0_0000                      LAPIC (in-kernel)
    0xFEFF_C000 .. 0xFF00_0000       KVM's own pages on Intel (identity map, TSS)
    4 GiB - ROM .. 0x1_0000_0000     a firmware image (-l bootrom), read-only; an OVMF
                                     variables file below it (boot/bootrom.py)
    0x1_0000_0000 ..                 the RAM above 0xB000_0000 (2.75 GiB), if any
    pci_mmio64_window(...)           PCI 64-bit memory window (64-bit BARs), above RAM

I/O ports and ISA interrupt lines of the legacy devices are here too, so the ACPI tables,
the PCI root and the device models cannot disagree about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .vstate.memory import MMIO_HOLE_END, MMIO_HOLE_START, GiB

# -- memory ---------------------------------------------------------------------------
ACPI_TABLES_START = 0x000E_0000
ACPI_TABLES_END = 0x0010_0000

PCI_ECAM_START = MMIO_HOLE_START  # the Q35 MCH's PCIEXBAR base (as firmware programs it)
PCI_ECAM_BUSES = 256
PCI_ECAM_SIZE = PCI_ECAM_BUSES << 20  # 1 MiB per bus: 32 devices x 8 functions x 4 KiB

IOAPIC_START = 0xFEC0_0000
PCI_MMIO32_START = PCI_ECAM_START + PCI_ECAM_SIZE  # right above ECAM, as SeaBIOS's mch_mem_addr_setup
PCI_MMIO32_SIZE = IOAPIC_START - PCI_MMIO32_START  # up to the IOAPIC: 0x3EC0_0000

IOAPIC_SIZE = 0x1000
PLATFORM_MMIO_START = 0xFED0_0000
PLATFORM_MMIO_SIZE = 0x1000
LAPIC_START = 0xFEE0_0000
LAPIC_SIZE = 0x10_0000

# The 64-bit window starts at the first 1 GiB boundary above RAM and is this large.
PCI_MMIO64_ALIGN = GiB
PCI_MMIO64_SIZE = 64 * GiB

assert ACPI_TABLES_START % 16 == 0  # the RSDP is found on a 16-byte boundary
assert MMIO_HOLE_START <= PCI_ECAM_START and PCI_ECAM_START + PCI_ECAM_SIZE <= PCI_MMIO32_START
assert PCI_MMIO32_START + PCI_MMIO32_SIZE <= IOAPIC_START < MMIO_HOLE_END


def ram_top(regions) -> int:
    """The end of the highest guest RAM region (GuestMemory.regions)."""
    return max(r.gpa + r.size for r in regions)


def pci_mmio64_window(top_of_ram: int) -> tuple[int, int]:
    """(start, size) of the 64-bit PCI window for a guest whose RAM ends at `top_of_ram`."""
    start = max(MMIO_HOLE_END, -(-top_of_ram // PCI_MMIO64_ALIGN) * PCI_MMIO64_ALIGN)
    return start, PCI_MMIO64_SIZE


# -- I/O ports ------------------------------------------------------------------------
PIT_PORT = 0x40  # i8254, 4 ports
SPEAKER_PORT = 0x61  # NMI status / speaker control: PIT channel 2's gate and output
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
RTC_PORT = 0x70  # index, data
POST_PORT = 0x80
COM1_PORT = 0x3F8  # COM_PORTS[0]; the others are in COM_PORTS below
ACPI_PM_PORT = 0x600  # the ACPI PM register block (devices/legacy/acpi_pm.py): the ICH9
ACPI_PM_SIZE = 0x80  # LPC's PMBASE (as SeaBIOS and OVMF program it), 128 ports
ACPI_PM1_EVT_PORT = ACPI_PM_PORT  # PM1a_EVT_BLK: PM1_STS (2 ports), then PM1_EN (2 ports)
ACPI_PM1_EVT_LEN = 4
ACPI_PM1_CNT_PORT = ACPI_PM_PORT + 4  # PM1a_CNT_BLK: PM1_CNT (2 ports)
ACPI_PM1_CNT_LEN = 2
ACPI_PM_TMR_PORT = ACPI_PM_PORT + 8  # PM_TMR_BLK: the ACPI PM timer (4 ports)
ACPI_PM_TMR_LEN = 4
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # 0xCF8 address, 0xCFC..0xCFF data
PCI_CONFIG_PORTS = 8
RESET_CONTROL_PORT = 0xCF9  # also the FADT's RESET_REG (value 0x06), as on QEMU's q35
# The PCI I/O window: everything above the legacy devices' ports but 0xCF8-0xCFF.
PCI_IO_START = 0x1000
PCI_IO_END = 0x10000

# -- interrupts -----------------------------------------------------------------------
PIT_IRQ = 0
I8042_KBD_IRQ = 1
COM1_IRQ = 4
COM2_IRQ = 3
RTC_IRQ = 8
ACPI_SCI_IRQ = 9
IOAPIC_PINS = 24  # GSIs 0..23 are the IOAPIC's pins (0..15 also the PICs')
FIRST_MSI_GSI = IOAPIC_PINS  # GSIs from here on are MSI routes (asyncvmm.irq)
PCI_INTX_FIRST_GSI = 16  # INTx of PCI slots go to IOAPIC pins 16..23 (level, active low)
PCI_INTX_GSIS = 8


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTx `pin` (0 = INTA .. 3 = INTD) of a device in `slot` of bus 0: the
    usual swizzle over pins 16..23, as the DSDT's _PRT tells the guest."""
    return PCI_INTX_FIRST_GSI + (slot + pin) % PCI_INTX_GSIS


# -- the COM ports (16550A UARTs, `-l comN,...`) --------------------------------------
@dataclass(frozen=True)
class ComPort:
    """Where a PC's COM port sits: its 8 ports and its ISA interrupt line. COM3 and COM4
    share COM1's and COM2's lines, as on every PC (the lines are edge-triggered ISA IRQs:
    one wire, whoever drives it)."""

    name: str  # as `-l` spells it: com1..com4
    port: int  # base I/O port of the 8 registers
    irq: int  # ISA IRQ (= GSI: the IOAPIC's and the PIC's pin)
    uid: int  # the DSDT's _UID (1..4)


COM_PORT_SIZE = 8
COM_PORTS = (
    ComPort("com1", COM1_PORT, COM1_IRQ, 1),
    ComPort("com2", 0x2F8, COM2_IRQ, 2),
    ComPort("com3", 0x3E8, COM1_IRQ, 3),
    ComPort("com4", 0x2E8, COM2_IRQ, 4),
)
COM_PORT_BY_NAME = {c.name: c for c in COM_PORTS}
