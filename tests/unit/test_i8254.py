"""The i8254 PIT model, driven by a fake clock: what Linux does to it, read back as a
chip would answer."""

import pytest

from asyncvmm.devices.legacy.i8254 import (
    I8254,
    PIT_HZ,
    Mode,
    Port,
    Status,
    SystemControlB,
    ticks_to_ns,
)


class Clock:
    def __init__(self):
        self.ns = 1_000_000_000

    def __call__(self):
        return self.ns

    def ticks(self, n):
        """Advance by exactly n input clocks (from a tick boundary of the start)."""
        self.ns += ticks_to_ns(n)


@pytest.fixture
def pit():
    clock = Clock()
    changes = []
    p = I8254(clock, changed=lambda: changes.append(clock.ns))
    p.clock, p.changes = clock, changes
    return p


def program(pit, channel, mode, count, access=3):
    pit.write(Port.CONTROL, channel << 6 | access << 4 | mode << 1)
    if access in (1, 3):
        pit.write(Port.CHANNEL0 + channel, count & 0xFF)
    if access in (2, 3):
        pit.write(Port.CHANNEL0 + channel, count >> 8 & 0xFF)


def latch(pit, channel):
    pit.write(Port.CONTROL, channel << 6)  # counter latch command
    return pit.read(Port.CHANNEL0 + channel) | pit.read(Port.CHANNEL0 + channel) << 8


def test_linux_periodic_tick_mode_2(pit):
    # clockevent_i8253 periodic: control 0x34 (channel 0, lo/hi, mode 2), LATCH = 11932 (HZ 100).
    latch_count = (PIT_HZ + 50) // 100
    pit.write(Port.CONTROL, 0x34)
    pit.write(Port.CHANNEL0, latch_count & 0xFF)
    pit.write(Port.CHANNEL0, latch_count >> 8)
    assert pit.mode(0) == Mode.RATE_GENERATOR and pit.reload(0) == latch_count
    start = pit.clock.ns
    first = pit.next_edge(0)
    assert first == start + ticks_to_ns(latch_count)  # one period: about 10 ms
    assert 9_990_000 < first - start < 10_010_000
    pit.clock.ns = first
    assert pit.next_edge(0) == start + ticks_to_ns(2 * latch_count)
    assert pit.changes  # every write told the wiring


def test_counter_counts_down_and_reloads(pit):
    program(pit, 0, Mode.RATE_GENERATOR, 1000)
    assert latch(pit, 0) == 1000
    pit.clock.ticks(300)
    assert latch(pit, 0) == 700
    pit.clock.ticks(700)  # a full period: reloaded
    assert latch(pit, 0) == 1000


def test_mode_2_output_pulses_low_for_one_clock(pit):
    program(pit, 0, Mode.RATE_GENERATOR, 10)
    assert pit.output(0)
    pit.clock.ticks(9)
    assert not pit.output(0)
    pit.clock.ticks(1)
    assert pit.output(0)


def test_mode_3_square_wave(pit):
    program(pit, 0, Mode.SQUARE_WAVE, 100)
    assert pit.output(0)
    assert latch(pit, 0) == 100
    pit.clock.ticks(10)
    assert latch(pit, 0) == 80  # counts by two
    pit.clock.ticks(45)
    assert not pit.output(0)  # second half of the period
    start_next = pit.next_edge(0)
    assert start_next is not None and start_next > pit.clock.ns


def test_mode_0_one_shot_interrupt(pit):
    program(pit, 0, Mode.INTERRUPT_ON_TERMINAL_COUNT, 500)
    assert not pit.output(0)  # low while counting
    edge = pit.next_edge(0)
    pit.clock.ticks(499)
    assert not pit.output(0)
    pit.clock.ticks(1)
    assert pit.output(0) and pit.clock.ns >= edge
    assert pit.next_edge(0) is None  # no second edge
    pit.clock.ticks(10)
    assert latch(pit, 0) == (500 - 510) & 0xFFFF  # wraps through 0xFFFF


def test_mode_4_strobe_used_by_linux_oneshot(pit):
    # clockevent_i8253 oneshot: control 0x38 (mode 4), then the delta.
    pit.write(Port.CONTROL, 0x38)
    pit.write(Port.CHANNEL0, 100)
    pit.write(Port.CHANNEL0, 0)
    start = pit.clock.ns
    assert pit.next_edge(0) == start + ticks_to_ns(101)
    pit.clock.ticks(100)
    assert not pit.output(0)
    pit.clock.ticks(1)
    assert pit.output(0)
    assert pit.next_edge(0) is None
    # Shutdown: control 0x30 and count 0 stop it for good.
    pit.write(Port.CONTROL, 0x30)
    assert pit.next_edge(0) is None


def test_control_word_stops_counter_until_count_written(pit):
    program(pit, 0, Mode.RATE_GENERATOR, 1000)
    pit.write(Port.CONTROL, 0x34)
    assert pit.next_edge(0) is None
    pit.write(Port.CHANNEL0, 0x00)
    assert pit.next_edge(0) is None  # only the low byte so far
    pit.write(Port.CHANNEL0, 0x00)  # 0 means 65536
    assert pit.reload(0) == 0x10000


def test_linux_tsc_calibration_on_channel_2(pit):
    # pit_calibrate_tsc: gate 2 high and speaker off, mode 0 on channel 2, poll OUT2.
    port_b = pit.read(Port.SYSTEM_CONTROL_B)
    pit.write(Port.SYSTEM_CONTROL_B, (port_b & ~0x02) | 0x01)
    pit.write(Port.CONTROL, 0xB0)
    latch_count = PIT_HZ // (1000 // 10)  # 10 ms
    pit.write(Port.CHANNEL2, latch_count & 0xFF)
    pit.write(Port.CHANNEL2, latch_count >> 8)
    assert not pit.read(Port.SYSTEM_CONTROL_B) & SystemControlB.OUT2
    pit.clock.ns += 9_900_000
    assert not pit.read(Port.SYSTEM_CONTROL_B) & SystemControlB.OUT2
    pit.clock.ns += 200_000
    assert pit.read(Port.SYSTEM_CONTROL_B) & SystemControlB.OUT2


def test_gate_2_low_holds_mode_0(pit):
    pit.write(Port.CONTROL, 0xB0)  # channel 2, mode 0; gate still low
    pit.write(Port.CHANNEL2, 100)
    pit.write(Port.CHANNEL2, 0)
    pit.clock.ticks(1000)
    assert not pit.output(2)  # not counting without the gate
    pit.write(Port.SYSTEM_CONTROL_B, SystemControlB.GATE2)
    pit.clock.ticks(60)
    pit.write(Port.SYSTEM_CONTROL_B, 0)  # suspend at 60
    pit.clock.ticks(1000)
    assert latch(pit, 2) == 40
    pit.write(Port.SYSTEM_CONTROL_B, SystemControlB.GATE2)
    pit.clock.ticks(40)
    assert pit.output(2)


def test_quick_pit_calibrate_reads_msb_without_latch(pit):
    # quick_pit_calibrate: mode 0, 0xFFFF, then inb(0x42) twice per sample (LSB, MSB).
    pit.write(Port.SYSTEM_CONTROL_B, SystemControlB.GATE2)
    pit.write(Port.CONTROL, 0xB0)
    pit.write(Port.CHANNEL2, 0xFF)
    pit.write(Port.CHANNEL2, 0xFF)
    msbs = []
    for _ in range(5):
        pit.read(Port.CHANNEL2)
        msbs.append(pit.read(Port.CHANNEL2))
        pit.clock.ticks(256)
    assert msbs == [0xFF, 0xFE, 0xFD, 0xFC, 0xFB]


def test_one_shot_mode_1_triggered_by_gate(pit):
    pit.write(Port.CONTROL, 0xB2)  # channel 2, mode 1
    pit.write(Port.CHANNEL2, 50)
    pit.write(Port.CHANNEL2, 0)
    assert pit.output(2)  # armed, waiting for a gate edge
    pit.write(Port.SYSTEM_CONTROL_B, SystemControlB.GATE2)
    assert not pit.output(2)
    pit.clock.ticks(50)
    assert pit.output(2)


def test_read_back_status_and_count(pit):
    program(pit, 1, Mode.RATE_GENERATOR, 0x1234)
    pit.clock.ticks(0x34)
    pit.write(Port.CONTROL, 0xC0 | 0x04)  # read-back: count and status of counter 1
    status = pit.read(Port.CHANNEL1)
    assert status & 0x3F == (3 << 4 | Mode.RATE_GENERATOR << 1)
    assert status & Status.OUTPUT and not status & Status.NULL_COUNT
    assert pit.read(Port.CHANNEL1) | pit.read(Port.CHANNEL1) << 8 == 0x1200


def test_status_shows_null_count_before_the_count(pit):
    pit.write(Port.CONTROL, 0x34)
    pit.write(Port.CONTROL, 0xE2)  # read-back status only, counter 0
    assert pit.read(Port.CHANNEL0) & Status.NULL_COUNT


def test_latch_holds_until_read(pit):
    program(pit, 0, Mode.RATE_GENERATOR, 1000)
    pit.write(Port.CONTROL, 0x00)
    pit.clock.ticks(100)
    pit.write(Port.CONTROL, 0x00)  # a second latch before the first is read: ignored
    assert pit.read(Port.CHANNEL0) | pit.read(Port.CHANNEL0) << 8 == 1000


def test_lsb_only_access(pit):
    program(pit, 0, Mode.RATE_GENERATOR, 200, access=1)
    assert pit.reload(0) == 200
    pit.clock.ticks(50)
    assert pit.read(Port.CHANNEL0) == 150


def test_port_61_keeps_its_writable_bits_and_toggles_refresh(pit):
    pit.write(Port.SYSTEM_CONTROL_B, 0xFF)
    value = pit.read(Port.SYSTEM_CONTROL_B)
    assert value & 0x0F == 0x0F and not value & 0xC0
    seen = set()
    for _ in range(4):
        pit.clock.ns += 15_085
        seen.add(pit.read(Port.SYSTEM_CONTROL_B) & SystemControlB.REFRESH)
    assert seen == {0, SystemControlB.REFRESH}


def test_control_port_reads_open_bus(pit):
    assert pit.read(Port.CONTROL) == 0xFF
