"""The machine of one boot: an assembly of parts that each own one thing.

    vm       vstate/vm.py               the KVM VM and guest RAM; the quirks, the CPU template
    boot     boot/setup.py              the ACPI tables and the kernel loaded into RAM
    vcpus    vstate/vcpus.py            the vCPU threads, serving their exits, their registers
    legacy   device_manager/legacy.py   the port devices: COM ports, i8042, RTC, PIT, ACPI PM
    pci      device_manager/pci.py      the GSI router, the PCI root and the -s devices

Life cycle (one object per boot; a guest reset builds a new Machine):

    m = Machine(config, console, images)   # nothing acquired yet
    m.build()                      # synchronous: the parts above, in that order
    stop = await m.run()           # vCPU threads run until the guest or host stops it
    m.close()                      # fds, threads, RAM released (idempotent)

Threads: vCPU threads live in the C core. Everything here runs on the loop's thread: the
notify eventfd brings posted exits, which are dispatched to the port/MMIO buses and
completed; the console eventfd brings bytes the C fast path took from the COM ports' THR.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import log, platform
from .boot.setup import BootImages, BootSetup, read_images
from .bus import Bus
from .config import VmConfig
from .console import Console
from .device_manager.legacy import LegacyDevices
from .device_manager.pci import PciDevices
from .errors import VmmError
from .vstate.vcpus import EXIT_NAMES, Stop, StopReason, Vcpus
from .vstate.vm import Vm

if TYPE_CHECKING:
    from .boot.bootrom import FirmwareMapping

__all__ = ["BootImages", "EXIT_NAMES", "Machine", "Stop", "StopReason", "Timeline", "read_images"]


@dataclass
class Timeline:
    """Wall-clock marks of a boot (time.monotonic())."""

    created: float = field(default_factory=time.monotonic)
    built: float = 0.0
    started: float = 0.0
    stopped: float = 0.0


class Machine:
    def __init__(self, config: VmConfig, console: Console, images: BootImages, host=None):
        self.config = config
        self.console = console  # COM1's backend
        self.images = images
        # devices.slots.HostResources: what outlives this boot (TAPs, COM2-4's consoles);
        # without one the machine keeps its own, closed with it.
        self._own_host = host is None
        if host is None:
            from .devices.slots import HostResources  # noqa: PLC0415

            host = HostResources()
        self.host = host
        self.timeline = Timeline()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.pio.strict = self.mmio.strict = config.strict_io
        self.vm: Vm | None = None
        self.boot_setup: BootSetup | None = None
        self.vcpus: Vcpus | None = None
        self.legacy: LegacyDevices | None = None
        self.pci: PciDevices | None = None
        self.firmware: FirmwareMapping | None = None  # with -l bootrom
        self._console_observer = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future | None = None
        self._stop_before_run: Stop | None = None
        self._closed = False
        self.announce = True  # say the probe, quirks and boot path (a VM's later boots, after a reset, do not)
        self.restore = None  # a snapshot.file.Snapshot: build this machine in its state (no boot)
        self.incoming = False  # a live migration's destination: no boot; RAM and state come later

    # -- build -------------------------------------------------------------------------
    def build(self) -> None:
        """Build the machine. What its parts say (the probe, the tables, the boot path, the
        devices) is said once it is built, and only if `announce` (a VM's first boot: a
        reset is one line); an input refused on the way is then the one line said."""
        with log.held(say=self.announce):
            self._build()

    def _build(self) -> None:
        cfg = self.config
        snap_fd = -1
        try:
            if self.restore is not None:  # RAM from the snapshot's file, copy-on-write; nothing booted
                root = self.restore.root()  # a diff's pages go over its base's (restore_machine)
                snap_fd = root.open_memory()
                self.vm = Vm(cfg, self.host, memory_backing=(snap_fd, root.memory.offset))
            else:
                self.vm = Vm(cfg, self.host)
            if cfg.bootrom:  # the firmware at the top of 4 GiB, before anything writes RAM
                from .boot.bootrom import Firmware, FirmwareMapping  # noqa: PLC0415 (only with -l bootrom)

                self.firmware = FirmwareMapping(self.vm.fd, self.vm.mem, Firmware.load(cfg.bootrom, cfg.bootvars), self.mmio)
                self.vm.quirks.rom = (self.firmware.fw.base, bytes(self.firmware.fw.code))  # fpu-control reads operands there
            if self.restore is None and not self.incoming:
                ports = [c for c in platform.COM_PORTS if c.name == "com1" or c.name in cfg.serial]
                self.boot_setup = BootSetup(self.vm.mem, cfg, self.images, self.vm.quirks.linux_cmdline, ports)
            boot_state = self.boot_setup.state if self.boot_setup is not None else None
            self.vcpus = Vcpus(self.vm, cfg, boot_state, self.pio, self.mmio, self.request_stop)
            consoles = {"com1": self.console, **{n: self.host.console(n, spec) for n, spec in cfg.serial.items()}}
            self.legacy = LegacyDevices(self.vm, self.vcpus, cfg, consoles, self.pio, self.request_stop)
            self.legacy.console_observer = self._console_observer
            if cfg.bootrom and cfg.kernel and self.boot_setup is not None:  # the firmware loads it: fw_cfg hands it over
                self._kernel_to_firmware(cfg)
            self.pci = PciDevices(self.vm, cfg, self.pio, self.mmio, self.host, reset_control=self.legacy.reset_control,
                                  place_acpi_pm=self.legacy.place_acpi_pm)
            if self.restore is not None:
                from .snapshot.state import restore_machine  # noqa: PLC0415

                restore_machine(self, self.restore)
        except BaseException:
            self.close()
            raise
        finally:
            if snap_fd >= 0:
                import os  # noqa: PLC0415

                os.close(snap_fd)  # the mappings keep the file
        self.timeline.built = time.monotonic()

    def _kernel_to_firmware(self, cfg: VmConfig) -> None:
        from .boot import fw_cfg_items  # noqa: PLC0415
        from .boot.linux import is_linux  # noqa: PLC0415

        cmdline, appended = cfg.cmdline, list[str]()
        if is_linux(self.images.kernel):
            cmdline, appended = self.vm.quirks.linux_cmdline(cmdline)
        fw_cfg_items.add_kernel(self.legacy.fw_cfg, self.vm.mem, self.images.kernel, self.images.initrd, cmdline)
        log.get_logger("asyncvmm.machine").info(f"boot: {cfg.kernel} through fw_cfg, for the firmware's linuxboot option ROM")
        if appended:
            log.get_logger("asyncvmm.quirks").info(
                f"quirks: linux-cmdline: appended to the kernel command line: {' '.join(appended)}")

    # -- what callers look at -------------------------------------------------------------
    @property
    def mem(self):
        return self.vm.mem if self.vm is not None else None

    @property
    def quirks(self):
        return self.vm.quirks

    @property
    def cpu_template(self):
        return self.vm.cpu_template

    @property
    def boot(self):
        """How the kernel was loaded (boot.loader.Boot), once built."""
        return self.boot_setup.loaded if self.boot_setup is not None else None

    @property
    def irq(self):
        return self.pci.irq if self.pci is not None else None

    @property
    def paused(self) -> bool:
        return self.vcpus is not None and self.vcpus.paused

    @property
    def console_observer(self):
        """Called with COM1's output (a boot profile watches it)."""
        return self._console_observer

    @console_observer.setter
    def console_observer(self, fn) -> None:
        self._console_observer = fn
        if self.legacy is not None:
            self.legacy.console_observer = fn

    # -- run ---------------------------------------------------------------------------
    async def run(self) -> Stop:
        """Start the vCPUs and serve them until the VM stops; returns why."""
        loop = self._loop = asyncio.get_running_loop()
        if self._stop_before_run is not None:  # stopped before it ran: nothing to start
            return self._stop_before_run
        self._stopped = loop.create_future()
        self.vcpus.attach(loop, self.legacy.drain_signalled_console, lambda: self.stopping)
        self.legacy.attach(loop, on_quit=self._on_console_quit)
        self.timeline.started = time.monotonic()
        try:
            self.vcpus.start()
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

    # -- pause / resume, looking inside ---------------------------------------------------
    def pause(self) -> None:
        """Stop every vCPU from running guest code; returns once none does."""
        self.vcpus.pause()

    def resume(self) -> None:
        self.vcpus.resume()

    def vcpu_state(self, i: int) -> int:
        return self.vcpus.state(i)

    def vcpu_stats(self, i: int) -> dict:
        return self.vcpus.stats_of(i)

    def read_registers(self, i: int) -> dict:
        """vCPU i's registers as plain ints (the vCPU must not be running guest code)."""
        return self.vcpus.read_registers(i)

    # -- changing a stopped vCPU (ctl set/nmi/msr; the caller has paused the VM) --------
    def vcpus_in_exit(self) -> list[int]:
        return self.vcpus.in_exit() if self.vcpus is not None else []

    def write_registers(self, i: int, changes: dict) -> None:
        self.vcpus.write_registers(i, changes)

    def inject_nmi(self, i: int) -> None:
        self.vcpus.inject_nmi(i)

    def vcpu_events(self, i: int) -> dict:
        return self.vcpus.events(i)

    def read_msrs(self, i: int, indices: list[int]) -> dict[int, int]:
        return self.vcpus.read_msrs(i, indices)

    def write_msr(self, i: int, index: int, value: int) -> bool:
        return self.vcpus.write_msr(i, index, value)

    @property
    def rtc(self):
        """The RTC model (ctl rtc reads and sets it)."""
        if self.legacy is None or self.legacy.rtc is None:
            raise VmmError("the VM has no RTC yet")
        return self.legacy.rtc

    def enable_sampling(self, period_ns: int, capacity: int) -> None:
        """RIP samples every `period_ns` on each vCPU (before run())."""
        self.vcpus.enable_sampling(period_ns, capacity)

    def kvm_stats_files(self) -> list:
        """KVM's statistics files, the VM's then each vCPU's (vstate/kvm_stats.py); a KVM
        without them gives []. Open them before the vCPUs run: KVM_GET_STATS_FD on a vCPU
        takes its mutex, held for as long as it is in KVM_RUN (a guest spinning in user
        mode never leaves it)."""
        from .vstate.kvm_stats import open_stats  # noqa: PLC0415 (only for a boot profile)

        files = [open_stats(self.vm.fd.fd, "the VM")] + [open_stats(v.fd, f"vCPU {v.idx}") for v in self.vcpus.fds]
        if None in files:
            for f in files:
                if f is not None:
                    f.close()
            return []
        return files

    def rip_samples(self, i: int, capacity: int) -> list[int]:
        """vCPU i's RIP samples (once its thread has ended)."""
        return self.vcpus.rip_samples(i, capacity) if self.vcpus is not None else []

    def stats(self) -> dict:
        """The counters of this boot (cheap to read: the hot paths only increment)."""
        legacy = self.legacy.stats() if self.legacy is not None else {"console": {}, "acpi": {}}
        vcpus = self.vcpus.stats() if self.vcpus is not None else []
        for s in vcpus:  # the first kernel-half RIP sample, as seconds after the vCPUs started
            if s["first_high_rip_ns"] and self.timeline.started:
                s["first_high_rip_after_s"] = round(s["first_high_rip_ns"] / 1e9 - self.timeline.started, 3)
        return {
            "vcpus": vcpus,
            "ports": dict(self.pio.accesses),
            "unclaimed_ports": {f"{port:#x}": n for port, n in self.pio.unclaimed.most_common(32)},
            "mmio": dict(self.mmio.accesses),
            "unclaimed_mmio": {f"{addr:#x}": n for addr, n in self.mmio.unclaimed.most_common(32)},
            "pci": self.pci.stats() if self.pci is not None else {},
            "quirks": {"on": self.vm.quirks.in_effect(), "applied": dict(self.vm.quirks.applied)}
            if self.vm is not None else {},
            **legacy,
            "loop": self.vcpus.loop_stats() if self.vcpus is not None else {},
            "uptime_s": round(time.monotonic() - self.timeline.started, 3) if self.timeline.started else 0.0,
        }

    # -- the legacy devices, from the host -------------------------------------------------
    def press_power_button(self) -> bool:
        """Press the ACPI power button; True if the guest has enabled its event (so it
        will hear it), False if it cannot (no ACPI, or the guest does not listen)."""
        if self.legacy is None or self._closed:
            return False
        return self.legacy.press_power_button()

    def send_break(self) -> None:
        if self.legacy is not None:
            self.legacy.send_break()

    def send_sysrq(self, key: str) -> None:
        """The kernel's serial SysRq: a break on COM1, then `key` (one character)."""
        if self.legacy is None:
            raise VmmError("the VM is not running")
        self.legacy.send_sysrq(key)

    # -- teardown ----------------------------------------------------------------------
    def _stop_vcpus(self) -> None:
        self.vcpus.stop()
        try:
            self.legacy.detach()
        finally:
            self.vcpus.detach(self._loop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The vCPU threads first (nothing runs guest code or posts exits any more), then
        # the devices (I/O in flight points into guest RAM), then the VM and its RAM.
        for part in (self.vcpus, self.legacy, self.pci, self.vm, self.firmware):
            if part is not None:
                part.close()
        if self._own_host:
            self.host.close()
