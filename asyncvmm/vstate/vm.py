"""The KVM VM of one boot and its guest RAM: what every other part of the machine needs.

`Vm(config)` opens /dev/kvm, asks what kind of KVM it is (hardware or emulating: the quirks
and the CPU template follow from that), creates the VM with its in-kernel irqchip and
maps guest RAM into it. `close()` releases all of it (idempotent); a failure half-way
through `__init__` releases what was acquired before it is raised.

The PIT is not created here: it is a legacy port device (device_manager/legacy.py), the
in-kernel one or the VMM's, as the quirks say.
"""

from __future__ import annotations

from ..boot import cpuid
from ..config import VmConfig
from ..errors import ConfigError
from ..log import get_logger
from ..quirks import Quirks
from . import probe
from .kvm import Kvm, VmFd
from .memory import GuestMemory

log = get_logger("asyncvmm.machine")  # the machine's story: the probe first


class Vm:
    """KVM, the VM fd, guest RAM; the quirks and CPU template chosen for this KVM."""

    def __init__(self, config: VmConfig, host=None, *, memory_backing: tuple[int, int] | None = None):
        """`host`: the VM's HostResources (which disks share RAM with a back-end);
        `memory_backing`: (fd, offset) of a snapshot's memory part, mapped copy-on-write as
        guest RAM (vstate/memory.py)."""
        self.kvm: Kvm | None = None
        self.fd: VmFd | None = None
        self.mem: GuestMemory | None = None
        self.quirks = Quirks(False)
        self.emulating = False  # KVM runs guest code in its instruction emulator (probe.py)
        self.cpu_template = cpuid.Template.HOST
        try:
            self._create(config, host, memory_backing)
        except BaseException:
            self.close()
            raise

    def _create(self, cfg: VmConfig, host=None, memory_backing: tuple[int, int] | None = None) -> None:
        from ..devices.registry import shares_memory  # noqa: PLC0415

        shared = shares_memory(cfg, host)
        spare = probe.take_spare_vm()  # the CLI's: made while it imported (vstate/probe.py)
        if spare is not None:
            self.kvm, self.fd, mem = spare
            if mem is not None and (mem.size != cfg.memory or cfg.wired or shared or memory_backing is not None):
                # RAM of another kind was wanted: its slots are set, so the whole VM goes
                self.fd.close()
                mem.close()
                self.kvm.close()
                self.fd = None
                self.kvm = Kvm()
            else:
                self.mem = mem
        else:
            self.kvm = Kvm()
        if cfg.cpus > self.kvm.max_vcpus():
            raise ConfigError(f"-c {cfg.cpus}: this KVM supports at most {self.kvm.max_vcpus()} vCPUs")
        kind = probe.probe(self.kvm)
        self.quirks = Quirks(kind.emulating and cfg.quirks, kind.detail)
        self.emulating = kind.emulating
        if cfg.cpu_template:
            self.cpu_template = cpuid.Template(cfg.cpu_template)
        else:
            self.cpu_template = cpuid.Template.BASELINE if kind.emulating else cpuid.Template.HOST
        log.info(
            f"KVM: {kind.detail}; CPU template {self.cpu_template.value}"
            + ("" if cfg.cpu_template else " (chosen by probing KVM)")
            + ("; quirks for an emulating KVM on" if self.quirks.enabled else "")
        )
        if self.fd is None:
            self.fd = VmFd(self.kvm)
            self.fd.create_irqchip()
        if self.mem is None:  # else the spare VM's, in its slots already
            self.mem = GuestMemory(cfg.memory, wired=cfg.wired, shared=shared, backing=memory_backing)
            for r in self.mem.regions:
                self.fd.set_memory_region(r.slot, r.gpa, r.size, r.hva)

    def close(self) -> None:
        """After every user of the VM fd and of guest RAM has closed."""
        if self.fd is not None:
            self.fd.close()
            self.fd = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
