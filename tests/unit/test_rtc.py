"""The MC146818 RTC/CMOS model with an injected clock: exact register values."""

from __future__ import annotations

import calendar

import pytest

from asyncvmm.devices.legacy.rtc import CMOS_SIZE, Reg, Rtc, StatusB

INDEX, DATA = 0x70, 0x71
GiB = 1 << 30
MiB = 1 << 20

SEC, MIN, HOUR, WDAY, MDAY, MON, YEAR, CENT = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32


def ts(*fields: int) -> int:
    """UTC (year, month, day, hour, minute, second) to a Unix timestamp."""
    return calendar.timegm(fields)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rd(rtc: Rtc, index: int) -> int:
    rtc.write(INDEX, index)
    return rtc.read(DATA)


def wr(rtc: Rtc, index: int, value: int) -> None:
    rtc.write(INDEX, index)
    rtc.write(DATA, value)


def time_regs(rtc: Rtc) -> tuple[int, ...]:
    return tuple(rd(rtc, i) for i in (SEC, MIN, HOUR, WDAY, MDAY, MON, YEAR, CENT))


# Thursday 2024-02-29 23:59:58.5 UTC: a leap day two seconds before March.
LEAP = ts(2024, 2, 29, 23, 59, 58) + 0.5


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(LEAP)


@pytest.fixture
def rtc(clock: FakeClock) -> Rtc:
    return Rtc(clock=clock)


def test_register_numbers() -> None:
    assert (Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.WEEKDAY) == (0, 2, 4, 6)
    assert (Reg.DAY_OF_MONTH, Reg.MONTH, Reg.YEAR, Reg.CENTURY) == (7, 8, 9, 0x32)
    assert (Reg.STATUS_A, Reg.STATUS_B, Reg.STATUS_C, Reg.STATUS_D) == (0x0A, 0x0B, 0x0C, 0x0D)
    assert (StatusB.SET, StatusB.DM_BINARY, StatusB.HOUR_24) == (0x80, 0x04, 0x02)


# ---- formats ------------------------------------------------------------------------------


def test_default_is_bcd_24_hour(rtc: Rtc) -> None:
    assert rd(rtc, Reg.STATUS_B) == 0x02
    assert time_regs(rtc) == (0x58, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20)


def test_binary_24_hour(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x06)
    assert time_regs(rtc) == (58, 59, 23, 5, 29, 2, 24, 20)


def test_bcd_12_hour_pm(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x00)
    assert rd(rtc, HOUR) == 0x91  # 11 PM: BCD 11 with bit 7


def test_binary_12_hour_pm(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x04)
    assert rd(rtc, HOUR) == 0x8B  # 11 PM: binary 11 with bit 7


@pytest.mark.parametrize(
    "hour, bcd12, bin12, bcd24",
    [
        (0, 0x12, 12, 0x00),  # midnight is 12 AM
        (1, 0x01, 1, 0x01),
        (11, 0x11, 11, 0x11),
        (12, 0x92, 0x8C, 0x12),  # noon is 12 PM
        (13, 0x81, 0x81, 0x13),
        (23, 0x91, 0x8B, 0x23),
    ],
)
def test_hour_encodings(clock: FakeClock, rtc: Rtc, hour: int, bcd12: int, bin12: int, bcd24: int) -> None:
    clock.now = ts(2024, 6, 1, hour, 30, 0)
    assert rd(rtc, HOUR) == bcd24
    wr(rtc, Reg.STATUS_B, 0x00)
    assert rd(rtc, HOUR) == bcd12
    wr(rtc, Reg.STATUS_B, 0x04)
    assert rd(rtc, HOUR) == bin12


def test_time_follows_the_clock_across_a_leap_day(clock: FakeClock, rtc: Rtc) -> None:
    clock.now += 0.4  # 58.9: still the same second
    assert rd(rtc, SEC) == 0x58
    clock.now += 0.2  # 59.1
    assert time_regs(rtc) == (0x59, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20)
    clock.now += 1.0  # 2024-03-01 00:00:00.1, a Friday
    assert time_regs(rtc) == (0x00, 0x00, 0x00, 6, 0x01, 0x03, 0x24, 0x20)


def test_century_rollover(clock: FakeClock, rtc: Rtc) -> None:
    clock.now = ts(1999, 12, 31, 23, 59, 59)
    assert time_regs(rtc) == (0x59, 0x59, 0x23, 6, 0x31, 0x12, 0x99, 0x19)
    clock.now += 1
    assert time_regs(rtc) == (0x00, 0x00, 0x00, 7, 0x01, 0x01, 0x00, 0x20)


def test_weekday_sunday_is_1(clock: FakeClock, rtc: Rtc) -> None:
    clock.now = ts(2024, 3, 3, 12, 0, 0)  # a Sunday
    assert rd(rtc, WDAY) == 1
    clock.now = ts(2024, 3, 9, 12, 0, 0)  # a Saturday
    assert rd(rtc, WDAY) == 7


# ---- setting the time ---------------------------------------------------------------------


def set_time_bcd(rtc: Rtc, values: dict[int, int]) -> None:
    wr(rtc, Reg.STATUS_B, rd(rtc, Reg.STATUS_B) | StatusB.SET)
    for index, value in values.items():
        wr(rtc, index, value)
    wr(rtc, Reg.STATUS_B, rd(rtc, Reg.STATUS_B) & ~int(StatusB.SET))


def test_set_time_then_read_it_back_later(clock: FakeClock, rtc: Rtc) -> None:
    # 2031-07-04 12:34:56, a Friday.
    set_time_bcd(
        rtc,
        {SEC: 0x56, MIN: 0x34, HOUR: 0x12, WDAY: 6, MDAY: 0x04, MON: 0x07, YEAR: 0x31, CENT: 0x20},
    )
    assert time_regs(rtc) == (0x56, 0x34, 0x12, 6, 0x04, 0x07, 0x31, 0x20)
    assert rtc.now() == ts(2031, 7, 4, 12, 34, 56)
    released = clock.now
    clock.now = released + 0.99
    assert rd(rtc, SEC) == 0x56  # the next second starts a full second after SET is cleared
    clock.now = released + 1
    assert rd(rtc, SEC) == 0x57
    clock.now += 3 * 86400 + 3600 + 4  # three days, one hour and four seconds on
    assert time_regs(rtc) == (0x01, 0x35, 0x13, 2, 0x07, 0x07, 0x31, 0x20)


def test_time_registers_are_frozen_while_set(clock: FakeClock, rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x82)
    assert rd(rtc, Reg.STATUS_B) == 0x82
    clock.now += 10
    assert rd(rtc, SEC) == 0x58  # frozen at the instant SET was written
    wr(rtc, MIN, 0x10)
    assert rd(rtc, MIN) == 0x10  # the written value reads back...
    clock.now += 100
    assert time_regs(rtc) == (0x58, 0x10, 0x23, 5, 0x29, 0x02, 0x24, 0x20)  # ...and stays
    wr(rtc, Reg.STATUS_B, 0x02)
    assert rtc.now() == ts(2024, 2, 29, 23, 10, 58)
    clock.now += 2
    assert time_regs(rtc) == (0x00, 0x11, 0x23, 5, 0x29, 0x02, 0x24, 0x20)


def test_set_time_in_binary_12_hour_mode(clock: FakeClock, rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, StatusB.SET | StatusB.DM_BINARY)
    for index, value in {SEC: 5, MIN: 6, HOUR: 0x80 | 7, MDAY: 31, MON: 12, YEAR: 99, CENT: 20}.items():
        wr(rtc, index, value)
    wr(rtc, Reg.STATUS_B, StatusB.DM_BINARY)
    assert rtc.now() == ts(2099, 12, 31, 19, 6, 5)
    assert rd(rtc, HOUR) == 0x87
    wr(rtc, Reg.STATUS_B, 0x02)  # switch to BCD 24-hour: same instant, new format
    assert time_regs(rtc) == (0x05, 0x06, 0x19, 5, 0x31, 0x12, 0x99, 0x20)
    clock.now += 5 * 3600 + 54 * 60 + 55  # to 2100-01-01 01:01:00, a Friday
    assert time_regs(rtc) == (0x00, 0x01, 0x01, 6, 0x01, 0x01, 0x00, 0x21)


def test_set_twelve_am_and_pm_in_12_hour_mode(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, StatusB.SET)
    wr(rtc, HOUR, 0x12)  # 12 AM
    wr(rtc, Reg.STATUS_B, 0)
    assert rtc.now() == ts(2024, 2, 29, 0, 59, 58)
    wr(rtc, Reg.STATUS_B, StatusB.SET)
    wr(rtc, HOUR, 0x92)  # 12 PM
    wr(rtc, Reg.STATUS_B, 0)
    assert rtc.now() == ts(2024, 2, 29, 12, 59, 58)


def test_time_register_write_without_set_applies_at_once(clock: FakeClock, rtc: Rtc) -> None:
    wr(rtc, YEAR, 0x25)
    assert rtc.now() == ts(2025, 2, 28, 23, 59, 58) + 86400  # 2025 has no Feb 29: it carries
    # The weekday register is a counter of its own: changing the year leaves it alone.
    assert time_regs(rtc) == (0x58, 0x59, 0x23, 5, 0x01, 0x03, 0x25, 0x20)
    clock.now += 2
    assert rd(rtc, SEC) == 0x00


def test_written_weekday_is_kept_and_keeps_counting(clock: FakeClock, rtc: Rtc) -> None:
    set_time_bcd(rtc, {WDAY: 2})  # the guest says it is Monday; the date says Thursday
    assert rd(rtc, WDAY) == 2
    clock.now += 2  # midnight
    assert rd(rtc, WDAY) == 3
    clock.now += 4 * 86400
    assert rd(rtc, WDAY) == 7
    clock.now += 86400
    assert rd(rtc, WDAY) == 1


def test_setting_set_clears_uie(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x12)
    assert rd(rtc, Reg.STATUS_B) == 0x12
    wr(rtc, Reg.STATUS_B, 0x92)
    assert rd(rtc, Reg.STATUS_B) == 0x82


def test_garbage_time_values_give_a_time_not_an_error(rtc: Rtc) -> None:
    set_time_bcd(rtc, {SEC: 0xFF, MIN: 0xFF, HOUR: 0xFF, MDAY: 0xFF, MON: 0xFF, YEAR: 0xFF, CENT: 0xFF})
    regs = time_regs(rtc)
    assert len(regs) == 8 and all(0 <= r <= 0xFF for r in regs)
    set_time_bcd(rtc, {MON: 0x00, MDAY: 0x00, YEAR: 0x00, CENT: 0x00})
    assert all(0 <= r <= 0xFF for r in time_regs(rtc))


def test_month_13_is_clamped_to_december(rtc: Rtc) -> None:
    set_time_bcd(rtc, {MON: 0x13, MDAY: 0x01})
    assert rtc.now() == ts(2024, 12, 1, 23, 59, 58)


# ---- status registers ---------------------------------------------------------------------


def test_status_a_uip_never_set_and_divider_stored(rtc: Rtc) -> None:
    assert rd(rtc, Reg.STATUS_A) == 0x26
    wr(rtc, Reg.STATUS_A, 0xFF)
    assert rd(rtc, Reg.STATUS_A) == 0x7F  # UIP is read-only and always clear
    for _ in range(100):
        assert not rd(rtc, Reg.STATUS_A) & 0x80


def test_status_c_reads_zero(rtc: Rtc) -> None:
    wr(rtc, Reg.STATUS_B, 0x72)  # PIE | AIE | UIE: stored, no interrupts happen
    assert rd(rtc, Reg.STATUS_B) == 0x72
    assert rd(rtc, Reg.STATUS_C) == 0
    wr(rtc, Reg.STATUS_C, 0xFF)
    assert rd(rtc, Reg.STATUS_C) == 0


def test_status_d_reports_a_good_battery(rtc: Rtc) -> None:
    assert rd(rtc, Reg.STATUS_D) == 0x80
    wr(rtc, Reg.STATUS_D, 0x00)
    assert rd(rtc, Reg.STATUS_D) == 0x80


# ---- the index port -----------------------------------------------------------------------


def test_nmi_mask_bit_is_ignored(rtc: Rtc) -> None:
    assert rd(rtc, 0x80 | SEC) == 0x58
    assert rd(rtc, 0x80 | Reg.STATUS_D) == 0x80
    wr(rtc, 0x80 | 0x40, 0x77)
    assert rd(rtc, 0x40) == 0x77


def test_index_port_reads_as_open_bus(rtc: Rtc) -> None:
    rtc.write(INDEX, 0x0D)
    assert rtc.read(INDEX) == 0xFF
    assert rtc.read(0x72) == 0xFF
    rtc.write(0x72, 0x00)
    assert rtc.read(DATA) == 0x80  # index still selects status D


# ---- CMOS memory --------------------------------------------------------------------------


def test_plain_cmos_bytes_are_storage(rtc: Rtc) -> None:
    for index in (0x0E, 0x0F, 0x10, 0x40, 0x7F):
        assert rd(rtc, index) == 0
        wr(rtc, index, index ^ 0xA5)
    for index in (0x0E, 0x0F, 0x10, 0x40, 0x7F):
        assert rd(rtc, index) == index ^ 0xA5
    assert CMOS_SIZE == 128


def test_alarm_registers_are_stored(rtc: Rtc) -> None:
    wr(rtc, Reg.SECONDS_ALARM, 0x30)
    wr(rtc, Reg.MINUTES_ALARM, 0xC0)
    wr(rtc, Reg.HOURS_ALARM, 0x07)
    assert (rd(rtc, 1), rd(rtc, 3), rd(rtc, 5)) == (0x30, 0xC0, 0x07)
    assert rd(rtc, SEC) == 0x58


def memory_bytes(rtc: Rtc) -> dict[int, int]:
    return {i: rd(rtc, i) for i in (0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5B, 0x5C, 0x5D)}


def test_memory_size_bytes_3g_low_2g_high(clock: FakeClock) -> None:
    rtc = Rtc(clock=clock, mem_below_4g=3 * GiB, mem_above_4g=2 * GiB)
    assert memory_bytes(rtc) == {
        0x15: 0x80, 0x16: 0x02,  # 640 KiB
        0x17: 0xFF, 0x18: 0xFF,  # 3 GiB - 1 MiB in KiB, capped at 0xFFFF
        0x30: 0xFF, 0x31: 0xFF,
        0x34: 0x00, 0x35: 0xBF,  # (3 GiB - 16 MiB) / 64 KiB = 0xBF00
        0x5B: 0x00, 0x5C: 0x80, 0x5D: 0x00,  # 2 GiB / 64 KiB = 0x8000
    }


def test_memory_size_bytes_64m(clock: FakeClock) -> None:
    rtc = Rtc(clock=clock, mem_below_4g=64 * MiB)
    assert memory_bytes(rtc) == {
        0x15: 0x80, 0x16: 0x02,
        0x17: 0x00, 0x18: 0xFC,  # 63 MiB = 64512 KiB = 0xFC00
        0x30: 0x00, 0x31: 0xFC,
        0x34: 0x00, 0x35: 0x03,  # 48 MiB / 64 KiB = 0x0300
        0x5B: 0, 0x5C: 0, 0x5D: 0,
    }


def test_memory_size_bytes_tiny_and_huge(clock: FakeClock) -> None:
    tiny = Rtc(clock=clock, mem_below_4g=512 * 1024)
    assert memory_bytes(tiny) == {
        0x15: 0x80, 0x16: 0x02, 0x17: 0, 0x18: 0, 0x30: 0, 0x31: 0, 0x34: 0, 0x35: 0, 0x5B: 0, 0x5C: 0, 0x5D: 0
    }
    huge = Rtc(clock=clock, mem_below_4g=3 * GiB, mem_above_4g=2 << 40)
    assert (rd(huge, 0x5B), rd(huge, 0x5C), rd(huge, 0x5D)) == (0xFF, 0xFF, 0xFF)  # capped
    odd = Rtc(clock=clock, mem_below_4g=20 * MiB + 1000, mem_above_4g=(1 << 32) + 0x1_0000 * 5 + 7)
    assert (rd(odd, 0x17), rd(odd, 0x18)) == (0x00, 0x4C)  # 19 MiB + 1000 B -> 19456 KiB
    assert (rd(odd, 0x34), rd(odd, 0x35)) == (0x40, 0x00)  # 4 MiB above 16 MiB -> 64 units
    assert (rd(odd, 0x5B), rd(odd, 0x5C), rd(odd, 0x5D)) == (0x05, 0x00, 0x01)  # 0x10005 units


def test_default_clock_is_wall_time() -> None:
    import time

    rtc = Rtc()
    before = int(time.time())
    now = rtc.now()
    assert before <= now <= int(time.time())


# ---- from the host: bhyvectl's --set-rtc-time and --get/--set-rtc-nvram -------------------------


def test_the_host_sets_the_time_and_it_runs_on(clock: FakeClock, rtc: Rtc) -> None:
    from asyncvmm.errors import ConfigError

    rtc.set_now(ts(2001, 9, 9, 1, 46, 40))
    assert rtc.now() == 1_000_000_000
    assert time_regs(rtc) == (0x40, 0x46, 0x01, 0x01, 0x09, 0x09, 0x01, 0x20)  # Sunday: weekday 1
    clock.now += 61
    assert rtc.now() == 1_000_000_061
    for bad in (-(10**15), 10**15, "soon", True):
        with pytest.raises(ConfigError):
            rtc.set_now(bad)


def test_the_host_reads_and_writes_nvram_but_not_the_clock(rtc: Rtc) -> None:
    from asyncvmm.errors import ConfigError

    rtc.nvram_write(20, 0x5A)
    assert rtc.nvram_read(20) == 0x5A == rd(rtc, 20)
    assert rtc.nvram_read(SEC) == rd(rtc, SEC)  # the clock reads as the guest sees it
    wr(rtc, 0x40, 7)
    rtc.write(INDEX, 0x40)
    rtc.nvram_read(20)
    assert rtc.read(DATA) == 7  # the guest's index is left alone
    for offset, value in ((SEC, 1), (Reg.STATUS_B, 0), (CENT, 0x19), (CMOS_SIZE, 0), (20, 256), (20, -1)):
        with pytest.raises(ConfigError):
            rtc.nvram_write(offset, value)
    with pytest.raises(ConfigError):
        rtc.nvram_read(CMOS_SIZE)
