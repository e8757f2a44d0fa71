"""bhyvectl's spellings (bhyvectl(8)), translated onto ctl's requests (commands.py), with
bhyvectl's output ("rip[0]\t0x...") or, with --json, the answers as one JSON object.

    asyncvmm ctl --vm=NAME [--cpu=N] --get-rip --set-rax=1 --inject-nmi --get-rtc-time ...

What is done runs in bhyvectl's order: register writes, the NMI, the reads, the RTC,
the vCPU sets, pending events, statistics, topology, then a reset, power-off or destroy.
Options about VMX/SVM internals and bhyve's own kernel objects have no meaning on KVM and
are refused with status 2, saying why, as are the few asyncvmm does not offer.
"""

from __future__ import annotations

import datetime
import json
import os

from ..errors import ConfigError
from ..vstate import registers
from ..vstate.registers import Msr
from . import commands
from .client import ControlClient
from .regs_text import Registers, seg_field, segment_access

# The register options bhyvectl has, in the order it prints them.
BHYVE_REGS = ("efer", "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
              "rsp", "rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rflags")
BHYVE_DESCS = ("ds", "es", "fs", "gs", "ss", "cs", "tr", "ldtr", "gdtr", "idtr")
BHYVE_SELECTORS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")

_NO_MEANING = "has no meaning on KVM"
_VMX = "KVM keeps the VMCS/VMCB to itself"
_NOT_OFFERED = "is not supported by asyncvmm"

# bhyvectl options asyncvmm refuses: option (or prefix ending in '-') -> (verdict, why).
REFUSED: dict[str, tuple[str, str]] = {
    "get-vmcs-": (_NO_MEANING, _VMX),
    "set-vmcs-": (_NO_MEANING, _VMX),
    "get-vmcb-": (_NO_MEANING, _VMX),
    "get-avic-": (_NO_MEANING, _VMX),
    "get-apic-access-address": (_NO_MEANING, _VMX),
    "get-virtual-apic-address": (_NO_MEANING, _VMX),
    "get-eptp": (_NO_MEANING, "KVM does not expose its EPT/NPT root"),
    "get-exception-bitmap": (_NO_MEANING, _VMX),
    "set-exception-bitmap": (_NO_MEANING, _VMX),
    "get-io-bitmap-address": (_NO_MEANING, _VMX),
    "get-msr-bitmap": (_NO_MEANING, _VMX),
    "get-msr-bitmap-address": (_NO_MEANING, _VMX),
    "get-tsc-offset": (_NO_MEANING, _VMX),
    "get-exit-reason": (_NO_MEANING, _VMX),
    "get-gpa-pmap": (_NO_MEANING, "the host's page tables for guest memory are the kernel's"),
    "create": (_NO_MEANING, "asyncvmm run NAME creates and runs a VM in one process"),
    "run": (_NO_MEANING, "only the VMM's own vCPU threads run a vCPU"),
    "set-mem": (_NO_MEANING, "guest memory is given at start: asyncvmm run -m SIZE"),
    "get-memmap": (_NO_MEANING, "these are bhyve's vmm(4) memory segments"),
    "get-memseg": (_NO_MEANING, "these are bhyve's vmm(4) memory segments"),
    "get-lowmem": (_NO_MEANING, "these are bhyve's vmm(4) memory segments"),
    "get-highmem": (_NO_MEANING, "these are bhyve's vmm(4) memory segments"),
    "getcap": (_NO_MEANING, "bhyve's vCPU capabilities (hlt/pause exits, mtrap ...) are not KVM's"),
    "setcap": (_NO_MEANING, "bhyve's vCPU capabilities (hlt/pause exits, mtrap ...) are not KVM's"),
    "capname": (_NO_MEANING, "bhyve's vCPU capabilities (hlt/pause exits, mtrap ...) are not KVM's"),
    "unassign-pptdev": (_NO_MEANING, "asyncvmm has no PCI passthrough"),
    "get-x2apic-state": (_NO_MEANING, "the guest picks x2APIC mode in its APIC base MSR"),
    "set-x2apic-state": (_NO_MEANING, "the guest picks x2APIC mode in its APIC base MSR"),
    # Meaningful on KVM, not offered (yet).
    "assert-lapic-lvt": (_NOT_OFFERED, "the control socket has no LAPIC command; asyncvmm ctl nmi NAME delivers an NMI"),
}

SET_REGS = {f"set-{r}" for r in BHYVE_REGS}  # --set-REG=VALUE (bhyvectl: some; here every --get- twin)
SET_SELECTORS = {f"set-{s}" for s in BHYVE_SELECTORS}
SET_DESCS = {f"set-desc-{s}" for s in BHYVE_DESCS}
DESC_FIELDS = {"desc-base": "base", "desc-limit": "limit", "desc-access": "access"}
TAKES_VALUE = ({"vm", "cpu", "set-rtc-time", "set-rtc-nvram", "rtc-nvram-offset", "suspend", "checkpoint"} | SET_REGS | SET_SELECTORS
               | set(DESC_FIELDS))
GETS = ({f"get-{r}" for r in BHYVE_REGS} | {f"get-desc-{s}" for s in BHYVE_DESCS}
        | {f"get-{s}" for s in BHYVE_SELECTORS})
FLAGS = GETS | SET_DESCS | {
    "get-all", "get-stats", "destroy", "force-poweroff", "force-reset", "inject-nmi", "get-intinfo",
    "get-guest-pat", "get-guest-sysenter", "get-cpu-topology", "get-rtc-time", "get-rtc-nvram",
    "get-active-cpus", "get-suspended-cpus", "get-debug-cpus", "json",
}


def is_bhyvectl(argv: list[str]) -> bool:
    """asyncvmm's commands come first and their options after; bhyvectl's are all options."""
    return argv[0].startswith("--") or any(a == "--vm" or a.startswith("--vm=") for a in argv)


def _refusal(option: str) -> tuple[str, str] | None:
    if option in FLAGS or option in TAKES_VALUE:
        return None
    if option in REFUSED:
        return REFUSED[option]
    for prefix, verdict in REFUSED.items():
        if prefix.endswith("-") and option.startswith(prefix):
            return verdict
    return None


def _number(option: str, value: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"--{option}={value}: not a number (decimal, or 0x... hex)") from None
    if n < 0:
        raise ConfigError(f"--{option}={value}: a number 0 or more")
    return n


class BhyveRequest:
    """What a bhyvectl command line asks for."""

    def __init__(self):
        self.vm: str | None = None
        self.cpu = 0
        self.gets: set[str] = set()  # register names, selector names ("cs"), descriptor names ("desc-cs")
        self.sets: dict = {}  # the protocol's {"rip": n, "cs": {...}}
        self.set_descs: list[str] = []
        self.desc: dict[str, int] = {}  # --desc-base/limit/access
        self.flags: set[str] = set()  # the other flags, as spelled
        self.rtc_time: int | None = None
        self.rtc_nvram: int | None = None
        self.rtc_offset = 0
        self.json = False
        self.snapshot: tuple[str, str] | None = None  # (--suspend or --checkpoint, PATH)

    def has(self, flag: str) -> bool:
        return flag in self.flags or ("get-all" in self.flags and flag.startswith("get-") and flag != "get-debug-cpus")


def parse(argv: list[str]) -> BhyveRequest:
    req = BhyveRequest()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: bhyvectl's spelling takes only --options")
        option, eq, value = arg[2:].partition("=")
        refused = _refusal(option)
        if refused is not None:
            verdict, why = refused
            raise ConfigError(f"bhyvectl option --{option} {verdict} ({why})")
        if option in TAKES_VALUE:
            if not eq:
                if i >= len(argv):
                    raise ConfigError(f"option --{option} needs a value: --{option}=VALUE")
                value = argv[i]
                i += 1
            _take_value(req, option, value)
            continue
        if option not in FLAGS:
            raise ConfigError(f"unknown option --{option} (see asyncvmm ctl --help)")
        if eq:
            raise ConfigError(f"option --{option} takes no value")
        if option in GETS:
            req.gets.add(option[len("get-"):])
        elif option in SET_DESCS:
            req.set_descs.append(option[len("set-desc-"):])
        elif option == "json":
            req.json = True
        else:
            req.flags.add(option)
    if req.vm is None:
        raise ConfigError("bhyvectl's spelling needs --vm=NAME")
    for name in req.set_descs:  # --set-desc-cs with --desc-base/--desc-limit/--desc-access
        if not req.desc:
            raise ConfigError(f"--set-desc-{name} needs --desc-base, --desc-limit and/or --desc-access")
        fields = {k: v for k, v in req.desc.items() if not (name in ("gdtr", "idtr") and k == "access")}
        target = req.sets.setdefault(registers.canonical_name(name), {})
        if not isinstance(target, dict):
            target = req.sets[registers.canonical_name(name)] = {"selector": target}
        target.update(fields)
    if req.desc and not req.set_descs:
        raise ConfigError("--desc-base/--desc-limit/--desc-access go with --set-desc-SEG")
    return req


def _take_value(req: BhyveRequest, option: str, value: str) -> None:
    if option == "vm":
        req.vm = value
    elif option == "cpu":
        req.cpu = _number(option, value)
    elif option in DESC_FIELDS:
        req.desc[DESC_FIELDS[option]] = _number(option, value)
    elif option == "set-rtc-time":
        req.rtc_time = _number(option, value)
    elif option == "set-rtc-nvram":
        req.rtc_nvram = _number(option, value)
    elif option == "rtc-nvram-offset":
        req.rtc_offset = _number(option, value)
    elif option in ("suspend", "checkpoint"):
        if req.snapshot is not None:
            raise ConfigError(f"--{option}: give one of --suspend and --checkpoint, once")
        req.snapshot = (option, value)
    else:  # --set-REG=VALUE, --set-SEG=SELECTOR
        name = registers.canonical_name(option[len("set-"):])
        if name in req.sets:
            raise ConfigError(f"--{option} is given twice")
        req.sets[name] = _number(option, value) if option in SET_REGS else {"selector": _number(option, value)}


# -- running it ----------------------------------------------------------------------------------


def run(argv: list[str]) -> str:
    req = parse(argv)
    client = ControlClient(req.vm)
    lines: list[str] = []
    answers: dict = {}
    cpu = req.cpu

    if req.sets:
        answers["set"] = client.request("set", vcpu=cpu, registers=req.sets)
    if "inject-nmi" in req.flags:
        answers["nmi"] = client.request("nmi", vcpu=cpu)
    if req.gets or req.has("get-rip"):
        regs = client.request("regs", vcpu=cpu)
        answers["regs"] = regs
        lines += registers_lines(Registers(regs), req)
    msrs = [m for flag, ms in (("get-guest-pat", [Msr.IA32_PAT]),
                               ("get-guest-sysenter", [Msr.IA32_SYSENTER_CS, Msr.IA32_SYSENTER_ESP,
                                                       Msr.IA32_SYSENTER_EIP])) if req.has(flag) for m in ms]
    if msrs:
        got = client.request("msr", vcpu=cpu, indices=[int(m) for m in msrs])
        answers["msrs"] = got
        values = {int(k, 16): v for k, v in got.get("msrs", {}).items()}
        if Msr.IA32_PAT in values:
            lines.append(f"guest_pat[{cpu}]\t\t0x{values[Msr.IA32_PAT]:016x}")
        for msr, label in ((Msr.IA32_SYSENTER_CS, "cs"), (Msr.IA32_SYSENTER_ESP, "sp"), (Msr.IA32_SYSENTER_EIP, "ip")):
            if msr in values:
                lines.append(f"guest_sysenter_{label}[{cpu}]\t{values[msr]:#x}")
    lines += _rtc(client, req, answers)
    cpus = [w for w in ("active", "suspended", "debug") if req.has(f"get-{w}-cpus")]
    if cpus or not (answers or req.flags or req.rtc_time is not None or req.rtc_nvram is not None
                    or req.snapshot is not None):
        state = client.request("state")  # with nothing else asked: is it there? (status 0 or 2)
        answers["state"] = state
        for which in cpus:
            listed = _cpus(which, state)
            answers.setdefault("cpus", {})[which] = listed
            lines.append(f"{which} cpus:\t {', '.join(map(str, listed)) if listed else '(none)'}")
    if req.has("get-intinfo"):
        events = client.request("events", vcpu=cpu)
        answers["events"] = events
        lines += intinfo_lines(events)
    if req.has("get-stats"):
        stats = client.request("stats")
        answers["stats"] = stats
        lines += stats_lines(stats, cpu)
    if req.has("get-cpu-topology"):
        t = client.request("topology")
        answers["topology"] = t
        lines.append(f"cpu_topology:\tsockets={t.get('sockets')}, cores={t.get('cores')}, "
                     f"threads={t.get('threads')}, maxcpus={t.get('maxcpus')}")
    if req.snapshot is not None:  # bhyve's: --suspend saves and ends the VM, --checkpoint saves and goes on
        option, path = req.snapshot
        answers["snapshot"] = client.request("snapshot", path=os.path.abspath(path), stop=option == "suspend",
                                             resume=option == "checkpoint")
        lines.append(commands.snapshot_line(client.name, answers["snapshot"]))
    if "force-reset" in req.flags:
        answers["reset"] = client.request("reset")
        lines.append(commands._reset_line(client.name, answers["reset"]))
    if "force-poweroff" in req.flags:
        answers["poweroff"] = commands.ending(client, "poweroff")
        lines.append(commands.destroyed_line(client.name, answers["poweroff"]))
    elif "destroy" in req.flags:
        answers["destroy"] = commands.destroy(client, timeout=0, force=True)
        lines.append(commands.destroyed_line(client.name, answers["destroy"]))
    if req.json:
        return json.dumps(answers, indent=2)
    return "\n".join(lines)


def _rtc(client: ControlClient, req: BhyveRequest, answers: dict) -> list[str]:
    lines = []
    if req.rtc_nvram is not None or req.has("get-rtc-nvram"):
        fields = {"offset": req.rtc_offset}
        if req.rtc_nvram is not None:
            fields["value"] = req.rtc_nvram
        answers["rtc_nvram"] = got = client.request("rtc", **fields)
        if req.has("get-rtc-nvram"):
            lines.append(f"rtc nvram[{req.rtc_offset:03d}]: 0x{got.get('value', 0):02x}")
    if req.rtc_time is not None or req.has("get-rtc-time"):
        got = client.request("rtc", **({"time": req.rtc_time} if req.rtc_time is not None else {}))
        answers["rtc"] = got
        if req.has("get-rtc-time"):
            lines.append(rtc_time_line(got.get("time", 0)))
    return lines


def rtc_time_line(seconds: int) -> str:
    """bhyvectl's "rtc time 0x...: Wed Dec 03 13:45:00 2026"."""
    try:
        t = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        when = t.strftime("%a %b %d %H:%M:%S ") + str(t.year)
    except (OverflowError, OSError, ValueError):
        when = "out of range"
    return f"rtc time {seconds:#x}: {when}"


def registers_lines(regs: Registers, req: BhyveRequest) -> list[str]:
    """bhyvectl's lines: "rip[0]\t0x..." and "cs desc[0]\t0xBASE/0xLIMIT/0xACCESS"."""
    cpu, every = req.cpu, "get-all" in req.flags
    lines = []
    for name in BHYVE_REGS:
        if name not in req.gets and not every:
            continue
        value = regs.get(name)
        if value is None:
            if name in req.gets:
                raise ConfigError(f"bhyvectl option --get-{name} {_NOT_OFFERED} (the VM does not report {name})")
            continue
        lines.append(f"{name}[{cpu}]\t0x{value:016x}")
    for name in BHYVE_DESCS:
        if f"desc-{name}" not in req.gets and not every:
            continue
        seg = regs.segment(name)
        if seg is None:
            continue
        base, limit = seg_field(seg, "base") or 0, seg_field(seg, "limit") or 0
        if name in ("gdtr", "idtr"):
            lines.append(f"{name}[{cpu}]\t0x{base:016x}/0x{limit:08x}")
        else:
            lines.append(f"{name} desc[{cpu}]\t0x{base:016x}/0x{limit:08x}/0x{segment_access(seg) or 0:08x}")
    for name in BHYVE_SELECTORS:
        if name not in req.gets and not every:
            continue
        seg = regs.segment(name)
        sel = seg_field(seg, "selector") if seg is not None else None
        if sel is not None:
            lines.append(f"{name}[{cpu}]\t0x{sel:04x}")
    return lines


def _cpus(which: str, state: dict) -> list[int]:
    n = state.get("vcpus") if isinstance(state.get("vcpus"), int) else 0
    running = state.get("state")
    if which == "active":
        return list(range(n))
    if which == "debug":  # bhyve's debug-stopped vCPUs: asyncvmm's paused ones
        return list(range(n)) if running == "paused" else []
    return list(range(n)) if running == "stopping" else []  # bhyve suspends them on the way out


def intinfo_lines(events: dict) -> list[str]:
    """bhyvectl's "pending:\t..." and "current:\t..." from KVM's vCPU events."""
    ex, it, nmi = events.get("exception", {}), events.get("interrupt", {}), events.get("nmi", {})

    def exception() -> str:
        code = f" errcode {ex.get('error_code', 0):#x}" if ex.get("has_error_code") else ""
        return f"exception vector {ex.get('vector', 0)}{code}"

    if ex.get("pending"):
        pending = exception()
    elif nmi.get("pending"):
        pending = "nmi vector 2"
    else:
        pending = "n/a"
    if ex.get("injected"):
        current = exception()
    elif it.get("injected"):
        current = f"{'swint' if it.get('soft') else 'extint'} vector {it.get('vector', 0)}"
    elif nmi.get("injected"):
        current = "nmi vector 2"
    else:
        current = "n/a"
    return [f"pending:\t{pending}", f"current:\t{current}"]


def stats_lines(stats: dict, cpu: int) -> list[str]:
    """bhyvectl's "vcpuN stats:" and one "description<TAB>value" line per counter."""
    vcpus = stats.get("vcpus") if isinstance(stats.get("vcpus"), list) else []
    if not 0 <= cpu < len(vcpus):
        raise ConfigError(f"the VM has no vCPU {cpu} (it has {len(vcpus)})")
    lines = [f"vcpu{cpu} stats:"]
    for key, value in vcpus[cpu].items():
        if isinstance(value, dict):
            for kind, count in value.items():
                lines.append(f"{key + ' ' + str(kind):<40}\t{count}")
        elif not isinstance(value, list):
            lines.append(f"{key:<40}\t{value}")
    for section, value in stats.items():
        if section != "vcpus":
            lines += [f"{label:<40}\t{count}" for label, count in _flatten(section, value)]
    return lines


def _flatten(prefix: str, value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flatten(f"{prefix} {k}", v)]
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out += _flatten(f"{prefix} {i}", item)
        return out
    return [(prefix, str(value))]


HELP = """\
bhyvectl's spellings (bhyvectl(8)); --json prints the answers as one JSON object:
  --vm=NAME --cpu=N            the VM, and the vCPU for register options (default 0)
  --get-REG, --set-REG=VALUE   rip rsp rax..r15 rflags cr0 cr2 cr3 cr4 efer dr0..dr7
  --get-SEG, --set-SEG=SEL     segment selectors: cs ds es fs gs ss tr ldtr
  --get-desc-SEG, --set-desc-SEG --desc-base=B --desc-limit=L --desc-access=A
                               a segment's (or gdtr/idtr's) base/limit/access rights
  --get-all                    every register, the MSRs, RTC, vCPUs, events, stats below
  --inject-nmi                 an NMI to --cpu (KVM_NMI)
  --get-intinfo                the event pending and the one being delivered
  --get-guest-pat --get-guest-sysenter
                               IA32_PAT, IA32_SYSENTER_CS/ESP/EIP
  --get-rtc-time --set-rtc-time=SECONDS
  --get-rtc-nvram --set-rtc-nvram=BYTE --rtc-nvram-offset=N
  --get-cpu-topology --get-stats
  --get-active-cpus --get-suspended-cpus --get-debug-cpus
                               all vCPUs / none unless stopping / the paused ones
  --force-reset                the guest resets (boots again; ends with --no-reboot)
  --force-poweroff             the VM ends as if the guest had powered off (status 0)
  --destroy                    the VM is stopped at once (no word to the guest)
  Options about VMX/SVM internals (--get-vmcs-*, --get-vmcb-*, --get-eptp, bitmaps, the TSC
  offset, the exit reason) and bhyve's own kernel objects (--create, --run, --set-mem,
  memory segments, capabilities, x2APIC state, passthrough) have no meaning on KVM and are
  refused with status 2, as are --assert-lapic-lvt and snapshots (--checkpoint, --suspend).
"""
