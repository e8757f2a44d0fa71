"""MSI-X (PCI 3.0, 6.8.2): the capability, the vector table and the pending-bit array.

Each table entry is a vector of the IrqRouter (asyncvmm.irq): its address/data pair
becomes the vector's GSI route, and its mask bit — together with the capability's
Function Mask and Enable — becomes the mask the C data path checks before it raises
the vector. While masked, a raise sets the pending bit; unmasking delivers it.

The table starts with every vector masked (6.8.2.9). Table and PBA take DWORD and QWORD
accesses, naturally aligned; others read all ones and are dropped.
"""

from __future__ import annotations

import struct

from ...irq import IrqRouter, MsiMessage, MsiVector
from .config_space import ConfigSpace
from .regs import MSIX_ENTRY_CTRL_MASKBIT, CapId, MsixCap, MsixEntry, MsixFlags

MAX_VECTORS = 2048  # the table size field is 11 bits


class Msix:
    def __init__(self, config: ConfigSpace, router: IrqRouter, nvectors: int, *, bar: int, table_offset: int,
                 pba_offset: int):
        if not 1 <= nvectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X: {nvectors} vectors (1..{MAX_VECTORS})")
        if (table_offset | pba_offset) & 7:
            raise ValueError("MSI-X table and PBA offsets are QWORD aligned")
        self.config = config
        self.nvectors = nvectors
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        body = struct.pack("<HII", nvectors - 1, table_offset | bar, pba_offset | bar)
        flags_mask = (MsixFlags.MASKALL | MsixFlags.ENABLE).to_bytes(2, "little")
        self.cap = config.add_capability(CapId.MSIX, body, writable=flags_mask)
        self.vectors: list[MsiVector] = [router.allocate() for _ in range(nvectors)]
        self.table = bytearray(MsixEntry.SIZE * nvectors)
        for i in range(nvectors):
            self._put(i, MsixEntry.VECTOR_CTRL, MSIX_ENTRY_CTRL_MASKBIT)

    @property
    def table_size(self) -> int:
        return MsixEntry.SIZE * self.nvectors

    @property
    def pba_size(self) -> int:
        return ((self.nvectors + 63) // 64) * 8

    # -- the capability ------------------------------------------------------------------
    @property
    def flags(self) -> MsixFlags:
        return MsixFlags(self.config.get(self.cap + MsixCap.FLAGS, 2) & (MsixFlags.MASKALL | MsixFlags.ENABLE))

    @property
    def enabled(self) -> bool:
        return bool(self.flags & MsixFlags.ENABLE)

    def touches_capability(self, offset: int, size: int) -> bool:
        return offset < self.cap + MsixCap.SIZEOF and offset + size > self.cap

    def control_written(self) -> None:
        """The guest wrote the capability (Enable or Function Mask may have changed)."""
        for i in range(self.nvectors):
            self._sync(i)

    # -- the table -----------------------------------------------------------------------
    def _get(self, i: int, field: int) -> int:
        return struct.unpack_from("<I", self.table, i * MsixEntry.SIZE + field)[0]

    def _put(self, i: int, field: int, value: int) -> None:
        struct.pack_into("<I", self.table, i * MsixEntry.SIZE + field, value)

    def entry_masked(self, i: int) -> bool:
        return bool(self._get(i, MsixEntry.VECTOR_CTRL) & MSIX_ENTRY_CTRL_MASKBIT)

    def message(self, i: int) -> MsiMessage:
        address = self._get(i, MsixEntry.LOWER_ADDR) | self._get(i, MsixEntry.UPPER_ADDR) << 32
        return MsiMessage(address, self._get(i, MsixEntry.DATA))

    def _sync(self, i: int) -> None:
        v = self.vectors[i]
        flags = self.flags
        masked = not (flags & MsixFlags.ENABLE) or bool(flags & MsixFlags.MASKALL) or self.entry_masked(i)
        if masked:
            v.mask()
        else:
            v.route(self.message(i))
            v.unmask()

    @staticmethod
    def _bad(offset: int, size: int) -> bool:
        return size not in (4, 8) or offset % size != 0

    def table_read(self, offset: int, size: int) -> int:
        if self._bad(offset, size) or offset + size > self.table_size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if self._bad(offset, size) or offset + size > self.table_size:
            return
        first, last = offset // MsixEntry.SIZE, (offset + size - 1) // MsixEntry.SIZE
        old_ctrl = [self._get(i, MsixEntry.VECTOR_CTRL) for i in range(first, last + 1)]
        self.table[offset : offset + size] = value.to_bytes(size, "little")
        for n, i in enumerate(range(first, last + 1)):
            # Only the mask bit of Vector Control is writable; the rest is reserved.
            ctrl = self._get(i, MsixEntry.VECTOR_CTRL) & MSIX_ENTRY_CTRL_MASKBIT
            self._put(i, MsixEntry.VECTOR_CTRL, ctrl)
            if ctrl != old_ctrl[n] or not ctrl:
                self._sync(i)

    def pba_read(self, offset: int, size: int) -> int:
        if self._bad(offset, size) or offset + size > self.pba_size:
            return (1 << (8 * size)) - 1
        value = 0
        for bit in range(8 * size):
            i = offset * 8 + bit
            if i < self.nvectors and self.vectors[i].pending:
                value |= 1 << bit
        return value

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only (6.8.2.10): writes are dropped."""

    # -- the device's side -----------------------------------------------------------------
    def vector(self, i: int) -> MsiVector | None:
        return self.vectors[i] if 0 <= i < self.nvectors else None

    def reset(self) -> None:
        """Function reset: every vector masked, table cleared, capability disabled."""
        self.config.put(self.cap + MsixCap.FLAGS, 2, self.nvectors - 1)
        self.table[:] = bytes(len(self.table))
        for i, v in enumerate(self.vectors):
            self._put(i, MsixEntry.VECTOR_CTRL, MSIX_ENTRY_CTRL_MASKBIT)
            v.mask()
            v.c.pending = 0

    def close(self) -> None:
        for v in self.vectors:
            v.close()
