"""`asyncvmm ctl`: the bhyvectl of asyncvmm, a client of each running VM's control socket.

Two spellings of the same requests (see HELP below):

    asyncvmm ctl list                                  every VM with a socket in run_dir()
    asyncvmm ctl state|regs|stats|pause|resume|destroy NAME [--json] ...
    asyncvmm ctl --vm=NAME [--cpu=N] --get-rip ... --get-all --get-stats --destroy
                                                       bhyvectl's own options

Exit status: 0 done; 1 the command failed (the VM's error answer, no answer in time);
2 bad usage, no such VM (no socket, or a stale one), or a bhyvectl option that asyncvmm does
not take. Every error is one line on stderr, prefixed "asyncvmm: ".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .. import log
from ..config import format_size
from ..errors import ConfigError, VmmError
from .client import ControlClient, list_vms

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DESTROY_TIMEOUT = 30.0  # seconds the guest has to power off before a hard stop
MAX_TIMEOUT = 3600.0
GONE_WAIT = 10.0  # seconds `destroy` waits for the VMM to end once it has answered

HELP = """\
usage: asyncvmm ctl list [--json]
       asyncvmm ctl state NAME [--json]
       asyncvmm ctl regs NAME [--vcpu N] [--json]
       asyncvmm ctl stats NAME [--json]
       asyncvmm ctl pause NAME [--json]
       asyncvmm ctl resume NAME [--json]
       asyncvmm ctl sysrq NAME KEY [--json]
       asyncvmm ctl destroy NAME [--timeout S] [--force] [--json]
       asyncvmm ctl --vm=NAME [--cpu=N] [bhyvectl options]

Control a running VM through its control socket (the analogue of bhyve's /dev/vmm/NAME).

commands:
  list       the VMs with a control socket: name, state, vCPUs, memory, uptime, pid
  state      the VM's state and configuration
  regs       a vCPU's registers (--vcpu N, default 0; the vCPUs are paused for the read)
  stats      exits per vCPU, time in the guest and waiting on the loop, port accesses,
             console counters
  pause      stop every vCPU from running guest code
  resume     let them run again
  sysrq      the kernel's magic SysRq on the serial console: a break on COM1, then
             KEY (one character: h help, t tasks, m memory, b reboot, o power off...)
  destroy    ask the guest to power off, stop it hard after --timeout S (default 30);
             --force stops it at once. Returns once the VMM has ended.
  destroy    press the guest's ACPI power button, stop it hard if it has not powered
             off (S5) after --timeout S (default 30); a guest that does not listen for
             the button is stopped at once, and so with --force. Says which happened
             ("powered off" or "stopped hard"; --json: "how": "acpi" or "hard").
             Returns once the VMM has ended.
  --json     print the VM's answer as JSON instead of text

bhyvectl's spellings (bhyvectl(8)):
  --vm=NAME --cpu=N            the VM, and the vCPU for register options (default 0)
  --get-rip --get-rsp --get-rax ... --get-r15 --get-rflags
  --get-cr0 --get-cr2 --get-cr3 --get-cr4 --get-efer
  --get-cs ... --get-ldtr      segment selectors
  --get-desc-cs ... --get-desc-ldtr --get-desc-gdtr --get-desc-idtr
                               base/limit/access of a segment or descriptor table
  --get-all                    every register above
  --get-stats                  the statistics
  --get-active-cpus --get-suspended-cpus --get-debug-cpus
                               all vCPUs / none unless stopping / the paused ones
  --destroy --force-poweroff   stop the VM at once (as bhyvectl: no wait for the guest)
  Options about VMX/SVM internals (--get-vmcs-*, --get-vmcb-*, --get-eptp, bitmaps ...)
  and bhyve's own kernel objects (--create, --run, --set-mem, capabilities, passthrough)
  are refused with status 2, as are those asyncvmm does not offer (--set-*, --inject-nmi,
  --force-reset, the RTC, snapshots: --checkpoint, --suspend).

exit status:
  0  done
  1  the command failed (the VM's error answer, no answer in time)
  2  bad usage, no such VM (no socket, or a stale one), an option asyncvmm does not take
"""


class _Help(Exception):
    """--help was asked for; the text has been printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        raise ConfigError(message)

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            raise ConfigError(message.strip())
        raise _Help()


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:
            raise ConfigError(
                "ctl needs a command: list, state, regs, stats, pause, resume, sysrq, destroy "
                "(or bhyvectl's --vm=NAME ...); see asyncvmm ctl --help"
            )
        if argv[0] in ("-h", "--help", "help") or (argv[0].startswith("--") and ("--help" in argv or "-h" in argv)):
            _out(HELP)
            return EXIT_OK
        if argv[0] == "--json" and len(argv) > 1 and not argv[1].startswith("-"):
            argv = argv[1:] + ["--json"]  # `ctl --json state NAME` as well as `ctl state NAME --json`
        if _is_bhyvectl(argv):
            return _bhyvectl(argv)
        return _command(argv)
    except _Help:
        return EXIT_OK
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except VmmError as e:
        log.error(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILED
    except BrokenPipeError:  # `asyncvmm ctl stats NAME | head`: the reader has had enough
        _silence_stdout()
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 (a bug, or an answer this version cannot read: one line)
        log.error(f"internal error in ctl: {type(e).__name__}: {e}")
        return EXIT_FAILED


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


# -- asyncvmm's own spelling ---------------------------------------------------------------


def _parser() -> _Parser:
    p = _Parser(prog="asyncvmm ctl", add_help=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help: str, with_name: bool = True) -> _Parser:
        c = sub.add_parser(name, help=help, description=help)
        if with_name:
            c.add_argument("name", metavar="NAME", help="the VM's name (or its socket's path)")
        c.add_argument("--json", action="store_true", help="print the answer as JSON")
        return c

    command("list", "the VMs with a control socket", with_name=False)
    command("state", "the VM's state and configuration")
    regs = command("regs", "a vCPU's registers")
    regs.add_argument("--vcpu", type=int, default=0, metavar="N", help="which vCPU (default 0)")
    command("stats", "exits, times, port and console counters")
    command("pause", "stop every vCPU from running guest code")
    command("resume", "let the vCPUs run again")
    sysrq = command("sysrq", "a break on COM1, then KEY: the kernel's serial SysRq")
    sysrq.add_argument("key", metavar="KEY", help="the SysRq key, one character (h: help)")
    destroy = command("destroy", "power the guest off, or stop it hard")
    destroy.add_argument(
        "--timeout", type=float, default=DESTROY_TIMEOUT, metavar="S",
        help=f"seconds the guest has to power off before a hard stop (default {DESTROY_TIMEOUT:g})",
    )
    destroy.add_argument("--force", action="store_true", help="stop it at once")
    return p


def _command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        vms = list_vms()
        _out(json.dumps(vms, indent=2) if args.json else format_list(vms))
        return EXIT_OK
    client = ControlClient(args.name)
    if args.command == "regs":
        if args.vcpu < 0:
            raise ConfigError(f"--vcpu {args.vcpu}: a vCPU's number is 0 or more")
        result = client.request("regs", vcpu=args.vcpu)
        _out(_json(result) if args.json else format_regs(result, args.vcpu))
    elif args.command == "state":
        result = client.request("state")
        _out(_json(result) if args.json else format_state(result))
    elif args.command == "stats":
        result = client.request("stats")
        _out(_json(result) if args.json else format_stats(result))
    elif args.command in ("pause", "resume"):
        result = client.request(args.command)
        _out(_json(result) if args.json else _paused_line(client.name, args.command, result))
    elif args.command == "sysrq":
        if len(args.key) != 1 or not args.key.isprintable() or not args.key.isascii():
            raise ConfigError(f"sysrq {args.key!r}: the key is one printable character (h for help)")
        result = client.request("sysrq", key=args.key)
        _out(_json(result) if args.json else f"VM {client.name}: SysRq {args.key} sent (a break, then {args.key!r})")
    elif args.command == "destroy":
        if not 0 <= args.timeout <= MAX_TIMEOUT:
            raise ConfigError(f"--timeout {args.timeout:g}: a number of seconds from 0 to {MAX_TIMEOUT:g}")
        result = destroy(client, timeout=args.timeout, force=args.force)
        _out(_json(result) if args.json else _destroyed_line(client.name, result))
    return EXIT_OK


def _json(result: dict) -> str:
    return json.dumps(result, indent=2)


def _paused_line(name: str, cmd: str, result: dict) -> str:
    state = result.get("state", "paused" if cmd == "pause" else "running")
    if cmd == "pause":
        return f"VM {name} paused" if state == "paused" else f"VM {name} is {state}"
    return f"VM {name} resumed" if state == "running" else f"VM {name} is {state}"


def _destroyed_line(name: str, result: dict) -> str:
    how = result.get("how")
    if how == "acpi":
        return f"VM {name} powered off (the guest shut down through ACPI)"
    if how == "hard":
        return f"VM {name} destroyed (stopped hard)"
    return f"VM {name} destroyed" + (f" ({how})" if how else "")


def destroy(client: ControlClient, *, timeout: float, force: bool) -> dict:
    """Ask the VM to end, then wait until its VMM has (its socket gone, or its process)."""
    pid = 0
    try:
        pid = int(client.request("state").get("pid") or 0)
    except (VmmError, TypeError, ValueError):
        if not os.path.exists(client.path):
            raise
    # The VM answers once it knows how the guest ended (the client waits `timeout` longer).
    result = client.request("destroy", timeout=timeout, force=force)
    if force:
        result.setdefault("how", "hard")
    if not _wait_gone(client.path, pid, GONE_WAIT):
        raise VmmError(f"VM {client.name} was told to stop but is still running after {GONE_WAIT:g} s")
    return result


def _wait_gone(path: str, pid: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while True:
        if not os.path.exists(path) or (pid and not _pid_alive(pid)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    """Is `pid` running? A zombie (ended, not yet reaped by its parent) is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True


# -- text output ---------------------------------------------------------------------------

STATE_KEYS = (
    ("name", "name"), ("state", "state"), ("pid", "pid"), ("vcpus", "vCPUs"), ("memory", "memory"),
    ("kernel", "kernel"), ("cpu_template", "CPU template"), ("boots", "boots"),
    ("uptime_s", "uptime"), ("emulating_kvm", "emulating KVM"),
)


def format_state(state: dict) -> str:
    rows = []
    shown = set()
    for key, label in STATE_KEYS:
        if key in state:
            rows.append((label, _state_value(key, state[key])))
            shown.add(key)
    for key, value in state.items():
        if key not in shown and key != "socket":
            rows.append((key.replace("_", " "), _state_value(key, value)))
    width = max((len(label) for label, _ in rows), default=0) + 1
    return "\n".join(f"{label + ':':<{width}} {value}" for label, value in rows)


def _state_value(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "memory" and isinstance(value, int):
        return format_size(value)
    if key.endswith("_s") and isinstance(value, (int, float)):
        return format_duration(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "-" if value is None or value == "" else str(value)


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


def format_list(vms: list[dict]) -> str:
    header = ("NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "PID")
    rows = [header]
    for vm in vms:
        memory = vm.get("memory")
        uptime = vm.get("uptime_s")
        rows.append((
            str(vm.get("name", "?")),
            str(vm.get("state", "?")),
            str(vm.get("vcpus", "-")),
            format_size(memory) if isinstance(memory, int) else "-",
            format_duration(uptime) if isinstance(uptime, (int, float)) else "-",
            str(vm.get("pid", "-")),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# Registers: names as in the SDM and KVM's struct kvm_regs / kvm_sregs.
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
DEBUG = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
TABLES = ("gdt", "idt")
_ALIASES = {"ldtr": "ldt", "gdtr": "gdt", "idtr": "idt", "eflags": "rflags"}

# RFLAGS bits worth naming in a dump (SDM vol. 1, 3.4.3).
RFLAGS_BITS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
               (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"),
               (19, "VIF"), (20, "VIP"), (21, "ID"))


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


class Registers:
    """A regs answer read into flat registers and segments, whatever its nesting:
    {"rax": ..} or {"regs": {"rax": ..}, "sregs": {"cs": {"selector": ..}, "cr0": ..}}."""

    def __init__(self, result: dict):
        self.values: dict[str, int] = {}
        self.segments: dict[str, dict] = {}
        self._walk(result)

    def _walk(self, obj: dict) -> None:
        for key, value in obj.items():
            k = _ALIASES.get(str(key).lower(), str(key).lower())
            if isinstance(value, dict):
                if k in SEGMENTS + TABLES and ({"base", "limit", "selector"} & set(value)):
                    self.segments.setdefault(k, value)
                else:
                    self._walk(value)
            else:
                n = _as_int(value)
                if n is not None:
                    self.values.setdefault(k, n)

    def get(self, name: str) -> int | None:
        return self.values.get(_ALIASES.get(name, name))

    def segment(self, name: str) -> dict | None:
        return self.segments.get(_ALIASES.get(name, name))


def _hex(value: int | None, digits: int = 16) -> str:
    return "-" if value is None else f"0x{value:0{digits}x}"


def _rflags_names(value: int) -> str:
    names = [n for bit, n in RFLAGS_BITS if value & (1 << bit)]
    iopl = (value >> 12) & 3
    if iopl:
        names.append(f"IOPL={iopl}")
    return " ".join(names)


def _seg_field(seg: dict, *names: str) -> int | None:
    for n in names:
        if n in seg:
            return _as_int(seg[n])
    return None


_SEG_FIELDS = ("type", "s", "dpl", "present", "avl", "l", "db", "g", "unusable")


def _seg_flags(name: str, seg: dict) -> dict[str, int]:
    """KVM's kvm_segment fields; those the answer leaves out are inferred: `s` (code/data,
    not system) from which register it is, `g` from whether the limit is in pages."""
    f = {n: _seg_field(seg, n) for n in _SEG_FIELDS}
    if f["s"] is None:
        f["s"] = 0 if name in ("tr", "ldt", "ldtr") else 1
    if f["g"] is None:
        limit = _seg_field(seg, "limit") or 0
        f["g"] = 1 if limit > 0xFFFFF and limit & 0xFFF == 0xFFF else 0
    return {n: v or 0 for n, v in f.items()}


def segment_access(name: str, seg: dict) -> int | None:
    """The access rights in VMX's layout (what bhyvectl prints), from KVM's fields."""
    given = _seg_field(seg, "access", "ar", "attrib", "attributes")
    if given is not None:
        return given
    if "type" not in seg:
        return None
    f = _seg_flags(name, seg)
    return (f["type"] & 0xF | (f["s"] & 1) << 4 | (f["dpl"] & 3) << 5 | (f["present"] & 1) << 7
            | (f["avl"] & 1) << 12 | (f["l"] & 1) << 13 | (f["db"] & 1) << 14 | (f["g"] & 1) << 15
            | (f["unusable"] & 1) << 16)


def _segment_attrs(name: str, seg: dict) -> str:
    if "type" not in seg:
        ar = segment_access(name, seg)
        return "" if ar is None else f"access 0x{ar:x}"
    f = _seg_flags(name, seg)
    if f["unusable"]:
        return "unusable"
    t = f["type"]
    if f["s"]:
        if t & 8:
            kind = "code " + ("r" if t & 2 else "-") + "x" + (" conforming" if t & 4 else "")
        else:
            kind = "data r" + ("w" if t & 2 else "-") + (" expand-down" if t & 4 else "")
    else:
        kind = {2: "LDT", 9: "TSS (available)", 11: "TSS (busy)"}.get(t, f"system type {t}")
    parts = [kind, f"dpl {f['dpl']}", "present" if f["present"] else "not present"]
    if f["s"]:
        parts.append("64-bit" if f["l"] else "32-bit" if f["db"] else "16-bit")
    if f["g"]:
        parts.append("4K granular")
    return ", ".join(parts)


def format_regs(result: dict, vcpu: int) -> str:
    regs = Registers(result)
    state = result.get("state")
    lines = [f"vCPU {result.get('vcpu', vcpu)}" + (f" ({state})" if isinstance(state, str) else "")]
    for row in range(0, len(GPRS), 4):
        lines.append("  ".join(f"{n:<3} {_hex(regs.get(n))}" for n in GPRS[row:row + 4]))
    rflags = regs.get("rflags")
    flags = f" [{_rflags_names(rflags)}]" if rflags is not None and _rflags_names(rflags) else ""
    lines.append(f"rip {_hex(regs.get('rip'))}  rflags {_hex(rflags)}{flags}")
    lines.append("")
    lines.append(f"{'':<4} {'selector':<8}  {'base':<18}  {'limit':<10}  attributes")
    for name in SEGMENTS:
        seg = regs.segment(name)
        if seg is None:
            continue
        sel = _seg_field(seg, "selector", "sel")
        lines.append(
            f"{name:<4} {_hex(sel, 4):<8}  {_hex(_seg_field(seg, 'base'))}  "
            f"{_hex(_seg_field(seg, 'limit'), 8):<10}  {_segment_attrs(name, seg)}".rstrip()
        )
    for name in TABLES:
        seg = regs.segment(name)
        if seg is not None:
            lines.append(f"{name:<4} {'':<8}  {_hex(_seg_field(seg, 'base'))}  {_hex(_seg_field(seg, 'limit'), 4)}")
    lines.append("")
    lines.append("  ".join(f"{n} {_hex(regs.get(n))}" for n in ("cr0", "cr2", "cr3", "cr4")))
    extra = [n for n in ("cr8", "efer", "apic_base") if regs.get(n) is not None]
    if extra:
        lines.append("  ".join(f"{n} {_hex(regs.get(n))}" for n in extra))
    debug = [n for n in DEBUG if regs.get(n) is not None]
    if debug:
        lines.append("  ".join(f"{n} {_hex(regs.get(n))}" for n in debug))
    return "\n".join(lines)


# -- stats -----------------------------------------------------------------------------------


def _ms(key: str, value) -> float | None:
    """A duration counter in milliseconds, from its key's unit suffix (ns_in_run, wait_ms ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    k = key.lower()
    for unit, scale in (("ns", 1e-6), ("us", 1e-3), ("ms", 1.0)):
        if k.startswith(unit + "_") or k.endswith("_" + unit):
            return value * scale
    if k.endswith("_s") or k.startswith("s_"):
        return value * 1e3
    return None


# How the C core's counters read in a dump.
VCPU_LABELS = {
    "ns_in_run": "in the guest",
    "ns_waiting": "waiting on the loop",
    "fast_io": "fast-path exits (served in C)",
    "posted": "exits posted to the loop",
    "kicks": "kicks",
}


def _vcpus(stats: dict) -> list[tuple[str, dict]]:
    v = stats.get("vcpus")
    if isinstance(v, list):
        return [(str(s.get("vcpu", i)) if isinstance(s, dict) else str(i), s) for i, s in enumerate(v)
                if isinstance(s, dict)]
    if isinstance(v, dict):
        return [(str(k), s) for k, s in v.items() if isinstance(s, dict)]
    return []


def _label(key: str) -> str:
    return VCPU_LABELS.get(key, key.replace("_", " "))


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def format_stats(stats: dict) -> str:
    lines: list[str] = []
    for idx, s in _vcpus(stats):
        lines.append(f"vCPU {idx}")
        exits = s.get("exits")
        if isinstance(exits, dict):
            total = sum(v for v in exits.values() if isinstance(v, int))
            lines.append(f"  exits: {total}")
            for kind, count in sorted(exits.items(), key=lambda kv: (-kv[1] if isinstance(kv[1], int) else 0, kv[0])):
                lines.append(f"    {kind:<20} {count}")
        rows = []
        for key, value in s.items():
            if key in ("exits", "vcpu"):
                continue
            ms = _ms(key, value)
            if ms is not None:
                rows.append((_label(key), f"{ms:.1f} ms"))
            elif isinstance(value, (dict, list)):
                rows.append((_label(key), json.dumps(value)))
            else:
                rows.append((_label(key), _number(value)))
        width = max((len(label) for label, _ in rows), default=0) + 1
        lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    scalars = []
    for key, value in stats.items():
        if key == "vcpus":
            continue
        if not isinstance(value, (dict, list)):
            scalars.append((key, value))
        elif not value:
            lines.append(f"{_section_title(key)}: none")
        else:
            lines.append(f"{_section_title(key)}:")
            lines += _section(key, value)
    for key, value in scalars:
        lines.append(f"{_scalar_label(key)}: {_fmt_counter(key, value)}")
    return "\n".join(lines)


SECTION_TITLES = {
    "ports": "ports served on the loop (accesses by device)",
    "unclaimed_ports": "ports nobody claims (accesses)",
    "mmio": "MMIO served on the loop (accesses by device)",
    "unclaimed_mmio": "MMIO nobody claims (accesses)",
    "console": "console (COM1)",
    "quirks": "quirks applied",
}


def _section_title(key: str) -> str:
    return SECTION_TITLES.get(key, key.replace("_", " "))


def _scalar_label(key: str) -> str:
    k = key
    for suffix in ("_ns", "_us", "_ms", "_s"):
        if k.endswith(suffix):
            k = k[: -len(suffix)]
            break
    return k.replace("_", " ")


def _section(key: str, value, indent: str = "  ") -> list[str]:
    """Any other part of the answer: a table of name → count, nested as it comes."""
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict):
                name = item.get("device") or item.get("name") or ""
                rng = ""
                start, length = _as_int(item.get("start")), _as_int(item.get("length") or item.get("size"))
                if start is not None:
                    rng = f"0x{start:x}" + (f"-0x{start + length - 1:x}" if length else "")
                rest = {k: v for k, v in item.items() if k not in ("device", "name", "start", "length", "size")}
                body = "  ".join(f"{k} {_fmt_counter(k, v)}" for k, v in rest.items())
                out.append(f"{indent}{name:<10} {rng:<14} {body}".rstrip())
            else:
                out.append(f"{indent}{item}")
        return out
    if isinstance(value, dict):
        out = []
        width = max((len(str(k)) for k in value), default=0) + 1
        for k, v in value.items():
            if isinstance(v, dict):
                flat = all(not isinstance(x, (dict, list)) for x in v.values())
                if flat:
                    body = "  ".join(f"{kk} {_fmt_counter(kk, vv)}" for kk, vv in v.items())
                    out.append(f"{indent}{str(k) + ':':<{width}} {body}")
                else:
                    out.append(f"{indent}{k}:")
                    out += _section(k, v, indent + "  ")
            elif isinstance(v, list):
                out.append(f"{indent}{k}:")
                out += _section(k, v, indent + "  ")
            else:
                out.append(f"{indent}{str(k) + ':':<{width}} {_fmt_counter(k, v)}")
        return out
    return [f"{indent}{_fmt_counter(key, value)}"]


def _fmt_counter(key: str, value) -> str:
    if str(key).endswith("_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_duration(value)
    ms = _ms(str(key), value)
    if ms is not None:
        return f"{ms:.1f} ms"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _number(value) if isinstance(value, (int, float)) else str(value)


# -- bhyvectl's spelling ---------------------------------------------------------------------

# The register options bhyvectl has, in the order it prints them.
BHYVE_REGS = ("efer", "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
              "rsp", "rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rflags")
BHYVE_DESCS = ("ds", "es", "fs", "gs", "ss", "cs", "tr", "ldtr", "gdtr", "idtr")
BHYVE_SELECTORS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
# What --get-all reads: what a regs answer holds (debug registers only when it has them).
GET_ALL_REGS = tuple(r for r in BHYVE_REGS if not r.startswith("dr"))

_NO_MEANING = "has no meaning on KVM"
_VMX = "KVM keeps the VMCS/VMCB to itself"

# bhyvectl options asyncvmm refuses: option (or prefix ending in '-') → (verdict, why).
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
    # Meaningful on KVM, but not offered by asyncvmm's control socket.
    "set-": ("is not supported by asyncvmm", "the control socket reads registers, it does not write them"),
    "desc-base": ("is not supported by asyncvmm", "the control socket does not write registers"),
    "desc-limit": ("is not supported by asyncvmm", "the control socket does not write registers"),
    "desc-access": ("is not supported by asyncvmm", "the control socket does not write registers"),
    "inject-nmi": ("is not supported by asyncvmm", "the control socket has no NMI command"),
    "assert-lapic-lvt": ("is not supported by asyncvmm", "the control socket has no LAPIC command"),
    "force-reset": ("is not supported by asyncvmm", "the control socket has no reset command"),
    "get-intinfo": ("is not supported by asyncvmm", "the control socket does not report pending events"),
    "get-guest-pat": ("is not supported by asyncvmm", "the control socket does not read MSRs"),
    "get-guest-sysenter": ("is not supported by asyncvmm", "the control socket does not read MSRs"),
    "get-cpu-topology": ("is not supported by asyncvmm", "use asyncvmm ctl state NAME for the vCPUs"),
    "get-rtc-time": ("is not supported by asyncvmm", "the control socket does not reach the RTC"),
    "get-rtc-nvram": ("is not supported by asyncvmm", "the control socket does not reach the RTC"),
    "set-rtc-time": ("is not supported by asyncvmm", "the control socket does not reach the RTC"),
    "set-rtc-nvram": ("is not supported by asyncvmm", "the control socket does not reach the RTC"),
    "rtc-nvram-offset": ("is not supported by asyncvmm", "the control socket does not reach the RTC"),
    "checkpoint": ("is not supported by asyncvmm", "asyncvmm has no snapshots"),
    "suspend": (
        "is not supported by asyncvmm",
        "it saves a snapshot, and asyncvmm has none; asyncvmm ctl pause NAME stops the vCPUs",
    ),
}

# The options asyncvmm takes, and whether they take a value.
_TAKES_VALUE = {"vm", "cpu"}
_FLAGS = (
    {"get-all", "get-stats", "destroy", "force-poweroff", "get-active-cpus", "get-suspended-cpus", "get-debug-cpus"}
    | {f"get-{r}" for r in BHYVE_REGS}
    | {f"get-desc-{s}" for s in BHYVE_DESCS}
    | {f"get-{s}" for s in BHYVE_SELECTORS}
)


def _is_bhyvectl(argv: list[str]) -> bool:
    """asyncvmm's commands come first and their options after; bhyvectl's are all options."""
    return argv[0].startswith("--") or any(a == "--vm" or a.startswith("--vm=") for a in argv)


def _refusal(option: str) -> tuple[str, str] | None:
    if option in _FLAGS or option in _TAKES_VALUE:
        return None
    if option in REFUSED:
        return REFUSED[option]
    for prefix, verdict in REFUSED.items():
        if prefix.endswith("-") and option.startswith(prefix):
            return verdict
    return None


class BhyveRequest:
    """What a bhyvectl command line asks for."""

    def __init__(self):
        self.vm: str | None = None
        self.cpu = 0
        self.regs: set[str] = set()  # register names, selector names ("cs"), descriptor names ("desc-cs")
        self.get_all = False
        self.stats = False
        self.destroy = False
        self.cpus: set[str] = set()  # active, suspended, debug


def parse_bhyvectl(argv: list[str]) -> BhyveRequest:
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
        if option in _TAKES_VALUE:
            if not eq:
                if i >= len(argv):
                    raise ConfigError(f"option --{option} needs a value: --{option}=VALUE")
                value = argv[i]
                i += 1
            if option == "vm":
                req.vm = value
            else:
                try:
                    req.cpu = int(value, 0)
                except ValueError:
                    raise ConfigError(f"--cpu={value}: a vCPU's number") from None
                if req.cpu < 0:
                    raise ConfigError(f"--cpu={value}: a vCPU's number is 0 or more")
            continue
        if option not in _FLAGS:
            raise ConfigError(f"unknown option --{option} (see asyncvmm ctl --help)")
        if eq:
            raise ConfigError(f"option --{option} takes no value")
        if option == "get-all":
            req.get_all = True
        elif option == "get-stats":
            req.stats = True
        elif option in ("destroy", "force-poweroff"):
            req.destroy = True
        elif option.endswith("-cpus"):
            req.cpus.add(option[len("get-"):-len("-cpus")])
        else:
            req.regs.add(option[len("get-"):])
    if req.vm is None:
        raise ConfigError("bhyvectl's spelling needs --vm=NAME")
    return req


def _bhyvectl(argv: list[str]) -> int:
    req = parse_bhyvectl(argv)
    client = ControlClient(req.vm)
    lines: list[str] = []
    if req.regs or req.get_all:
        result = client.request("regs", vcpu=req.cpu)
        lines += bhyve_registers(Registers(result), req)
    state = None
    if req.cpus or not (req.regs or req.get_all or req.stats or req.destroy):
        state = client.request("state")  # with nothing else asked: is it there? (status 0 or 2)
    for which in ("active", "debug", "suspended"):
        if which in req.cpus:
            lines.append(_bhyve_cpus(which, state))
    if req.stats:
        lines += bhyve_stats(client.request("stats"), req.cpu)
    if lines:
        _out("\n".join(lines))
    if req.destroy:
        destroy(client, timeout=0, force=True)
    return EXIT_OK


def bhyve_registers(regs: Registers, req: BhyveRequest) -> list[str]:
    """bhyvectl's lines: "rip[0]\t0x..." and "cs desc[0]\t0xBASE/0xLIMIT/0xACCESS"."""
    cpu = req.cpu
    lines = []
    for name in BHYVE_REGS:
        asked = name in req.regs
        if not asked and not (req.get_all and name in GET_ALL_REGS):
            continue
        value = regs.get(name)
        if value is None:
            if asked:  # the debug registers, until the VM reports them
                raise ConfigError(
                    f"bhyvectl option --get-{name} is not supported by asyncvmm (the VM does not report {name})"
                )
            continue
        lines.append(f"{name}[{cpu}]\t0x{value:016x}")
    for name in BHYVE_DESCS:
        if f"desc-{name}" not in req.regs and not req.get_all:
            continue
        seg = regs.segment(name)
        if seg is None:
            if f"desc-{name}" in req.regs:
                raise VmmError(f"the VM's answer for vCPU {cpu} has no {name}")
            continue
        base, limit = _seg_field(seg, "base") or 0, _seg_field(seg, "limit") or 0
        if name in ("gdtr", "idtr"):
            lines.append(f"{name}[{cpu}]\t0x{base:016x}/0x{limit:08x}")
        else:
            access = segment_access(name, seg) or 0
            lines.append(f"{name} desc[{cpu}]\t0x{base:016x}/0x{limit:08x}/0x{access:08x}")
    for name in BHYVE_SELECTORS:
        if name not in req.regs and not req.get_all:
            continue
        seg = regs.segment(name)
        sel = _seg_field(seg, "selector", "sel") if seg is not None else None
        if sel is None:
            if name in req.regs:
                raise VmmError(f"the VM's answer for vCPU {cpu} has no {name} selector")
            continue
        lines.append(f"{name}[{cpu}]\t0x{sel:04x}")
    return lines


def _bhyve_cpus(which: str, state: dict) -> str:
    n = _as_int(state.get("vcpus")) or 0
    running = state.get("state")
    if which == "active":
        cpus = list(range(n))
    elif which == "debug":  # bhyve's debug-stopped vCPUs: asyncvmm's paused ones
        cpus = list(range(n)) if running == "paused" else []
    else:  # bhyve suspends every vCPU on its way to reset/power-off
        cpus = list(range(n)) if running == "stopping" else []
    listed = ", ".join(str(c) for c in cpus) if cpus else "(none)"
    return f"{which} cpus:\t {listed}"


def bhyve_stats(stats: dict, cpu: int) -> list[str]:
    """bhyvectl's "vcpuN stats:" and one "description<TAB>value" line per counter."""
    vcpus = dict(_vcpus(stats))
    s = vcpus.get(str(cpu))
    if s is None:
        raise VmmError(f"the VM's stats have no vCPU {cpu}")
    lines = [f"vcpu{cpu} stats:"]
    for key, value in s.items():
        if key == "vcpu":
            continue
        if isinstance(value, dict):
            for kind, count in value.items():
                lines.append(f"{key + ' ' + str(kind):<40}\t{_number(count)}")
        elif not isinstance(value, list):
            lines.append(f"{key:<40}\t{_number(value)}")
    for section, value in stats.items():
        if section == "vcpus":
            continue
        for label, count in _flatten(section, value):
            lines.append(f"{label:<40}\t{count}")
    return lines


def _flatten(prefix: str, value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _flatten(f"{prefix} {k}", v)
        return out
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            name = item.get("device") or item.get("name") or str(i) if isinstance(item, dict) else str(i)
            if isinstance(item, dict):
                rest = {k: v for k, v in item.items() if k not in ("device", "name")}
                out += _flatten(f"{prefix} {name}", rest)
            else:
                out.append((f"{prefix} {name}", str(item)))
        return out
    return [(prefix, _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value))]
