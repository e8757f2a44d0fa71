"""The control protocol: where a VM's socket lives and what goes over it.

One request per connection line, one answer line, both JSON objects:

    → {"cmd": "state"}
    ← {"ok": true, "result": {...}}       or  {"ok": false, "error": "what went wrong"}

Commands (request fields besides "cmd"):
    state                   name, state (running|paused|stopping), pid, vcpus, memory,
                            kernel, cpu_template, boots, uptime_s, emulating_kvm
    regs     vcpu=N         general registers, segment and control registers of vCPU N
                            (the vCPUs are paused for the read if they were running)
    stats                   per-vCPU exits and times, port ranges, console counters
    pause | resume          → state
    sysrq    key=K          the kernel's serial SysRq: a break on COM1, then the key K
                            (one character) → {"key": K}
    destroy  timeout=S force=B
                            ask the guest to power off (ACPI, when the VM has it), wait up
                            to S seconds, then stop it hard; force stops it at once
                            → {"how": "acpi"|"hard"}
"""

from __future__ import annotations

import json
import os
import re

SOCKET_SUFFIX = ".sock"
# A VM's name becomes a file name: keep it to what needs no quoting anywhere.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
COMMANDS = ("state", "regs", "stats", "pause", "resume", "sysrq", "destroy")
MAX_LINE = 64 * 1024


def run_dir() -> str:
    """Where control sockets live: $ASYNCVMM_RUN_DIR, /run/asyncvmm for root, else
    $XDG_RUNTIME_DIR/asyncvmm (or /tmp/asyncvmm-UID without one)."""
    override = os.environ.get("ASYNCVMM_RUN_DIR")
    if override:
        return override
    if os.geteuid() == 0:
        return "/run/asyncvmm"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "asyncvmm") if xdg else f"/tmp/asyncvmm-{os.geteuid()}"


def socket_path(name: str) -> str:
    return os.path.join(run_dir(), name + SOCKET_SUFFIX)


def encode(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj
