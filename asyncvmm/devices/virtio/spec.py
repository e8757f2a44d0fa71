"""virtio names (virtio 1.2, OASIS), values from <linux/virtio_*.h> through cffi."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from ..._native import lib


class Status(IntFlag):
    """device_status (2.1)."""

    ACKNOWLEDGE = lib.VIRTIO_CONFIG_S_ACKNOWLEDGE  # the guest found the device
    DRIVER = lib.VIRTIO_CONFIG_S_DRIVER  # the guest has a driver for it
    DRIVER_OK = lib.VIRTIO_CONFIG_S_DRIVER_OK  # the driver is ready: the device runs
    FEATURES_OK = lib.VIRTIO_CONFIG_S_FEATURES_OK  # the device accepted the driver's features
    NEEDS_RESET = lib.VIRTIO_CONFIG_S_NEEDS_RESET  # the device broke down: the driver must reset it
    FAILED = lib.VIRTIO_CONFIG_S_FAILED  # the driver gave up on the device


class Feature(IntEnum):
    """Transport feature bits (6)."""

    RING_INDIRECT_DESC = lib.VIRTIO_RING_F_INDIRECT_DESC
    RING_EVENT_IDX = lib.VIRTIO_RING_F_EVENT_IDX
    VERSION_1 = lib.VIRTIO_F_VERSION_1
    ACCESS_PLATFORM = lib.VIRTIO_F_ACCESS_PLATFORM
    RING_PACKED = lib.VIRTIO_F_RING_PACKED
    IN_ORDER = lib.VIRTIO_F_IN_ORDER
    RING_RESET = lib.VIRTIO_F_RING_RESET


def bits(*features: int) -> int:
    return sum(1 << f for f in set(features))


# A split queue's parts in guest RAM (2.7, "Virtqueue Part Sizes"), in bytes: descriptors
# of 16 bytes; flags, idx, a u16 per entry and used_event; flags, idx, an 8-byte element
# per entry and avail_event.
def desc_table_bytes(size: int) -> int:
    return 16 * size


def avail_ring_bytes(size: int) -> int:
    return 6 + 2 * size


def used_ring_bytes(size: int) -> int:
    return 6 + 8 * size


class DeviceId(IntEnum):
    """Device types (5): the PCI device ID is 0x1040 + this."""

    NET = lib.VIRTIO_ID_NET
    BLOCK = lib.VIRTIO_ID_BLOCK
    CONSOLE = lib.VIRTIO_ID_CONSOLE
    RNG = lib.VIRTIO_ID_RNG  # the entropy device (5.4)


# 4.1.2.1: modern PCI device IDs are 0x1040 + the virtio device ID.
PCI_DEVICE_ID_BASE = 0x1040
# 4.1.2.1: a non-transitional device has a revision ID of 1 or more.
PCI_REVISION_MODERN = 1


class PciCapType(IntEnum):
    """cfg_type of the virtio vendor capabilities (4.1.4)."""

    COMMON_CFG = lib.VIRTIO_PCI_CAP_COMMON_CFG
    NOTIFY_CFG = lib.VIRTIO_PCI_CAP_NOTIFY_CFG
    ISR_CFG = lib.VIRTIO_PCI_CAP_ISR_CFG
    DEVICE_CFG = lib.VIRTIO_PCI_CAP_DEVICE_CFG
    PCI_CFG = lib.VIRTIO_PCI_CAP_PCI_CFG


class Common(IntEnum):
    """struct virtio_pci_common_cfg offsets (4.1.4.3)."""

    DEVICE_FEATURE_SELECT = lib.VIRTIO_PCI_COMMON_DFSELECT
    DEVICE_FEATURE = lib.VIRTIO_PCI_COMMON_DF
    DRIVER_FEATURE_SELECT = lib.VIRTIO_PCI_COMMON_GFSELECT
    DRIVER_FEATURE = lib.VIRTIO_PCI_COMMON_GF
    CONFIG_MSIX_VECTOR = lib.VIRTIO_PCI_COMMON_MSIX
    NUM_QUEUES = lib.VIRTIO_PCI_COMMON_NUMQ
    DEVICE_STATUS = lib.VIRTIO_PCI_COMMON_STATUS
    CONFIG_GENERATION = lib.VIRTIO_PCI_COMMON_CFGGENERATION
    QUEUE_SELECT = lib.VIRTIO_PCI_COMMON_Q_SELECT
    QUEUE_SIZE = lib.VIRTIO_PCI_COMMON_Q_SIZE
    QUEUE_MSIX_VECTOR = lib.VIRTIO_PCI_COMMON_Q_MSIX
    QUEUE_ENABLE = lib.VIRTIO_PCI_COMMON_Q_ENABLE
    QUEUE_NOTIFY_OFF = lib.VIRTIO_PCI_COMMON_Q_NOFF
    QUEUE_DESC_LO = lib.VIRTIO_PCI_COMMON_Q_DESCLO
    QUEUE_DESC_HI = lib.VIRTIO_PCI_COMMON_Q_DESCHI
    QUEUE_DRIVER_LO = lib.VIRTIO_PCI_COMMON_Q_AVAILLO
    QUEUE_DRIVER_HI = lib.VIRTIO_PCI_COMMON_Q_AVAILHI
    QUEUE_DEVICE_LO = lib.VIRTIO_PCI_COMMON_Q_USEDLO
    QUEUE_DEVICE_HI = lib.VIRTIO_PCI_COMMON_Q_USEDHI


# Each field's width; accesses of another width or offset are the driver's error (4.1.3.1).
COMMON_WIDTH = {
    Common.DEVICE_FEATURE_SELECT: 4, Common.DEVICE_FEATURE: 4, Common.DRIVER_FEATURE_SELECT: 4,
    Common.DRIVER_FEATURE: 4, Common.CONFIG_MSIX_VECTOR: 2, Common.NUM_QUEUES: 2, Common.DEVICE_STATUS: 1,
    Common.CONFIG_GENERATION: 1, Common.QUEUE_SELECT: 2, Common.QUEUE_SIZE: 2, Common.QUEUE_MSIX_VECTOR: 2,
    Common.QUEUE_ENABLE: 2, Common.QUEUE_NOTIFY_OFF: 2, Common.QUEUE_DESC_LO: 4, Common.QUEUE_DESC_HI: 4,
    Common.QUEUE_DRIVER_LO: 4, Common.QUEUE_DRIVER_HI: 4, Common.QUEUE_DEVICE_LO: 4, Common.QUEUE_DEVICE_HI: 4,
}
COMMON_CFG_SIZE = 0x38  # through queue_device_hi

NO_VECTOR = lib.VIRTIO_MSI_NO_VECTOR
ISR_QUEUE = 0x1  # ISR bit 0: a used buffer notification (4.1.4.5)
ISR_CONFIG = lib.VIRTIO_PCI_ISR_CONFIG  # bit 1: a configuration change

VRING_DESC_F_NEXT = lib.VRING_DESC_F_NEXT
VRING_DESC_F_WRITE = lib.VRING_DESC_F_WRITE
VRING_DESC_F_INDIRECT = lib.VRING_DESC_F_INDIRECT
VRING_AVAIL_F_NO_INTERRUPT = lib.VRING_AVAIL_F_NO_INTERRUPT
VRING_USED_F_NO_NOTIFY = lib.VRING_USED_F_NO_NOTIFY
MAX_QUEUE_SIZE = 32768  # 2.7: split queues hold at most 32768 entries


class VqError(IntEnum):
    """How a guest broke a queue (cext/virtq.h enum avmm_vq_error); names for counters."""

    HEAD_RANGE = lib.AVMM_VQ_E_HEAD_RANGE
    AVAIL_IDX = lib.AVMM_VQ_E_AVAIL_IDX
    NEXT_RANGE = lib.AVMM_VQ_E_NEXT_RANGE
    LOOP = lib.AVMM_VQ_E_LOOP
    INDIRECT = lib.AVMM_VQ_E_INDIRECT
    BUFFER = lib.AVMM_VQ_E_BUFFER
    ORDER = lib.AVMM_VQ_E_ORDER
    TOO_MANY = lib.AVMM_VQ_E_TOO_MANY
