"""The ACPI PM block (PM1, the PM timer, ICH9's SMI_EN) driven directly, as ACPICA, SeaBIOS
and OVMF do."""

from __future__ import annotations

import pytest

from asyncvmm import platform
from asyncvmm.devices.legacy.acpi_pm import (
    PM_TIMER_HZ,
    RESET_VALUE,
    SLP_TYP_SHIFT,
    AcpiPm,
    Pm1Control,
    Pm1Enable,
    Pm1Status,
    Register,
    SleepType,
    SmiEnable,
    pm_timer_value,
)
from asyncvmm.devices.legacy.reset_control import ResetControl

STS, EN, CNT, TMR = Register.PM1_STS, Register.PM1_EN, Register.PM1_CNT, Register.PM_TMR


class Harness:
    def __init__(self) -> None:
        self.sci_levels: list[bool] = []
        self.events: list[str] = []
        self.pm = AcpiPm(sci=self.sci_levels.append, power_off=lambda: self.events.append("off"))

    @property
    def sci(self) -> bool:
        return bool(self.sci_levels) and self.sci_levels[-1]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_register_layout_matches_the_platform_ports():
    assert platform.ACPI_PM_PORT + STS == platform.ACPI_PM1_EVT_PORT
    assert platform.ACPI_PM_PORT + EN == platform.ACPI_PM1_EVT_PORT + platform.ACPI_PM1_EVT_LEN // 2
    assert platform.ACPI_PM_PORT + CNT == platform.ACPI_PM1_CNT_PORT
    assert platform.ACPI_PM_PORT + TMR == platform.ACPI_PM_TMR_PORT
    assert max(Register) < platform.ACPI_PM_SIZE == 0x80  # ICH9's PMBASE block: 128 ports


def test_reset_state(h: Harness):
    assert h.pm.read(STS, 2) == 0
    assert h.pm.read(EN, 2) == 0
    assert h.pm.read(CNT, 2) == Pm1Control.SCI_EN  # no SMI_CMD: always in ACPI mode
    assert h.pm.read(STS, 4) == 0  # the event block as one dword: STS | EN << 16
    assert h.pm.read(0x20, 1) == 0xFF  # the rest of the block decodes nothing
    assert not h.pm.listening and h.sci_levels == []


def test_power_button_raises_the_sci_only_when_enabled(h: Harness):
    assert h.pm.press_power_button() is False  # nobody listens yet
    assert h.pm.read(STS, 2) == Pm1Status.PWRBTN_STS  # the press is latched anyway
    assert h.sci_levels == []
    h.pm.write(EN, 2, Pm1Enable.PWRBTN_EN)  # enabling a pending event raises the SCI at once
    assert h.sci and h.pm.listening
    h.pm.write(STS, 2, Pm1Status.PWRBTN_STS)  # write 1 to clear: the level drops
    assert h.sci_levels == [True, False]
    assert h.pm.read(STS, 2) == 0
    assert h.pm.press_power_button() is True
    assert h.sci_levels == [True, False, True]
    assert h.pm.counters["power_button"] == 2 and h.pm.counters["sci_raised"] == 2


def test_status_write_of_zero_clears_nothing(h: Harness):
    h.pm.write(EN, 2, Pm1Enable.PWRBTN_EN)
    h.pm.press_power_button()
    h.pm.write(STS, 2, 0)
    h.pm.write(STS, 2, Pm1Status.WAK_STS)  # another bit's 1 clears only that bit
    assert h.pm.read(STS, 2) == Pm1Status.PWRBTN_STS and h.sci


def test_byte_accesses_reach_the_right_half(h: Harness):
    h.pm.write(EN + 1, 1, Pm1Enable.PWRBTN_EN >> 8)  # high byte of PM1_EN
    assert h.pm.read(EN, 2) == Pm1Enable.PWRBTN_EN
    h.pm.press_power_button()
    assert h.pm.read(STS + 1, 1) == Pm1Status.PWRBTN_STS >> 8
    h.pm.write(STS, 1, 0xFF)  # the low byte holds no PWRBTN_STS: it stays
    assert h.sci
    h.pm.write(STS + 1, 1, 0x01)
    assert not h.sci


def test_event_block_as_one_dword(h: Harness):
    h.pm.write(STS, 4, Pm1Enable.PWRBTN_EN << 16)  # EN through the high word
    assert h.pm.read(EN, 2) == Pm1Enable.PWRBTN_EN


def test_every_enable_sticks_as_acpica_checks(h: Harness):
    # ACPICA enables GBL_EN to see whether the global lock hardware answers.
    h.pm.write(EN, 2, 0xFFFF)
    assert h.pm.read(EN, 2) == (Pm1Enable.TMR_EN | Pm1Enable.GBL_EN | Pm1Enable.PWRBTN_EN | Pm1Enable.SLPBTN_EN
                                | Pm1Enable.RTC_EN | Pm1Enable.PCIEXP_WAKE_DIS)
    assert h.sci_levels == []  # no status bit is set: no SCI


def test_s5_powers_off_on_the_write_with_slp_en(h: Harness):
    typ = SleepType.S5 << SLP_TYP_SHIFT
    h.pm.write(CNT, 2, typ)  # ACPICA writes SLP_TYP first ...
    assert h.events == []
    assert h.pm.read(CNT, 2) == typ | Pm1Control.SCI_EN
    h.pm.write(CNT, 2, typ | Pm1Control.SLP_EN)  # ... then with SLP_EN
    assert h.events == ["off"]
    assert not h.pm.read(CNT, 2) & Pm1Control.SLP_EN  # write-only


def test_s5_through_the_high_byte_alone(h: Harness):
    h.pm.write(CNT + 1, 1, (SleepType.S5 << SLP_TYP_SHIFT | Pm1Control.SLP_EN) >> 8)
    assert h.events == ["off"]


@pytest.mark.parametrize("typ", [0, 1, 3, 4, 7])
def test_other_sleep_states_do_nothing(h: Harness, typ: int):
    h.pm.write(CNT, 2, typ << SLP_TYP_SHIFT | Pm1Control.SLP_EN)
    assert h.events == [] and h.pm.counters["sleeps_refused"] == 1


def test_sci_en_cannot_be_cleared(h: Harness):
    h.pm.write(CNT, 2, 0)
    assert h.pm.read(CNT, 2) & Pm1Control.SCI_EN


def test_the_fadt_reset_value_is_a_hard_reset_at_0xcf9():
    # RESET_REG is the chipset's reset control register now (as QEMU's q35): 0x06 = hard reset
    assert RESET_VALUE == ResetControl.SYS_RST | ResetControl.RST_CPU == 0x06


def test_pm_timer_counts_at_3_579545_mhz_from_clock_monotonic(h: Harness):
    import time

    assert pm_timer_value(1_000_000_000) == PM_TIMER_HZ  # one second
    assert pm_timer_value(0) == 0
    assert pm_timer_value(2_000_000_000_000) == (2000 * PM_TIMER_HZ) & 0xFFFF_FFFF  # 32 bits, wrapping
    t0, a = time.monotonic_ns(), h.pm.read(TMR, 4)
    time.sleep(0.05)
    t1, b = time.monotonic_ns(), h.pm.read(TMR, 4)
    ticks = (b - a) & 0xFFFF_FFFF
    assert abs(ticks - (t1 - t0) * PM_TIMER_HZ / 1e9) < PM_TIMER_HZ * 0.005  # within 5 ms of the host's clock
    assert h.pm.read(TMR + 2, 2) in ((pm_timer_value() >> 16) & 0xFFFF, ((pm_timer_value() >> 16) - 1) & 0xFFFF)
    h.pm.write(TMR, 4, 0)  # read-only
    assert h.pm.counters["timer_reads"] == 2


def test_a_pm_timer_read_takes_one_count_for_all_its_bytes(h: Harness, monkeypatch):
    # The loop's model serves reads the C fast path declines (a split or a rep ins): the
    # bytes of one read must come from one count, or a carry between them tears the value.
    from asyncvmm.devices.legacy import acpi_pm

    counts = iter([0x0000_00FF, 0x0000_0100, 0x0000_0101, 0x0000_0102])
    monkeypatch.setattr(acpi_pm, "pm_timer_value", lambda: next(counts))
    assert h.pm.read(TMR, 4) == 0x0000_00FF
    assert h.pm.read(TMR, 2) == 0x0000_0100


def test_smi_en_is_in_the_snapshot_state(h: Harness):
    from asyncvmm.snapshot.devices import ACPI_PM_FIELDS, _get, _put

    h.pm.write(Register.SMI_EN, 4, SmiEnable.GBL_SMI_EN)
    state = _get(h.pm, ACPI_PM_FIELDS)
    other = AcpiPm(sci=lambda level: None, power_off=lambda: None)
    _put(other, state, ACPI_PM_FIELDS)
    assert other.read(Register.SMI_EN, 4) == SmiEnable.GBL_SMI_EN | SmiEnable.APMC_EN


def test_smi_en_says_smm_is_set_up_and_keeps_the_rest(h: Harness):
    # SeaBIOS's ich9_lpc_apmc_smm_setup returns when APMC_EN reads 1 (else it waits for an SMI forever)
    assert h.pm.read(Register.SMI_EN, 4) == SmiEnable.APMC_EN
    h.pm.write(Register.SMI_EN, 4, SmiEnable.GBL_SMI_EN)
    assert h.pm.read(Register.SMI_EN, 4) == SmiEnable.APMC_EN | SmiEnable.GBL_SMI_EN
    h.pm.write(Register.SMI_EN, 4, 0)
    assert h.pm.read(Register.SMI_EN, 4) == SmiEnable.APMC_EN
