"""The PC's reset control register at port 0xCF9 (Intel PIIX/ICH "RST_CNT", QEMU's piix
and ich9 "RCR"), which SeaBIOS's and Linux's reboot=pci write.

It shares the dword at 0xCF8 with PCI's CONFIG_ADDRESS: a byte access at 0xCF9 is this
register (devices/pci/root.py sends the narrow accesses here). A write with RST_CPU set
resets the machine, the way the other reset paths do (the VMM builds a new machine, or stops
with --no-reboot); SYS_RST (hard) and FULL_RST (power cycle) make no difference to a VM.
The register reads back SYS_RST and FULL_RST as last written.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntFlag

RESET_CONTROL_OFFSET = 1  # 0xCF9 in the 0xCF8-0xCFB dword


class ResetControl(IntFlag):
    SYS_RST = 1 << 1  # a hard reset (1) or a soft one, INIT only (0)
    RST_CPU = 1 << 2  # 0 -> 1: the reset
    FULL_RST = 1 << 3  # with SYS_RST: drive the power down too


KEPT = ResetControl.SYS_RST | ResetControl.FULL_RST


class ResetControlRegister:
    """The narrow side of 0xCF8-0xCFB: only the byte at 0xCF9 is this register."""

    def __init__(self, reset: Callable[[], None]):
        self._reset = reset
        self.value = ResetControl(0)
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == RESET_CONTROL_OFFSET and size == 1:
            return int(self.value)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != RESET_CONTROL_OFFSET or size != 1:
            return
        self.value = ResetControl(value) & KEPT
        if value & ResetControl.RST_CPU:
            self.resets += 1
            self._reset()
