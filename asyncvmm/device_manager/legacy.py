"""The legacy port devices of one boot, as Firecracker's PortIODeviceManager: the COM ports,
the i8042, the CMOS/RTC, the PIT (the in-kernel one, or the VMM's under the vmm-pit
quirk), the POST port and the ACPI PM block — their models on the port bus, their
interrupt lines, their consoles, and the UART fast path.

    legacy = LegacyDevices(vm, vcpus, config, consoles, pio, request_stop)
    legacy.attach(loop, on_quit)   # consoles feed the UARTs; the fast path is armed
    legacy.detach(loop)            # the guest's last words drained; consoles let go
    legacy.close()                 # eventfds, the PIT's timer (idempotent)

The UART fast path: every COM port has its THR writes and LSR reads served in C (a slot
each in cext/vcpu_loop.c), without the loop, while its model allows
(`Uart16550.fast_path`). After every access through the loop, and after the host changes
the model (input, a break), the model is asked again and its slot re-armed with the ports
the model names. Bytes C took from THR wait in the slot until the loop hands them to the
model (`drain_console`): before any posted exit is served, and on the console eventfd.

Threads: the loop's thread only. The vCPU threads reach the models through posted exits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import platform
from .._native import ffi, lib
from ..bus import Bus, BusConflict, ByteRegisters, Sink
from ..config import VmConfig
from ..console import Console
from ..devices.legacy.i8042 import I8042
from ..devices.legacy.isa_line import IsaLine
from ..devices.legacy.reset_control import ResetControlRegister
from ..devices.legacy.rtc import Rtc
from ..devices.legacy.uart16550 import Uart16550
from ..errors import VmmError
from ..platform import (
    ACPI_PM_PORT,
    ACPI_PM_SIZE,
    ACPI_SCI_IRQ,
    COM_PORT_SIZE,
    I8042_CMD_PORT,
    I8042_DATA_PORT,
    PIT_IRQ,
    PIT_PORT,
    POST_PORT,
    RTC_PORT,
    SPEAKER_PORT,
)
from ..quirks import BoundedRatePit
from ..vstate.vcpus import Stop, StopReason, Vcpus
from ..vstate.vm import Vm

if TYPE_CHECKING:
    from ..devices.legacy.acpi_pm import AcpiPm
    from ..devices.legacy.debugcon import DebugCon
    from ..devices.legacy.fw_cfg import FwCfg

CONSOLE_DRAIN_CHUNK = 65536
CONSOLE_COALESCE_S = 0.001  # polled console output is written out at most this late


class PortOffsets:
    """A model addressed by absolute port numbers (read(port) / write(port, value))."""

    def __init__(self, model, base: int):
        self.regs = ByteRegisters(model, offset_base=base)

    def read(self, offset: int, size: int) -> int:
        return self.regs.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs.write(offset, size, value)


class SerialPort:
    """One COM port: a 16550A on the port bus, its console, its interrupt output.

    After every access through the loop, and every change from the host's side,
    `on_change(port)` runs (the manager re-arms the port's fast path slot)."""

    def __init__(self, where: platform.ComPort, console: Console, irq_output: Callable[[bool], None],
                 on_change: Callable[["SerialPort"], None], observe: Callable[[bytes], None] | None = None):
        self.where = where
        self.name = where.name
        self.console = console
        self._observe = observe
        self.uart = Uart16550(irq_output, self._output, self._rx_space_available)
        self.regs = ByteRegisters(self.uart)
        self._on_change = on_change
        self.sysrq_key: bytes | None = None  # a SysRq key waiting for its break to be read
        self.fast_slot = where.uid - 1  # its slot in the C fast path
        self.fast_state: tuple[bool, int | None] | None = None  # what the slot was last armed with

    def changed(self) -> None:
        self._on_change(self)

    # the bus's side
    def read(self, offset: int, size: int) -> int:
        value = self.regs.read(offset, size)
        self.changed()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs.write(offset, size, value)
        self.changed()

    # the model's callbacks
    def _output(self, data: bytes) -> None:
        if self._observe is not None:
            self._observe(data)
        self.console.write(data)

    def _rx_space_available(self) -> None:
        # A SysRq key waiting behind its break goes first, then held console input.
        if self.sysrq_key is not None and self.uart.rx_room():
            key, self.sysrq_key = self.sysrq_key, None
            self.uart.receive(key)
        self.console.resume_input()

    # the host's side
    def feed(self, data: bytes) -> int:
        n = self.uart.receive(data)
        self.changed()
        return n

    def send_break(self) -> None:
        self.uart.send_break()
        self.changed()


class LegacyDevices:
    """The port devices and their wiring. See the module docstring."""

    def __init__(self, vm: Vm, vcpus: Vcpus, config: VmConfig, consoles: dict[str, Console], pio: Bus,
                 request_stop: Callable[[Stop], None]):
        """`consoles`: the configured COM ports' backends, by name (com1..com4)."""
        self.vm = vm
        self.vcpus = vcpus
        self.pio = pio
        self.request_stop = request_stop
        self.console_observer: Callable[[bytes], None] | None = None  # COM1's output (a boot profile)
        self.irq_lines: dict[int, IsaLine] = {}
        self.serial: dict[str, SerialPort] = {}
        self.i8042: I8042 | None = None
        self.rtc: Rtc | None = None
        self.pit: BoundedRatePit | None = None  # the vmm-pit quirk's PIT, if on
        self.acpi_pm: AcpiPm | None = None  # with ACPI
        self.acpi_pm_port: int | None = None  # where its block is decoded now
        self.fw_cfg: FwCfg | None = None  # for a firmware boot (-l bootrom)
        self.reset_control: ResetControlRegister | None = None  # port 0xCF9 (devices/legacy/reset_control.py)
        self.debugcon: DebugCon | None = None  # -l debugcon,PATH
        self._irq_efds: list[int] = []
        self._drain_buf = ffi.new("uint8_t[]", CONSOLE_DRAIN_CHUNK)
        self._console_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        try:
            self._create(config, consoles)
        except BaseException:
            self.close()
            raise

    def _create(self, cfg: VmConfig, consoles: dict[str, Console]) -> None:
        vm, pio = self.vm, self.pio
        if vm.quirks.vmm_pit:
            from ..log import get_logger  # noqa: PLC0415

            self.pit = BoundedRatePit(vm.fd, PIT_IRQ)
            get_logger("asyncvmm.quirks").info("quirks: vmm-pit: the PIT is the VMM's, IRQ0 at most every "
                     f"{self.pit.min_interval_ns // 1_000_000} ms (no in-kernel PIT)")
            pio.register(PIT_PORT, 4, PortOffsets(self.pit.model, PIT_PORT), "pit")
            pio.register(SPEAKER_PORT, 1, PortOffsets(self.pit.model, SPEAKER_PORT), "port61")
        else:
            vm.fd.create_pit()  # it serves ports 0x40-0x43 and 0x61 in the kernel
        for where in platform.COM_PORTS:
            console = consoles.get(where.name)
            if console is None:
                continue
            line = self._isa_line(where.irq)
            port = SerialPort(
                where, console, line.driver(where.name), self.sync_fast_path,
                observe=self._observe if where.name == "com1" else None,
            )
            self.serial[where.name] = port
            pio.register(where.port, COM_PORT_SIZE, port, where.name)
        self.i8042 = I8042(reset=lambda: self.request_stop(Stop(StopReason.RESET, "guest reset through the i8042 reset line")))
        pio.register(I8042_DATA_PORT, 1, PortOffsets(self.i8042, I8042_DATA_PORT), "i8042")
        pio.register(I8042_CMD_PORT, 1, PortOffsets(self.i8042, I8042_CMD_PORT), "i8042")
        regions = vm.mem.regions
        self.rtc = Rtc(mem_below_4g=regions[0].size, mem_above_4g=sum(r.size for r in regions[1:]))
        pio.register(RTC_PORT, 2, PortOffsets(self.rtc, RTC_PORT), "rtc")
        pio.register(POST_PORT, 1, Sink(), "post")  # POST codes, and a delay port
        # 0xCF9: on the PCI root's 0xCF8 dword (its narrow accesses), given to PciDevices
        self.reset_control = ResetControlRegister(
            lambda: self.request_stop(Stop(StopReason.RESET, "guest reset through the reset control register (0xCF9)")))
        if cfg.acpi:
            from ..devices.legacy.acpi_pm import AcpiPm  # noqa: PLC0415

            self.acpi_pm = AcpiPm(
                sci=self._sci,
                power_off=lambda: self.request_stop(Stop(StopReason.POWEROFF, "guest powered off through ACPI S5")),
            )
            self.place_acpi_pm(ACPI_PM_PORT)  # where firmware puts it; the LPC's PMBASE moves it
        if cfg.bootrom:
            from ..boot import fw_cfg_items  # noqa: PLC0415
            from ..devices.legacy import fw_cfg  # noqa: PLC0415

            fwc = self.fw_cfg = fw_cfg.FwCfg(vm.mem)
            fw_cfg_items.populate(fwc, vm.mem, cfg, [c.where for c in self.serial.values()])
            pio.register(fw_cfg.FW_CFG_PORT, fw_cfg.FW_CFG_PORTS, fwc.control_port(), "fw-cfg")
            pio.register(fw_cfg.FW_CFG_DMA_PORT, fw_cfg.FW_CFG_DMA_PORTS, fwc.dma_port(), "fw-cfg-dma")
        if cfg.debugcon:
            from ..devices.legacy.debugcon import DEBUGCON_PORT, DebugCon  # noqa: PLC0415

            try:
                self.debugcon = DebugCon(cfg.debugcon)
            except OSError as e:
                raise VmmError(f"-l debugcon,{cfg.debugcon}: {e.strerror}") from None
            pio.register(DEBUGCON_PORT, 1, self.debugcon, "debugcon")

    def _isa_line(self, irq: int) -> IsaLine:
        """The line of ISA IRQ `irq`, made on first use: an irqfd on its GSI."""
        line = self.irq_lines.get(irq)
        if line is None:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._irq_efds.append(efd)
            self.vm.fd.irqfd(efd, irq)
            # An edge: the irqfd pulses the PIC's and the IOAPIC's pin.
            line = self.irq_lines[irq] = IsaLine(lambda: self._pulse(efd))
        return line

    def _pulse(self, efd: int) -> None:
        if not self._closed:  # a model may still be touched after close (console input)
            os.eventfd_write(efd, 1)

    def _observe(self, data: bytes) -> None:
        if self.console_observer is not None:
            self.console_observer(data)

    @property
    def uart(self) -> Uart16550 | None:
        """COM1's model."""
        port = self.serial.get("com1")
        return port.uart if port is not None else None

    # -- the ACPI PM block ---------------------------------------------------------------
    def _sci(self, level: bool) -> None:
        # A level interrupt: KVM_IRQ_LINE holds the IOAPIC pin (and the PIC's) until the
        # guest clears the status bit; the IOAPIC redelivers it after EOI while it is held.
        self.vm.fd.irq_line(ACPI_SCI_IRQ, level)

    def place_acpi_pm(self, port: int | None) -> bool:
        """Decode the ACPI PM block at `port` (None: nowhere), its PM timer served in C.
        The ICH9 LPC's PMBASE and ACPI_EN decide (devices/pci/lpc.py). False if the
        ports are taken by something else (then nothing decodes it). Without ACPI
        (--no-acpi) there is no block: PMBASE is only a register then."""
        if self.acpi_pm is None:
            return True
        if self.acpi_pm_port is not None:
            self.pio.unregister(self.acpi_pm_port)
            self.acpi_pm_port = None
            self.vcpus.pm_timer_set(0)
        if port is None:
            return True
        try:
            self.pio.register(port, ACPI_PM_SIZE, self.acpi_pm, "acpi-pm")
        except BusConflict:
            return False
        self.acpi_pm_port = port
        self.vcpus.pm_timer_set(port + platform.ACPI_PM_TMR_PORT - ACPI_PM_PORT)
        return True

    def press_power_button(self) -> bool:
        """Press the ACPI power button; True if the guest has enabled its event."""
        if self.acpi_pm is None or self._closed:
            return False
        return self.acpi_pm.press_power_button()

    # -- running -----------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, on_quit: Callable[[], None]) -> None:
        """The vCPUs are about to run: consoles feed their UARTs, the fast path is armed."""
        self._loop = loop
        loop.add_reader(self.vcpus.console_efd, self._on_console_output)
        for port in self.serial.values():
            port.console.attach(loop, port.feed, on_break=port.send_break, on_quit=on_quit)
            self.sync_fast_path(port)
        if self.pit is not None:
            self.pit.attach(loop)

    def detach(self, stopping: bool = True) -> None:
        """The vCPUs have stopped: drain the guest's last words, let the consoles go."""
        if self.pit is not None:
            self.pit.detach()
        if self._console_timer is not None:
            self._console_timer.cancel()
            self._console_timer = None
        try:
            if self._loop is not None:
                if self.vcpus.console_efd >= 0:
                    self._loop.remove_reader(self.vcpus.console_efd)
                self.drain_console()  # the guest's last words
        finally:
            for port in self.serial.values():
                port.console.detach()

    # -- the UART fast path --------------------------------------------------------------
    def sync_fast_path(self, port: SerialPort) -> None:
        """Arm (or disarm) C for `port` as its model allows now."""
        if not self.vcpus.alive:  # closed: nothing to arm
            return
        state = port.uart.fast_path()
        if state == port.fast_state:
            return
        port.fast_state = state
        thr, lsr = state
        flags = (lib.AVMM_UART_FAST_THR if thr else 0) | (lib.AVMM_UART_FAST_LSR if lsr is not None else 0)
        base = port.where.port
        thr_reg, lsr_reg = port.uart.FAST_PATH_REGS
        self.vcpus.uart_fast_set(port.fast_slot, base + thr_reg, base + lsr_reg, flags, lsr or 0)

    def _on_console_output(self) -> None:
        """The C fast path has bytes from THR.

        A guest waiting for a THR empty interrupt gets it at once. A guest that polls LSR
        (printk's console) never waits on us: its bytes are gathered for CONSOLE_COALESCE_S
        and written out in one batch, instead of one loop wake-up per byte.
        """
        if any(port.uart.tx_interrupt_enabled for port in self.serial.values()):
            self._drain_and_sync()
            return
        self._loop.remove_reader(self.vcpus.console_efd)
        self._console_timer = self._loop.call_later(CONSOLE_COALESCE_S, self._console_flush)

    def _console_flush(self) -> None:
        self._console_timer = None
        try:
            self._drain_and_sync()
        finally:
            if not self._closed and self.vcpus.console_efd >= 0:
                self._loop.add_reader(self.vcpus.console_efd, self._on_console_output)

    def _drain_and_sync(self) -> None:
        self.drain_console()
        for port in self.serial.values():
            self.sync_fast_path(port)

    def drain_signalled_console(self) -> None:
        """drain_console, if the fast path signalled bytes since the last drain: before
        each batch of posted exits, where most batches find none (no eventfd read then,
        a syscall per exit saved)."""
        if self.vcpus.console_pending():
            self.drain_console()

    def drain_console(self) -> None:
        """Hand what the fast path took from THR to each port's model, in order."""
        self.vcpus.console_ack()
        for port in self.serial.values():
            while True:
                n = self.vcpus.console_drain(port.fast_slot, self._drain_buf, CONSOLE_DRAIN_CHUNK)
                if not n:
                    break
                port.uart.tx_batch(bytes(ffi.buffer(self._drain_buf, n)))
                if n < CONSOLE_DRAIN_CHUNK:
                    break

    # -- SysRq ---------------------------------------------------------------------------
    def send_sysrq(self, key: str, port_name: str = "com1") -> None:
        """The kernel's serial SysRq: a break on the port, then `key` (one character)."""
        if len(key) != 1 or not key.isprintable() or not key.isascii():
            raise ValueError(f"a SysRq key is one printable ASCII character, not {key!r}")
        port = self.serial.get(port_name)
        if port is None or not self.vcpus.alive:
            raise VmmError("the VM is not running")
        uart = port.uart
        if not uart.rx_room() or port.sysrq_key is not None:
            raise VmmError(f"{port_name.upper()}'s receive buffer is full: the guest is not reading its console")
        uart.send_break()  # a 0 byte with LSR BI
        if uart.rx_room():
            uart.receive(key.encode())
        else:  # no FIFO: the key follows once the guest has read the break
            port.sysrq_key = key.encode()
        port.changed()

    def send_break(self, port_name: str = "com1") -> None:
        port = self.serial.get(port_name)
        if port is not None and self.vcpus.alive:
            port.send_break()

    # -- stats and teardown --------------------------------------------------------------
    def stats(self) -> dict:
        out = {
            "console": dict(self.uart.counters) if self.uart is not None else {},
            "acpi": dict(self.acpi_pm.counters) if self.acpi_pm is not None else {},
            "serial": {name: dict(port.uart.counters) for name, port in self.serial.items()},
            "isa_irqs": {str(irq): {"drivers": list(line.drivers), "edges": line.edges}
                         for irq, line in self.irq_lines.items()},
        }
        if self.pit is not None:
            out["pit"] = self.pit.stats()
        return out

    def close(self) -> None:
        """After the vCPU threads have ended."""
        if self._closed:
            return
        self._closed = True
        if self._console_timer is not None:
            self._console_timer.cancel()
            self._console_timer = None
        if self.pit is not None:
            self.pit.close()
        if self.debugcon is not None:
            self.debugcon.close()
        for efd in self._irq_efds:
            os.close(efd)
        self._irq_efds.clear()

