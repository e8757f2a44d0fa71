"""The ACPI power-management registers: the PM1 event and control blocks and the reset
register, as the FADT describes them (ACPI 6.5, 4.8 "ACPI Hardware Model", fixed hardware).

Why fixed hardware and not hardware-reduced ACPI with a Generic Event Device (GED):

* A guest reaches every power path here with port writes it can find in static tables:
  the power button is a *fixed* event (PM1_STS.PWRBTN_STS, enabled by PM1_EN.PWRBTN_EN,
  signalled by the SCI), S5 is "write SLP_TYP|SLP_EN to PM1_CNT", reset is RESET_REG.
  A GED's power button is an interrupt whose meaning is in AML (`_EVT` doing
  `Notify (PWRB, 0x80)`), so only a guest with an AML interpreter can use it; with fixed
  hardware a freestanding test guest exercises the whole power path, and so do older or
  minimal kernels (ACPI_REDUCED_HARDWARE support is optional in OSes).
* It is what bhyve and QEMU's PC machines offer, so guests' drivers are well trodden.
* What it costs is nothing at run time: no register here is on a hot path but the PM
  timer, whose reads the vCPU threads answer in C (cext/vcpu_loop.c) without the loop.

The block is the ICH9 LPC's ACPI I/O space (devices/pci/lpc.py): where its PMBASE puts it,
decoded while ACPI_CNTL.ACPI_EN is set. A machine without the LPC has it at
platform.ACPI_PM_PORT, where firmware would have put it.

Registers (offsets in the block; any access size, as the bytes they cover):

    PM1_STS  16 bits  status, write 1 to clear; PWRBTN_STS is set by the power button
    PM1_EN   16 bits  enables: an enabled status bit asserts the SCI
    PM1_CNT  16 bits  SCI_EN reads 1 (no SMI_CMD: always in ACPI mode); SLP_TYP + SLP_EN
                      enters a sleep state: only S5 (soft off) exists here
    PM_TMR   32 bits  the ACPI PM timer: 3.579545 MHz from CLOCK_MONOTONIC, 32 bits (the
                      FADT's TMR_VAL_EXT), read-only; OVMF's and SeaBIOS's delays spin on
                      it. TMR_STS (bit 31 toggling) is not raised: no OS here waits for it.
    SMI_EN   32 bits  ICH9's SMI enables: stored, but APMC_EN reads 1 always. There is no
                      SMM here, and a set APMC_EN is what tells SeaBIOS "SMM is already set
                      up" (else it raises an SMI through 0xB2 and waits forever for it), as
                      QEMU's q35 does without SMM.

The reset register is not here: the FADT's RESET_REG is the chipset's 0xCF9
(devices/legacy/reset_control.py), as on QEMU's q35.

The SCI is a level interrupt (the MADT says level, active high): the model hands its
level to `sci(level)` whenever it changes, recomputed after every access.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from ...platform import ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_LEN, ACPI_PM1_EVT_PORT, ACPI_PM_PORT, ACPI_PM_TMR_PORT
from .reset_control import ResetControl

_BYTE_MASK = 0xFF
_OPEN_BUS = 0xFF


class Register(enum.IntEnum):
    """Offsets of the registers from the block's first port."""

    PM1_STS = ACPI_PM1_EVT_PORT - ACPI_PM_PORT
    PM1_EN = PM1_STS + ACPI_PM1_EVT_LEN // 2  # the second half of PM1a_EVT_BLK
    PM1_CNT = ACPI_PM1_CNT_PORT - ACPI_PM_PORT
    PM_TMR = ACPI_PM_TMR_PORT - ACPI_PM_PORT
    SMI_EN = 0x30  # ICH9's (as SeaBIOS's dev-q35.h ICH9_PMIO_SMI_EN)


REGISTER_WIDTH = {Register.PM1_STS: 2, Register.PM1_EN: 2, Register.PM1_CNT: 2, Register.PM_TMR: 4, Register.SMI_EN: 4}

PM_TIMER_HZ = 3_579_545  # the ACPI PM timer's frequency (ACPI 6.5, 4.8.3.3)
PM_TIMER_MASK = 0xFFFF_FFFF  # 32 bits (the FADT's TMR_VAL_EXT)


def pm_timer_value(monotonic_ns: int | None = None) -> int:
    """The PM timer now: ticks of CLOCK_MONOTONIC at PM_TIMER_HZ, as C computes them
    (cext/vcpu_loop.c), so the fast path and this model agree."""
    ns = time.monotonic_ns() if monotonic_ns is None else monotonic_ns
    return (ns // 1_000_000_000 * PM_TIMER_HZ + ns % 1_000_000_000 * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK


class SmiEnable(enum.IntFlag):
    """ICH9 SMI_EN, the bits firmware touches."""

    GBL_SMI_EN = 1 << 0
    APMC_EN = 1 << 5  # an SMI on writes to 0xB2: reads 1 (no SMM; see the module docstring)


class Pm1Status(enum.IntFlag):
    """PM1_STS (ACPI 6.5 table 4.16). Bits for hardware this machine lacks never set."""

    TMR_STS = 1 << 0  # the PM timer's bit 23 changed (no PM timer here)
    BM_STS = 1 << 4  # bus master activity
    GBL_STS = 1 << 5  # firmware released the global lock (no firmware here)
    PWRBTN_STS = 1 << 8  # the power button was pressed
    SLPBTN_STS = 1 << 9  # the sleep button was pressed (none here)
    RTC_STS = 1 << 10  # the RTC alarm fired (the FADT's FIX_RTC says: not here)
    PCIEXP_WAKE_STS = 1 << 14  # a PCIe wake event
    WAK_STS = 1 << 15  # the system woke from a sleep state


class Pm1Enable(enum.IntFlag):
    """PM1_EN (ACPI 6.5 table 4.17): each enable sits at its status bit's position.

    They all stick when written, even for absent hardware: ACPICA checks that GBL_EN
    sticks and otherwise reports the global lock hardware as not responding.
    """

    TMR_EN = 1 << 0
    GBL_EN = 1 << 5
    PWRBTN_EN = 1 << 8
    SLPBTN_EN = 1 << 9
    RTC_EN = 1 << 10
    PCIEXP_WAKE_DIS = 1 << 14  # a disable, not an enable: no SCI of its own


class Pm1Control(enum.IntFlag):
    """PM1_CNT (ACPI 6.5 table 4.18)."""

    SCI_EN = 1 << 0  # power management events raise the SCI (not an SMI): always 1
    BM_RLD = 1 << 1  # bus master requests take the CPU out of C3
    GBL_RLS = 1 << 2  # write: the OS released the global lock (tells firmware; none here)
    SLP_TYP = 0b111 << 10  # the sleep state to enter, as the DSDT's \_Sx package says
    SLP_EN = 1 << 13  # write 1: enter the SLP_TYP state; reads 0


SLP_TYP_SHIFT = 10
# Status bits that raise the SCI when their enable (same bit position) is set.
_SCI_EVENTS = Pm1Status.TMR_STS | Pm1Status.GBL_STS | Pm1Status.PWRBTN_STS | Pm1Status.SLPBTN_STS | Pm1Status.RTC_STS
_EN_WRITABLE = (
    Pm1Enable.TMR_EN | Pm1Enable.GBL_EN | Pm1Enable.PWRBTN_EN | Pm1Enable.SLPBTN_EN | Pm1Enable.RTC_EN | Pm1Enable.PCIEXP_WAKE_DIS
)
_CNT_STORED = Pm1Control.BM_RLD | Pm1Control.SLP_TYP


class SleepType(enum.IntEnum):
    """SLP_TYP values, as the DSDT's \\_Sx packages give them to the OS."""

    S5 = 5  # soft off: the only sleep state this machine has


# The FADT's RESET_VALUE, written to its RESET_REG, 0xCF9: a hard CPU reset.
RESET_VALUE = ResetControl.SYS_RST | ResetControl.RST_CPU


class AcpiPm:
    """The PM1a event and control blocks, the PM timer and SMI_EN of one machine.

    `sci(level)` is called when the SCI's level changes; `power_off()` when the guest
    enters S5. All on the loop's thread, like every access.
    """

    def __init__(self, sci: Callable[[bool], None], power_off: Callable[[], None]):
        self._sci = sci
        self._power_off = power_off
        self.status = Pm1Status(0)
        self.enable = Pm1Enable(0)
        self.control = Pm1Control.SCI_EN
        self.smi_enable = SmiEnable.APMC_EN
        self._level = False
        self._timer_now: int | None = None  # the PM timer's count for the access being served
        self.counters = {"power_button": 0, "sci_raised": 0, "sleeps_refused": 0, "power_offs": 0, "timer_reads": 0}

    # -- the host's side ---------------------------------------------------------------
    @property
    def listening(self) -> bool:
        """Has the guest enabled the power button's event (so a press reaches it)?"""
        return bool(self.enable & Pm1Enable.PWRBTN_EN and self.control & Pm1Control.SCI_EN)

    def press_power_button(self) -> bool:
        """Press and release the power button; returns whether the guest listens for it.

        The status bit is set either way, as on hardware: a guest that enables the event
        later still sees the press (ACPI OSes clear stale status bits when they start).
        """
        self.counters["power_button"] += 1
        self.status |= Pm1Status.PWRBTN_STS
        self._update_sci()
        return self.listening

    # -- the guest's side --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self._timer_now = None  # one count per access: its bytes cannot tear
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & _BYTE_MASK)
        self._update_sci()

    def _register(self, offset: int) -> tuple[Register | None, int]:
        """The register a byte offset falls in, and the byte's shift within it."""
        for reg, width in REGISTER_WIDTH.items():
            if reg <= offset < reg + width:
                return reg, 8 * (offset - reg)
        return None, 0

    def _read_byte(self, offset: int) -> int:
        reg, shift = self._register(offset)
        if reg is Register.PM1_STS:
            word = int(self.status)
        elif reg is Register.PM1_EN:
            word = int(self.enable)
        elif reg is Register.PM1_CNT:
            word = int(self.control)  # SLP_EN and GBL_RLS are write-only: never stored
        elif reg is Register.PM_TMR:
            if shift == 0:
                self.counters["timer_reads"] += 1
            if self._timer_now is None:
                self._timer_now = pm_timer_value()
            word = self._timer_now
        elif reg is Register.SMI_EN:
            word = int(self.smi_enable)
        else:
            return _OPEN_BUS  # the rest of the block decodes nothing
        return (word >> shift) & _BYTE_MASK

    def _write_byte(self, offset: int, value: int) -> None:
        reg, shift = self._register(offset)
        bits = value << shift
        lane = _BYTE_MASK << shift
        if reg is Register.PM1_STS:
            self.status = Pm1Status(int(self.status) & ~bits)  # write 1 to clear
        elif reg is Register.PM1_EN:
            kept = int(self.enable) & ~lane
            self.enable = Pm1Enable(kept | (bits & int(_EN_WRITABLE)))
        elif reg is Register.PM1_CNT:
            kept = int(self.control) & ~(lane & int(_CNT_STORED))
            self.control = Pm1Control(kept | (bits & int(_CNT_STORED)) | Pm1Control.SCI_EN)
            if bits & Pm1Control.SLP_EN:
                self._sleep((int(self.control) & Pm1Control.SLP_TYP) >> SLP_TYP_SHIFT)
        elif reg is Register.SMI_EN:  # stored; APMC_EN stays set (no SMM)
            kept = int(self.smi_enable) & ~lane
            self.smi_enable = SmiEnable(kept | bits | SmiEnable.APMC_EN)

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ == SleepType.S5:
            self.counters["power_offs"] += 1
            self._power_off()
        else:  # a state no \_Sx package offers: the write does nothing, as on a chipset without it
            self.counters["sleeps_refused"] += 1

    def _update_sci(self) -> None:
        level = bool(self.control & Pm1Control.SCI_EN and int(self.status) & int(self.enable) & int(_SCI_EVENTS))
        if level != self._level:
            self._level = level
            if level:
                self.counters["sci_raised"] += 1
            self._sci(level)
