"""A 16550A UART, the PC's COM1.

The model is synchronous and pure: the I/O dispatcher calls `read(offset)` and
`write(offset, value)` with the offset from the base port (0x3F8 for COM1); the host
side feeds console input with `receive()` and gets the guest's output through the `tx`
callback. Interrupts leave through `irq_line(level)`, called only when the level changes.

What the model simplifies, and why a guest cannot tell:

* The transmitter is infinitely fast. THR is empty again right after a write, so LSR
  always shows THRE|TEMT; the THR empty interrupt is dropped by the write and raised
  again at once, which gives an edge-triggered ISA interrupt the fresh edge a real chip
  gives when the byte moves to the shift register.
* The character timeout (FIFO mode, data below the trigger level and no new byte for
  four character times) happens at once: there is no line speed, and input arrives in
  host-sized chunks, so waiting would only delay the guest.
* Parity and framing errors never happen (no wire). Overruns can: in loopback, and
  when a break arrives into a full FIFO. A break is latched in LSR until LSR is read,
  not carried down the FIFO with its 0 character.
* The divisor latch is stored and read back but sets no speed.

Host flow control: `receive()` accepts only what fits in the RX FIFO (16 bytes in FIFO
mode, 1 otherwise) and nothing in loopback (the chip's serial input is disconnected).
When the FIFO had no room and a guest access makes room, `rx_space_available()` is
called so the host side resumes reading console input.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Callable

FIFO_SIZE = 16  # bytes in each of the 16550A's FIFOs
_BYTE_MASK = 0xFF  # every register is 8 bits wide
_OFFSET_MASK = 0b111  # the chip decodes address lines A0-A2 only
_DEFAULT_DIVISOR = 12  # 115200 / 12 = 9600 baud, what PC firmware programs


class Reg(enum.IntEnum):
    """Register offsets from the base port (THR, DLL, DLM and FCR are aliases)."""

    RBR = 0  # receiver buffer (read, DLAB clear)
    THR = 0  # transmitter holding (write, DLAB clear)
    DLL = 0  # divisor latch, low byte (DLAB set)
    IER = 1  # interrupt enable (DLAB clear)
    DLM = 1  # divisor latch, high byte (DLAB set)
    IIR = 2  # interrupt identification (read)
    FCR = 2  # FIFO control (write)
    LCR = 3  # line control
    MCR = 4  # modem control
    LSR = 5  # line status
    MSR = 6  # modem status
    SCR = 7  # scratch


class Ier(enum.IntFlag):
    """Interrupt enable register; bits 4-7 read as 0 on a 16550A."""

    ERBFI = 0x01  # interrupt on received data available (and character timeout)
    ETBEI = 0x02  # interrupt on transmitter holding register empty
    ELSI = 0x04  # interrupt on receiver line status (overrun, parity, framing, break)
    EDSSI = 0x08  # interrupt on modem status change (MSR delta bits)
    ALL = 0x0F


class Iir(enum.IntEnum):
    """Interrupt identification values, highest priority first, plus the FIFO bits."""

    RX_LINE_STATUS = 0x06  # an error or break in LSR; cleared by reading LSR
    RX_DATA = 0x04  # received data at or above the FIFO trigger level; cleared by reading RBR
    CHAR_TIMEOUT = 0x0C  # received data below the trigger level (FIFO mode); cleared by reading RBR
    THR_EMPTY = 0x02  # THR empty; cleared by reading IIR (this value) or writing THR
    MODEM_STATUS = 0x00  # an MSR delta bit; cleared by reading MSR
    NO_INTERRUPT = 0x01  # bit 0 set: nothing pending
    FIFOS_ENABLED = 0xC0  # bits 6-7 both set while FCR enables the FIFOs


class Fcr(enum.IntFlag):
    """FIFO control register (write only)."""

    ENABLE = 0x01  # FIFO mode on; the other bits are only taken while this is set
    CLEAR_RX = 0x02  # empty the receive FIFO (self-clearing)
    CLEAR_TX = 0x04  # empty the transmit FIFO (self-clearing; always empty here)
    DMA_MODE = 0x08  # selects the RXRDY/TXRDY pin mode, no effect on a PC
    TRIGGER = 0xC0  # receive FIFO trigger level, see FcrTrigger


class FcrTrigger(enum.IntEnum):
    """FCR bits 6-7: how many received bytes raise the data available interrupt."""

    BYTES_1 = 0x00
    BYTES_4 = 0x40
    BYTES_8 = 0x80
    BYTES_14 = 0xC0


_TRIGGER_LEVEL = {
    FcrTrigger.BYTES_1: 1,
    FcrTrigger.BYTES_4: 4,
    FcrTrigger.BYTES_8: 8,
    FcrTrigger.BYTES_14: 14,
}


class Lcr(enum.IntFlag):
    """Line control register; all bits read back as written."""

    WLS0 = 0x01  # word length select, low bit
    WLS1 = 0x02  # word length select, high bit (11 = 8 data bits)
    STB = 0x04  # 2 stop bits (1.5 for 5-bit words)
    PEN = 0x08  # parity enable
    EPS = 0x10  # even parity select
    STICK = 0x20  # stick parity
    BREAK = 0x40  # set break: drive the serial output low (no effect here)
    DLAB = 0x80  # offsets 0 and 1 reach the divisor latch instead of RBR/THR/IER


class Mcr(enum.IntFlag):
    """Modem control register; bits 5-7 read as 0."""

    DTR = 0x01  # data terminal ready output (loops to MSR DSR)
    RTS = 0x02  # request to send output (loops to MSR CTS)
    OUT1 = 0x04  # user output 1 (loops to MSR RI)
    OUT2 = 0x08  # user output 2: on a PC, gates the UART interrupt to the PIC (loops to MSR DCD)
    LOOP = 0x10  # loopback: transmitted bytes come back to the receiver, outputs to MSR inputs
    ALL = 0x1F


class Lsr(enum.IntFlag):
    """Line status register."""

    DR = 0x01  # data ready: the RX FIFO (or RBR) holds a byte
    OE = 0x02  # overrun error: a byte was lost (cleared by reading LSR)
    PE = 0x04  # parity error (cleared by reading LSR; never happens here)
    FE = 0x08  # framing error (cleared by reading LSR; never happens here)
    BI = 0x10  # break interrupt: the input was held low (cleared by reading LSR)
    THRE = 0x20  # transmitter holding register empty: THR accepts a byte
    TEMT = 0x40  # transmitter empty: nothing left to send
    RX_FIFO_ERROR = 0x80  # FIFO mode: a parity/framing/break error is pending in the FIFO
    ERRORS = OE | PE | FE | BI  # the bits a read of LSR clears
    FIFO_ERRORS = PE | FE | BI  # the errors RX_FIFO_ERROR summarises


class Msr(enum.IntFlag):
    """Modem status register: deltas in bits 0-3 (cleared by reading MSR), inputs in 4-7."""

    DCTS = 0x01  # CTS changed since the last MSR read
    DDSR = 0x02  # DSR changed since the last MSR read
    TERI = 0x04  # RI went from on to off since the last MSR read
    DDCD = 0x08  # DCD changed since the last MSR read
    CTS = 0x10  # clear to send input
    DSR = 0x20  # data set ready input
    RI = 0x40  # ring indicator input
    DCD = 0x80  # data carrier detect input
    DELTAS = DCTS | DDSR | TERI | DDCD
    CONNECTED = CTS | DSR | DCD  # what a console attached to the port asserts


class Uart16550:
    """The 16550A register model. See the module docstring for what is simplified."""

    def __init__(
        self,
        irq_line: Callable[[bool], None],
        tx: Callable[[bytes], None],
        rx_space_available: Callable[[], None] | None = None,
    ) -> None:
        self._irq_line = irq_line
        self._tx = tx
        self._rx_space_available = rx_space_available
        self.counters: dict[str, int] = {
            "tx_bytes": 0,  # bytes handed to tx()
            "tx_batches": 0,  # tx_batch() calls with data
            "rx_bytes": 0,  # bytes receive() accepted from the host
            "rx_read": 0,  # bytes the guest read from RBR
            "loopback_bytes": 0,  # bytes transmitted in loopback mode
            "overruns": 0,  # bytes lost to a full RX FIFO (sets LSR OE)
            "breaks": 0,  # send_break() calls that reached the receiver
            "irq_raised": 0,  # times the interrupt line went high
        }
        self._ier = Ier(0)
        self._lcr = Lcr(0)
        self._mcr = Mcr(0)
        self._scr = 0
        self._dll = _DEFAULT_DIVISOR & _BYTE_MASK
        self._dlm = _DEFAULT_DIVISOR >> 8
        self._fifo_enabled = False
        self._trigger = 1
        self._rx: deque[int] = deque()
        self._rbr_last = 0  # RBR keeps the last byte when read empty
        self._lsr_errors = Lsr(0)  # latched error bits, cleared by an LSR read
        self._thre_pending = False  # the THR empty interrupt is waiting to be seen
        self._msr_inputs = self._modem_inputs()
        self._msr_deltas = Msr(0)
        self._irq_level = False

    # ---- the guest's side ---------------------------------------------------------------

    def read(self, offset: int) -> int:
        """A guest read of the register at `offset` from the base port; returns a byte."""
        offset &= _OFFSET_MASK
        room_before = self.rx_room()
        dlab = bool(self._lcr & Lcr.DLAB)
        if offset == Reg.RBR:
            value = self._dll if dlab else self._read_rbr()
        elif offset == Reg.IER:
            value = self._dlm if dlab else int(self._ier)
        elif offset == Reg.IIR:
            value = self._read_iir()
        elif offset == Reg.LCR:
            value = int(self._lcr)
        elif offset == Reg.MCR:
            value = int(self._mcr)
        elif offset == Reg.LSR:
            value = int(self._lsr())
            self._lsr_errors = Lsr(0)
        elif offset == Reg.MSR:
            value = int(self._msr_inputs | self._msr_deltas)
            self._msr_deltas = Msr(0)
        else:
            value = self._scr
        self._after_access(room_before)
        return value

    def write(self, offset: int, value: int) -> None:
        """A guest write of `value` (masked to a byte) to the register at `offset`."""
        offset &= _OFFSET_MASK
        value &= _BYTE_MASK
        room_before = self.rx_room()
        dlab = bool(self._lcr & Lcr.DLAB)
        if offset == Reg.THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(bytes((value,)))
        elif offset == Reg.IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == Reg.FCR:
            self._write_fcr(value)
        elif offset == Reg.LCR:
            self._lcr = Lcr(value)
        elif offset == Reg.MCR:
            self._mcr = Mcr(value) & Mcr.ALL
            self._update_modem_inputs()
        elif offset == Reg.SCR:
            self._scr = value
        # LSR and MSR are read-only: a write is ignored, as on the chip.
        self._after_access(room_before)

    # ---- the host's side ----------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Console input into the RX FIFO; returns how many bytes were accepted."""
        count = min(len(data), self.rx_room())
        if count:
            self._rx.extend(data[:count])
            self.counters["rx_bytes"] += count
            self._update_irq()
        return count

    def rx_room(self) -> int:
        """How many bytes `receive()` would accept now (0 in loopback: input is cut off)."""
        if self._mcr & Mcr.LOOP:
            return 0
        return self._rx_capacity() - len(self._rx)

    def tx_batch(self, data: bytes) -> None:
        """Bytes a fast path took from THR writes, in order: one THR write's effect for all."""
        if data:
            self.counters["tx_batches"] += 1
            self._transmit(bytes(data))

    def fast_path(self) -> tuple[bool, int | None]:
        """(may THR writes bypass the model, LSR value a fast path may return or None)."""
        thr_ok = not (self._lcr & Lcr.DLAB) and not (self._mcr & Mcr.LOOP)
        lsr = None if self._lsr_errors else int(self._lsr())
        return thr_ok, lsr

    def send_break(self) -> None:
        """The host side holds the line low: LSR BI, and a 0 byte into the FIFO."""
        if self._mcr & Mcr.LOOP:
            return  # the serial input is disconnected in loopback
        self.counters["breaks"] += 1
        self._lsr_errors |= Lsr.BI
        self._push_rx(0)
        self._update_irq()

    # ---- state a VMM may look at --------------------------------------------------------

    @property
    def irq_level(self) -> bool:
        """The level last handed to `irq_line` (False before any change)."""
        return self._irq_level

    @property
    def divisor(self) -> int:
        """The 16-bit baud rate divisor latch."""
        return (self._dlm << 8) | self._dll

    # ---- registers ----------------------------------------------------------------------

    def _read_rbr(self) -> int:
        if self._rx:
            self._rbr_last = self._rx.popleft()
            self.counters["rx_read"] += 1
        return self._rbr_last

    def _read_iir(self) -> int:
        source = self._pending_source()
        if source == Iir.THR_EMPTY:
            self._thre_pending = False  # reading IIR acknowledges THR empty
        if self._fifo_enabled:
            return int(source | Iir.FIFOS_ENABLED)
        return int(source)

    def _write_ier(self, value: int) -> None:
        new = Ier(value) & Ier.ALL
        if new & Ier.ETBEI and not self._ier & Ier.ETBEI:
            self._thre_pending = True  # enabling it while THR is empty interrupts at once
        elif not new & Ier.ETBEI:
            self._thre_pending = False
        self._ier = new

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & Fcr.ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # switching FIFO mode on or off empties both FIFOs
            self._fifo_enabled = enable
        if not enable:
            return  # the other bits are only programmed together with ENABLE
        if value & Fcr.CLEAR_RX:
            self._rx.clear()
        self._trigger = _TRIGGER_LEVEL[FcrTrigger(value & Fcr.TRIGGER)]

    def _lsr(self) -> Lsr:
        value = Lsr.THRE | Lsr.TEMT | self._lsr_errors
        if self._rx:
            value |= Lsr.DR
        if self._fifo_enabled and self._lsr_errors & Lsr.FIFO_ERRORS:
            value |= Lsr.RX_FIFO_ERROR
        return value

    def _modem_inputs(self) -> Msr:
        if not self._mcr & Mcr.LOOP:
            return Msr.CONNECTED
        inputs = Msr(0)
        if self._mcr & Mcr.DTR:
            inputs |= Msr.DSR
        if self._mcr & Mcr.RTS:
            inputs |= Msr.CTS
        if self._mcr & Mcr.OUT1:
            inputs |= Msr.RI
        if self._mcr & Mcr.OUT2:
            inputs |= Msr.DCD
        return inputs

    def _update_modem_inputs(self) -> None:
        old, new = self._msr_inputs, self._modem_inputs()
        changed = old ^ new
        if changed & Msr.CTS:
            self._msr_deltas |= Msr.DCTS
        if changed & Msr.DSR:
            self._msr_deltas |= Msr.DDSR
        if old & Msr.RI and not new & Msr.RI:
            self._msr_deltas |= Msr.TERI
        if changed & Msr.DCD:
            self._msr_deltas |= Msr.DDCD
        self._msr_inputs = new

    # ---- data paths ---------------------------------------------------------------------

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _push_rx(self, byte: int) -> None:
        if len(self._rx) < self._rx_capacity():
            self._rx.append(byte)
        else:
            self._lsr_errors |= Lsr.OE  # the new byte is lost, the FIFO is kept
            self.counters["overruns"] += 1

    def _transmit(self, data: bytes) -> None:
        # Loading THR drops the THR empty interrupt; the byte leaves at once and THR is
        # empty again, which raises it anew: a fresh edge per write (or per batch).
        self._thre_pending = False
        self._update_irq()
        if self._mcr & Mcr.LOOP:
            for byte in data:
                self.counters["loopback_bytes"] += 1
                self._push_rx(byte)
        else:
            self.counters["tx_bytes"] += len(data)
            self._tx(data)
        self._thre_pending = bool(self._ier & Ier.ETBEI)
        self._update_irq()

    # ---- interrupts ---------------------------------------------------------------------

    def _pending_source(self) -> Iir:
        """The highest-priority enabled interrupt, or NO_INTERRUPT."""
        if self._ier & Ier.ELSI and self._lsr_errors:
            return Iir.RX_LINE_STATUS
        if self._ier & Ier.ERBFI and self._rx:
            if self._fifo_enabled and len(self._rx) < self._trigger:
                return Iir.CHAR_TIMEOUT
            return Iir.RX_DATA
        if self._ier & Ier.ETBEI and self._thre_pending:
            return Iir.THR_EMPTY
        if self._ier & Ier.EDSSI and self._msr_deltas:
            return Iir.MODEM_STATUS
        return Iir.NO_INTERRUPT

    def _update_irq(self) -> None:
        level = self._pending_source() != Iir.NO_INTERRUPT and bool(self._mcr & Mcr.OUT2)
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self.counters["irq_raised"] += 1
            self._irq_line(level)

    def _after_access(self, room_before: int) -> None:
        self._update_irq()
        if room_before == 0 and self.rx_room() > 0 and self._rx_space_available is not None:
            self._rx_space_available()
