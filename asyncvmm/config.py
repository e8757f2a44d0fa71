"""A VM's configuration: one dataclass, built by `asyncvmm run` and by the Python API alike.

The parse_* functions turn bhyve-style option strings into values and raise ConfigError
with a message naming the option; `VmConfig.validate` checks the whole.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .boot.cpuid import Topology
from .errors import ConfigError

MiB = 1 << 20
MIN_RIP_PERIOD_MS = 0.1  # --profile-rip: a sample costs a KVM_RUN exit and KVM_GET_REGS
MAX_RIP_PERIOD_MS = 10_000.0

# bhyve's -s drivers asyncvmm does not have (yet); those it has are in devices/slots.py.
PLANNED_DRIVERS = {"ahci-hd", "passthru", "xhci", "virtio-rnd", "virtio-console"}


@dataclass(frozen=True)
class PciSlot:
    """One `-s` option: a device at bus:slot:function."""

    bus: int
    slot: int
    function: int
    driver: str
    options: str = ""


@dataclass
class VmConfig:
    name: str = "asyncvmm"
    cpus: int = 1
    memory: int = 256 * MiB
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    console: str = "stdio"  # -l com1,SPEC: stdio | PATH | socket=PATH | tcp=HOST:PORT ("": nowhere)
    serial: dict[str, str] = field(default_factory=dict)  # -l com2..com4,SPEC: port name → SPEC
    no_reboot: bool = False
    cpu_template: str = ""  # "" = chosen by probing KVM
    quirks: bool = True  # workarounds for an emulating KVM, when one is detected
    poll: bool = True  # busy-poll briefly for the next exit, and (with a CPU to spare) for device I/O
    decompress: str = "auto"  # who unpacks a bzImage: auto | vmm | kernel (boot/loader.py)
    profile_boot: bool = False  # report where the boot's wall time went (profile.py)
    profile_rip_ms: float = 0.0  # sample guest RIPs this often for the profile (0: no)
    symbols: str = ""  # System.map or vmlinux naming the sampled RIPs (default: found)
    slots: list[PciSlot] = field(default_factory=list)
    pins: dict[int, int] = field(default_factory=dict)  # vCPU → host CPU
    topology: Topology | None = None  # -c sockets=,cores=,threads= (None: `cpus` sockets)
    acpi: bool = True  # -A: ACPI tables (--no-acpi leaves them out)
    strict_io: bool = False  # -e: an access nothing emulates stops the VM
    force_msi: bool = False  # -W: virtio-pci devices offer MSI, not MSI-X
    # --seccomp: off | log | kill (asyncvmm/seccomp.py); ASYNCVMM_SECCOMP sets the default
    seccomp: str = field(default_factory=lambda: os.environ.get("ASYNCVMM_SECCOMP", "off"))
    gdb: object = None  # -g/-G: gdb.options.GdbOptions, a gdb server for the guest
    xapic: bool = False  # -a: the local APIC in xAPIC mode (x2APIC hidden from CPUID)
    wired: bool = False  # -S: guest memory wired (mlock'd)

    @property
    def cpu_topology(self) -> Topology:
        return self.topology or Topology.of(self.cpus)

    def validate(self, *, com1_open: bool = False) -> "VmConfig":
        if not self.kernel:
            raise ConfigError("no kernel given: use --kernel PATH")
        check_readable(self.kernel, "kernel")
        if self.initrd:
            check_readable(self.initrd, "initrd")
        if self.cpus < 1:
            raise ConfigError(f"-c {self.cpus}: a VM needs at least one vCPU")
        topo = self.cpu_topology
        if topo.cpus != self.cpus:
            raise ConfigError(f"-c: {self.cpus} vCPUs do not match sockets*cores*threads={topo.cpus}")
        if topo.apic_id(self.cpus - 1) > MAX_APIC_ID:
            raise ConfigError(
                f"-c: sockets={topo.sockets},cores={topo.cores},threads={topo.threads} needs APIC IDs up to "
                f"{topo.apic_id(self.cpus - 1)}; at most {MAX_APIC_ID} (xAPIC) are supported"
            )
        if self.memory < 2 * MiB:
            raise ConfigError(f"-m {format_size(self.memory)}: a VM needs at least 2 MiB of memory")
        host = host_memory()
        if host and self.memory > host:
            raise ConfigError(f"-m {format_size(self.memory)} is more than this host's {format_size(host)} of memory")
        allowed = os.sched_getaffinity(0) if self.pins else set()
        for vcpu, cpu in self.pins.items():
            if vcpu >= self.cpus:
                raise ConfigError(f"-p {vcpu}:{cpu}: the VM has no vCPU {vcpu}")
            if cpu >= (os.cpu_count() or 1):
                raise ConfigError(f"-p {vcpu}:{cpu}: this host has no CPU {cpu}")
            if cpu not in allowed:
                cpus = ",".join(map(str, sorted(allowed)))
                raise ConfigError(f"-p {vcpu}:{cpu}: CPU {cpu} is not one this process may run on ({cpus})")
        if self.cpu_template not in ("", "host", "baseline"):
            raise ConfigError(f"--cpu {self.cpu_template}: choose host or baseline")
        if self.decompress not in ("auto", "vmm", "kernel"):
            raise ConfigError(f"--decompress {self.decompress}: choose auto, vmm or kernel")
        if self.seccomp not in ("off", "log", "kill"):
            raise ConfigError(f"--seccomp {self.seccomp}: choose off, log or kill")
        if self.profile_rip_ms and not MIN_RIP_PERIOD_MS <= self.profile_rip_ms <= MAX_RIP_PERIOD_MS:
            raise ConfigError(
                f"--profile-rip {self.profile_rip_ms:g}: a period from {MIN_RIP_PERIOD_MS:g} to {MAX_RIP_PERIOD_MS:g} ms"
            )
        if self.symbols:
            check_readable(self.symbols, "--symbols")
        check_serial(self, com1_open=com1_open)
        from .devices.slots import check_slots  # noqa: PLC0415 (devices import this module)

        check_slots(self)
        return self


def check_readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: permission denied")


def format_size(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / MiB:.1f} MiB" if size >= MiB else f"{size} bytes"


def host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_SIZE = re.compile(r"^(\d+)([kKmMgGtT]?)[bB]?$")
_UNITS = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str) -> int:
    """bhyve's -m: a number of MiB, or a number with a K/M/G/T suffix."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"-m {text}: not a size (use MiB, or a suffix: 512M, 2G)")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size % 4096:
        raise ConfigError(f"-m {text}: not a whole number of 4 KiB pages")
    return size


MAX_APIC_ID = 254  # the MADT's xAPIC entries (255 is the broadcast ID)


def parse_cpus(text: str) -> int:
    """bhyve's -c: N, or cpus=N,sockets=S,cores=C,threads=T: the number of vCPUs."""
    return parse_topology(text).cpus


def parse_topology(text: str) -> Topology:
    """bhyve's -c as a topology: N alone is N sockets (bhyve's default); a field not
    given is 1; cpus=, if given with the others, must be their product."""
    if text.isdigit():
        n = int(text)
        topo = Topology.of(n)
    else:
        fields = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("cpus", "sockets", "cores", "threads") or not value.isdigit():
                raise ConfigError(f"-c {text}: use N or cpus=N,sockets=S,cores=C,threads=T")
            fields[key] = int(value)
        given = any(k in fields for k in ("sockets", "cores", "threads"))
        topo = Topology(fields.get("sockets", 1), fields.get("cores", 1), fields.get("threads", 1))
        n = fields.get("cpus", topo.cpus)
        if not given:
            topo = Topology.of(n)
        elif n != topo.cpus:
            raise ConfigError(f"-c {text}: cpus={n} does not match sockets*cores*threads={topo.cpus}")
    if n < 1 or topo.cpus < 1:
        raise ConfigError(f"-c {text}: a VM needs at least one vCPU")
    return topo


def parse_console(text: str) -> str:
    """bhyve's -l: com1,stdio | com1,PATH | com1,socket=PATH."""
    dev, sep, spec = text.partition(",")
    if dev.lower() != "com1":
        raise ConfigError(f"-l {text}: only com1 exists (use com1,stdio, com1,PATH or com1,socket=PATH)")
    if not sep or not spec or spec == "socket=":
        raise ConfigError(f"-l {text}: say where com1 goes: com1,stdio, com1,PATH or com1,socket=PATH")
    return spec


def parse_serial(text: str) -> tuple[str, str]:
    """bhyve's -l: comN,stdio | comN,PATH | comN,socket=PATH | comN,tcp=HOST:PORT (N 1-4)."""
    from .platform import COM_PORT_BY_NAME  # noqa: PLC0415

    dev, sep, spec = text.partition(",")
    name = dev.lower()
    if name not in COM_PORT_BY_NAME:
        raise ConfigError(f"-l {text}: no such port {dev!r} (com1, com2, com3 or com4)")
    if not sep or not spec or spec in ("socket=", "tcp="):
        raise ConfigError(f"-l {text}: say where {name} goes: stdio, PATH, socket=PATH or tcp=HOST:PORT")
    return name, spec


def serial_config(options: list[str], cfg: "VmConfig") -> None:
    """The -l options into `cfg`: COM1's in `console`, the others in `serial`. COM1 is
    always there; without a -l of its own it goes to stdio, or nowhere when another
    port has stdio."""
    given: dict[str, str] = {}
    for text in options:
        name, spec = parse_serial(text)
        if name in given:
            raise ConfigError(f"-l {text}: {name} is given twice")
        given[name] = spec
    if "com1" in given:
        cfg.console = given.pop("com1")
    elif "stdio" in given.values():
        cfg.console = ""
    cfg.serial = given


def check_serial(cfg: "VmConfig", *, com1_open: bool = False) -> None:
    """The COM ports' backends, before anything starts (console.check_console).
    `com1_open`: COM1's backend is a console the caller opened already (its socket or port
    is ours, not another process's)."""
    from .console import check_console  # noqa: PLC0415
    from .platform import COM_PORT_BY_NAME  # noqa: PLC0415

    ports = {"com1": cfg.console, **cfg.serial}
    seen: dict[str, str] = {}
    for name, spec in ports.items():
        if name not in COM_PORT_BY_NAME:
            raise ConfigError(f"-l {name},{spec}: no such port {name!r} (com1, com2, com3 or com4)")
        where = f"-l {name},{spec}"
        if spec and spec in seen:
            what = "stdio" if spec == "stdio" else spec
            raise ConfigError(f"{where}: {seen[spec]} already goes to {what}")
        if spec:
            seen[spec] = name
        if not (name == "com1" and com1_open):
            check_console(spec, where)


def parse_slot(text: str) -> PciSlot:
    """bhyve's -s: SLOT[:FUNC],DRIVER[,CONFIG] or BUS:SLOT:FUNC,DRIVER[,CONFIG]."""
    where, sep, rest = text.partition(",")
    if not sep or not rest:
        raise ConfigError(f"-s {text}: use SLOT[:FUNC],DRIVER[,CONFIG]")
    driver, _, options = rest.partition(",")
    parts = where.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise ConfigError(f"-s {text}: {where} is not SLOT, SLOT:FUNC or BUS:SLOT:FUNC")
    nums = [int(p) for p in parts]
    bus, slot, func = (0, nums[0], 0) if len(nums) == 1 else (0, nums[0], nums[1]) if len(nums) == 2 else nums
    if bus > 255 or slot > 31 or func > 7:
        raise ConfigError(f"-s {text}: bus 0-255, slot 0-31, function 0-7")
    from .devices.slots import DRIVERS  # noqa: PLC0415

    if driver not in DRIVERS:
        if driver in PLANNED_DRIVERS:
            raise ConfigError(f"-s {text}: the {driver} driver is not available in this version of asyncvmm yet")
        raise ConfigError(f"-s {text}: no such driver {driver!r}")
    return PciSlot(bus, slot, func, driver, options)


def parse_pin(text: str) -> tuple[int, int]:
    """bhyve's -p VCPU:HOSTCPU."""
    vcpu, sep, cpu = text.partition(":")
    if not sep or not vcpu.isdigit() or not cpu.isdigit():
        raise ConfigError(f"-p {text}: use VCPU:HOSTCPU")
    return int(vcpu), int(cpu)
