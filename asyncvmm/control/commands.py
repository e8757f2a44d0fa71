"""`asyncvmm ctl`'s commands, one table: each command's arguments, the request it sends
(a handler of the same name in handlers.py serves it) and how its answer reads as text.
The parser and `ctl --help` are generated from this table; bhyvectl's spellings
(bhyvectl.py) are a translation onto the same requests."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, VmmError
from ..vstate import registers
from . import report
from .client import ControlClient, list_vms
from .regs_text import format_regs, format_set

DESTROY_TIMEOUT = 30.0  # seconds the guest has to power off before a hard stop
MAX_TIMEOUT = 3600.0
GONE_WAIT = 10.0  # seconds `destroy` waits for the VMM to end once it has answered


class Parser(argparse.ArgumentParser):
    """argparse that says one line and raises (status 2), never prints usage or exits."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("add_help", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise ConfigError((message or "bad usage").strip())


@dataclass
class Command:
    name: str
    help: str  # what it does, one line (the help is generated from these)
    request: Callable[[argparse.Namespace], dict] = lambda a: {}  # the request's fields
    text: Callable[[Any, argparse.Namespace, str], str] = lambda r, a, n: report.format_state(r)
    arguments: Callable[[argparse.ArgumentParser], object] = lambda p: None
    vcpu: bool = False  # takes --vcpu N
    with_name: bool = True
    run: Callable[[Any, argparse.Namespace], Any] | None = None  # instead of one request
    details: str = ""  # more help, shown by `ctl COMMAND --help`


# -- the requests ------------------------------------------------------------------------


def _vcpu(args) -> dict:
    if args.vcpu < 0:
        raise ConfigError(f"--vcpu {args.vcpu}: a vCPU's number is 0 or more")
    return {"vcpu": args.vcpu}


def _set_request(args) -> dict:
    return {**_vcpu(args), "registers": registers.assignments(args.assignments)}


def _msr_request(args) -> dict:
    indices, value = [], None
    for word in args.msrs:
        index, eq, raw = word.partition("=")
        indices.append(registers.msr_index(index))
        if eq:
            if len(args.msrs) != 1:
                raise ConfigError(f"{word}: an MSR write names one MSR (no others beside it)")
            try:
                value = int(raw, 0)
            except ValueError:
                raise ConfigError(f"{word}: {raw!r} is not a number") from None
    req = {**_vcpu(args), "indices": indices}
    if value is not None:
        req["value"] = value
    return req


def parse_time(text: str) -> int:
    """Seconds since 1970 (bhyvectl's --set-rtc-time), or an ISO date-time in UTC."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    import datetime  # noqa: PLC0415

    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r}: a time as seconds since 1970 or YYYY-MM-DD[ HH:MM:SS] (UTC)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return int(t.timestamp())


def _rtc_request(args) -> dict:
    req: dict = {}
    if args.set is not None:
        req["time"] = parse_time(args.set)
    if args.nvram is not None:
        offset, eq, value = args.nvram.partition("=")
        try:
            req["offset"] = int(offset, 0)
            if eq:
                req["value"] = int(value, 0)
        except ValueError:
            raise ConfigError(f"--nvram {args.nvram}: OFFSET or OFFSET=VALUE, numbers") from None
    return req


def _sysrq_request(args) -> dict:
    if len(args.key) != 1 or not args.key.isprintable() or not args.key.isascii():
        raise ConfigError(f"sysrq {args.key!r}: the key is one printable character (h for help)")
    return {"key": args.key}


# -- destroy and list: more than one request -------------------------------------------------


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
    wait_gone(client, pid)
    return result


def ending(client: ControlClient, cmd: str) -> dict:
    """A request that ends the VM (poweroff): sent, then the VMM waited for."""
    pid = 0
    try:
        pid = int(client.request("state").get("pid") or 0)
    except (VmmError, TypeError, ValueError):
        pass
    result = client.request(cmd)
    wait_gone(client, pid)
    return result


def wait_gone(client: ControlClient, pid: int) -> None:
    deadline = time.monotonic() + GONE_WAIT
    while not (not os.path.exists(client.path) or (pid and not _pid_alive(pid))):
        if time.monotonic() >= deadline:
            raise VmmError(f"VM {client.name} was told to stop but is still running after {GONE_WAIT:g} s")
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


def _run_destroy(client, args) -> dict:
    if not 0 <= args.timeout <= MAX_TIMEOUT:
        raise ConfigError(f"--timeout {args.timeout:g}: a number of seconds from 0 to {MAX_TIMEOUT:g}")
    return destroy(client, timeout=args.timeout, force=args.force)


def destroyed_line(name: str, result: dict) -> str:
    how = result.get("how")
    if how == "acpi":
        return f"VM {name} powered off (the guest shut down through ACPI)"
    if how == "hard":
        return f"VM {name} destroyed (stopped hard)"
    if how == "poweroff":
        return f"VM {name} powered off (forced: the guest was not asked)"
    return f"VM {name} destroyed" + (f" ({how})" if how else "")


def _paused_line(name: str, cmd: str, result: dict) -> str:
    state = result.get("state", "paused" if cmd == "pause" else "running")
    if cmd == "pause":
        return f"VM {name} paused" if state == "paused" else f"VM {name} is {state}"
    return f"VM {name} resumed" if state == "running" else f"VM {name} is {state}"


def _reset_line(name: str, result: dict) -> str:
    if result.get("reboots", True):
        return f"VM {name} reset: the guest boots again"
    return f"VM {name} reset: it ends (it runs with --no-reboot)"


def _rtc_args(p):
    p.add_argument("--set", metavar="TIME", help="seconds since 1970, or YYYY-MM-DD HH:MM:SS (UTC)")
    p.add_argument("--nvram", metavar="OFFSET[=VALUE]", help="read (or write) one CMOS byte")


# -- the table ----------------------------------------------------------------------------------


def _vcpu_arg(p):
    p.add_argument("--vcpu", type=int, default=0, metavar="N", help="which vCPU (default 0)")


def _snapshot_args(p):
    p.add_argument("path", metavar="PATH", help="the snapshot file to write (asyncvmm run --restore PATH goes on from it)")
    p.add_argument("--stop", action="store_true", help="end the VM once it is written (bhyvectl --suspend)")
    p.add_argument("--diff", action="store_true",
                   help="only the pages written since the VM's last snapshot (kept as its base: a restore needs both)")


def _snapshot_request(args) -> dict:
    return {"path": os.path.abspath(args.path), "stop": args.stop, "diff": args.diff}


def snapshot_line(name: str, r: dict) -> str:
    after = "stopped" if r.get("stop") else "resumed" if r.get("resumed") else "paused (asyncvmm ctl resume goes on)"
    return (f"VM {name}: snapshot {r.get('path')}: {r.get('ram_bytes', 0) >> 20} MiB of RAM, "
            f"{r.get('pages_written', 0)} pages written ({r.get('disk_bytes', 0) >> 10} KiB on disk) "
            f"in {r.get('seconds', 0) * 1000:.0f} ms; the VM is {after}")


def _destroy_args(p):
    p.add_argument("--timeout", type=float, default=DESTROY_TIMEOUT, metavar="S",
                   help=f"seconds the guest has to power off before a hard stop (default {DESTROY_TIMEOUT:g})")
    p.add_argument("--force", action="store_true", help="stop it at once, without asking the guest")


COMMANDS: list[Command] = [
    Command("list", "the VMs with a control socket: name, state, vCPUs, memory, uptime, pid",
            with_name=False, run=lambda client, args: list_vms(), text=lambda r, a, n: report.format_list(r)),
    Command("state", "the VM's state, configuration and devices"),
    Command("regs", "a vCPU's registers (a running VM is paused for the read)", vcpu=True,
            request=_vcpu, text=lambda r, a, n: format_regs(r)),
    Command("set", "write a vCPU's registers: REG=VALUE (rip, rax..r15, rflags, cr0..cr8, efer, dr0..dr7), "
            "SEG=SELECTOR or SEG.base/.limit/.access=VALUE (cs..ldtr, gdtr, idtr)", vcpu=True,
            arguments=lambda p: p.add_argument("assignments", nargs="+", metavar="REG=VALUE"),
            request=_set_request, text=lambda r, a, n: format_set(r, list(registers.assignments(a.assignments))),
            details="Checked as a whole first: a non-canonical RIP, reserved bits in CR0/CR4/EFER/RFLAGS, long mode "
                    "without PAE... are refused (status 2) and nothing is written. A running VM is paused for the "
                    "write and resumed after; the vCPU runs from the new values. Access rights are in VMX's "
                    "layout, as bhyvectl's --desc-access."),
    Command("nmi", "deliver an NMI to a vCPU (KVM_NMI)", vcpu=True, request=_vcpu,
            text=lambda r, a, n: f"VM {n}: NMI delivered to vCPU {r.get('vcpu', 0)}"),
    Command("events", "the exception, interrupt and NMI pending or being delivered on a vCPU", vcpu=True,
            request=_vcpu, text=lambda r, a, n: report.format_events(r)),
    Command("msr", "read MSRs, or write one: INDEX or NAME (0x277, pat, lstar), INDEX=VALUE", vcpu=True,
            arguments=lambda p: p.add_argument("msrs", nargs="+", metavar="INDEX[=VALUE]"),
            request=_msr_request, text=lambda r, a, n: report.format_msrs(r)),
    Command("rtc", "the guest's RTC: its time, or set it; a CMOS/NVRAM byte (--nvram OFFSET[=VALUE])",
            arguments=_rtc_args,
            request=_rtc_request, text=lambda r, a, n: report.format_rtc(r)),
    Command("topology", "the vCPUs as sockets x cores x threads", text=lambda r, a, n: report.format_topology(r)),
    Command("stats", "exits and times per vCPU, the loop, port and MMIO accesses, each device and queue, "
            "the console, the quirks", text=lambda r, a, n: report.format_stats(r)),
    Command("pause", "stop every vCPU from running guest code", text=lambda r, a, n: _paused_line(n, "pause", r)),
    Command("resume", "let the vCPUs run again", text=lambda r, a, n: _paused_line(n, "resume", r)),
    Command("snapshot", "write the VM's whole state to PATH (it is left paused; --stop ends it)",
            arguments=_snapshot_args, request=_snapshot_request, text=lambda r, a, n: snapshot_line(n, r),
            details="The vCPUs are paused, block requests in flight complete, and the devices, the vCPUs, KVM's "
                    "irqchip and clock and guest RAM (zero pages left as holes) are written to PATH (docs/SNAPSHOT.md). "
                    "asyncvmm run --restore PATH [NAME] goes on from it in a new process."),
    Command("migrate", "send the running VM to asyncvmm run --incoming ADDRESS waiting on this host or another "
            "(unix:PATH or tcp:HOST:PORT); it ends here once it runs there",
            arguments=lambda p: p.add_argument("address", metavar="ADDRESS", help="unix:PATH or tcp:HOST:PORT"),
            request=lambda a: {"address": a.address},
            text=lambda r, a, n: (f"VM {n}: migrated to {r.get('address')} in {len(r.get('rounds', []))} rounds "
                                  f"({r.get('pages')} pages); downtime {r.get('downtime_ms')} ms")),
    Command("sysrq", "the kernel's serial SysRq: a break on COM1, then KEY (h help, t tasks, b reboot, o off)",
            arguments=lambda p: p.add_argument("key", metavar="KEY", help="one character"),
            request=_sysrq_request,
            text=lambda r, a, n: f"VM {n}: SysRq {r.get('key')} sent (a break, then {r.get('key')!r})"),
    Command("reset", "reset the guest as its reset line would: it boots again (ends with --no-reboot)",
            text=lambda r, a, n: _reset_line(n, r)),
    Command("poweroff", "end the VM as if the guest had powered off, without asking it",
            run=lambda client, args: ending(client, "poweroff"), text=lambda r, a, n: destroyed_line(n, r)),
    Command("destroy", "press the ACPI power button, stop the VM hard after --timeout S (at once with --force "
            "or a guest that does not listen); says which happened and returns once the VMM has ended",
            arguments=_destroy_args, run=_run_destroy, text=lambda r, a, n: destroyed_line(n, r)),
]
BY_NAME = {c.name: c for c in COMMANDS}


def parser() -> tuple[Parser, dict[str, Parser]]:
    p = Parser(prog="asyncvmm ctl")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    subs = {}
    for c in COMMANDS:
        text = textwrap.fill(c.help, 92) + (f"\n\n{textwrap.fill(c.details, 92)}" if c.details else "")
        sp = sub.add_parser(c.name, help=c.help, description=text,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if c.with_name:
            sp.add_argument("name", metavar="NAME", help="the VM's name (or its socket's path)")
        c.arguments(sp)
        if c.vcpu:
            _vcpu_arg(sp)
        sp.add_argument("--json", action="store_true", help="print the VM's answer as JSON")
        subs[c.name] = sp
    return p, subs


def run(argv: list[str]) -> str:
    """Parse, send, format: the text to print."""
    p, _ = parser()
    args = p.parse_args(argv)
    c = BY_NAME[args.command]
    client = ControlClient(args.name) if c.with_name else None
    if c.run is not None:
        result = c.run(client, args)
    else:
        result = client.request(c.name, **c.request(args))
    if args.json:
        return json.dumps(result, indent=2)
    return c.text(result, args, client.name if client else "")


def usage_lines() -> list[str]:
    _, subs = parser()
    return [s.format_usage().strip().removeprefix("usage: ") for s in subs.values()]


def command_help(name: str) -> str:
    _, subs = parser()
    return subs[name].format_help()
