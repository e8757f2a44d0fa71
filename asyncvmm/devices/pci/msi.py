"""MSI (PCI 3.0, 6.8.1): one message, 64-bit address, with the per-vector mask bit.

What bhyve's -W gives virtio devices instead of MSI-X. One vector (Multiple Message
Capable 0): every queue and configuration change raise it, and the driver reads the ISR to
learn why. The vector is an IrqRouter MsiVector like an MSI-X entry's.
"""

from __future__ import annotations

import struct

from ..._native import lib
from ...irq import IrqRouter, MsiMessage, MsiVector
from .config_space import ConfigSpace
from .regs import CapId

FLAGS_ENABLE = lib.PCI_MSI_FLAGS_ENABLE
FLAGS_64BIT = lib.PCI_MSI_FLAGS_64BIT
FLAGS_MASKBIT = lib.PCI_MSI_FLAGS_MASKBIT
FLAGS_QSIZE = lib.PCI_MSI_FLAGS_QSIZE  # Multiple Message Enable: what the OS granted (we use 1)
ADDRESS_LO, ADDRESS_HI = lib.PCI_MSI_ADDRESS_LO, lib.PCI_MSI_ADDRESS_HI
DATA, MASK, PENDING = lib.PCI_MSI_DATA_64, lib.PCI_MSI_MASK_64, lib.PCI_MSI_PENDING_64
SIZEOF = PENDING + 4


class Msi:
    def __init__(self, config: ConfigSpace, router: IrqRouter):
        self.config = config
        flags = FLAGS_64BIT | FLAGS_MASKBIT  # MMC 0: one message
        body = struct.pack("<HIIHHII", flags, 0, 0, 0, 0, 0, 0)
        writable = struct.pack("<HIIHHII", FLAGS_ENABLE | FLAGS_QSIZE, 0xFFFF_FFFC, 0xFFFF_FFFF, 0xFFFF, 0, 1, 0)
        self.cap = config.add_capability(CapId.MSI, body, writable=writable)
        self.vector: MsiVector = router.allocate()

    def _get(self, off: int, size: int) -> int:
        return self.config.get(self.cap + off, size)

    @property
    def enabled(self) -> bool:
        return bool(self._get(2, 2) & FLAGS_ENABLE)

    def touches_capability(self, offset: int, size: int) -> bool:
        return offset < self.cap + SIZEOF and offset + size > self.cap

    def control_written(self) -> None:
        """Enable, address, data or mask changed: route, mask or deliver."""
        v = self.vector
        if not self.enabled or self._get(MASK, 4) & 1:
            v.mask()
        else:
            v.route(MsiMessage(self._get(ADDRESS_LO, 4) | self._get(ADDRESS_HI, 4) << 32, self._get(DATA, 2)))
            v.unmask()
        self.config.put(self.cap + PENDING, 4, int(v.pending))

    def close(self) -> None:
        self.vector.close()
