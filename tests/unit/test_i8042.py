"""The i8042 model driven directly: the reset line and the commands Linux probes with."""

from __future__ import annotations

import pytest

from asyncvmm.devices.legacy.i8042 import I8042, Command, CommandByte, OutputPort, Port, Status

DATA, CMD = 0x60, 0x64


class Harness:
    def __init__(self) -> None:
        self.resets = 0
        self.kbc = I8042(self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def command(self, value: int) -> None:
        self.kbc.write(CMD, value)

    def status(self) -> int:
        return self.kbc.read(CMD)

    def reply(self) -> int:
        """Read a reply the way Linux does: OBF must be set first."""
        assert self.status() & Status.OBF
        value = self.kbc.read(DATA)
        assert not self.status() & Status.OBF
        return value


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_port_numbers() -> None:
    assert Port.DATA == 0x60 and Port.STATUS == Port.COMMAND == 0x64
    assert Command.PULSE_RESET == 0xFE and Command.WRITE_OUTPUT_PORT == 0xD1


def test_idle_status_has_nothing_to_read_and_room_to_write(h: Harness) -> None:
    status = h.status()
    assert status == 0x14  # UNLOCKED | SYS (the POST flag from the command byte)
    assert not status & Status.OBF
    assert not status & Status.IBF


def test_status_cmd_bit_tracks_the_last_port_written(h: Harness) -> None:
    h.command(Command.ENABLE_KBD)
    assert h.status() == 0x1C
    h.kbc.write(DATA, 0xF4)  # a byte for the (absent) keyboard
    assert h.status() == 0x14


def test_pulse_reset(h: Harness) -> None:
    h.command(0xFE)
    assert h.resets == 1
    assert h.kbc.resets == 1
    h.command(0xFE)
    assert h.resets == 2


@pytest.mark.parametrize("command, resets", [(0xF0, 1), (0xFC, 1), (0xF1, 0), (0xFF, 0), (0xFD, 0)])
def test_pulse_commands_reset_only_when_line_0_is_pulsed(h: Harness, command: int, resets: int) -> None:
    h.command(command)
    assert h.resets == resets
    assert not h.status() & Status.OBF


def test_write_output_port_with_bit_0_clear_resets(h: Harness) -> None:
    h.command(Command.WRITE_OUTPUT_PORT)
    assert h.resets == 0
    h.kbc.write(DATA, 0xFE)
    assert h.resets == 1
    h.command(Command.READ_OUTPUT_PORT)
    assert h.reply() == 0xFF  # the reset line is released again after the reset


def test_write_output_port_with_bit_0_set_does_not_reset(h: Harness) -> None:
    h.command(Command.READ_OUTPUT_PORT)
    assert h.reply() == OutputPort.RESET | OutputPort.A20 == 0x03
    h.command(Command.WRITE_OUTPUT_PORT)
    h.kbc.write(DATA, 0xDF)
    assert h.resets == 0
    h.command(Command.READ_OUTPUT_PORT)
    assert h.reply() == 0xDF


def test_read_and_write_command_byte(h: Harness) -> None:
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0x45  # KBD_INT | SYS | XLATE
    h.command(Command.WRITE_COMMAND_BYTE)
    assert not h.status() & Status.OBF
    h.kbc.write(DATA, 0x47)
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0x47
    assert h.kbc.command_byte == CommandByte.KBD_INT | CommandByte.AUX_INT | CommandByte.SYS | CommandByte.XLATE
    assert type(h.kbc.command_byte) is int


def test_status_sys_flag_follows_the_command_byte(h: Harness) -> None:
    h.command(Command.WRITE_COMMAND_BYTE)
    h.kbc.write(DATA, 0x00)
    assert not h.status() & Status.SYS
    h.command(Command.WRITE_COMMAND_BYTE)
    h.kbc.write(DATA, CommandByte.SYS)
    assert h.status() & Status.SYS


def test_self_test(h: Harness) -> None:
    h.command(Command.SELF_TEST)
    assert h.reply() == 0x55


def test_interface_tests_report_nothing_plugged_in(h: Harness) -> None:
    h.command(Command.TEST_AUX)
    assert h.reply() == 0x02
    h.command(Command.TEST_KBD)
    assert h.reply() == 0x02


@pytest.mark.parametrize(
    "command, set_bits, clear_bits",
    [
        (0xA7, 0x20, 0),  # disable aux
        (0xA8, 0, 0x20),  # enable aux
        (0xAD, 0x10, 0),  # disable keyboard
        (0xAE, 0, 0x10),  # enable keyboard
    ],
)
def test_port_enable_disable_commands(h: Harness, command: int, set_bits: int, clear_bits: int) -> None:
    start = 0x45 | clear_bits
    h.command(Command.WRITE_COMMAND_BYTE)
    h.kbc.write(DATA, start)
    h.command(command)
    assert not h.status() & Status.OBF
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == (start | set_bits) & ~clear_bits


def test_enable_disable_keep_the_other_command_byte_bits(h: Harness) -> None:
    h.command(Command.WRITE_COMMAND_BYTE)
    h.kbc.write(DATA, 0xFF)
    h.command(Command.ENABLE_AUX)
    h.command(Command.ENABLE_KBD)
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0xCF
    h.command(Command.DISABLE_AUX)
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0xEF


def test_write_aux_output_buffer_echoes_as_mouse_data(h: Harness) -> None:
    h.command(Command.WRITE_AUX_BUFFER)
    h.kbc.write(DATA, 0x5A)
    assert h.status() & (Status.OBF | Status.AUX_OBF) == Status.OBF | Status.AUX_OBF
    assert h.kbc.read(DATA) == 0x5A
    assert not h.status() & (Status.OBF | Status.AUX_OBF)


def test_write_kbd_output_buffer_echoes_as_keyboard_data(h: Harness) -> None:
    h.command(Command.WRITE_KBD_BUFFER)
    h.kbc.write(DATA, 0xAB)
    assert h.status() & (Status.OBF | Status.AUX_OBF) == Status.OBF
    assert h.reply() == 0xAB


def test_data_port_keeps_its_last_byte_once_read(h: Harness) -> None:
    assert h.kbc.read(DATA) == 0
    h.command(Command.SELF_TEST)
    assert h.kbc.read(DATA) == 0x55
    assert h.kbc.read(DATA) == 0x55
    assert not h.status() & Status.OBF


def test_unknown_commands_are_ignored(h: Harness) -> None:
    for command in (0x00, 0x1F, 0xC0, 0xE0, 0xA5):
        h.command(command)
    assert not h.status() & Status.OBF
    assert h.resets == 0
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0x45


def test_keyboard_bytes_are_dropped(h: Harness) -> None:
    h.kbc.write(DATA, 0xFF)  # keyboard reset, no keyboard attached
    assert not h.status() & Status.OBF
    assert h.resets == 0


def test_a_new_command_abandons_a_pending_parameter(h: Harness) -> None:
    h.command(Command.WRITE_COMMAND_BYTE)
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0x45
    h.kbc.write(DATA, 0x00)  # not a parameter any more
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == 0x45
    h.command(Command.WRITE_OUTPUT_PORT)
    h.command(Command.ENABLE_KBD)
    h.kbc.write(DATA, 0x00)  # would have been a reset
    assert h.resets == 0


def test_values_are_masked_to_a_byte(h: Harness) -> None:
    h.command(0x1FE)
    assert h.resets == 1


def test_other_ports_read_as_open_bus(h: Harness) -> None:
    assert h.kbc.read(0x61) == 0xFF
    h.kbc.write(0x61, 0xFE)
    assert h.resets == 0


def test_linux_probe_sequence(h: Harness) -> None:
    # i8042_controller_check: flush the output buffer.
    assert not h.status() & Status.OBF
    # i8042_controller_selftest.
    h.command(Command.SELF_TEST)
    assert h.reply() == 0x55
    # i8042_controller_init: two identical command byte reads, then a write.
    h.command(Command.READ_COMMAND_BYTE)
    first = h.reply()
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() == first
    ctr = (first & ~int(CommandByte.KBD_INT)) | CommandByte.KBD_DISABLE
    h.command(Command.WRITE_COMMAND_BYTE)
    h.kbc.write(DATA, ctr)
    # i8042_check_aux: loop test, then the AUXDIS bit assignment test.
    h.command(Command.WRITE_AUX_BUFFER)
    h.kbc.write(DATA, 0x5A)
    assert h.reply() == 0x5A
    h.command(Command.DISABLE_AUX)
    h.command(Command.READ_COMMAND_BYTE)
    assert h.reply() & CommandByte.AUX_DISABLE
    h.command(Command.ENABLE_AUX)
    h.command(Command.READ_COMMAND_BYTE)
    assert not h.reply() & CommandByte.AUX_DISABLE
    # Reboot through the keyboard controller.
    h.command(Command.PULSE_RESET)
    assert h.resets == 1
