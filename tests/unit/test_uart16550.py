"""The 16550A model driven directly, with no guest: registers, FIFOs, interrupts."""

from __future__ import annotations

import pytest

from asyncvmm.devices.legacy.uart16550 import (
    FIFO_SIZE,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    Reg,
    Uart16550,
)


class Harness:
    """A UART plus everything its callbacks reported."""

    def __init__(self, with_space_callback: bool = True) -> None:
        self.levels: list[bool] = []
        self.sent = bytearray()
        self.tx_calls: list[bytes] = []
        self.space_calls = 0
        self.uart = Uart16550(
            self.levels.append,
            self._tx,
            self._space if with_space_callback else None,
        )

    def _tx(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.tx_calls.append(data)
        self.sent += data

    def _space(self) -> None:
        self.space_calls += 1

    def read(self, reg: int) -> int:
        return self.uart.read(reg)

    def write(self, reg: int, value: int) -> None:
        self.uart.write(reg, value)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_power_on_values(h: Harness) -> None:
    assert h.read(Reg.IER) == 0
    assert h.read(Reg.IIR) == 0x01
    assert h.read(Reg.LCR) == 0
    assert h.read(Reg.MCR) == 0
    assert h.read(Reg.LSR) == 0x60
    assert h.read(Reg.MSR) == 0xB0  # CTS|DSR|DCD: a console is attached
    assert h.read(Reg.SCR) == 0
    assert h.uart.irq_level is False
    assert h.levels == []
    assert h.sent == b""


def test_constants_match_the_datasheet() -> None:
    assert (Reg.RBR, Reg.IER, Reg.IIR, Reg.LCR, Reg.MCR, Reg.LSR, Reg.MSR, Reg.SCR) == tuple(range(8))
    assert Reg.THR == Reg.DLL == 0 and Reg.DLM == 1 and Reg.FCR == 2
    assert (Ier.ERBFI, Ier.ETBEI, Ier.ELSI, Ier.EDSSI) == (1, 2, 4, 8)
    assert (Iir.RX_LINE_STATUS, Iir.RX_DATA, Iir.CHAR_TIMEOUT, Iir.THR_EMPTY, Iir.MODEM_STATUS) == (6, 4, 12, 2, 0)
    assert Lcr.DLAB == 0x80 and Mcr.OUT2 == 0x08 and Mcr.LOOP == 0x10
    assert (Lsr.DR, Lsr.OE, Lsr.BI, Lsr.THRE, Lsr.TEMT) == (0x01, 0x02, 0x10, 0x20, 0x40)
    assert (Msr.CTS, Msr.DSR, Msr.RI, Msr.DCD) == (0x10, 0x20, 0x40, 0x80)


# ---- plain registers ----------------------------------------------------------------------


def test_scratch_register_keeps_a_byte(h: Harness) -> None:
    h.write(Reg.SCR, 0xA5)
    assert h.read(Reg.SCR) == 0xA5
    h.write(Reg.SCR, 0x1FF)  # wider than a byte: masked, not refused
    assert h.read(Reg.SCR) == 0xFF


def test_lcr_reads_back_every_bit(h: Harness) -> None:
    for value in (0x03, 0x1B, 0x7F):
        h.write(Reg.LCR, value)
        assert h.read(Reg.LCR) == value


def test_ier_keeps_only_its_four_bits(h: Harness) -> None:
    h.write(Reg.IER, 0xFF)
    assert h.read(Reg.IER) == 0x0F
    h.write(Reg.IER, 0x45)  # Linux's XScale probe writes bit 6 and expects it to vanish
    assert h.read(Reg.IER) == 0x05


def test_mcr_keeps_only_its_five_bits(h: Harness) -> None:
    h.write(Reg.MCR, 0xFF)
    assert h.read(Reg.MCR) == 0x1F
    h.write(Reg.MCR, 0x0B)
    assert h.read(Reg.MCR) == 0x0B


def test_offsets_wrap_at_eight(h: Harness) -> None:
    h.write(Reg.SCR + 8, 0x42)
    assert h.read(Reg.SCR) == 0x42


def test_lsr_and_msr_writes_are_ignored(h: Harness) -> None:
    h.write(Reg.LSR, 0x1F)
    h.write(Reg.MSR, 0x0F)
    assert h.read(Reg.LSR) == 0x60
    assert h.read(Reg.MSR) == 0xB0


# ---- divisor latch ------------------------------------------------------------------------


def test_dlab_switches_offsets_0_and_1_to_the_divisor(h: Harness) -> None:
    h.write(Reg.IER, 0x05)
    h.write(Reg.LCR, 0x83)
    h.write(Reg.DLL, 0x01)
    h.write(Reg.DLM, 0x02)
    assert h.read(Reg.DLL) == 0x01
    assert h.read(Reg.DLM) == 0x02
    assert h.uart.divisor == 0x0201
    assert h.sent == b""  # the DLL write transmitted nothing
    h.write(Reg.LCR, 0x03)
    assert h.read(Reg.IER) == 0x05  # IER untouched by the DLM write
    h.write(Reg.THR, ord("x"))
    assert h.sent == b"x"
    h.write(Reg.LCR, 0x83)
    assert h.uart.divisor == 0x0201  # the THR write did not touch DLL


def test_dlab_read_of_offset_0_does_not_consume_rx(h: Harness) -> None:
    assert h.uart.receive(b"a") == 1
    h.write(Reg.LCR, Lcr.DLAB)
    h.read(Reg.DLL)
    h.write(Reg.LCR, 0)
    assert h.read(Reg.LSR) & Lsr.DR
    assert h.read(Reg.RBR) == ord("a")


def test_default_divisor_is_9600_baud(h: Harness) -> None:
    assert h.uart.divisor == 12


def test_iir_and_lsr_are_reachable_with_dlab_set(h: Harness) -> None:
    h.write(Reg.LCR, Lcr.DLAB)
    assert h.read(Reg.IIR) == 0x01
    assert h.read(Reg.LSR) == 0x60


# ---- FIFOs --------------------------------------------------------------------------------


def test_fifo_enable_shows_in_iir_bits_6_and_7(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    assert h.read(Reg.IIR) == 0xC1
    h.write(Reg.FCR, 0)
    assert h.read(Reg.IIR) == 0x01


def test_fcr_bits_without_enable_are_not_programmed(h: Harness) -> None:
    h.write(Reg.FCR, 0xC0)  # trigger 14 but no ENABLE
    assert h.read(Reg.IIR) == 0x01
    assert h.uart.receive(b"ab") == 1  # still one byte of holding register


def test_receive_capacity_non_fifo_is_one_byte(h: Harness) -> None:
    assert h.uart.rx_room() == 1
    assert h.uart.receive(b"xyz") == 1
    assert h.uart.rx_room() == 0
    assert h.uart.receive(b"yz") == 0
    assert h.read(Reg.RBR) == ord("x")
    assert h.uart.counters["rx_bytes"] == 1
    assert h.uart.counters["overruns"] == 0  # refused input is not lost input


def test_receive_capacity_fifo_is_sixteen_bytes(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    assert h.uart.rx_room() == FIFO_SIZE == 16
    assert h.uart.receive(b"0123456789") == 10
    assert h.uart.rx_room() == 6
    assert h.uart.receive(b"abcdefghij") == 6
    assert h.uart.rx_room() == 0
    assert h.uart.receive(b"z") == 0
    got = bytes(h.read(Reg.RBR) for _ in range(16))
    assert got == b"0123456789abcdef"
    assert not h.read(Reg.LSR) & Lsr.DR
    assert h.uart.counters["rx_bytes"] == 16
    assert h.uart.counters["rx_read"] == 16


def test_rbr_read_when_empty_repeats_the_last_byte(h: Harness) -> None:
    assert h.read(Reg.RBR) == 0
    h.uart.receive(b"q")
    assert h.read(Reg.RBR) == ord("q")
    assert h.read(Reg.RBR) == ord("q")
    assert h.uart.counters["rx_read"] == 1


def test_fcr_clear_rx_empties_the_fifo(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.uart.receive(b"abc")
    h.write(Reg.FCR, Fcr.ENABLE | Fcr.CLEAR_RX | Fcr.CLEAR_TX)
    assert h.read(Reg.LSR) == 0x60
    assert h.uart.rx_room() == 16
    assert h.read(Reg.IIR) == 0xC1  # CLEAR bits self-clear, FIFOs stay on


def test_switching_fifo_mode_empties_the_receiver(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.uart.receive(b"abc")
    h.write(Reg.FCR, 0)
    assert not h.read(Reg.LSR) & Lsr.DR
    h.uart.receive(b"d")
    h.write(Reg.FCR, Fcr.ENABLE)
    assert not h.read(Reg.LSR) & Lsr.DR


@pytest.mark.parametrize("fcr, level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_trigger_level_separates_data_available_from_timeout(h: Harness, fcr: int, level: int) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ERBFI)
    h.write(Reg.FCR, fcr)
    if level > 1:
        h.uart.receive(b"a" * (level - 1))
        assert h.read(Reg.IIR) == 0xCC  # below the trigger: character timeout
        assert h.levels == [True]
    h.uart.receive(b"b")
    assert h.read(Reg.IIR) == 0xC4  # at the trigger: received data available
    assert h.levels == [True]
    h.read(Reg.RBR)
    if level > 1:
        assert h.read(Reg.IIR) == 0xCC  # below the trigger again
    for _ in range(level - 1):
        h.read(Reg.RBR)
    assert h.read(Reg.IIR) == 0xC1
    assert h.levels == [True, False]


# ---- interrupts ---------------------------------------------------------------------------


def test_received_data_interrupt_non_fifo(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ERBFI)
    assert h.levels == []
    h.uart.receive(b"k")
    assert h.levels == [True]
    assert h.read(Reg.IIR) == 0x04
    assert h.read(Reg.IIR) == 0x04  # reading IIR does not acknowledge received data
    assert h.read(Reg.RBR) == ord("k")
    assert h.levels == [True, False]
    assert h.read(Reg.IIR) == 0x01


def test_received_data_without_erbfi_raises_nothing(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.uart.receive(b"k")
    assert h.levels == []
    assert h.read(Reg.IIR) == 0x01
    assert h.read(Reg.LSR) == 0x61
    h.write(Reg.IER, Ier.ERBFI)  # enabling it with data waiting interrupts at once
    assert h.levels == [True]


def test_line_status_interrupt_on_break(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ELSI)
    h.uart.send_break()
    assert h.levels == [True]
    assert h.read(Reg.IIR) == 0x06
    assert h.read(Reg.LSR) == 0x71  # DR (the break's 0 byte) | BI | THRE | TEMT
    assert h.levels == [True, False]
    assert h.read(Reg.LSR) == 0x61  # BI cleared by the read, the 0 byte remains
    assert h.read(Reg.IIR) == 0x01
    assert h.read(Reg.RBR) == 0


def test_break_in_fifo_mode_sets_the_fifo_error_bit(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.uart.receive(b"ab")
    h.uart.send_break()
    assert h.read(Reg.LSR) == 0xF1  # RX_FIFO_ERROR | BI | THRE | TEMT | DR
    assert h.read(Reg.LSR) == 0x61
    assert bytes(h.read(Reg.RBR) for _ in range(3)) == b"ab\x00"
    assert h.uart.counters["breaks"] == 1


def test_break_into_a_full_receiver_overruns(h: Harness) -> None:
    h.uart.receive(b"z")
    h.uart.send_break()
    assert h.read(Reg.LSR) == 0x73  # DR | OE | BI | THRE | TEMT
    assert h.read(Reg.RBR) == ord("z")
    assert h.uart.counters["overruns"] == 1


def test_thr_empty_interrupt_on_enable_and_iir_acknowledge(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    assert h.levels == [True]  # THR is empty, so enabling ETBEI interrupts
    assert h.read(Reg.IIR) == 0x02
    assert h.levels == [True, False]  # the IIR read that reported it cleared it
    assert h.read(Reg.IIR) == 0x01


def test_thr_write_gives_a_fresh_edge_when_the_line_was_high(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    assert h.levels == [True]
    h.write(Reg.THR, ord("a"))
    assert h.levels == [True, False, True]
    h.write(Reg.THR, ord("b"))
    assert h.levels == [True, False, True, False, True]
    assert h.sent == b"ab"
    assert h.tx_calls == [b"a", b"b"]


def test_thr_write_raises_when_the_line_was_low(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    h.read(Reg.IIR)
    assert h.levels == [True, False]
    h.write(Reg.THR, ord("a"))
    assert h.levels == [True, False, True]
    assert h.read(Reg.IIR) == 0x02


def test_thr_write_without_etbei_raises_nothing(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.THR, ord("a"))
    assert h.levels == []
    assert h.read(Reg.IIR) == 0x01
    assert h.read(Reg.LSR) == 0x60  # THRE | TEMT: the byte is gone already
    assert h.sent == b"a"


def test_thr_write_while_rx_holds_the_line_high_changes_nothing(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ERBFI | Ier.ETBEI)
    h.uart.receive(b"r")
    assert h.levels == [True]
    h.write(Reg.THR, ord("t"))
    assert h.levels == [True]  # another source kept the level up: no change to report
    assert h.read(Reg.IIR) == 0x04


def test_disabling_etbei_forgets_the_pending_thr_interrupt(h: Harness) -> None:
    # Linux's UART_BUG_THRE probe: enable, read IIR, disable, enable, read IIR.
    h.write(Reg.IER, Ier.ETBEI)
    assert h.read(Reg.IIR) == 0x02
    h.write(Reg.IER, 0)
    assert h.read(Reg.IIR) == 0x01
    h.write(Reg.IER, Ier.ETBEI)
    assert h.read(Reg.IIR) == 0x02
    h.write(Reg.IER, 0)
    h.write(Reg.IER, Ier.ETBEI | Ier.ERBFI)
    h.write(Reg.IER, Ier.ETBEI)  # ETBEI stays on: no new THR interrupt
    assert h.read(Reg.IIR) == 0x02
    assert h.read(Reg.IIR) == 0x01


def test_iir_read_clears_thre_only_when_it_is_the_reported_source(h: Harness) -> None:
    h.write(Reg.IER, Ier.ERBFI | Ier.ETBEI)
    h.uart.receive(b"r")
    assert h.read(Reg.IIR) == 0x04  # received data outranks THR empty
    h.read(Reg.RBR)
    assert h.read(Reg.IIR) == 0x02  # THR empty was still pending
    assert h.read(Reg.IIR) == 0x01


def test_interrupt_priorities(h: Harness) -> None:
    # Loopback makes every source reachable: a second byte overruns the 1-byte receiver,
    # and entering loopback changes the modem inputs.
    h.write(Reg.MCR, Mcr.LOOP | Mcr.OUT2)
    h.write(Reg.IER, Ier.ERBFI | Ier.ETBEI | Ier.ELSI | Ier.EDSSI)
    h.write(Reg.THR, ord("a"))
    h.write(Reg.THR, ord("b"))
    assert h.read(Reg.IIR) == 0x06  # receiver line status (overrun)
    assert h.read(Reg.LSR) == 0x63  # DR | OE | THRE | TEMT
    assert h.read(Reg.IIR) == 0x04  # received data
    assert h.read(Reg.RBR) == ord("a")
    assert h.read(Reg.IIR) == 0x02  # THR empty; this read acknowledges it
    assert h.read(Reg.IIR) == 0x00  # modem status
    assert h.read(Reg.MSR) == 0x83  # DCD (from OUT2); CTS and DSR dropped: DCTS | DDSR
    assert h.read(Reg.IIR) == 0x01
    assert h.uart.irq_level is False
    assert h.uart.counters["overruns"] == 1
    assert h.sent == b""  # loopback sends nothing out


def test_out2_gates_the_interrupt_line(h: Harness) -> None:
    h.write(Reg.IER, Ier.ERBFI)
    h.uart.receive(b"x")
    assert h.read(Reg.IIR) == 0x04  # pending...
    assert h.levels == []  # ...but not wired to the PIC without OUT2
    h.write(Reg.MCR, Mcr.OUT2 | Mcr.DTR | Mcr.RTS)
    assert h.levels == [True]
    h.write(Reg.MCR, Mcr.DTR | Mcr.RTS)
    assert h.levels == [True, False]
    h.write(Reg.MCR, Mcr.OUT2)
    assert h.levels == [True, False, True]
    h.read(Reg.RBR)
    assert h.levels == [True, False, True, False]
    assert h.uart.counters["irq_raised"] == 2


def test_thr_edge_is_invisible_without_out2(h: Harness) -> None:
    h.write(Reg.IER, Ier.ETBEI)
    h.write(Reg.THR, ord("a"))
    assert h.levels == []
    assert h.read(Reg.IIR) == 0x02


def test_modem_status_interrupt_and_clear_on_read(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP | Mcr.OUT2)
    h.read(Reg.MSR)  # drop the deltas from entering loopback
    h.write(Reg.IER, Ier.EDSSI)
    assert h.levels == []
    h.write(Reg.MCR, Mcr.LOOP | Mcr.OUT2 | Mcr.RTS)
    assert h.levels == [True]
    assert h.read(Reg.IIR) == 0x00
    assert h.read(Reg.MSR) == 0x91  # CTS | DCD, DCTS
    assert h.levels == [True, False]
    assert h.read(Reg.MSR) == 0x90  # deltas cleared by the read


# ---- loopback -----------------------------------------------------------------------------


def test_loopback_sends_thr_to_the_receiver(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP)
    h.write(Reg.THR, 0x5A)
    assert h.sent == b""
    assert h.tx_calls == []
    assert h.read(Reg.LSR) == 0x61
    assert h.read(Reg.RBR) == 0x5A
    assert h.uart.counters["loopback_bytes"] == 1
    assert h.uart.counters["tx_bytes"] == 0


def test_loopback_in_fifo_mode_overruns_after_sixteen(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.write(Reg.MCR, Mcr.LOOP)
    for byte in range(17):
        h.write(Reg.THR, byte)
    assert h.read(Reg.LSR) == 0x63  # DR | OE
    assert [h.read(Reg.RBR) for _ in range(16)] == list(range(16))
    assert h.read(Reg.LSR) == 0x60
    assert h.uart.counters["overruns"] == 1


@pytest.mark.parametrize(
    "mcr, inputs",
    [
        (Mcr.DTR, Msr.DSR),
        (Mcr.RTS, Msr.CTS),
        (Mcr.OUT1, Msr.RI),
        (Mcr.OUT2, Msr.DCD),
        (Mcr.DTR | Mcr.RTS | Mcr.OUT1 | Mcr.OUT2, 0xF0),
        (0, 0),
    ],
)
def test_loopback_modem_outputs_drive_msr_inputs(h: Harness, mcr: int, inputs: int) -> None:
    h.write(Reg.MCR, Mcr.LOOP | mcr)
    assert h.read(Reg.MSR) & 0xF0 == inputs


def test_linux_loopback_probe_sees_dcd_and_cts(h: Harness) -> None:
    # autoconfig(): MCR = LOOP | OUT2 | RTS, expects MSR & 0xF0 == DCD | CTS.
    h.write(Reg.MCR, Mcr.LOOP | 0x0A)
    assert h.read(Reg.MSR) & 0xF0 == 0x90
    h.write(Reg.MCR, 0)
    assert h.read(Reg.MSR) & 0xF0 == 0xB0


def test_loopback_delta_bits(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP | Mcr.DTR | Mcr.RTS | Mcr.OUT2)  # same inputs as a console
    assert h.read(Reg.MSR) == 0xB0  # nothing changed
    h.write(Reg.MCR, Mcr.LOOP | Mcr.DTR | Mcr.RTS | Mcr.OUT2 | Mcr.OUT1)
    assert h.read(Reg.MSR) == 0xF0  # RI rose: no TERI, that is for the trailing edge
    h.write(Reg.MCR, Mcr.LOOP | Mcr.DTR | Mcr.RTS | Mcr.OUT2)
    assert h.read(Reg.MSR) == 0xB4  # RI fell: TERI
    h.write(Reg.MCR, Mcr.LOOP)
    assert h.read(Reg.MSR) == 0x0B  # DCTS | DDSR | DDCD
    h.write(Reg.MCR, 0)
    assert h.read(Reg.MSR) == 0xBB  # leaving loopback: the console's inputs return
    assert h.read(Reg.MSR) == 0xB0


def test_loopback_cuts_off_host_input(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP)
    assert h.uart.rx_room() == 0
    assert h.uart.receive(b"abc") == 0
    h.uart.send_break()
    assert h.read(Reg.LSR) == 0x60
    assert h.uart.counters["breaks"] == 0
    h.write(Reg.MCR, 0)
    assert h.uart.rx_room() == 1
    assert h.uart.receive(b"abc") == 1


# ---- clear on read ------------------------------------------------------------------------


def test_lsr_read_clears_errors_but_not_data_ready(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP)
    h.write(Reg.THR, 1)
    h.write(Reg.THR, 2)
    assert h.read(Reg.LSR) == 0x63
    assert h.read(Reg.LSR) == 0x61
    h.read(Reg.RBR)
    assert h.read(Reg.LSR) == 0x60


# ---- flow control towards the host --------------------------------------------------------


def test_rx_space_available_after_reading_a_full_fifo(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.uart.receive(b"x" * 15)
    h.read(Reg.RBR)
    assert h.space_calls == 0  # it was not full: the host never stopped
    h.uart.receive(b"yy")
    assert h.uart.rx_room() == 0
    h.read(Reg.LSR)
    assert h.space_calls == 0
    h.read(Reg.RBR)
    assert h.space_calls == 1
    h.read(Reg.RBR)
    assert h.space_calls == 1  # only on the full -> not full transition


def test_rx_space_available_non_fifo(h: Harness) -> None:
    h.uart.receive(b"a")
    assert h.uart.receive(b"b") == 0
    assert h.read(Reg.RBR) == ord("a")
    assert h.space_calls == 1
    assert h.uart.receive(b"b") == 1


def test_rx_space_available_after_fifo_reset_or_enable(h: Harness) -> None:
    h.uart.receive(b"a")
    h.write(Reg.FCR, Fcr.ENABLE)  # 1 -> 16 bytes, and the switch empties the FIFO
    assert h.space_calls == 1
    h.uart.receive(b"b" * 16)
    h.write(Reg.FCR, Fcr.ENABLE | Fcr.CLEAR_RX)
    assert h.space_calls == 2


def test_rx_space_available_when_leaving_loopback(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP)
    assert h.space_calls == 0
    h.write(Reg.MCR, Mcr.OUT2)
    assert h.space_calls == 1


def test_rx_space_callback_may_feed_more_input(h: Harness) -> None:
    # The host side may answer rx_space_available() by calling receive() right away.
    backlog = [b"n"]

    def refill() -> None:
        h.space_calls += 1
        if backlog:
            uart.receive(backlog.pop())

    uart = Uart16550(h.levels.append, h._tx, refill)
    uart.write(Reg.MCR, Mcr.OUT2)
    uart.write(Reg.IER, Ier.ERBFI)
    uart.receive(b"m")
    assert uart.read(Reg.RBR) == ord("m")
    assert h.space_calls == 1
    assert uart.read(Reg.RBR) == ord("n")
    assert h.space_calls == 2
    assert h.levels == [True, False, True, False]


def test_no_rx_space_callback_is_fine() -> None:
    h = Harness(with_space_callback=False)
    h.uart.receive(b"a")
    assert h.read(Reg.RBR) == ord("a")


# ---- fast path hand-off -------------------------------------------------------------------


def test_tx_batch_is_one_tx_call_and_one_edge(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    assert h.levels == [True]
    h.uart.tx_batch(b"hello")
    assert h.tx_calls == [b"hello"]
    assert h.levels == [True, False, True]
    assert h.uart.counters["tx_bytes"] == 5
    assert h.uart.counters["tx_batches"] == 1
    assert h.read(Reg.IIR) == 0x02


def test_tx_batch_after_iir_ack_raises_once(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    h.read(Reg.IIR)
    h.uart.tx_batch(bytearray(b"abc"))
    assert h.tx_calls == [b"abc"]
    assert h.levels == [True, False, True]


def test_tx_batch_empty_does_nothing(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.write(Reg.IER, Ier.ETBEI)
    h.uart.tx_batch(b"")
    assert h.tx_calls == []
    assert h.levels == [True]
    assert h.uart.counters["tx_batches"] == 0


def test_tx_batch_without_etbei_only_transmits(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.OUT2)
    h.uart.tx_batch(b"abc")
    assert h.sent == b"abc"
    assert h.levels == []


def test_tx_batch_in_loopback_fills_the_receiver(h: Harness) -> None:
    h.write(Reg.FCR, Fcr.ENABLE)
    h.write(Reg.MCR, Mcr.LOOP)
    h.uart.tx_batch(b"xy")
    assert h.sent == b""
    assert bytes(h.read(Reg.RBR) for _ in range(2)) == b"xy"


def test_fast_path_in_each_state(h: Harness) -> None:
    assert h.uart.fast_path() == (True, 0x60)
    h.uart.receive(b"a")
    assert h.uart.fast_path() == (True, 0x61)  # DR is part of the answer
    h.write(Reg.LCR, Lcr.DLAB | 0x03)
    assert h.uart.fast_path() == (False, 0x61)  # offset 0 is DLL now
    h.write(Reg.LCR, 0x03)
    assert h.uart.fast_path() == (True, 0x61)
    h.write(Reg.MCR, Mcr.LOOP)
    assert h.uart.fast_path() == (False, 0x61)  # THR bytes belong to the receiver
    h.write(Reg.MCR, 0)
    h.read(Reg.RBR)
    assert h.uart.fast_path() == (True, 0x60)
    h.uart.send_break()
    assert h.uart.fast_path() == (True, None)  # BI must be cleared by a real LSR read
    assert h.read(Reg.LSR) == 0x71
    assert h.uart.fast_path() == (True, 0x61)
    h.read(Reg.RBR)
    assert h.uart.fast_path() == (True, 0x60)


def test_fast_path_lsr_none_while_an_overrun_is_latched(h: Harness) -> None:
    h.write(Reg.MCR, Mcr.LOOP)
    h.write(Reg.THR, 1)
    h.write(Reg.THR, 2)
    h.write(Reg.MCR, 0)
    assert h.uart.fast_path() == (True, None)
    h.read(Reg.LSR)
    assert h.uart.fast_path() == (True, 0x61)


# ---- guest input that makes no sense ------------------------------------------------------


def test_odd_values_are_masked_not_refused(h: Harness) -> None:
    h.write(Reg.THR, 0x141)
    assert h.sent == b"A"
    h.write(Reg.LCR, -1)
    assert h.read(Reg.LCR) == 0xFF
    h.write(Reg.LCR, 0)
    h.write(Reg.FCR, 0xFF)  # every FCR bit at once
    assert h.read(Reg.IIR) == 0xC1
