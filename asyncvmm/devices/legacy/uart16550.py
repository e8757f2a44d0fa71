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
from collections.abc import Callable
from operator import index as _index

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



# ---- the registers' bits as plain ints ----------------------------------------------------
#
# The enums above name the registers; the model works on these plain-int copies, since an
# `&` or `|` on an IntFlag builds a new enum object, which costs microseconds per guest
# access on a path every COM1 port exit takes.

_IER_ERBFI = int(Ier.ERBFI)
_IER_ETBEI = int(Ier.ETBEI)
_IER_ELSI = int(Ier.ELSI)
_IER_EDSSI = int(Ier.EDSSI)
_IER_ALL = int(Ier.ALL)

_IIR_RX_LINE_STATUS = int(Iir.RX_LINE_STATUS)
_IIR_RX_DATA = int(Iir.RX_DATA)
_IIR_CHAR_TIMEOUT = int(Iir.CHAR_TIMEOUT)
_IIR_THR_EMPTY = int(Iir.THR_EMPTY)
_IIR_MODEM_STATUS = int(Iir.MODEM_STATUS)
_IIR_NO_INTERRUPT = int(Iir.NO_INTERRUPT)
_IIR_FIFOS_ENABLED = int(Iir.FIFOS_ENABLED)

_FCR_ENABLE = int(Fcr.ENABLE)
_FCR_CLEAR_RX = int(Fcr.CLEAR_RX)
_FCR_TRIGGER = int(Fcr.TRIGGER)

_TRIGGER_LEVEL = {
    int(FcrTrigger.BYTES_1): 1,
    int(FcrTrigger.BYTES_4): 4,
    int(FcrTrigger.BYTES_8): 8,
    int(FcrTrigger.BYTES_14): 14,
}

_LCR_DLAB = int(Lcr.DLAB)

_MCR_DTR = int(Mcr.DTR)
_MCR_RTS = int(Mcr.RTS)
_MCR_OUT1 = int(Mcr.OUT1)
_MCR_OUT2 = int(Mcr.OUT2)
_MCR_LOOP = int(Mcr.LOOP)
_MCR_ALL = int(Mcr.ALL)

_LSR_DR = int(Lsr.DR)
_LSR_OE = int(Lsr.OE)
_LSR_BI = int(Lsr.BI)
_LSR_RX_FIFO_ERROR = int(Lsr.RX_FIFO_ERROR)
_LSR_FIFO_ERRORS = int(Lsr.FIFO_ERRORS)
_LSR_TX_IDLE = int(Lsr.THRE | Lsr.TEMT)  # the transmitter is always empty (THRE|TEMT)
_LSR_TX_IDLE_DR = _LSR_TX_IDLE | _LSR_DR  # ... and the receiver holds a byte

_MSR_DCTS = int(Msr.DCTS)
_MSR_DDSR = int(Msr.DDSR)
_MSR_TERI = int(Msr.TERI)
_MSR_DDCD = int(Msr.DDCD)
_MSR_CTS = int(Msr.CTS)
_MSR_DSR = int(Msr.DSR)
_MSR_RI = int(Msr.RI)
_MSR_DCD = int(Msr.DCD)
_MSR_CONNECTED = int(Msr.CONNECTED)

_ONE_BYTE = tuple(bytes((byte,)) for byte in range(_BYTE_MASK + 1))  # a THR write's tx() argument


class Uart16550:
    """The 16550A register model. See the module docstring for what is simplified.

    `read` and `write` dispatch through a table of eight handlers, one per offset; there
    are two pairs of tables, for LCR DLAB clear and set, swapped by LCR writes. A handler
    does only what its register can cause: one whose access changes no interrupt source
    does not re-evaluate the interrupt line, and only accesses that can make room in the
    receiver check for the rx_space_available() hand-off.
    """

    # The registers a fast path may serve for the model, while `fast_path()` allows:
    # writes of THR (handed back through `tx_batch`) and reads of LSR.
    FAST_PATH_REGS = (Reg.THR, Reg.LSR)

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
        # Every register is a plain int holding Ier/Lcr/Mcr/Lsr/Msr bits (see above).
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = _DEFAULT_DIVISOR & _BYTE_MASK
        self._dlm = _DEFAULT_DIVISOR >> 8
        self._fifo_enabled = False
        self._rx_capacity = 1  # bytes the receiver holds: FIFO_SIZE in FIFO mode
        self._trigger = 1
        self._rx: deque[int] = deque()
        self._rbr_last = 0  # RBR keeps the last byte when read empty
        self._lsr_errors = 0  # latched Lsr error bits, cleared by an LSR read
        self._thre_pending = False  # the THR empty interrupt is waiting to be seen
        self._msr_inputs = self._modem_inputs()
        self._msr_deltas = 0
        self._irq_level = False
        self._thr_ok = True  # THR writes may bypass the model: DLAB and LOOP both clear
        self._readers: tuple[Callable[[Uart16550], int], ...] = _READERS
        self._writers: tuple[Callable[[Uart16550, int], None], ...] = _WRITERS

    # ---- the guest's side ---------------------------------------------------------------

    def read(self, offset: int) -> int:
        """A guest read of the register at `offset` from the base port; returns a byte."""
        return self._readers[offset & _OFFSET_MASK](self)

    def write(self, offset: int, value: int) -> None:
        """A guest write of `value` (masked to a byte) to the register at `offset`."""
        self._writers[offset & _OFFSET_MASK](self, _index(value) & _BYTE_MASK)

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
        if self._mcr & _MCR_LOOP:
            return 0
        return self._rx_capacity - len(self._rx)

    def tx_batch(self, data: bytes) -> None:
        """Bytes a fast path took from THR writes, in order: one THR write's effect for all."""
        if data:
            self.counters["tx_batches"] += 1
            self._transmit(bytes(data))

    def fast_path(self) -> tuple[bool, int | None]:
        """(may THR writes bypass the model, LSR value a fast path may return or None)."""
        if self._lsr_errors:
            return self._thr_ok, None
        return self._thr_ok, _LSR_TX_IDLE_DR if self._rx else _LSR_TX_IDLE

    def send_break(self) -> None:
        """The host side holds the line low: LSR BI, and a 0 byte into the FIFO."""
        if self._mcr & _MCR_LOOP:
            return  # the serial input is disconnected in loopback
        self.counters["breaks"] += 1
        self._lsr_errors |= _LSR_BI
        self._push_rx(0)
        self._update_irq()

    # ---- state a VMM may look at --------------------------------------------------------

    @property
    def irq_level(self) -> bool:
        """The level last handed to `irq_line` (False before any change)."""
        return self._irq_level

    @property
    def tx_interrupt_enabled(self) -> bool:
        """Whether the guest enabled the THR empty interrupt (IER ETBEI): it waits for it."""
        return bool(self._ier & _IER_ETBEI)

    @property
    def divisor(self) -> int:
        """The 16-bit baud rate divisor latch."""
        return (self._dlm << 8) | self._dll

    # ---- register reads (the _READERS tables) -------------------------------------------

    def _read_rbr(self) -> int:
        rx = self._rx
        if not rx:
            return self._rbr_last  # nothing changes
        was_full = len(rx) >= self._rx_capacity
        value = self._rbr_last = rx.popleft()
        self.counters["rx_read"] += 1
        self._update_irq()
        if was_full:
            self._room_made()
        return value

    def _read_dll(self) -> int:
        return self._dll

    def _read_ier(self) -> int:
        return self._ier

    def _read_dlm(self) -> int:
        return self._dlm

    def _read_iir(self) -> int:
        source = self._pending_source()
        value = source | _IIR_FIFOS_ENABLED if self._fifo_enabled else source
        if source == _IIR_THR_EMPTY:
            self._thre_pending = False  # reading IIR acknowledges THR empty
            self._update_irq()
        return value

    def _read_lcr(self) -> int:
        return self._lcr

    def _read_mcr(self) -> int:
        return self._mcr

    def _read_lsr(self) -> int:
        if not self._lsr_errors:
            return _LSR_TX_IDLE_DR if self._rx else _LSR_TX_IDLE
        value = self._lsr()
        self._lsr_errors = 0  # the read clears the error bits and their interrupt
        self._update_irq()
        return value

    def _read_msr(self) -> int:
        deltas = self._msr_deltas
        if not deltas:
            return self._msr_inputs
        self._msr_deltas = 0  # the read clears the delta bits and their interrupt
        self._update_irq()
        return self._msr_inputs | deltas

    def _read_scr(self) -> int:
        return self._scr

    # ---- register writes (the _WRITERS tables); `value` is a byte -----------------------

    def _write_thr(self, value: int) -> None:
        self._transmit(_ONE_BYTE[value])

    def _write_dll(self, value: int) -> None:
        self._dll = value

    def _write_ier(self, value: int) -> None:
        new = value & _IER_ALL
        if new & _IER_ETBEI:
            if not self._ier & _IER_ETBEI:
                self._thre_pending = True  # enabling it while THR is empty interrupts at once
        else:
            self._thre_pending = False
        self._ier = new
        self._update_irq()

    def _write_dlm(self, value: int) -> None:
        self._dlm = value

    def _write_fcr(self, value: int) -> None:
        full = not self.rx_room()
        enable = bool(value & _FCR_ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # switching FIFO mode on or off empties both FIFOs
            self._fifo_enabled = enable
            self._rx_capacity = FIFO_SIZE if enable else 1
        if enable:  # the other bits are only programmed together with ENABLE
            if value & _FCR_CLEAR_RX:
                self._rx.clear()
            self._trigger = _TRIGGER_LEVEL[value & _FCR_TRIGGER]
        self._update_irq()
        if full:
            self._room_made()

    def _write_lcr(self, value: int) -> None:
        self._lcr = value
        if value & _LCR_DLAB:
            self._readers, self._writers = _READERS_DLAB, _WRITERS_DLAB
        else:
            self._readers, self._writers = _READERS, _WRITERS
        self._thr_ok = not value & _LCR_DLAB and not self._mcr & _MCR_LOOP

    def _write_mcr(self, value: int) -> None:
        full = not self.rx_room()
        self._mcr = value & _MCR_ALL
        self._thr_ok = not self._lcr & _LCR_DLAB and not self._mcr & _MCR_LOOP
        self._update_modem_inputs()
        self._update_irq()
        if full:
            self._room_made()

    def _write_read_only(self, value: int) -> None:
        pass  # LSR and MSR are read-only: a write is ignored, as on the chip

    def _write_scr(self, value: int) -> None:
        self._scr = value

    # ---- register values ----------------------------------------------------------------

    def _lsr(self) -> int:
        errors = self._lsr_errors
        value = _LSR_TX_IDLE | errors
        if self._rx:
            value |= _LSR_DR
        if self._fifo_enabled and errors & _LSR_FIFO_ERRORS:
            value |= _LSR_RX_FIFO_ERROR
        return value

    def _modem_inputs(self) -> int:
        mcr = self._mcr
        if not mcr & _MCR_LOOP:
            return _MSR_CONNECTED
        inputs = 0
        if mcr & _MCR_DTR:
            inputs |= _MSR_DSR
        if mcr & _MCR_RTS:
            inputs |= _MSR_CTS
        if mcr & _MCR_OUT1:
            inputs |= _MSR_RI
        if mcr & _MCR_OUT2:
            inputs |= _MSR_DCD
        return inputs

    def _update_modem_inputs(self) -> None:
        old, new = self._msr_inputs, self._modem_inputs()
        changed = old ^ new
        if changed & _MSR_CTS:
            self._msr_deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            self._msr_deltas |= _MSR_DDSR
        if old & _MSR_RI and not new & _MSR_RI:
            self._msr_deltas |= _MSR_TERI
        if changed & _MSR_DCD:
            self._msr_deltas |= _MSR_DDCD
        self._msr_inputs = new

    # ---- data paths ---------------------------------------------------------------------

    def _push_rx(self, byte: int) -> None:
        if len(self._rx) < self._rx_capacity:
            self._rx.append(byte)
        else:
            self._lsr_errors |= _LSR_OE  # the new byte is lost, the FIFO is kept
            self.counters["overruns"] += 1

    def _transmit(self, data: bytes) -> None:
        # Loading THR drops the THR empty interrupt; the byte leaves at once and THR is
        # empty again, which raises it anew: a fresh edge per write (or per batch).
        if self._thre_pending:
            self._thre_pending = False
            self._update_irq()
        if self._mcr & _MCR_LOOP:
            for byte in data:
                self.counters["loopback_bytes"] += 1
                self._push_rx(byte)
        else:
            self.counters["tx_bytes"] += len(data)
            self._tx(data)
        if self._ier & _IER_ETBEI:
            self._thre_pending = True
        self._update_irq()

    def _room_made(self) -> None:
        """After an access that may have emptied a full receiver: resume the host's input."""
        if self._rx_space_available is not None and self.rx_room() > 0:
            self._rx_space_available()

    # ---- interrupts ---------------------------------------------------------------------

    def _pending_source(self) -> int:
        """The highest-priority enabled interrupt (an Iir value), or NO_INTERRUPT."""
        ier = self._ier
        if not ier:
            return _IIR_NO_INTERRUPT
        if ier & _IER_ELSI and self._lsr_errors:
            return _IIR_RX_LINE_STATUS
        if ier & _IER_ERBFI and self._rx:
            if self._fifo_enabled and len(self._rx) < self._trigger:
                return _IIR_CHAR_TIMEOUT
            return _IIR_RX_DATA
        if ier & _IER_ETBEI and self._thre_pending:
            return _IIR_THR_EMPTY
        if ier & _IER_EDSSI and self._msr_deltas:
            return _IIR_MODEM_STATUS
        return _IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        level = bool(self._mcr & _MCR_OUT2) and self._pending_source() != _IIR_NO_INTERRUPT
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self.counters["irq_raised"] += 1
            self._irq_line(level)


# The handlers by offset (Reg), for LCR DLAB clear and set: only offsets 0 and 1 differ.
_READERS = (
    Uart16550._read_rbr,  # Reg.RBR
    Uart16550._read_ier,  # Reg.IER
    Uart16550._read_iir,  # Reg.IIR
    Uart16550._read_lcr,  # Reg.LCR
    Uart16550._read_mcr,  # Reg.MCR
    Uart16550._read_lsr,  # Reg.LSR
    Uart16550._read_msr,  # Reg.MSR
    Uart16550._read_scr,  # Reg.SCR
)
_READERS_DLAB = (Uart16550._read_dll, Uart16550._read_dlm, *_READERS[Reg.IIR :])
_WRITERS = (
    Uart16550._write_thr,  # Reg.THR
    Uart16550._write_ier,  # Reg.IER
    Uart16550._write_fcr,  # Reg.FCR
    Uart16550._write_lcr,  # Reg.LCR
    Uart16550._write_mcr,  # Reg.MCR
    Uart16550._write_read_only,  # Reg.LSR
    Uart16550._write_read_only,  # Reg.MSR
    Uart16550._write_scr,  # Reg.SCR
)
_WRITERS_DLAB = (Uart16550._write_dll, Uart16550._write_dlm, *_WRITERS[Reg.FCR :])
