"""The Intel 8254 programmable interval timer (PIT), with the PC's port 0x61.

The model is synchronous and pure: the port dispatcher calls `read(port)` and
`write(port, value)` with absolute port numbers (0x40-0x43 and 0x61); time comes from
the `clock` it is handed (nanoseconds, monotonic), so a test drives it with a fake one.
It raises no interrupt itself: whoever wires channel 0 to IRQ0 asks `next_edge(0, now)`
when the next rising edge of OUT0 is due (a PC's IRQ0 is edge-triggered on it) and calls
`changed` after every guest write, which may move that edge.

What a PC wires to the three counters, all clocked at 1.193182 MHz:

* channel 0: gate tied high, OUT0 is IRQ0 (the system timer);
* channel 1: gate tied high, OUT1 unused (DRAM refresh once);
* channel 2: gate is bit 0 of port 0x61, OUT2 reads back as bit 5 of port 0x61 and,
  ANDed with bit 1, drives the speaker. Linux times its TSC calibration with it.

What the model simplifies, and why a guest cannot tell:

* The counters are computed from elapsed time when read, never stepped; a counter
  starts counting at the moment its count is written (a real chip waits for the next
  CLK edge, under a microsecond).
* A new count written in modes 2 and 3 starts a new period at once (a real chip waits
  for the current one to end): Linux writes the count once, after the control word.
* BCD counting is stored and reported in the status byte but the counter counts in
  binary (no PC operating system uses BCD mode).
* Port 0x61's refresh toggle (bit 4) flips every 15.085 us of host time, as the refresh
  request it once reflected did; the NMI status bits (6, 7) read 0: no parity errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

PIT_HZ = 1_193_182  # input clock of all three counters: 14.31818 MHz / 12
NS_PER_S = 1_000_000_000
CHANNELS = 3
REFRESH_PERIOD_NS = 15_085  # port 0x61 bit 4 toggles this often
_BYTE_MASK = 0xFF
_OPEN_BUS = 0xFF


class Port(enum.IntEnum):
    CHANNEL0 = 0x40  # counter 0 (IRQ0)
    CHANNEL1 = 0x41
    CHANNEL2 = 0x42  # counter 2 (speaker, gated by port 0x61)
    CONTROL = 0x43  # control word (write only)
    SYSTEM_CONTROL_B = 0x61  # NMI status and control: gate 2, speaker, OUT2


class Control(enum.IntFlag):
    """The control word written to port 0x43: SC1 SC0 RW1 RW0 M2 M1 M0 BCD."""

    BCD = 0x01
    MODE_MASK = 0x0E  # M2..M0, bits 3-1
    RW_MASK = 0x30  # RW1 RW0, bits 5-4: 0 is a counter latch command
    SELECT_MASK = 0xC0  # SC1 SC0, bits 7-6: the channel; 3 is the read-back command


SELECT_SHIFT = 6
RW_SHIFT = 4
MODE_SHIFT = 1
READ_BACK = 3  # SC1 SC0 = 11


class ReadBack(enum.IntFlag):
    """The read-back command (SC = 11): bits 5 and 4 are active low."""

    CNT0 = 0x02
    CNT1 = 0x04
    CNT2 = 0x08
    NOT_STATUS = 0x10  # 0: latch the selected counters' status
    NOT_COUNT = 0x20  # 0: latch the selected counters' count


class Status(enum.IntFlag):
    """A counter's status byte (after a read-back): the control bits, OUT, NULL COUNT."""

    NULL_COUNT = 0x40  # a count was written but not yet loaded into the counter
    OUTPUT = 0x80  # the level of OUT


class Access(enum.IntEnum):
    """RW1 RW0: how the counter's 16 bits are moved through its 8-bit port."""

    LATCH = 0  # counter latch command, not an access mode
    LSB = 1  # low byte only
    MSB = 2  # high byte only
    LSB_MSB = 3  # low byte, then high byte


class Mode(enum.IntEnum):
    """M2 M1 M0 (6 and 7 are aliases of 2 and 3)."""

    INTERRUPT_ON_TERMINAL_COUNT = 0  # OUT low until the count runs out, then high
    ONE_SHOT = 1  # hardware-retriggerable one-shot: OUT low for N after a gate edge
    RATE_GENERATOR = 2  # OUT high, low for one clock every N
    SQUARE_WAVE = 3  # OUT high for N/2, low for N/2
    SOFTWARE_STROBE = 4  # OUT high, low for one clock N after the count is written
    HARDWARE_STROBE = 5  # the same, N after a gate edge


class SystemControlB(enum.IntFlag):
    """Port 0x61 (what a PC's chipset keeps of the AT's port B)."""

    GATE2 = 0x01  # timer 2 gate (read/write)
    SPEAKER = 0x02  # speaker data enable (read/write)
    PARITY_CHECK_DISABLE = 0x04  # (read/write, no effect)
    CHANNEL_CHECK_DISABLE = 0x08  # (read/write, no effect)
    REFRESH = 0x10  # refresh toggle (read only)
    OUT2 = 0x20  # timer 2 output (read only)
    CHANNEL_CHECK = 0x40  # IOCHK NMI source (read only, never set here)
    PARITY_ERROR = 0x80  # SERR NMI source (read only, never set here)


_PORT_B_WRITABLE = (
    SystemControlB.GATE2 | SystemControlB.SPEAKER
    | SystemControlB.PARITY_CHECK_DISABLE | SystemControlB.CHANNEL_CHECK_DISABLE
)


def ticks_to_ns(ticks: int) -> int:
    """Nanoseconds until `ticks` input clocks have passed (rounded up)."""
    return -(-ticks * NS_PER_S // PIT_HZ)


class _Counter:
    """One counter's registers and where it is in its count.

    The count in progress is kept as (`start_ns`, `offset`): `offset` clocks had passed
    when the time base was last moved to `start_ns`; `counting` is False while the gate
    holds it (modes 0, 2, 3, 4) or while it waits for a trigger (modes 1, 5) or a count.
    """

    def __init__(self, gate: bool):
        self.mode = Mode.INTERRUPT_ON_TERMINAL_COUNT
        self.access = Access.LSB_MSB
        self.bcd = False
        self.gate = gate
        self.reload = 0x10000  # N; a written 0 means 65536
        self.null_count = True  # a count was written and not yet loaded
        self.loaded = False  # a count has been loaded: OUT follows the mode's waveform
        self.counting = False
        self.start_ns = 0
        self.offset = 0
        self.write_lsb_next = True  # LSB_MSB: the next write is the low byte
        self.read_lsb_next = True
        self.partial = 0  # the low byte of a count being written in two halves
        self.latched_count: list[int] = []  # bytes a latch command left to read
        self.latched_status: int | None = None

    # -- time --------------------------------------------------------------------------
    def elapsed(self, now: int) -> int:
        """Input clocks counted since the count was loaded (or the trigger)."""
        if not self.counting:
            return self.offset
        return self.offset + (now - self.start_ns) * PIT_HZ // NS_PER_S

    def start(self, now: int, offset: int = 0) -> None:
        self.start_ns, self.offset, self.counting = now, offset, True

    def hold(self, now: int) -> None:
        self.offset, self.counting = self.elapsed(now), False

    # -- the waveform ------------------------------------------------------------------
    def count(self, now: int) -> int:
        """The counting element's value (what a latch captures)."""
        n = self.reload
        if not self.loaded:
            return 0
        t = self.elapsed(now)
        if self.mode == Mode.RATE_GENERATOR:
            return n - t % n
        if self.mode == Mode.SQUARE_WAVE:
            return (n - 2 * t % n) & 0xFFFE  # down by two, twice per period
        # Modes 0, 1, 4, 5 count N down to 0 and then wrap through 0xFFFF.
        return (n - t) & 0xFFFF

    def output(self, now: int) -> bool:
        """The level of OUT."""
        mode = self.mode
        if mode == Mode.INTERRUPT_ON_TERMINAL_COUNT:
            return self.loaded and self.elapsed(now) >= self.reload
        if mode == Mode.ONE_SHOT:
            return not (self.loaded and self.counting_since_trigger and self.elapsed(now) < self.reload)
        if not self.loaded:
            return True
        t = self.elapsed(now)
        n = self.reload
        if mode == Mode.RATE_GENERATOR:
            return not (self.gate and t % n == n - 1)
        if mode == Mode.SQUARE_WAVE:
            return not self.gate or t % n < (n + 1) // 2
        # Strobes: one clock low when the count reaches 0, once.
        if mode == Mode.SOFTWARE_STROBE or self.counting_since_trigger:
            return t != n
        return True

    @property
    def counting_since_trigger(self) -> bool:
        return self.counting or self.offset > 0

    def next_edge(self, now: int) -> int | None:
        """When OUT next rises after `now` (ns), or None if it will not on its own.

        A `now` before the count started means the first edge of this count."""
        if not self.loaded or not self.counting:
            return None
        t = self.elapsed(max(now, self.start_ns))
        n = self.reload
        mode = self.mode
        if mode in (Mode.INTERRUPT_ON_TERMINAL_COUNT, Mode.ONE_SHOT):
            edge = n  # OUT rises when the count runs out
            if t >= edge:
                return None
        elif mode == Mode.RATE_GENERATOR:
            edge = (t // n + 1) * n  # the end of each one-clock low pulse
        elif mode == Mode.SQUARE_WAVE:
            edge = (t // n + 1) * n  # the start of each high half
        else:  # strobes: back high one clock after the count ran out
            edge = n + 1
            if t >= edge:
                return None
        return self.start_ns + ticks_to_ns(edge - self.offset)


class I8254:
    """The PIT and port 0x61. See the module docstring."""

    def __init__(self, clock: Callable[[], int], changed: Callable[[], None] = lambda: None):
        self._clock = clock
        self._changed = changed
        self._counters = [_Counter(gate=(i != 2)) for i in range(CHANNELS)]
        self._port_b = 0  # the writable bits of port 0x61
        self.counters = {"writes": 0, "reads": 0, "programmed": 0}

    # ---- the guest's side ---------------------------------------------------------------
    def read(self, port: int) -> int:
        self.counters["reads"] += 1
        now = self._clock()
        if port == Port.SYSTEM_CONTROL_B:
            return self._read_port_b(now)
        if Port.CHANNEL0 <= port <= Port.CHANNEL2:
            return self._read_counter(self._counters[port - Port.CHANNEL0], now)
        return _OPEN_BUS  # the control word cannot be read back

    def write(self, port: int, value: int) -> None:
        self.counters["writes"] += 1
        value &= _BYTE_MASK
        now = self._clock()
        if port == Port.SYSTEM_CONTROL_B:
            self._port_b = value & _PORT_B_WRITABLE
            self._set_gate(self._counters[2], bool(value & SystemControlB.GATE2), now)
        elif port == Port.CONTROL:
            self._write_control(value, now)
        elif Port.CHANNEL0 <= port <= Port.CHANNEL2:
            self._write_counter(self._counters[port - Port.CHANNEL0], value, now)
        else:
            return
        self._changed()

    # ---- the host's side ----------------------------------------------------------------
    def next_edge(self, channel: int, now: int | None = None) -> int | None:
        """When OUT of `channel` next rises (clock ns), or None: nothing is due."""
        return self._counters[channel].next_edge(self._clock() if now is None else now)

    def output(self, channel: int, now: int | None = None) -> bool:
        return self._counters[channel].output(self._clock() if now is None else now)

    def mode(self, channel: int) -> Mode:
        return self._counters[channel].mode

    def reload(self, channel: int) -> int:
        """The count N the channel was programmed with (65536 for a written 0)."""
        return self._counters[channel].reload

    # ---- registers ----------------------------------------------------------------------
    def _read_port_b(self, now: int) -> int:
        value = self._port_b
        if (now // REFRESH_PERIOD_NS) & 1:
            value |= SystemControlB.REFRESH
        if self._counters[2].output(now):
            value |= SystemControlB.OUT2
        return value

    def _write_control(self, value: int, now: int) -> None:
        select = (value & Control.SELECT_MASK) >> SELECT_SHIFT
        if select == READ_BACK:
            for i in range(CHANNELS):
                if value & (ReadBack.CNT0 << i):
                    c = self._counters[i]
                    if not value & ReadBack.NOT_COUNT:
                        self._latch_count(c, now)
                    if not value & ReadBack.NOT_STATUS and c.latched_status is None:
                        c.latched_status = self._status(c, now)
            return
        c = self._counters[select]
        access = (value & Control.RW_MASK) >> RW_SHIFT
        if access == Access.LATCH:
            self._latch_count(c, now)
            return
        self.counters["programmed"] += 1
        mode = (value & Control.MODE_MASK) >> MODE_SHIFT
        c.mode = Mode(mode & 3 if mode >= 6 else mode)
        c.access = Access(access)
        c.bcd = bool(value & Control.BCD)
        # Writing a control word stops the counter until a count is written; OUT takes
        # its initial level: low in mode 0, high in the others.
        c.loaded = False
        c.counting = False
        c.offset = 0
        c.null_count = True
        c.write_lsb_next = c.read_lsb_next = True
        c.latched_count.clear()
        c.latched_status = None

    def _write_counter(self, c: _Counter, value: int, now: int) -> None:
        if c.access == Access.LSB:
            count = value
        elif c.access == Access.MSB:
            count = value << 8
        elif c.write_lsb_next:
            c.partial = value
            c.write_lsb_next = False
            if c.mode == Mode.INTERRUPT_ON_TERMINAL_COUNT:
                c.hold(now)  # mode 0: writing the first byte stops the count
                c.loaded = False
            return
        else:
            count = c.partial | (value << 8)
            c.write_lsb_next = True
        c.reload = count or 0x10000
        c.null_count = False
        if c.mode in (Mode.ONE_SHOT, Mode.HARDWARE_STROBE):
            c.loaded = True  # armed: counting starts at the next gate rising edge
            c.counting = False
            c.offset = 0
            return
        c.loaded = True
        if c.gate:
            c.start(now)
        else:
            c.counting = False
            c.offset = 0

    def _read_counter(self, c: _Counter, now: int) -> int:
        if c.latched_status is not None:
            status, c.latched_status = c.latched_status, None
            return status
        if c.latched_count:
            return c.latched_count.pop(0)
        value = c.count(now)
        if c.access == Access.LSB:
            return value & _BYTE_MASK
        if c.access == Access.MSB:
            return value >> 8 & _BYTE_MASK
        lsb = c.read_lsb_next
        c.read_lsb_next = not lsb
        return value & _BYTE_MASK if lsb else value >> 8 & _BYTE_MASK

    def _latch_count(self, c: _Counter, now: int) -> None:
        if c.latched_count:
            return  # a latch not yet read out holds (further latches are ignored)
        value = c.count(now)
        if c.access == Access.LSB:
            c.latched_count = [value & _BYTE_MASK]
        elif c.access == Access.MSB:
            c.latched_count = [value >> 8 & _BYTE_MASK]
        elif c.read_lsb_next:
            c.latched_count = [value & _BYTE_MASK, value >> 8 & _BYTE_MASK]
        else:  # the guest is between the two halves of an unlatched read
            c.latched_count = [value >> 8 & _BYTE_MASK, value & _BYTE_MASK]

    def _status(self, c: _Counter, now: int) -> int:
        status = (c.access << RW_SHIFT) | (c.mode << MODE_SHIFT) | int(c.bcd)
        if c.output(now):
            status |= Status.OUTPUT
        if c.null_count:
            status |= Status.NULL_COUNT
        return status

    def _set_gate(self, c: _Counter, gate: bool, now: int) -> None:
        if gate == c.gate:
            return
        c.gate = gate
        if not c.loaded:
            return
        if c.mode in (Mode.ONE_SHOT, Mode.HARDWARE_STROBE, Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
            if gate:
                c.start(now)  # a rising gate (re)triggers these modes from N
            elif c.mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
                c.hold(now)  # a low gate stops the count (OUT is forced high)
        elif gate:  # modes 0 and 4: the gate only suspends counting
            c.start(now, c.offset)
        else:
            c.hold(now)
