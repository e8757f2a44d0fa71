"""A VM's configuration: one dataclass, built by `asyncvmm run` and by the Python API alike.

The parse_* functions turn bhyve-style option strings into values and raise ConfigError
with a message naming the option; `VmConfig.validate` checks the whole, and names what is
wrong as its caller wrote it: a flag (`-m 1`) for the command line, a keyword
(`memory=1`) for a Python caller.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .boot.cpuid import Topology
from .devices.registry import check_slots, lookup, names
from .errors import ConfigError
from .seccomp import default_mode as seccomp_default_mode

if TYPE_CHECKING:
    from .gdb.options import GdbOptions

MiB = 1 << 20
MIN_RIP_PERIOD_MS = 0.1  # --profile-rip: a sample costs a KVM_RUN exit and KVM_GET_REGS
MAX_RIP_PERIOD_MS = 10_000.0

# bhyve's -s drivers asyncvmm does not have (yet); those it has register in devices/registry.py.
PLANNED_DRIVERS = {"ahci-hd", "passthru", "xhci"}


@dataclass(frozen=True)
class PciSlot:
    """One `-s` option: a device at bus:slot:function (parse_slot("3,virtio-blk,disk.img")
    makes one from bhyve's spelling)."""

    bus: int
    slot: int
    function: int
    driver: str
    options: str = ""


_unnamed = itertools.count(1)


def default_name() -> str:
    """A name no other VM of this process has: asyncvmm-PID-N."""
    return f"asyncvmm-{os.getpid()}-{next(_unnamed)}"


# How the command line spells each field in an error (validate(cli=True)); a Python
# caller reads the field's own name (`memory=1`).
CLI_FLAGS = {
    "name": "NAME", "cpus": "-c", "memory": "-m", "kernel": "--kernel", "initrd": "--initrd", "pins": "-p",
    "cpu_template": "--cpu", "decompress": "--decompress", "profile_rip_ms": "--profile-rip", "symbols": "--symbols",
    "seccomp": "--seccomp", "bootrom": "-l bootrom",
}


@dataclass
class VmConfig:
    """What a VM is made of: `asyncvmm run`'s flags as fields (the flag in brackets).

    name: the VM's name, for `asyncvmm ctl` and its control socket (letters, digits, '.',
        '_', '-'; default: asyncvmm-PID-N, unique in this process) [NAME]
    cpus: vCPUs [-c N]
    memory: guest RAM in bytes (64 << 20), or a size string as -m takes it ("64M", "2G");
        at least 2 MiB. A number below 1 MiB is refused: it is bytes, not MiB [-m]
    kernel: path of the kernel: a bzImage, a vmlinux, or an ELF with a PVH entry [--kernel]
    initrd, cmdline: the initial ramdisk's path and the kernel command line [--initrd, --cmdline]
    console: where COM1 goes: "stdio", a file PATH, "socket=PATH", "tcp=HOST:PORT", or ""
        (nowhere); the API's VM gives it to `vm.console` (a stream pair) unless a Console
        is passed [-l com1,SPEC]
    serial: COM2-COM4: port name -> SPEC as for console, e.g. {"com2": "socket=/run/c2"} [-l comN,SPEC]
    no_reboot: end when the guest resets or triple-faults, instead of restarting it [--no-reboot]
    cpu_template: "host" or "baseline"; "" chooses by probing KVM [--cpu]
    quirks: workarounds for an emulating KVM, when one is detected [not --no-quirks]
    poll: busy-poll briefly for the next exit and, with a CPU to spare, for device I/O
    decompress: who unpacks a bzImage: "auto", "vmm" or "kernel" [--decompress]
    profile_boot, profile_rip_ms, symbols: the boot profile [--profile-boot, --profile-rip, --symbols]
    slots: PCI devices, e.g. [parse_slot("3,virtio-blk,disk.img")] [-s]
    pins: vCPU -> host CPU its thread runs on [-p VCPU:HOSTCPU]
    topology: sockets, cores and threads (None: `cpus` sockets) [-c cpus=,sockets=,...]
    acpi: ACPI tables [-A; --no-acpi]
    strict_io: an access to a port or address nothing emulates stops the VM [-e]
    force_msi: virtio-pci devices offer one MSI, not MSI-X [-W]
    gdb: a gdb server for the guest (gdb.options.GdbOptions; None: none) [-g PORT, -G]
    xapic: the local APIC in xAPIC mode, x2APIC hidden from CPUID [-a]
    wired: guest memory wired (mlock'd: never swapped or moved) [-S]
    bootrom, bootvars: a firmware image (SeaBIOS, OVMF) started at the reset vector instead
        of a kernel, and an OVMF variables file (boot/bootrom.py) [-l bootrom,FILE[,VARSFILE]]
    debugcon: a file for what the guest writes to port 0x402, the firmwares' debug console
        (devices/legacy/debugcon.py) [-l debugcon,PATH]
    seccomp: the vCPU, loop and helper threads' system-call filters: "off", "log" or "kill"
        (default $ASYNCVMM_SECCOMP, else kill; in-process, vCPU threads only; asyncvmm/seccomp.py) [--seccomp]
    block_backends: disks an embedder serves with coroutines, by name (asyncvmm.BlockBackend);
        a slot `virtio-blk-backend,NAME` attaches one [none: Python objects only]
    """

    name: str = field(default_factory=default_name)
    cpus: int = 1
    memory: int = 256 * MiB  # bytes; a size string ("64M") is turned into them at construction
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
    seccomp: str = field(default_factory=seccomp_default_mode)
    gdb: GdbOptions | None = None  # -g/-G: a gdb server for the guest
    xapic: bool = False  # -a: the local APIC in xAPIC mode (x2APIC hidden from CPUID)
    wired: bool = False  # -S: guest memory wired (mlock'd)
    bootrom: str = ""  # -l bootrom,FILE: firmware started at the reset vector (boot/bootrom.py)
    bootvars: str = ""  # -l bootrom,FILE,VARSFILE: its UEFI variables
    debugcon: str = ""  # -l debugcon,PATH: port 0x402's bytes (firmware debug output) to a file
    block_backends: dict[str, Any] = field(default_factory=dict)  # virtio-blk-backend,NAME (block/backend.py)

    def __post_init__(self):
        memory: object = self.memory
        if isinstance(memory, str):  # "64M", as -m takes it
            self.memory = parse_memory(memory, f"memory={memory!r}")

    @property
    def cpu_topology(self) -> Topology:
        """`topology`, or `cpus` sockets of one core when it is None."""
        return self.topology or Topology.of(self.cpus)

    def validate(self, cli: bool = False, *, com1_open: bool = False) -> "VmConfig":
        """Check the whole; ConfigError names the culprit as the command line spells it
        (`cli`) or as a Python caller does (`kernel=`). `com1_open`: COM1's backend is a
        console the caller opened already. Returns self."""

        def said(field: str, value) -> str:  # "-m 1 MiB" / "memory=1048576"
            return f"{CLI_FLAGS[field]} {value}" if cli else f"{field}={value!r}"

        from .control.protocol import NAME_RE  # noqa: PLC0415 (the control socket's names)

        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ConfigError(f"VM name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        if self.bootrom or self.bootvars:
            from .boot.bootrom import Firmware  # noqa: PLC0415

            if not self.bootrom:
                raise ConfigError("bootvars= needs bootrom=")
            Firmware.load(self.bootrom, self.bootvars)  # the files' checks, before anything starts
            if not any(s.driver == "lpc" and (s.slot, s.function) == (31, 0) for s in self.slots):  # as bhyve
                lpc = "-s 31,lpc" if cli else "slots=[PciSlot(0, 31, 0, 'lpc')]"
                raise ConfigError(f"{said('bootrom', self.bootrom)}: firmware needs the LPC bridge at 00:1f.0 ({lpc})")
        elif not self.kernel:
            raise ConfigError("no kernel given: use --kernel PATH" if cli else "no kernel given: VmConfig(kernel=PATH)")
        if self.kernel:
            check_readable(self.kernel, "kernel")
        if self.debugcon:
            parent = os.path.dirname(os.path.abspath(self.debugcon))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise ConfigError(f"-l debugcon,{self.debugcon}: cannot write there ({parent} is not a writable directory)")
        if self.initrd:
            check_readable(self.initrd, "initrd")
        if self.cpus < 1:
            raise ConfigError(f"{said('cpus', self.cpus)}: a VM needs at least one vCPU")
        topo = self.cpu_topology
        if topo.cpus != self.cpus:
            raise ConfigError(f"{CLI_FLAGS['cpus'] if cli else 'topology'}: {self.cpus} vCPUs do not match "
                              f"sockets*cores*threads={topo.cpus}")
        if topo.apic_id(self.cpus - 1) > MAX_APIC_ID:
            raise ConfigError(
                f"{CLI_FLAGS['cpus'] if cli else 'topology'}: sockets={topo.sockets},cores={topo.cores},"
                f"threads={topo.threads} needs APIC IDs up to "
                f"{topo.apic_id(self.cpus - 1)}; at most {MAX_APIC_ID} (xAPIC) are supported"
            )
        if not cli and self.memory < MiB:  # a Python caller who meant MiB, as -m takes them
            raise ConfigError(f"memory={self.memory!r} is bytes, too few for a VM: give bytes "
                              f"({self.memory} << 20) or a size string (\"{self.memory}M\")")
        if self.memory < 2 * MiB:
            raise ConfigError(f"{said('memory', format_size(self.memory) if cli else self.memory)}: "
                              "a VM needs at least 2 MiB of memory")
        host = host_memory()
        if host and self.memory > host:
            raise ConfigError(f"{said('memory', format_size(self.memory) if cli else self.memory)} is more than "
                              f"this host's {format_size(host)} of memory")
        allowed = os.sched_getaffinity(0) if self.pins else set()
        for vcpu, cpu in self.pins.items():
            pin = f"-p {vcpu}:{cpu}" if cli else f"pins={{{vcpu}: {cpu}}}"
            if vcpu >= self.cpus:
                raise ConfigError(f"{pin}: the VM has no vCPU {vcpu}")
            if cpu >= (os.cpu_count() or 1):
                raise ConfigError(f"{pin}: this host has no CPU {cpu}")
            if cpu not in allowed:
                cpus = ",".join(map(str, sorted(allowed)))
                raise ConfigError(f"{pin}: CPU {cpu} is not one this process may run on ({cpus})")
        if self.cpu_template not in ("", "host", "baseline"):
            raise ConfigError(f"{said('cpu_template', self.cpu_template)}: choose host or baseline")
        if self.decompress not in ("auto", "vmm", "kernel"):
            raise ConfigError(f"{said('decompress', self.decompress)}: choose auto, vmm or kernel")
        if self.seccomp not in ("off", "log", "kill"):
            raise ConfigError(f"{said('seccomp', self.seccomp)}: choose off, log or kill")
        if self.profile_rip_ms and not MIN_RIP_PERIOD_MS <= self.profile_rip_ms <= MAX_RIP_PERIOD_MS:
            raise ConfigError(
                f"{said('profile_rip_ms', format(self.profile_rip_ms, 'g'))}: a period from "
                f"{MIN_RIP_PERIOD_MS:g} to {MAX_RIP_PERIOD_MS:g} ms"
            )
        if self.symbols:
            check_readable(self.symbols, CLI_FLAGS["symbols"] if cli else "symbols")
        check_serial(self, com1_open=com1_open)
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


def parse_memory(text: str, what: str = "") -> int:
    """bhyve's -m: a number of MiB, or a number with a K/M/G/T suffix. `what` names it
    in errors (default: "-m TEXT")."""
    what = what or f"-m {text}"
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"{what}: not a size (use MiB, or a suffix: 512M, 2G)")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size % 4096:
        raise ConfigError(f"{what}: not a whole number of 4 KiB pages")
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
        if text.lower().startswith("bootrom,") or text.lower() == "bootrom":  # not a COM port: the firmware
            from .boot.bootrom import parse_bootrom  # noqa: PLC0415

            if cfg.bootrom:
                raise ConfigError(f"-l {text}: bootrom is given twice")
            cfg.bootrom, cfg.bootvars = parse_bootrom(text.partition(",")[2])
            continue
        if text.lower().startswith("debugcon,"):  # the firmware's debug port (0x402) to a file
            cfg.debugcon = text.partition(",")[2]
            if not cfg.debugcon:
                raise ConfigError(f"-l {text}: name a file: -l debugcon,PATH")
            continue
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
    if lookup(driver) is None:
        if driver in PLANNED_DRIVERS:
            raise ConfigError(f"-s {text}: the {driver} driver is not available in this version of asyncvmm yet")
        raise ConfigError(f"-s {text}: no such driver {driver!r} (drivers: {', '.join(names())})")
    return PciSlot(bus, slot, func, driver, options)


def parse_pin(text: str) -> tuple[int, int]:
    """bhyve's -p VCPU:HOSTCPU."""
    vcpu, sep, cpu = text.partition(":")
    if not sep or not vcpu.isdigit() or not cpu.isdigit():
        raise ConfigError(f"-p {text}: use VCPU:HOSTCPU")
    return int(vcpu), int(cpu)
