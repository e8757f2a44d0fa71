"""Just enough of the i8042 PS/2 controller for the CPU reset line.

No keyboard and no mouse are attached, and the model raises no interrupts (IRQ1 and
IRQ12 stay low). What it does:

* Status reads show an empty input buffer, so a guest never spins waiting to write,
  and an empty output buffer unless a controller command left a reply at port 0x60.
* The controller commands a Linux kernel issues while probing answer as a real
  controller would: read/write the command byte, self test, port enable/disable, the
  interface tests (reporting "clock line stuck high": nothing plugged in), the output
  port, and the "write to output buffer" loop commands.
* Pulsing output line 0 (command 0xFE, or any 0xF0-0xFF pulse with bit 0 clear) and
  writing the output port with bit 0 clear assert the CPU reset line: `reset()`.

Bytes written to port 0x60 for the keyboard itself are dropped. A Linux guest boots
fastest with `i8042.noaux i8042.nokbd` on its command line: probing the absent devices
would otherwise wait for replies (and interrupts) that never come.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

_BYTE_MASK = 0xFF  # ports are 8 bits wide
_OPEN_BUS = 0xFF  # what a read of a port nobody decodes returns


class Port(enum.IntEnum):
    """The controller's I/O ports."""

    DATA = 0x60  # output buffer (read), input buffer for data or a command's parameter (write)
    STATUS = 0x64  # status register (read)
    COMMAND = 0x64  # controller command (write)


class Status(enum.IntFlag):
    """Status register bits."""

    OBF = 0x01  # output buffer full: a byte waits at port 0x60
    IBF = 0x02  # input buffer full: never set, writes are consumed at once
    SYS = 0x04  # system flag, a copy of the command byte's SYS bit
    CMD = 0x08  # the last write went to port 0x64 (a command), not 0x60
    UNLOCKED = 0x10  # keyboard not inhibited by a key lock
    AUX_OBF = 0x20  # the waiting byte came from the aux (mouse) side
    TIMEOUT = 0x40  # a device did not answer (never set here)
    PARITY = 0x80  # a device byte had bad parity (never set here)


class CommandByte(enum.IntFlag):
    """The controller's command byte (read with 0x20, written with 0x60)."""

    KBD_INT = 0x01  # interrupt on IRQ1 when keyboard data arrives
    AUX_INT = 0x02  # interrupt on IRQ12 when mouse data arrives
    SYS = 0x04  # system flag: the POST passed (copied to the status register)
    KBD_DISABLE = 0x10  # keyboard clock held low: keyboard port disabled
    AUX_DISABLE = 0x20  # mouse clock held low: aux port disabled
    XLATE = 0x40  # translate keyboard scan codes to set 1


class OutputPort(enum.IntFlag):
    """The controller's output port (read with 0xD0, written with 0xD1)."""

    RESET = 0x01  # CPU reset line, active low: writing 0 here resets the machine
    A20 = 0x02  # A20 gate enabled
    AUX_CLOCK = 0x04  # aux clock line
    AUX_DATA = 0x08  # aux data line
    KBD_IRQ = 0x10  # IRQ1 output (keyboard data waiting)
    AUX_IRQ = 0x20  # IRQ12 output (mouse data waiting)
    KBD_CLOCK = 0x40  # keyboard clock line
    KBD_DATA = 0x80  # keyboard data line


class Command(enum.IntEnum):
    """Controller commands written to port 0x64."""

    READ_COMMAND_BYTE = 0x20  # reply: the command byte
    WRITE_COMMAND_BYTE = 0x60  # parameter: the new command byte
    DISABLE_AUX = 0xA7  # sets AUX_DISABLE in the command byte
    ENABLE_AUX = 0xA8  # clears AUX_DISABLE
    TEST_AUX = 0xA9  # reply: aux interface test result
    SELF_TEST = 0xAA  # reply: 0x55 when the controller works
    TEST_KBD = 0xAB  # reply: keyboard interface test result
    DISABLE_KBD = 0xAD  # sets KBD_DISABLE
    ENABLE_KBD = 0xAE  # clears KBD_DISABLE
    READ_OUTPUT_PORT = 0xD0  # reply: the output port
    WRITE_OUTPUT_PORT = 0xD1  # parameter: the new output port (bit 0 clear resets the CPU)
    WRITE_KBD_BUFFER = 0xD2  # parameter: returned at port 0x60 as if the keyboard sent it
    WRITE_AUX_BUFFER = 0xD3  # parameter: returned at port 0x60 as if the mouse sent it
    PULSE_OUTPUT = 0xF0  # 0xF0-0xFF: pulse low the output lines whose bit (0-3) is clear
    PULSE_RESET = 0xFE  # pulse line 0 only: the CPU reset


class Reply(enum.IntEnum):
    """Bytes the controller answers with."""

    SELF_TEST_OK = 0x55
    INTERFACE_OK = 0x00
    CLOCK_STUCK_HIGH = 0x02  # interface test with nothing plugged in: the clock is pulled up


_COMMANDS_WITH_PARAMETER = frozenset(
    {
        Command.WRITE_COMMAND_BYTE,
        Command.WRITE_OUTPUT_PORT,
        Command.WRITE_KBD_BUFFER,
        Command.WRITE_AUX_BUFFER,
    }
)

# What PC firmware leaves: keyboard interrupt on, POST passed, scan code translation.
_DEFAULT_COMMAND_BYTE = CommandByte.KBD_INT | CommandByte.SYS | CommandByte.XLATE
_DEFAULT_OUTPUT_PORT = OutputPort.RESET | OutputPort.A20


class I8042:
    """The PS/2 controller, ports 0x60 and 0x64, with nothing attached."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self.command_byte = int(_DEFAULT_COMMAND_BYTE)
        self.output_port = int(_DEFAULT_OUTPUT_PORT)
        self._output: int | None = None  # the byte waiting at port 0x60
        self._output_aux = False
        self._last_output = 0  # port 0x60 keeps its last byte once read
        self._pending: Command | None = None  # a command waiting for its parameter
        self._last_was_command = False
        self.resets = 0  # how many times the reset line was asserted

    def read(self, port: int) -> int:
        if port == Port.STATUS:
            return int(self._status())
        if port == Port.DATA:
            if self._output is not None:
                self._last_output = self._output
                self._output = None
                self._output_aux = False
            return self._last_output
        return _OPEN_BUS

    def write(self, port: int, value: int) -> None:
        value &= _BYTE_MASK
        if port == Port.COMMAND:
            self._last_was_command = True
            self._command(value)
        elif port == Port.DATA:
            self._last_was_command = False
            self._data(value)

    # ---- internals ----------------------------------------------------------------------

    def _status(self) -> Status:
        status = Status.UNLOCKED
        if self._output is not None:
            status |= Status.OBF
            if self._output_aux:
                status |= Status.AUX_OBF
        if self.command_byte & CommandByte.SYS:
            status |= Status.SYS
        if self._last_was_command:
            status |= Status.CMD
        return status

    def _reply(self, value: int, aux: bool = False) -> None:
        self._output = value & _BYTE_MASK
        self._output_aux = aux

    def _command(self, value: int) -> None:
        self._pending = None  # a new command abandons one still waiting for its parameter
        if value in _COMMANDS_WITH_PARAMETER:
            self._pending = Command(value)
        elif value == Command.READ_COMMAND_BYTE:
            self._reply(self.command_byte)
        elif value == Command.DISABLE_AUX:
            self.command_byte |= int(CommandByte.AUX_DISABLE)
        elif value == Command.ENABLE_AUX:
            self.command_byte &= ~int(CommandByte.AUX_DISABLE)
        elif value in (Command.TEST_AUX, Command.TEST_KBD):
            self._reply(Reply.CLOCK_STUCK_HIGH)
        elif value == Command.SELF_TEST:
            self._reply(Reply.SELF_TEST_OK)
        elif value == Command.DISABLE_KBD:
            self.command_byte |= int(CommandByte.KBD_DISABLE)
        elif value == Command.ENABLE_KBD:
            self.command_byte &= ~int(CommandByte.KBD_DISABLE)
        elif value == Command.READ_OUTPUT_PORT:
            self._reply(self.output_port)
        elif value & Command.PULSE_OUTPUT == Command.PULSE_OUTPUT:
            # Bits 0-3 of a pulse command map to output port lines 0-3; line 0 is the reset.
            if not value & OutputPort.RESET:
                self._assert_reset()
        # Anything else is a command this controller ignores.

    def _data(self, value: int) -> None:
        pending, self._pending = self._pending, None
        if pending == Command.WRITE_COMMAND_BYTE:
            self.command_byte = value
        elif pending == Command.WRITE_OUTPUT_PORT:
            # The reset line comes back up once the CPU has been reset.
            self.output_port = value | int(OutputPort.RESET)
            if not value & OutputPort.RESET:
                self._assert_reset()
        elif pending == Command.WRITE_KBD_BUFFER:
            self._reply(value)
        elif pending == Command.WRITE_AUX_BUFFER:
            self._reply(value, aux=True)
        # No pending command: the byte is for the keyboard, and none is attached.

    def _assert_reset(self) -> None:
        self.resets += 1
        self._reset()
