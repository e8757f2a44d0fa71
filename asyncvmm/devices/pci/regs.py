"""PCI register names (PCI Local Bus 3.0, ch. 6; PCI Express Base 4.0, ch. 7).

Offsets and bits come from <linux/pci_regs.h> through cffi; only the class codes, which
that header does not carry, are spelled here (PCI Code and ID Assignment spec).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from ..._native import lib


class Reg(IntEnum):
    """Type 0 configuration header offsets."""

    VENDOR_ID = lib.PCI_VENDOR_ID
    DEVICE_ID = lib.PCI_DEVICE_ID
    COMMAND = lib.PCI_COMMAND
    STATUS = lib.PCI_STATUS
    REVISION_ID = lib.PCI_REVISION_ID
    CLASS_PROG = lib.PCI_CLASS_PROG
    CLASS_DEVICE = lib.PCI_CLASS_DEVICE
    CACHE_LINE_SIZE = lib.PCI_CACHE_LINE_SIZE
    LATENCY_TIMER = lib.PCI_LATENCY_TIMER
    HEADER_TYPE = lib.PCI_HEADER_TYPE
    BIST = lib.PCI_BIST
    BASE_ADDRESS_0 = lib.PCI_BASE_ADDRESS_0
    SUBSYSTEM_VENDOR_ID = lib.PCI_SUBSYSTEM_VENDOR_ID
    SUBSYSTEM_ID = lib.PCI_SUBSYSTEM_ID
    ROM_ADDRESS = lib.PCI_ROM_ADDRESS
    CAPABILITY_LIST = lib.PCI_CAPABILITY_LIST
    INTERRUPT_LINE = lib.PCI_INTERRUPT_LINE
    INTERRUPT_PIN = lib.PCI_INTERRUPT_PIN


class Command(IntFlag):
    IO = lib.PCI_COMMAND_IO  # decode the I/O BARs
    MEMORY = lib.PCI_COMMAND_MEMORY  # decode the memory BARs
    MASTER = lib.PCI_COMMAND_MASTER  # the device may DMA (and send MSIs)
    SPECIAL = lib.PCI_COMMAND_SPECIAL
    INVALIDATE = lib.PCI_COMMAND_INVALIDATE
    VGA_PALETTE = lib.PCI_COMMAND_VGA_PALETTE
    PARITY = lib.PCI_COMMAND_PARITY
    WAIT = lib.PCI_COMMAND_WAIT
    SERR = lib.PCI_COMMAND_SERR
    FAST_BACK = lib.PCI_COMMAND_FAST_BACK
    INTX_DISABLE = lib.PCI_COMMAND_INTX_DISABLE  # the device must not assert INTx


# What a guest may set in COMMAND on our devices (the rest read 0).
COMMAND_WRITABLE = Command.IO | Command.MEMORY | Command.MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE


class Status(IntFlag):
    INTERRUPT = lib.PCI_STATUS_INTERRUPT  # INTx asserted (read-only)
    CAP_LIST = lib.PCI_STATUS_CAP_LIST  # the capability list exists (read-only)
    SIG_TARGET_ABORT = lib.PCI_STATUS_SIG_TARGET_ABORT
    REC_TARGET_ABORT = lib.PCI_STATUS_REC_TARGET_ABORT
    REC_MASTER_ABORT = lib.PCI_STATUS_REC_MASTER_ABORT
    SIG_SYSTEM_ERROR = lib.PCI_STATUS_SIG_SYSTEM_ERROR
    DETECTED_PARITY = lib.PCI_STATUS_DETECTED_PARITY


# Error bits are RW1C: a 1 written clears them.
STATUS_W1C = (
    Status.SIG_TARGET_ABORT | Status.REC_TARGET_ABORT | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY
)

HEADER_TYPE_NORMAL = lib.PCI_HEADER_TYPE_NORMAL
NUM_BARS = lib.PCI_STD_NUM_BARS
CONFIG_SPACE_SIZE = lib.PCI_CFG_SPACE_SIZE  # conventional: 256 bytes
CONFIG_SPACE_EXP_SIZE = lib.PCI_CFG_SPACE_EXP_SIZE  # PCI Express (ECAM): 4096 bytes
CAP_LIST_ID = lib.PCI_CAP_LIST_ID
CAP_LIST_NEXT = lib.PCI_CAP_LIST_NEXT
# Capabilities start after the header and are dword aligned (PCI 3.0, 6.7).
CAPABILITIES_START = 0x40


class BarBits(IntFlag):
    SPACE_IO = lib.PCI_BASE_ADDRESS_SPACE_IO  # bit 0: an I/O BAR
    MEM_TYPE_64 = lib.PCI_BASE_ADDRESS_MEM_TYPE_64  # bits 2:1 = 10b: a 64-bit memory BAR
    MEM_PREFETCH = lib.PCI_BASE_ADDRESS_MEM_PREFETCH  # reads have no side effects


class CapId(IntEnum):
    MSI = lib.PCI_CAP_ID_MSI
    VENDOR = lib.PCI_CAP_ID_VNDR
    EXP = lib.PCI_CAP_ID_EXP
    MSIX = lib.PCI_CAP_ID_MSIX


class MsixCap(IntEnum):
    """Offsets in the MSI-X capability."""

    FLAGS = lib.PCI_MSIX_FLAGS  # Message Control
    TABLE = lib.PCI_MSIX_TABLE  # Table Offset / BIR
    PBA = lib.PCI_MSIX_PBA  # PBA Offset / BIR
    SIZEOF = lib.PCI_CAP_MSIX_SIZEOF


class MsixFlags(IntFlag):
    QSIZE = lib.PCI_MSIX_FLAGS_QSIZE  # table size - 1 (read-only)
    MASKALL = lib.PCI_MSIX_FLAGS_MASKALL  # Function Mask
    ENABLE = lib.PCI_MSIX_FLAGS_ENABLE


class MsixEntry(IntEnum):
    """Offsets in one MSI-X table entry."""

    LOWER_ADDR = lib.PCI_MSIX_ENTRY_LOWER_ADDR
    UPPER_ADDR = lib.PCI_MSIX_ENTRY_UPPER_ADDR
    DATA = lib.PCI_MSIX_ENTRY_DATA
    VECTOR_CTRL = lib.PCI_MSIX_ENTRY_VECTOR_CTRL
    SIZE = lib.PCI_MSIX_ENTRY_SIZE


MSIX_ENTRY_CTRL_MASKBIT = lib.PCI_MSIX_ENTRY_CTRL_MASKBIT
MSIX_BIR_MASK = lib.PCI_MSIX_TABLE_BIR


class ClassCode(IntEnum):
    """Base class, subclass and programming interface, as the 24-bit register holds them."""

    HOST_BRIDGE = 0x06_00_00
    ISA_BRIDGE = 0x06_01_00  # the LPC bridge (bhyve's -s N,lpc)
    MASS_STORAGE_OTHER = 0x01_80_00  # what virtio-blk reports, as QEMU's does
    ETHERNET = 0x02_00_00
    COMMUNICATION_OTHER = 0x07_80_00  # what virtio-console reports, as QEMU's does
    OTHER = 0xFF_00_00


class VendorId(IntEnum):
    RED_HAT_QUMRANET = 0x1AF4  # virtio devices (virtio 1.2, 4.1.2)
    RED_HAT = 0x1B36  # Red Hat's ID for generic virtual hardware: the host bridge
    INTEL = 0x8086  # the Q35 chipset: the MCH (8086:29C0) and the ICH9 LPC (8086:2918)
