"""The machine: KVM objects, guest RAM, vCPU threads and the legacy devices, on one loop.

Life cycle (one object per boot; a guest reset builds a new Machine):

    m = Machine(config, console, images)   # nothing acquired yet
    m.build()                      # synchronous: KVM VM, RAM, kernel, vCPUs, devices
    stop = await m.run()           # vCPU threads run until the guest or host stops it
    m.close()                      # fds, threads, RAM released (idempotent)

Threads: vCPU threads live in the C core. Everything here runs on the loop's thread: the
notify eventfd brings posted exits, which are dispatched to the port/MMIO buses and
completed; the console eventfd brings bytes the C fast path took from COM1's THR.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from dataclasses import dataclass, field

from . import log
from .boot import cpuid, linux, loader
from .bus import Bus, ByteRegisters, Sink, UnclaimedAccess
from .config import VmConfig
from .console import Console
from .devices.legacy.i8042 import I8042
from .devices.legacy.rtc import Rtc
from .devices.legacy.uart16550 import Uart16550
from .disasm import disassemble
from .errors import BootError, ConfigError, KvmError, VmmError
from . import platform
from .irq import IrqRouter
from . import poll
from .poll import PollWindow
from .platform import (
    ACPI_PM_PORT, ACPI_PM_SIZE, ACPI_SCI_IRQ, COM1_IRQ, COM1_PORT, I8042_CMD_PORT, I8042_DATA_PORT, PIT_IRQ, PIT_PORT,
    POST_PORT, RTC_PORT, SPEAKER_PORT,
)
from .quirks import BoundedRatePit, Quirks
from .vstate import probe
from .vstate.kvm import Kvm, VcpuFd, VmFd
from .vstate.memory import GuestMemory
from .vstate.vcpu import apply_boot_state, set_boot_msrs
from . import seccomp
from ._native import ffi, lib


CONSOLE_DRAIN_CHUNK = 65536
CONSOLE_COALESCE_S = 0.001  # polled console output is written out at most this late


AVMM_EXIT_IO, AVMM_EXIT_MMIO = lib.AVMM_EXIT_IO, lib.AVMM_EXIT_MMIO

GP_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_FIELDS = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
VCPU_STATES = {
    lib.AVMM_VCPU_IDLE: "idle", lib.AVMM_VCPU_RUNNING: "running", lib.AVMM_VCPU_WAITING: "in an exit",
    lib.AVMM_VCPU_PAUSED: "paused", lib.AVMM_VCPU_DONE: "stopped",
}
AVMM_ACTION_RESUME, AVMM_ACTION_QUIT = lib.AVMM_ACTION_RESUME, lib.AVMM_ACTION_QUIT


class StopReason(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    ERROR = "error"
    HOST = "host"  # stopped from the host side: signal, console escape, API


@dataclass
class Stop:
    reason: StopReason
    message: str
    vcpu: int | None = None


@dataclass
class Timeline:
    """Wall-clock marks of a boot (time.monotonic())."""

    created: float = field(default_factory=time.monotonic)
    built: float = 0.0
    started: float = 0.0
    stopped: float = 0.0


class ComPort:
    """COM1 on the port bus: the UART model plus the C fast path it arms.

    After every access through the loop, the model says which of THR writes and LSR reads
    C may serve without it, and with which LSR value (`Uart16550.fast_path`).
    """

    def __init__(self, machine: "Machine", uart: Uart16550):
        self.machine = machine
        self.uart = uart
        self.regs = ByteRegisters(uart)

    def read(self, offset: int, size: int) -> int:
        value = self.regs.read(offset, size)
        self.machine.sync_uart_fast_path()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs.write(offset, size, value)
        self.machine.sync_uart_fast_path()


class PortOffsets:
    """A model addressed by absolute port numbers (read(port) / write(port, value))."""

    def __init__(self, model, base: int):
        self.regs = ByteRegisters(model, offset_base=base)

    def read(self, offset: int, size: int) -> int:
        return self.regs.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs.write(offset, size, value)


@dataclass(frozen=True)
class BootImages:
    """The files a boot loads, read once (off the loop) and kept across guest resets;
    `prepared` holds a bzImage's payload if the VMM unpacked it (boot/loader.py)."""

    kernel: bytes
    initrd: bytes | None = None
    prepared: loader.Prepared = loader.Prepared()
    seconds: float = 0.0  # wall time reading (and unpacking) took

    @classmethod
    def load(cls, cfg: VmConfig) -> "BootImages":
        """Read them now (for code that is not on a loop)."""
        t0 = time.monotonic()
        kernel = _read_file(cfg.kernel, "kernel")
        initrd = _read_file(cfg.initrd, "initrd") if cfg.initrd else None
        return cls(kernel, initrd, _prepare(cfg, kernel), time.monotonic() - t0)


async def read_images(cfg: VmConfig) -> BootImages:
    """Read the kernel and initrd, and unpack a bzImage's payload if that is wanted, in a
    worker thread: a 50 MB image or a second of decompression must not stall the loop."""
    t0 = time.monotonic()
    kernel = await asyncio.to_thread(_read_file, cfg.kernel, "kernel")
    initrd = await asyncio.to_thread(_read_file, cfg.initrd, "initrd") if cfg.initrd else None
    prepared = await asyncio.to_thread(_prepare, cfg, kernel)
    return BootImages(kernel, initrd, prepared, time.monotonic() - t0)


def _prepare(cfg: VmConfig, kernel: bytes) -> loader.Prepared:
    mode = cfg.decompress
    emulating = False
    if mode == loader.Decompress.AUTO and linux.kernel_kind(kernel) == "bzimage":
        emulating = probe.probe().emulating
    return loader.prepare(kernel, mode, emulating)


class Machine:
    def __init__(self, config: VmConfig, console: Console, images: BootImages, host=None):
        self.config = config
        self.console = console
        self.images = images
        self.host = host  # devices.slots.HostResources: what outlives this boot (TAPs)
        self.timeline = Timeline()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.kvm: Kvm | None = None
        self.vm: VmFd | None = None
        self.mem: GuestMemory | None = None
        self.vcpus: list[VcpuFd] = []
        self.quirks = Quirks(False)
        self.pit: BoundedRatePit | None = None  # the vmm-pit quirk's PIT, if on
        self.boot: loader.Boot | None = None
        self.console_observer = None  # called with the guest's console output (a boot profile)
        self._sysrq_key: bytes | None = None  # a SysRq key waiting for its break to be read
        self.cpu_template = cpuid.Template.HOST
        self._cvm = ffi.NULL
        self._notify_efd = -1
        self._console_efd = -1
        self._uart_irq_efd = -1
        self._uart_level = False
        self.acpi_pm = None  # devices.legacy.acpi_pm.AcpiPm, with ACPI
        self.acpi_tables = None  # boot.acpi.Tables, with ACPI
        self.acpi_build_s = 0.0  # what generating the ACPI tables took
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future | None = None
        self._stop_before_run: Stop | None = None
        self._ids = ffi.new("int[]", max(config.cpus, 1))
        self._drain_buf = ffi.new("uint8_t[]", CONSOLE_DRAIN_CHUNK)
        self._closed = False
        self.paused = False
        self.exit_poll = PollWindow(poll.POLL_MAX_NS if config.poll else 0)
        self.loop_wakeups = 0  # times the loop was woken for exits
        self.exit_batches = 0  # collections of posted exits (a wake-up, or a poll that hit)
        self.exits_served = 0
        self._uart_fast = None
        self._console_timer: asyncio.TimerHandle | None = None
        self.pci = None
        self.irq: IrqRouter | None = None

    # -- build -------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.config
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise
        self.timeline.built = time.monotonic()

    def _build(self, cfg: VmConfig) -> None:
        self.kvm = Kvm()
        if cfg.cpus > self.kvm.max_vcpus():
            raise ConfigError(f"-c {cfg.cpus}: this KVM supports at most {self.kvm.max_vcpus()} vCPUs")
        topology = cfg.cpu_topology
        kind = probe.probe(self.kvm)
        self.quirks = Quirks(kind.emulating and cfg.quirks, kind.detail)
        if cfg.cpu_template:
            self.cpu_template = cpuid.Template(cfg.cpu_template)
        else:
            self.cpu_template = cpuid.Template.BASELINE if kind.emulating else cpuid.Template.HOST
        log.info(
            f"KVM: {kind.detail}; CPU template {self.cpu_template.value}"
            + ("" if cfg.cpu_template else " (chosen by probing KVM)")
            + ("; quirks for an emulating KVM on" if self.quirks.enabled else "")
        )

        self.vm = VmFd(self.kvm)
        self.vm.create_irqchip()
        if self.quirks.vmm_pit:
            self.pit = BoundedRatePit(self.vm, PIT_IRQ)
            log.info("quirks: vmm-pit: the PIT is the VMM's, IRQ0 at most every "
                     f"{self.pit.min_interval_ns // 1_000_000} ms (no in-kernel PIT)")
        else:
            self.vm.create_pit()
        self.mem = GuestMemory(cfg.memory)
        for r in self.mem.regions:
            self.vm.set_memory_region(r.slot, r.gpa, r.size, r.hva)
        self.pio.strict = self.mmio.strict = cfg.strict_io

        rsdp = 0
        if cfg.acpi:
            from .boot import acpi  # noqa: PLC0415 (--no-acpi pays nothing for it)

            t0 = time.perf_counter()
            self.acpi_tables = acpi.build(topology.apic_ids(), platform.ram_top(self.mem.regions))
            self.acpi_tables.write(self.mem)
            self.acpi_build_s = time.perf_counter() - t0
            rsdp = self.acpi_tables.rsdp
            ids = topology.apic_ids()
            log.info(
                f"ACPI: tables at {rsdp:#x} ({len(self.acpi_tables.image)} bytes, {self.acpi_build_s * 1e3:.1f} ms); "
                f"vCPUs {topology.sockets}x{topology.cores}x{topology.threads} (sockets x cores x threads), "
                f"APIC IDs {ids[0]}..{ids[-1]}"
            )
        state = self._load_kernel(cfg, rsdp)

        self._notify_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._console_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cvm = lib.avmm_vm_new(cfg.cpus, self._notify_efd, self._console_efd)
        if self._cvm == ffi.NULL:
            raise KvmError("cannot allocate the vCPU threads' state")
        lib.avmm_vm_set_seccomp(self._cvm, seccomp.action(cfg.seccomp))  # each vCPU thread's filter
        entries = self.quirks.adjust_cpuid(cpuid.apply_template(self.kvm.supported_cpuid(), self.cpu_template))
        if self.quirks.hidden_pv_features:
            log.info(f"quirks: kvm-pv-hypercalls: hidden from the guest: {', '.join(self.quirks.hidden_pv_features)}")
        msrs = self.kvm.msr_index_list()
        for i in range(cfg.cpus):
            # KVM's vCPU ID is the initial APIC ID: the one the MADT and CPUID give.
            vcpu = self.vm.create_vcpu(i, topology.apic_id(i))
            self.vcpus.append(vcpu)
            r = lib.avmm_vcpu_attach(self._cvm, i, vcpu.fd, self.kvm.vcpu_mmap_size)
            if r < 0:
                raise KvmError(f"cannot map kvm_run of vCPU {i}: {os.strerror(-r)}")
            vcpu.set_cpuid(cpuid.for_vcpu(entries, topology, i))
            set_boot_msrs(vcpu, msrs)
        # The boot processor starts at the kernel's entry; the others wait for INIT/SIPI
        # from it, in the in-kernel LAPIC.
        apply_boot_state(self.vcpus[0], state)
        self._build_devices(cfg)

    def _load_kernel(self, cfg: VmConfig, rsdp: int = 0):
        images = self.images
        if linux.kernel_kind(images.kernel) is None:
            raise BootError(f"{cfg.kernel} is not a kernel: neither an ELF with a PVH entry nor a bzImage")
        boot = loader.load(
            self.mem, images.kernel, images.initrd, cfg.cmdline,
            prepared=images.prepared, linux_cmdline=self.quirks.linux_cmdline, rsdp=rsdp,
        )
        self.boot = boot
        log.info(f"boot: {cfg.kernel} {boot.path}")
        if boot.appended:
            log.info(f"quirks: linux-cmdline: appended to the kernel command line: {' '.join(boot.appended)}")
        return boot.state

    def _build_devices(self, cfg: VmConfig) -> None:
        self._uart_irq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vm.irqfd(self._uart_irq_efd, COM1_IRQ)
        self.uart = Uart16550(self._uart_irq, self._console_output, self._rx_space_available)
        self.pio.register(COM1_PORT, 8, ComPort(self, self.uart), "com1")
        self.i8042 = I8042(reset=lambda: self.request_stop(Stop(StopReason.RESET, "guest reset through the i8042 reset line")))
        self.pio.register(I8042_DATA_PORT, 1, PortOffsets(self.i8042, I8042_DATA_PORT), "i8042")
        self.pio.register(I8042_CMD_PORT, 1, PortOffsets(self.i8042, I8042_CMD_PORT), "i8042")
        below = self.mem.regions[0].size
        above = sum(r.size for r in self.mem.regions[1:])
        self.rtc = Rtc(mem_below_4g=below, mem_above_4g=above)
        self.pio.register(RTC_PORT, 2, PortOffsets(self.rtc, RTC_PORT), "rtc")
        self.pio.register(POST_PORT, 1, Sink(), "post")  # POST codes, and a delay port
        if self.pit is not None:  # else the in-kernel PIT serves these ports
            self.pio.register(PIT_PORT, 4, PortOffsets(self.pit.model, PIT_PORT), "pit")
            self.pio.register(SPEAKER_PORT, 1, PortOffsets(self.pit.model, SPEAKER_PORT), "port61")

        if cfg.acpi:
            from .devices.legacy.acpi_pm import AcpiPm  # noqa: PLC0415

            self.acpi_pm = AcpiPm(
                sci=self._sci,
                power_off=lambda: self.request_stop(Stop(StopReason.POWEROFF, "guest powered off through ACPI S5")),
                reset=lambda: self.request_stop(Stop(StopReason.RESET, "guest reset through the ACPI reset register")),
            )
            self.pio.register(ACPI_PM_PORT, ACPI_PM_SIZE, self.acpi_pm, "acpi-pm")
        self._build_pci(cfg)

    def _rx_space_available(self) -> None:
        # A SysRq key waiting behind its break goes first, then held console input.
        if self._sysrq_key is not None and self.uart.rx_room():
            key, self._sysrq_key = self._sysrq_key, None
            self.uart.receive(key)
        self.console.resume_input()

    def _console_output(self, data: bytes) -> None:
        if self.console_observer is not None:
            self.console_observer(data)
        self.console.write(data)

    def _build_pci(self, cfg: VmConfig) -> None:
        """The PCI root on bus 0, its config mechanisms, and the -s devices, BARs placed."""
        from .devices import slots  # noqa: PLC0415 (device models load the data path)
        from .devices.pci.device import PciBuses  # noqa: PLC0415
        from .devices.pci.root import PciRoot, install  # noqa: PLC0415
        from .devices.virtio.transport_pci import NotifyBinder  # noqa: PLC0415

        self.irq = IrqRouter(self.vm)
        self.irq.commit()  # the default routes, before any MSI exists
        any_length = self.kvm.check_extension(lib.KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0
        ctx = slots.BuildContext(cfg, self.mem, self.irq, NotifyBinder(self.vm, any_length), self.host)
        self.pci = PciRoot(PciBuses(self.mmio, self.pio))
        install(self.pci, self.pio, self.mmio)
        for s in cfg.slots:
            driver = slots.DRIVERS[s.driver]
            if driver.build is None:
                continue
            dev = driver.build(s, ctx)
            try:
                self.pci.add(s.slot, s.function, dev)
            except BaseException:
                dev.close()
                raise
        self.pci.assign_bars(platform.pci_mmio64_window(platform.ram_top(self.mem.regions)))

    # -- ACPI --------------------------------------------------------------------------
    def _sci(self, level: bool) -> None:
        # A level interrupt: KVM_IRQ_LINE holds the IOAPIC pin (and the PIC's) until the
        # guest clears the status bit; the IOAPIC redelivers it after EOI while it is held.
        self.vm.irq_line(ACPI_SCI_IRQ, level)

    def press_power_button(self) -> bool:
        """Press the ACPI power button; True if the guest has enabled its event (so it
        will hear it), False if it cannot (no ACPI, or the guest does not listen)."""
        if self.acpi_pm is None or self._closed:
            return False
        return self.acpi_pm.press_power_button()

    # -- the UART's wiring ---------------------------------------------------------------
    def _uart_irq(self, level: bool) -> None:
        # ISA interrupts are edge-triggered: a rising line is one pulse through the irqfd.
        if level and not self._uart_level:
            os.eventfd_write(self._uart_irq_efd, 1)
        self._uart_level = level

    def sync_uart_fast_path(self) -> None:
        if self._cvm == ffi.NULL:  # the machine is closed: nothing to arm
            return
        state = self.uart.fast_path()
        if state == self._uart_fast:
            return
        self._uart_fast = state
        thr, lsr = state
        flags = (lib.AVMM_UART_FAST_THR if thr else 0) | (lib.AVMM_UART_FAST_LSR if lsr is not None else 0)
        lib.avmm_uart_fast_set(self._cvm, COM1_PORT, flags, lsr or 0)

    def _drain_console(self) -> None:
        if self._cvm == ffi.NULL:
            return
        while True:
            n = lib.avmm_console_drain(self._cvm, self._drain_buf, CONSOLE_DRAIN_CHUNK)
            if not n:
                return
            self.uart.tx_batch(bytes(ffi.buffer(self._drain_buf, n)))
            if n < CONSOLE_DRAIN_CHUNK:
                return

    def _console_input(self, data: bytes) -> int:
        if self._cvm == ffi.NULL:
            return 0
        n = self.uart.receive(data)
        self.sync_uart_fast_path()
        return n

    def send_break(self) -> None:
        if self._cvm == ffi.NULL:
            return
        self.uart.send_break()
        self.sync_uart_fast_path()

    def send_sysrq(self, key: str) -> None:
        """The kernel's serial SysRq: a break on COM1, then `key` (one character)."""
        if len(key) != 1 or not key.isprintable() or not key.isascii():
            raise ValueError(f"a SysRq key is one printable ASCII character, not {key!r}")
        if self._cvm == ffi.NULL:
            raise VmmError("the VM is not running")
        if not self.uart.rx_room() or self._sysrq_key is not None:
            raise VmmError("COM1's receive buffer is full: the guest is not reading its console")
        self.uart.send_break()  # a 0 byte with LSR BI
        if self.uart.rx_room():
            self.uart.receive(key.encode())
        else:  # no FIFO: the key follows once the guest has read the break
            self._sysrq_key = key.encode()
        self.sync_uart_fast_path()

    def enable_sampling(self, period_ns: int, capacity: int) -> None:
        """RIP samples every `period_ns` on each vCPU (before run())."""
        r = lib.avmm_vm_set_sampling(self._cvm, period_ns, capacity)
        if r < 0:
            raise KvmError(f"cannot set up RIP sampling: {os.strerror(-r)}")

    def rip_samples(self, i: int, capacity: int) -> list[int]:
        """vCPU i's RIP samples (once its thread has ended)."""
        if self._cvm == ffi.NULL:
            return []
        buf = ffi.new("uint64_t[]", capacity)
        n = lib.avmm_vcpu_samples(self._cvm, i, buf, capacity)
        return list(buf[0:n])

    # -- run ---------------------------------------------------------------------------
    async def run(self) -> Stop:
        """Start the vCPUs and serve them until the VM stops; returns why."""
        loop = self._loop = asyncio.get_running_loop()
        if self._stop_before_run is not None:  # stopped before it ran: nothing to start
            return self._stop_before_run
        self._stopped = loop.create_future()
        loop.add_reader(self._notify_efd, self._on_exits)
        loop.add_reader(self._console_efd, self._on_console_output)
        self.console.attach(loop, self._console_input, on_break=self.send_break, on_quit=self._on_console_quit)
        self.sync_uart_fast_path()
        if self.pit is not None:
            self.pit.attach(loop)
        self.timeline.started = time.monotonic()
        try:
            for i in range(self.config.cpus):
                pin = self.config.pins.get(i, -1)
                r = lib.avmm_vcpu_start(self._cvm, i, pin)
                if r < 0:
                    raise KvmError(f"cannot start the thread of vCPU {i}: {os.strerror(-r)}")
            stop = await self._stopped
        finally:
            self._stop_vcpus()
            self.timeline.stopped = time.monotonic()
        return stop

    def request_stop(self, stop: Stop) -> None:
        """Stop the VM (the first reason given wins); also before run() has begun."""
        if self._stopped is None:
            if self._stop_before_run is None:
                self._stop_before_run = stop
        elif not self._stopped.done():
            self._stopped.set_result(stop)

    def _on_console_quit(self) -> None:
        self.request_stop(Stop(StopReason.HOST, "quit from the console (Ctrl-A x)"))

    @property
    def stopping(self) -> bool:
        return self._stopped is not None and self._stopped.done()

    def _on_console_output(self) -> None:
        """The C fast path has bytes from THR.

        A guest waiting for the THR empty interrupt gets it at once. A guest that polls LSR
        (printk's console) never waits on us: its bytes are gathered for CONSOLE_COALESCE_S
        and written out in one batch, instead of one loop wake-up per byte.
        """
        if self.uart.tx_interrupt_enabled:
            self._drain_and_sync()
            return
        self._loop.remove_reader(self._console_efd)
        self._console_timer = self._loop.call_later(CONSOLE_COALESCE_S, self._console_flush)

    def _console_flush(self) -> None:
        self._console_timer = None
        try:
            self._drain_and_sync()
        finally:
            if not self.stopping:
                self._loop.add_reader(self._console_efd, self._on_console_output)

    def _drain_and_sync(self) -> None:
        self._drain_console()
        self.sync_uart_fast_path()

    def _on_exits(self) -> None:
        """Serve posted exits; keep serving (busy-polling, asyncvmm.poll) while they come
        fast, so an exit-heavy guest pays no thread wake-up per exit."""
        cvm, ids, ncpus = self._cvm, self._ids, self.config.cpus
        n = lib.avmm_vm_collect(cvm, ids, ncpus, 0)
        if not n:
            return
        now = time.monotonic_ns()
        window = self.exit_poll
        window.woken(now)
        deadline = now + poll.POLL_SLICE_NS
        self.loop_wakeups += 1
        while True:
            # Bytes the fast path took from THR come before whatever these exits do; the
            # exits collected are served whatever the console does.
            try:
                self._drain_console()
            except Exception as exc:
                self.request_stop(Stop(StopReason.ERROR, f"internal error writing console output: {exc!r}"))
            self.exit_batches += 1
            self.exits_served += n
            for k in range(n):
                self._serve_exit(ids[k])
            if self.stopping:
                return
            # Past the deadline, exits still posted wake the loop again through the eventfd.
            n = lib.avmm_vm_collect(cvm, ids, ncpus, window.ns) if window.ns and time.monotonic_ns() < deadline else 0
            if not n:
                window.gave_up()
                return

    def _serve_exit(self, i: int) -> None:
        try:
            self._serve_exit_unguarded(i)
        except UnclaimedAccess as exc:  # -e: the first access nothing emulates stops the VM
            rip = self._rip(self.vcpus[i])
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: {exc}, at RIP {rip:#x} (-e)", i))
            lib.avmm_vcpu_complete(self._cvm, i, AVMM_ACTION_QUIT)
        except Exception as exc:  # a bug in a device model: stop the VM, never hang a vCPU
            where = f"{type(exc).__name__}: {exc}"
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: internal error serving an exit: {where}", i))
            lib.avmm_vcpu_complete(self._cvm, i, AVMM_ACTION_QUIT)

    def _serve_exit_unguarded(self, i: int) -> None:
        e = lib.avmm_vcpu_exit(self._cvm, i)
        kind = e.kind
        if kind == AVMM_EXIT_IO or kind == AVMM_EXIT_MMIO:
            bus = self.pio if kind == AVMM_EXIT_IO else self.mmio
            if e.count == 1:
                if e.is_write:
                    bus.access(e.addr, e.size, True, e.value)
                else:
                    e.value = bus.access(e.addr, e.size, False)
            else:  # string I/O: `count` accesses at one port
                bus.dispatch(e.addr, e.size, bool(e.is_write), ffi.buffer(e.data, e.size * e.count), e.count)
            resume = True
        else:
            resume = self._on_stop_exit(i, e)
        if self.stopping:
            resume = False
        lib.avmm_vcpu_complete(self._cvm, i, AVMM_ACTION_RESUME if resume else AVMM_ACTION_QUIT)

    def _on_stop_exit(self, i: int, e) -> bool:
        """A vCPU stopped on something other than I/O: serve it, or stop the VM."""
        reason = e.kvm_reason
        vcpu = self.vcpus[i]
        if e.kind == lib.AVMM_EXIT_ERROR:
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: KVM_RUN failed: {os.strerror(e.err)}", i))
            return False
        if reason == lib.KVM_EXIT_SHUTDOWN:
            rip = self._rip(vcpu)
            self.request_stop(Stop(StopReason.TRIPLE_FAULT, f"vCPU {i}: triple fault at RIP {rip:#x}", i))
            return False
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            suberror = e.info[0] & 0xFFFF_FFFF
            if suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
                insn, rip, bits = self._failed_instruction(vcpu, e)
                if self.quirks.on_emulation_failure(vcpu, insn):
                    return True
                text, length = disassemble(insn, rip, bits)
                hexbytes = insn[: length or len(insn)].hex(" ") if insn else "unreadable"
                self.request_stop(
                    Stop(StopReason.ERROR, f"vCPU {i}: emulation failure at RIP {rip:#x}: {hexbytes} ({text})", i)
                )
                return False
            names = {
                lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
                lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
            }
            what = names.get(suberror, f"suberror {suberror}")
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: KVM internal error: {what} at RIP {self._rip(vcpu):#x}", i))
            return False
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = e.info[0]
            if event == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.request_stop(Stop(StopReason.POWEROFF, "guest powered off", i))
            elif event == lib.KVM_SYSTEM_EVENT_RESET:
                self.request_stop(Stop(StopReason.RESET, "guest reset", i))
            else:
                self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: guest crashed (system event {event})", i))
            return False
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            self.request_stop(
                Stop(StopReason.ERROR, f"vCPU {i}: KVM could not enter the guest (hardware reason {e.info[0]:#x})", i)
            )
            return False
        name = EXIT_NAMES.get(reason, str(reason))
        self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: unhandled exit {name} at RIP {self._rip(vcpu):#x}", i))
        return False

    @staticmethod
    def _rip(vcpu: VcpuFd) -> int:
        try:
            return vcpu.get_regs().rip
        except KvmError:
            return 0

    def _failed_instruction(self, vcpu: VcpuFd, e) -> tuple[bytes, int, int]:
        """(instruction bytes, RIP, code size in bits) of a failed emulation."""
        sregs = vcpu.get_sregs()
        rip = vcpu.get_regs().rip
        bits = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
        ndata = e.info[0] >> 32
        flags = e.info[1] if ndata >= 1 else 0
        if ndata >= 3 and flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            raw = int(e.info[2]).to_bytes(8, "little") + int(e.info[3]).to_bytes(8, "little")
            size = min(raw[0], 15)
            if size:
                return raw[1 : 1 + size], rip, bits
        # No bytes from KVM: translate CS:RIP and read them from guest RAM.
        linear = (sregs.cs.base + rip) & ((1 << 64) - 1)
        gpa = vcpu.translate(linear) if sregs.cr0 & 0x8000_0000 else linear  # CR0.PG
        if gpa is None:
            return b"", rip, bits
        page_left = 4096 - (gpa & 4095)
        try:
            return self.mem.read(gpa, min(15, page_left)), rip, bits
        except Exception:
            return b"", rip, bits

    # -- pause / resume ----------------------------------------------------------------
    def pause(self) -> None:
        """Stop every vCPU from running guest code; returns once none does."""
        if not self.paused:
            lib.avmm_vm_pause(self._cvm)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            lib.avmm_vm_resume(self._cvm)
            self.paused = False

    def vcpu_state(self, i: int) -> int:
        return lib.avmm_vcpu_state(self._cvm, i)

    def vcpu_stats(self, i: int) -> dict:
        s = lib.avmm_vcpu_stats(self._cvm, i)
        exits = {EXIT_NAMES.get(r, str(r)): s.exits[r] for r in range(lib.AVMM_NR_REASONS) if s.exits[r]}
        ns_exits = {EXIT_NAMES.get(r, str(r)): s.ns_exits[r] for r in range(lib.AVMM_NR_REASONS) if s.ns_exits[r]}
        return {
            "exits": exits,
            "fast_io": s.fast_io,
            "posted": s.posted,
            "kicks": s.kicks,
            "ns_in_run": s.ns_in_run,
            "ns_waiting": s.ns_waiting,
            "ns_exits": ns_exits,  # out of KVM_RUN serving them, by exit reason
            "ns_fast_io": s.ns_fast_io,
            "samples": s.samples,
            "samples_dropped": s.samples_dropped,
            "first_high_rip_ns": s.first_high_rip_ns,  # CLOCK_MONOTONIC, 0: none
        }

    def read_registers(self, i: int) -> dict:
        """vCPU i's registers as plain ints (the vCPU must not be running guest code)."""
        vcpu = self.vcpus[i]
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        out = {name: getattr(regs, name) for name in GP_REGISTERS}
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            out[name] = getattr(sregs, name)
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            seg = getattr(sregs, name)
            out[name] = {f: getattr(seg, f) for f in SEGMENT_FIELDS}
        for name in ("gdt", "idt"):
            table = getattr(sregs, name)
            out[name] = {"base": table.base, "limit": table.limit}
        return {"vcpu": i, "state": VCPU_STATES.get(self.vcpu_state(i), "?"), "registers": out}

    def stats(self) -> dict:
        """The counters of this boot (cheap to read: the hot paths only increment)."""
        vcpus = [self.vcpu_stats(i) for i in range(self.config.cpus)] if self._cvm != ffi.NULL else []
        return {
            "vcpus": vcpus,
            "ports": dict(self.pio.accesses),
            "unclaimed_ports": {f"{port:#x}": n for port, n in self.pio.unclaimed.most_common(32)},
            "mmio": dict(self.mmio.accesses),
            "unclaimed_mmio": {f"{addr:#x}": n for addr, n in self.mmio.unclaimed.most_common(32)},
            "console": dict(self.uart.counters) if hasattr(self, "uart") else {},
            "pci": {dev.name: dev.stats() for _, dev in self.pci.devices() if hasattr(dev, "stats")} if self.pci else {},
            "quirks": dict(self.quirks.applied),
            **({"pit": self.pit.stats()} if self.pit is not None else {}),
            "acpi": dict(self.acpi_pm.counters) if self.acpi_pm is not None else {},
            "loop": {
                "wakeups": self.loop_wakeups,
                "batches": self.exit_batches,
                "exits": self.exits_served,
                "mean_batch": round(self.exits_served / self.exit_batches, 2) if self.exit_batches else 0.0,
                "poll_window_ns": self.exit_poll.ns,
            },
            "uptime_s": round(time.monotonic() - self.timeline.started, 3) if self.timeline.started else 0.0,
        }

    # -- teardown ----------------------------------------------------------------------
    def _stop_vcpus(self) -> None:
        if self._cvm != ffi.NULL:
            lib.avmm_vm_stop(self._cvm)
        if self.pit is not None:
            self.pit.detach()
        loop = self._loop
        if self._console_timer is not None:
            self._console_timer.cancel()
            self._console_timer = None
        try:
            if loop is not None:
                for fd in (self._notify_efd, self._console_efd):
                    if fd >= 0:
                        loop.remove_reader(fd)
                if hasattr(self, "uart"):
                    self._drain_console()  # the guest's last words
        finally:
            self.console.detach()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cvm != ffi.NULL:
            lib.avmm_vm_free(self._cvm)  # stops and joins any thread still running
            self._cvm = ffi.NULL
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.pit is not None:
            self.pit.close()
        if self.pci is not None:  # devices first: I/O in flight points into guest RAM
            for _, dev in self.pci.devices():
                dev.close()
            self.pci = None
        if self.irq is not None:
            self.irq.close()
            self.irq = None
        for name in ("_notify_efd", "_console_efd", "_uart_irq_efd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self.vm is not None:
            self.vm.close()
        if self.mem is not None:
            self.mem.close()
        if self.kvm is not None:
            self.kvm.close()


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def _exit_names() -> dict[int, str]:
    return {getattr(lib, n): n[len("KVM_EXIT_") :] for n in dir(lib) if n.startswith("KVM_EXIT_")}


EXIT_NAMES = _exit_names()
