"""The MC146818 real-time clock and its CMOS memory, ports 0x70 (index) and 0x71 (data).

The clock is UTC from `clock()` plus whatever the guest sets. Nothing ticks inside the
model: every read of a time register converts the current time to the register's
format (BCD or binary per status B DM, 24 or 12 hour per status B 24/12). Setting the
time follows the datasheet: the guest sets status B SET, which freezes the time
registers, writes them, and clears SET; the written values then become the time, and
the next second begins a full second later. A time register written while SET is clear
takes effect at once, as on the chip, where the counters simply continue from it.

Simplifications a guest cannot tell apart from a chip:

* The update cycle is instantaneous, so status A's UIP (update in progress) always
  reads 0: a guest polling for it to clear never waits, and a read never sees a half-
  updated time, because every read converts one consistent instant.
* No interrupts are generated (no IRQ 8): the periodic, alarm and update-ended enables
  in status B are stored but inert, so status C (the interrupt flags) always reads 0.
* The divider bits in status A are stored but do not stop or start the clock.

The rest of the 128 bytes is plain storage, seeded with the memory sizes PC firmware
reports there (QEMU's layout, which SeaBIOS and others read back).
"""

from __future__ import annotations

import datetime
import enum
import math
import time
from collections.abc import Callable

from ...errors import ConfigError

CMOS_SIZE = 128  # bytes of CMOS, including the clock and status registers
KiB = 1 << 10
MiB = 1 << 20
_OPEN_BUS = 0xFF  # what a read of a port nobody decodes returns
_BYTE_MASK = 0xFF
_WORD_MAX = 0xFFFF  # the largest value of a two-byte CMOS field
_TRIPLE_MAX = 0xFF_FFFF  # the largest value of a three-byte CMOS field
_BASE_MEMORY_KIB = 640  # conventional memory below 1 MiB, as every PC reports it
_CHUNK_64K = 64 * KiB
_EXTENDED_START = 1 * MiB  # "extended memory" is counted from here
_HIGH_START = 16 * MiB  # and the 64 KiB-unit count from here

_SECONDS_PER_MINUTE = 60
_SECONDS_PER_HOUR = 3600
_SECONDS_PER_DAY = 86_400
_HOURS_PER_HALF_DAY = 12
_MONTHS = 12
_YEARS_PER_CENTURY = 100
_NIBBLE_BITS = 4
_NIBBLE_MASK = 0x0F
_EPOCH = datetime.date(1970, 1, 1)
_EPOCH_WEEKDAY = 5  # 1970-01-01 was a Thursday; the RTC counts Sunday as 1
_DAYS_PER_WEEK = 7
_MIN_YEAR, _MAX_YEAR = datetime.MINYEAR, datetime.MAXYEAR
_MIN_SECONDS = (datetime.date(_MIN_YEAR, 1, 1) - _EPOCH).days * _SECONDS_PER_DAY
_MAX_SECONDS = ((datetime.date(_MAX_YEAR, 12, 31) - _EPOCH).days + 1) * _SECONDS_PER_DAY - 1
NVRAM_START = 0x0E  # the first CMOS byte after the clock and its status registers


class Port(enum.IntEnum):
    INDEX = 0x70  # write: selects the CMOS byte (bit 7 is the NMI mask)
    DATA = 0x71  # the selected byte


class Index(enum.IntFlag):
    NMI_DISABLE = 0x80  # bit 7 of the index port masks NMI on a PC; ignored here


class Reg(enum.IntEnum):
    """CMOS offsets."""

    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    WEEKDAY = 0x06  # 1 = Sunday .. 7 = Saturday
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09  # year within the century, 0-99
    STATUS_A = 0x0A
    STATUS_B = 0x0B
    STATUS_C = 0x0C
    STATUS_D = 0x0D
    BASE_MEMORY_LOW = 0x15  # KiB below 1 MiB, low byte
    BASE_MEMORY_HIGH = 0x16
    EXTENDED_MEMORY_LOW = 0x17  # KiB above 1 MiB (capped at 0xFFFF), low byte
    EXTENDED_MEMORY_HIGH = 0x18
    EXTENDED_MEMORY2_LOW = 0x30  # the same count again, where POST reports it
    EXTENDED_MEMORY2_HIGH = 0x31
    CENTURY = 0x32
    HIGH_MEMORY_LOW = 0x34  # 64 KiB units above 16 MiB and below 4 GiB, low byte
    HIGH_MEMORY_HIGH = 0x35
    ABOVE_4G_LOW = 0x5B  # 64 KiB units above 4 GiB, three bytes (QEMU's convention)
    ABOVE_4G_MID = 0x5C
    ABOVE_4G_HIGH = 0x5D


class StatusA(enum.IntFlag):
    RATE = 0x0F  # periodic interrupt rate select (stored only)
    DIVIDER = 0x70  # time base divider select (stored only)
    UIP = 0x80  # update in progress: always reads 0, updates are instantaneous


class StatusB(enum.IntFlag):
    DSE = 0x01  # daylight saving enable (stored, never applied: the clock is UTC)
    HOUR_24 = 0x02  # hours count 0-23; clear: 1-12 with the PM flag in bit 7
    DM_BINARY = 0x04  # time registers in binary; clear: BCD
    SQWE = 0x08  # square wave output (stored only)
    UIE = 0x10  # update-ended interrupt enable (stored only, no IRQ 8)
    AIE = 0x20  # alarm interrupt enable (stored only)
    PIE = 0x40  # periodic interrupt enable (stored only)
    SET = 0x80  # freeze the time registers so the guest can set them


class StatusD(enum.IntFlag):
    VRT = 0x80  # valid RAM and time: the battery is good


class Hour(enum.IntFlag):
    PM = 0x80  # 12-hour mode: afternoon


_TIME_REGS = (
    Reg.SECONDS,
    Reg.MINUTES,
    Reg.HOURS,
    Reg.WEEKDAY,
    Reg.DAY_OF_MONTH,
    Reg.MONTH,
    Reg.YEAR,
    Reg.CENTURY,
)

_DIVIDER_32KHZ = 0x20  # status A divider select for a 32.768 kHz crystal
_RATE_1024HZ = 0x06  # status A rate select for a 1024 Hz periodic rate
_DEFAULT_STATUS_A = _DIVIDER_32KHZ | _RATE_1024HZ  # what PC firmware programs
_DEFAULT_STATUS_B = StatusB.HOUR_24  # 24-hour, BCD


def _to_bcd(value: int) -> int:
    return ((value // 10) << _NIBBLE_BITS) | (value % 10)


def _from_bcd(value: int) -> int:
    # Nibbles above 9 are not BCD; the chip would count on from them regardless.
    return (value >> _NIBBLE_BITS) * 10 + (value & _NIBBLE_MASK)


def _memory_bytes(mem_below_4g: int, mem_above_4g: int) -> dict[int, int]:
    base = _BASE_MEMORY_KIB
    extended = min(max(mem_below_4g - _EXTENDED_START, 0) // KiB, _WORD_MAX)
    high = min(max(mem_below_4g - _HIGH_START, 0) // _CHUNK_64K, _WORD_MAX)
    above = min(max(mem_above_4g, 0) // _CHUNK_64K, _TRIPLE_MAX)
    fields = {
        Reg.BASE_MEMORY_LOW: base,
        Reg.EXTENDED_MEMORY_LOW: extended,
        Reg.EXTENDED_MEMORY2_LOW: extended,
        Reg.HIGH_MEMORY_LOW: high,
    }
    out: dict[int, int] = {}
    for low, value in fields.items():
        out[low] = value & _BYTE_MASK
        out[low + 1] = (value >> 8) & _BYTE_MASK
    out[Reg.ABOVE_4G_LOW] = above & _BYTE_MASK
    out[Reg.ABOVE_4G_MID] = (above >> 8) & _BYTE_MASK
    out[Reg.ABOVE_4G_HIGH] = (above >> 16) & _BYTE_MASK
    return out


class Rtc:
    """MC146818 RTC plus 128 bytes of CMOS."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        mem_below_4g: int = 0,
        mem_above_4g: int = 0,
    ) -> None:
        self._clock = clock
        self._cmos = bytearray(CMOS_SIZE)
        for offset, value in _memory_bytes(mem_below_4g, mem_above_4g).items():
            self._cmos[offset] = value
        self._index = 0
        self._status_a = _DEFAULT_STATUS_A
        self._status_b: int = _DEFAULT_STATUS_B
        # RTC time = _set_to + seconds elapsed on clock() since _set_at (whole seconds).
        self._set_at = 0.0
        self._set_to = 0
        self._weekday_shift = 0  # the guest may set a weekday that disagrees with the date
        self._frozen: dict[int, int] | None = None  # time register bytes while SET is set

    # ---- ports --------------------------------------------------------------------------

    def read(self, port: int) -> int:
        if port != Port.DATA:
            return _OPEN_BUS  # the index port is write-only
        index = self._index
        if index in _TIME_REGS:
            if self._frozen is not None:
                return self._frozen[index]
            return int(self._time_bytes()[index])
        if index == Reg.STATUS_A:
            return int(self._status_a & ~int(StatusA.UIP))
        if index == Reg.STATUS_B:
            return int(self._status_b)
        if index == Reg.STATUS_C:
            return 0  # no interrupt flags: none are ever raised (reading would clear them)
        if index == Reg.STATUS_D:
            return int(StatusD.VRT)
        return self._cmos[index]

    def write(self, port: int, value: int) -> None:
        value &= _BYTE_MASK
        if port == Port.INDEX:
            self._index = (value & ~int(Index.NMI_DISABLE)) % CMOS_SIZE
            return
        if port != Port.DATA:
            return
        index = self._index
        if index in _TIME_REGS:
            if self._frozen is not None:
                self._frozen[index] = value
            else:
                registers = self._time_bytes()
                registers[index] = value
                self._set_time(registers)
        elif index == Reg.STATUS_A:
            self._status_a = int(value & ~int(StatusA.UIP))  # UIP is read-only
        elif index == Reg.STATUS_B:
            self._write_status_b(value)
        elif index in (Reg.STATUS_C, Reg.STATUS_D):
            pass  # read-only
        else:
            self._cmos[index] = value

    # ---- time ---------------------------------------------------------------------------

    def now(self) -> int:
        """The RTC's current time as a Unix timestamp (whole seconds, UTC)."""
        return self._set_to + math.floor(self._clock() - self._set_at)

    def set_now(self, seconds: int) -> None:
        """Set the clock from the host (bhyvectl's --set-rtc-time): a Unix time, UTC.
        A guest in the middle of setting the time (SET) keeps its frozen registers."""
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ConfigError(f"RTC time {seconds!r}: a number of seconds since 1970-01-01 UTC")
        if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
            raise ConfigError(f"RTC time {seconds}: the RTC counts years {_MIN_YEAR} to {_MAX_YEAR}")
        self._set_at = self._clock()
        self._set_to = seconds
        self._weekday_shift = 0

    def nvram_read(self, offset: int) -> int:
        """A CMOS byte as the guest would read it (the clock's registers included)."""
        self._check_offset(offset)
        saved, self._index = self._index, offset
        try:
            return self.read(Port.DATA)
        finally:
            self._index = saved

    def nvram_write(self, offset: int, value: int) -> None:
        """Write a CMOS byte from the host; the clock, its status registers and the
        century are refused (as bhyve's vrtc does): set the time with set_now()."""
        self._check_offset(offset)
        if offset < NVRAM_START or offset == Reg.CENTURY:
            raise ConfigError(
                f"RTC NVRAM offset {offset}: that byte is the clock's (offsets {NVRAM_START}-{CMOS_SIZE - 1}, "
                f"not {int(Reg.CENTURY)}, are NVRAM)"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _BYTE_MASK:
            raise ConfigError(f"RTC NVRAM value {value!r}: a byte (0 to 255)")
        self._cmos[offset] = value

    @staticmethod
    def _check_offset(offset: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < CMOS_SIZE:
            raise ConfigError(f"RTC NVRAM offset {offset!r}: 0 to {CMOS_SIZE - 1}")

    def _write_status_b(self, value: int) -> None:
        old = self._status_b
        if value & StatusB.SET and not old & StatusB.SET:
            # Freeze the registers as they read now, in the format they were counting in.
            self._frozen = self._time_bytes()
            value &= ~int(StatusB.UIE)  # setting SET clears UIE (datasheet)
        self._status_b = int(value)
        if not value & StatusB.SET and self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._set_time(frozen)

    def _time_bytes(self) -> dict[int, int]:
        """The time registers' bytes for the current instant, in the current format."""
        seconds = self.now()
        days, second_of_day = divmod(seconds, _SECONDS_PER_DAY)
        try:
            date = _EPOCH + datetime.timedelta(days=days)
        except OverflowError:
            date = datetime.date.max if days > 0 else datetime.date.min
        hour, rest = divmod(second_of_day, _SECONDS_PER_HOUR)
        minute, second = divmod(rest, _SECONDS_PER_MINUTE)
        weekday = (days + _EPOCH_WEEKDAY - 1 + self._weekday_shift) % _DAYS_PER_WEEK + 1
        binary = bool(self._status_b & StatusB.DM_BINARY)

        def encode(value: int) -> int:
            return value if binary else _to_bcd(value)

        if self._status_b & StatusB.HOUR_24:
            hour_byte = encode(hour)
        else:
            hour_byte = encode(hour % _HOURS_PER_HALF_DAY or _HOURS_PER_HALF_DAY)
            if hour >= _HOURS_PER_HALF_DAY:
                hour_byte |= int(Hour.PM)
        return {
            Reg.SECONDS: encode(second),
            Reg.MINUTES: encode(minute),
            Reg.HOURS: hour_byte,
            Reg.WEEKDAY: encode(weekday),
            Reg.DAY_OF_MONTH: encode(date.day),
            Reg.MONTH: encode(date.month),
            Reg.YEAR: encode(date.year % _YEARS_PER_CENTURY),
            Reg.CENTURY: encode(date.year // _YEARS_PER_CENTURY),
        }

    def _set_time(self, registers: dict[int, int]) -> None:
        """Make the time register bytes (in the current format) the current time."""
        binary = bool(self._status_b & StatusB.DM_BINARY)

        def decode(value: int) -> int:
            return value if binary else _from_bcd(value)

        raw_hour = registers[Reg.HOURS]
        if self._status_b & StatusB.HOUR_24:
            hour = decode(raw_hour)
        else:
            hour = decode(raw_hour & ~int(Hour.PM)) % _HOURS_PER_HALF_DAY
            if raw_hour & Hour.PM:
                hour += _HOURS_PER_HALF_DAY
        year = decode(registers[Reg.CENTURY]) * _YEARS_PER_CENTURY + decode(registers[Reg.YEAR])
        year = min(max(year, _MIN_YEAR), _MAX_YEAR)
        month = min(max(decode(registers[Reg.MONTH]), 1), _MONTHS)
        # Out-of-range days, hours, minutes and seconds carry into the next unit rather
        # than fail: a guest's odd values give an odd time, never an error.
        days = (datetime.date(year, month, 1) - _EPOCH).days + decode(registers[Reg.DAY_OF_MONTH]) - 1
        seconds = (
            days * _SECONDS_PER_DAY
            + hour * _SECONDS_PER_HOUR
            + decode(registers[Reg.MINUTES]) * _SECONDS_PER_MINUTE
            + decode(registers[Reg.SECONDS])
        )
        self._set_at = self._clock()
        self._set_to = seconds
        computed_weekday = (seconds // _SECONDS_PER_DAY + _EPOCH_WEEKDAY - 1) % _DAYS_PER_WEEK
        self._weekday_shift = (decode(registers[Reg.WEEKDAY]) - 1 - computed_weekday) % _DAYS_PER_WEEK
