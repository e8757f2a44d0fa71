"""The machine's ACPI tables, generated at start-up (ACPI 6.5, chapter 5; MCFG from the
PCI Firmware Specification 3.3).

    RSDP -> XSDT -> FADT -> FACS
                         -> DSDT   the PCI root (PNP0A08), COM1, the motherboard's
                                   reserved ranges, the vCPUs, \\_S5
                 -> MADT   the LAPICs (one per vCPU), the IOAPIC, interrupt overrides
                 -> MCFG   ECAM for buses 0-255

Everything the tables say comes from asyncvmm.platform (addresses, ports, IRQ lines)
and from the device models that implement it (the PM registers' layout, RESET_VALUE,
the S5 sleep type, the RTC's century register), so the tables and the machine cannot
disagree. The FADT describes the fixed-hardware PM1 block of
asyncvmm.devices.legacy.acpi_pm (whose docstring says why not hardware-reduced ACPI).

    tables = build(apic_ids=[0, 1], ram_top=256 << 20)
    tables.write(mem)            # into guest RAM at platform.ACPI_TABLES_START
    tables.rsdp                  # its guest physical address, for the boot loaders
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import platform as p
from ..devices.legacy import acpi_pm
from ..devices.legacy.rtc import Reg as RtcReg
from . import aml

OEM_ID = b"ASYNCV"  # 6 bytes
OEM_TABLE_ID = b"ASYNCVMM"  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"AVMM"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # the System Description Table header, 36 bytes

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address and the extended checksum
RSDP_V1_LENGTH = 20  # what the first checksum covers
RSDP = struct.Struct("<8sB6sBIIQB3x")  # 36 bytes

FADT_REVISION, FADT_MINOR_REVISION = 6, 5  # ACPI 6.5: 276 bytes
MADT_REVISION = 5
DSDT_REVISION = 2  # 2+: AML integers are 64 bits wide (the 64-bit PCI window needs it)
MCFG_REVISION = 1
XSDT_REVISION = 1
FACS_VERSION = 2
FACS_LENGTH = 64
FACS_ALIGN = 64  # the FACS must be 64-byte aligned
TABLE_ALIGN = 16

MAX_XAPIC_ID = 254  # 255 is the xAPIC broadcast ID; IDs above need x2APIC MADT entries


class Gas(enum.IntEnum):
    """Generic Address Structure address space IDs (ACPI 6.5 table 5.1)."""

    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(enum.IntEnum):
    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3


GAS = struct.Struct("<BBBBQ")


def gas(space: Gas, bit_width: int, address: int, access: AccessSize) -> bytes:
    return GAS.pack(space, bit_width, 0, access, address)


NO_GAS = bytes(GAS.size)


class FadtFlags(enum.IntFlag):
    """FADT Flags (ACPI 6.5 table 5.10), the ones this machine sets."""

    WBINVD = 1 << 0  # WBINVD flushes and invalidates caches (it is emulated correctly)
    PROC_C1 = 1 << 2  # C1 (HLT) works on every CPU
    PWR_BUTTON = 1 << 4  # set: the power button is a control method device; clear: fixed
    SLP_BUTTON = 1 << 5  # set: no fixed sleep button (and no control method one either)
    FIX_RTC = 1 << 6  # the RTC's wake status is not in the fixed register space
    TMR_VAL_EXT = 1 << 8  # the PM timer counts 32 bits, not 24
    RESET_REG_SUP = 1 << 10  # RESET_REG is the way to reset the machine
    HW_REDUCED_ACPI = 1 << 20  # (not set: the PM1 block is there)


class BootArch(enum.IntFlag):
    """FADT IA-PC Boot Architecture Flags (ACPI 6.5 table 5.11)."""

    LEGACY_DEVICES = 1 << 0  # ISA-style devices the OS cannot enumerate are there (COM1, RTC)
    I8042 = 1 << 1  # (not set: the i8042 has only its reset line, no keyboard to probe)
    VGA_NOT_PRESENT = 1 << 2  # do not probe for VGA
    MSI_NOT_SUPPORTED = 1 << 3  # (not set: MSI works)
    PCIE_ASPM_CONTROLS = 1 << 4  # the OS must not touch ASPM (no PCIe links to save power on)


class PmProfile(enum.IntEnum):
    UNSPECIFIED = 0


# Latencies that mean "C2/C3 not supported" (ACPI 6.5, FADT P_LVL2_LAT/P_LVL3_LAT).
P_LVL2_NOT_SUPPORTED = 101
P_LVL3_NOT_SUPPORTED = 1001


class MadtFlags(enum.IntFlag):
    PCAT_COMPAT = 1 << 0  # dual 8259s are present too (KVM's in-kernel PIC)


class MadtEntry(enum.IntEnum):
    LOCAL_APIC = 0
    IO_APIC = 1
    INTERRUPT_OVERRIDE = 2
    LOCAL_APIC_NMI = 4


class MpsInti(enum.IntFlag):
    """MPS INTI flags of interrupt overrides and NMI entries."""

    POLARITY_ACTIVE_HIGH = 0b01
    POLARITY_ACTIVE_LOW = 0b11
    TRIGGER_EDGE = 0b01 << 2
    TRIGGER_LEVEL = 0b11 << 2


LAPIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF  # Local APIC NMI: the entry applies to every processor
LINT1 = 1  # the LAPIC input wired to NMI on a PC

# ISA IRQ -> (GSI, flags) where it differs from the ISA default (edge, active high, GSI = IRQ).
# KVM's in-kernel PIT raises GSI 0, which KVM's default routing takes to IOAPIC pin 0
# (not pin 2 as on a PC's chipset): say so, or an OS would look for the timer on pin 2.
INTERRUPT_OVERRIDES: tuple[tuple[int, int, int], ...] = (
    (p.PIT_IRQ, 0, 0),  # conforming polarity and trigger: the ISA defaults
    (p.ACPI_SCI_IRQ, p.ACPI_SCI_IRQ, MpsInti.POLARITY_ACTIVE_HIGH | MpsInti.TRIGGER_LEVEL),
)

PCI_SLOTS = 32
PCI_PINS = 4  # INTA..INTD
PRT_ALL_FUNCTIONS = 0xFFFF  # _PRT Address: the low word is the function, FFFF is "any"


@dataclass
class Tables:
    """The tables laid out at `base`: what to write where, and the RSDP's address."""

    base: int
    image: bytes  # everything from `base` on, as it goes into guest RAM
    addresses: dict[str, int] = field(default_factory=dict)  # signature -> guest physical address

    @property
    def rsdp(self) -> int:
        return self.addresses["RSD PTR "]

    def table(self, signature: str) -> bytes:
        """One table's bytes (its length from its header, or 36 for the RSDP)."""
        off = self.addresses[signature] - self.base
        if signature == "RSD PTR ":
            return self.image[off : off + RSDP.size]
        (length,) = struct.unpack_from("<I", self.image, off + 4)
        return self.image[off : off + length]

    def write(self, mem) -> None:
        mem.write(self.base, self.image)


def checksum(data: bytes) -> int:
    """The byte that makes `data` sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (length, checksum) and `body`."""
    length = HEADER.size + len(body)
    header = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


# -- the tables ---------------------------------------------------------------------------
def rsdp(xsdt_address: int) -> bytes:
    raw = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_address, 0))
    raw[8] = checksum(bytes(raw[:RSDP_V1_LENGTH]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def xsdt(entries: Sequence[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries))


def facs() -> bytes:
    # signature, length, hardware signature, waking vector, global lock, flags,
    # X waking vector, version, reserved, OSPM flags, reserved (ACPI 6.5 table 5.14).
    raw = struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, FACS_VERSION, 0)
    assert len(raw) == FACS_LENGTH
    return raw


def fadt(facs_address: int, dsdt_address: int) -> bytes:
    """The FADT: the PM1a event and control blocks, the PM timer, the SCI, the reset
    register (the chipset's 0xCF9, as on QEMU's q35)."""
    pm1_evt = gas(Gas.SYSTEM_IO, 8 * p.ACPI_PM1_EVT_LEN, p.ACPI_PM1_EVT_PORT, AccessSize.WORD)
    pm1_cnt = gas(Gas.SYSTEM_IO, 8 * p.ACPI_PM1_CNT_LEN, p.ACPI_PM1_CNT_PORT, AccessSize.WORD)
    pm_tmr = gas(Gas.SYSTEM_IO, 8 * p.ACPI_PM_TMR_LEN, p.ACPI_PM_TMR_PORT, AccessSize.DWORD)
    reset_reg = gas(Gas.SYSTEM_IO, 8, p.RESET_CONTROL_PORT, AccessSize.BYTE)
    flags = (FadtFlags.WBINVD | FadtFlags.PROC_C1 | FadtFlags.SLP_BUTTON | FadtFlags.FIX_RTC | FadtFlags.RESET_REG_SUP
             | FadtFlags.TMR_VAL_EXT)
    boot_arch = BootArch.LEGACY_DEVICES | BootArch.VGA_NOT_PRESENT | BootArch.PCIE_ASPM_CONTROLS
    fields: list[tuple[Any, ...]] = [  # (struct format, values...); format "": one ready-made bytes
        ("<I", facs_address),  # FIRMWARE_CTRL
        ("<I", dsdt_address),  # DSDT
        ("<B", 0),  # reserved
        ("<B", PmProfile.UNSPECIFIED),
        ("<H", p.ACPI_SCI_IRQ),  # SCI_INT
        ("<I", 0),  # SMI_CMD: 0 = no SMM, the machine is always in ACPI mode (SCI_EN is 1)
        ("<BBBB", 0, 0, 0, 0),  # ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        ("<I", p.ACPI_PM1_EVT_PORT),  # PM1a_EVT_BLK
        ("<I", 0),  # PM1b_EVT_BLK
        ("<I", p.ACPI_PM1_CNT_PORT),  # PM1a_CNT_BLK
        ("<I", 0),  # PM1b_CNT_BLK
        ("<I", 0),  # PM2_CNT_BLK
        ("<I", p.ACPI_PM_TMR_PORT),  # PM_TMR_BLK
        ("<I", 0),  # GPE0_BLK: no general-purpose events
        ("<I", 0),  # GPE1_BLK
        ("<BBBB", p.ACPI_PM1_EVT_LEN, p.ACPI_PM1_CNT_LEN, 0, p.ACPI_PM_TMR_LEN),  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR
        ("<BBBB", 0, 0, 0, 0),  # GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE, CST_CNT
        ("<HH", P_LVL2_NOT_SUPPORTED, P_LVL3_NOT_SUPPORTED),
        ("<HH", 0, 0),  # FLUSH_SIZE, FLUSH_STRIDE
        ("<BB", 0, 0),  # DUTY_OFFSET, DUTY_WIDTH
        ("<BBB", 0, 0, RtcReg.CENTURY),  # DAY_ALRM, MON_ALRM (none), CENTURY
        ("<H", boot_arch),  # IAPC_BOOT_ARCH
        ("<B", 0),  # reserved
        ("<I", flags),
        ("", reset_reg),  # RESET_REG
        ("<B", acpi_pm.RESET_VALUE),  # RST_CPU | SYS_RST at 0xCF9: a hard reset
        ("<H", 0),  # ARM_BOOT_ARCH
        ("<B", FADT_MINOR_REVISION),
        ("<Q", 0),  # X_FIRMWARE_CTRL: must be 0 when FIRMWARE_CTRL is set (the FACS is below 4 GiB)
        ("<Q", dsdt_address),  # X_DSDT
        ("", pm1_evt),  # X_PM1a_EVT_BLK
        ("", NO_GAS),  # X_PM1b_EVT_BLK
        ("", pm1_cnt),  # X_PM1a_CNT_BLK
        ("", NO_GAS),  # X_PM1b_CNT_BLK
        ("", NO_GAS),  # X_PM2_CNT_BLK
        ("", pm_tmr),  # X_PM_TMR_BLK
        ("", NO_GAS),  # X_GPE0_BLK
        ("", NO_GAS),  # X_GPE1_BLK
        ("", NO_GAS),  # SLEEP_CONTROL_REG (hardware-reduced only)
        ("", NO_GAS),  # SLEEP_STATUS_REG
        ("<8s", b"ASYNCVMM"),  # Hypervisor Vendor Identity
    ]
    body = b"".join(v[0] if fmt == "" else struct.pack(fmt, *v) for fmt, *v in fields)
    table = sdt(b"FACP", FADT_REVISION, body)
    assert len(table) == 276
    return table


def madt(apic_ids: Sequence[int]) -> bytes:
    """The MADT: one enabled LAPIC per vCPU (its ACPI processor UID is the vCPU's index,
    as the DSDT's processor devices say), the IOAPIC, the overrides, LINT1 as NMI."""
    body = bytearray(struct.pack("<II", p.LAPIC_START, MadtFlags.PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        if not 0 <= apic_id <= MAX_XAPIC_ID or uid > 0xFF:
            raise ValueError(f"vCPU {uid} has APIC ID {apic_id}: the MADT lists xAPIC IDs 0-{MAX_XAPIC_ID}")
        body += struct.pack("<BBBBI", MadtEntry.LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
    ioapic_id = 0  # KVM's in-kernel IOAPIC resets with ID 0
    body += struct.pack("<BBBBII", MadtEntry.IO_APIC, 12, ioapic_id, 0, p.IOAPIC_START, 0)  # GSI base 0
    for irq, gsi, flags in INTERRUPT_OVERRIDES:
        body += struct.pack("<BBBBIH", MadtEntry.INTERRUPT_OVERRIDE, 10, 0, irq, gsi, flags)  # bus 0 = ISA
    body += struct.pack("<BBBHB", MadtEntry.LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, LINT1)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def mcfg() -> bytes:
    """MCFG: one ECAM region, segment 0, buses 0 .. PCI_ECAM_BUSES-1."""
    body = bytes(8) + struct.pack("<QHBB4x", p.PCI_ECAM_START, 0, 0, p.PCI_ECAM_BUSES - 1)
    return sdt(b"MCFG", MCFG_REVISION, body)


def processor_name(uid: int) -> str:
    return f"C{uid:03X}"


def dsdt(ncpus: int, ram_top: int, serial_ports: Sequence[p.ComPort] = p.COM_PORTS[:1]) -> bytes:
    """The DSDT: the PCI root with its windows and _PRT, the COM ports (COM1 by default),
    the motherboard's reserved ranges (ECAM, the PM ports), one processor device per vCPU,
    and \\_S5."""
    mmio64_start, mmio64_size = p.pci_mmio64_window(ram_top)
    crs = aml.resource_template(
        aml.word_bus_number(0, p.PCI_ECAM_BUSES - 1),
        aml.word_io(0x0000, p.PCI_CONFIG_ADDRESS_PORT - 1),  # the legacy ports, up to 0xCF7
        aml.word_io(p.PCI_IO_START, p.PCI_IO_END - 1),
        aml.dword_memory(p.PCI_MMIO32_START, p.PCI_MMIO32_START + p.PCI_MMIO32_SIZE - 1),
        aml.qword_memory(mmio64_start, mmio64_start + mmio64_size - 1, cacheable=True),
    )
    prt = aml.package(
        *(
            aml.package(slot << 16 | PRT_ALL_FUNCTIONS, pin, 0, p.pci_intx_gsi(slot, pin))  # Source 0: a GSI
            for slot in range(PCI_SLOTS)
            for pin in range(PCI_PINS)
        )
    )
    pci0 = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),  # PCI Express root bridge (so ECAM is used)
        aml.name("_CID", aml.eisa_id("PNP0A03")),  # PCI root bridge
        aml.name("_UID", 0),
        aml.name("_SEG", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", crs),
        aml.name("_PRT", prt),
    )
    # The COM ports configured, each with its ports and ISA IRQ (edge, active high). COM3
    # and COM4 name COM1's and COM2's IRQ, as a PC's firmware does: one driver (Linux's
    # 8250) serves all the ports of one line from one handler.
    coms = [
        aml.device(
            c.name.upper(),
            aml.name("_HID", aml.eisa_id("PNP0501")),  # 16550A-compatible UART
            aml.name("_UID", c.uid),
            aml.name("_CRS", aml.resource_template(aml.io(c.port, c.port, 1, p.COM_PORT_SIZE), aml.irq_no_flags(c.irq))),
        )
        for c in serial_ports
    ]
    # Ranges the OS must not hand to PCI devices: ECAM (Linux uses MMCONFIG only when it
    # is reserved here) and the PM register block.
    mres = aml.device(
        "MRES",
        aml.name("_HID", aml.eisa_id("PNP0C02")),  # motherboard resources
        aml.name("_UID", 0),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.memory32_fixed(p.PCI_ECAM_START, p.PCI_ECAM_SIZE),
                aml.io(p.ACPI_PM_PORT, p.ACPI_PM_PORT, 1, p.ACPI_PM_SIZE),
            ),
        ),
    )
    cpus = [
        aml.device(processor_name(uid), aml.name("_HID", "ACPI0007"), aml.name("_UID", uid)) for uid in range(ncpus)
    ]
    s5 = acpi_pm.SleepType.S5
    body = aml.scope("\\_SB", pci0, *coms, mres, *cpus) + aml.name("\\_S5", aml.package(s5, s5, 0, 0))
    return sdt(b"DSDT", DSDT_REVISION, body)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def build(apic_ids: Sequence[int], ram_top: int, base: int = p.ACPI_TABLES_START,
          serial_ports: Sequence[p.ComPort] = p.COM_PORTS[:1]) -> Tables:
    """Lay every table out from `base` (RSDP first) for vCPUs with these APIC IDs, a
    guest whose RAM ends at `ram_top`, and these COM ports."""
    if not apic_ids:
        raise ValueError("a machine has at least one vCPU")
    image = bytearray()
    addresses: dict[str, int] = {}

    def place(signature: str, data: bytes, alignment: int = TABLE_ALIGN) -> int:
        image.extend(bytes(_align(len(image), alignment) - len(image)))
        addresses[signature] = base + len(image)
        image.extend(data)
        return addresses[signature]

    # The RSDP and XSDT point forward: their sizes are fixed, so reserve them first.
    xsdt_entries = 3
    rsdp_at = base
    xsdt_at = _align(rsdp_at + RSDP.size, TABLE_ALIGN)
    image.extend(bytes(xsdt_at + HEADER.size + 8 * xsdt_entries - base))
    facs_at = place("FACS", facs(), FACS_ALIGN)
    dsdt_at = place("DSDT", dsdt(len(apic_ids), ram_top, serial_ports))
    fadt_at = place("FACP", fadt(facs_at, dsdt_at))
    madt_at = place("APIC", madt(apic_ids))
    mcfg_at = place("MCFG", mcfg())
    image[xsdt_at - base : xsdt_at - base + HEADER.size + 8 * xsdt_entries] = xsdt([fadt_at, madt_at, mcfg_at])
    image[0 : RSDP.size] = rsdp(xsdt_at)
    addresses["RSD PTR "] = rsdp_at
    addresses["XSDT"] = xsdt_at
    if base + len(image) > p.ACPI_TABLES_END:
        raise ValueError(f"the ACPI tables take {len(image)} bytes, more than fit at {base:#x}-{p.ACPI_TABLES_END:#x}")
    return Tables(base, bytes(image), addresses)
