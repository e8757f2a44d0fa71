"""perf/history.jsonl: one JSON line per benchmark run, kept per machine and commit.

Every line written since 2026-12-03 carries `machine` (an id: the first 12 hex digits of
SHA-256 over the host name, the CPU model and the kernel release) and `machine_info` (the
CPU model, kernel, CPU count, KVM kind; the host name itself is not stored). Older lines
have neither: `load()` gives them `legacy-` + a hash of what they do have (kernel release,
CPU count, KVM kind), so they still group by machine and plot. Nothing is rewritten; the
format is otherwise the one perf/README.md describes.

Figures are one flat map per run (`exits.0x3ff.added_us`, `blk.direct.randread-4k-qd1.asyncvmm.iops`).
`direction()` says which way is better for a figure, `is_anchor()` whether it measures an
anchor (rawkvm, QEMU, fio, the plain TAP program, the interpreter) rather than asyncvmm: an
anchor that moves between two commits tells how noisy the machine was, not a regression.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HISTORY = Path(__file__).resolve().parent / "history.jsonl"

# Parts of a figure's name that mean it measures an anchor, not asyncvmm.
ANCHOR_PARTS = ("rawkvm", "qemu_kvm", "qemu_tcg", "python", "floor", "fio", "limit", "wakeup")
# Bookkeeping, not performance.
META_SUFFIXES = (".seconds", ".reps", ".n", ".loop")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _kvm_kind() -> str:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "kvm_pvm"
    return "hardware" if os.path.exists("/dev/kvm") else "none"


def machine_info() -> dict:
    return {"cpu_model": _cpu_model(), "kernel": os.uname().release, "cpus": os.cpu_count(), "kvm": _kvm_kind()}


def machine_id(info: dict | None = None) -> str:
    info = info or machine_info()
    key = "\0".join([os.uname().nodename, info["cpu_model"], info["kernel"]])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def legacy_machine_id(record: dict) -> str:
    key = "\0".join(str(record.get(k)) for k in ("host_kernel", "cpus", "kvm"))
    return "legacy-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def load(path: Path = HISTORY) -> list[dict]:
    """Every record, oldest first, each with `machine` set (see the module's docstring).
    A line that is not JSON is skipped (a run killed while writing)."""
    out = []
    try:
        f = open(path)
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or not isinstance(r.get("figures"), dict):
                continue
            r.setdefault("machine", legacy_machine_id(r))
            out.append(r)
    return out


def append(record: dict, path: Path = HISTORY) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def is_meta(key: str) -> bool:
    return key.endswith(META_SUFFIXES)


def is_anchor(key: str) -> bool:
    parts = key.replace("_", ".").split(".")
    if key.startswith(("startup.ratio", "memory.ratio")) or "added" in key or key.endswith("ratio"):
        return False  # asyncvmm against its anchor: asyncvmm's figure
    return any(p in parts for p in ANCHOR_PARTS) or any(f".{p}." in key for p in ANCHOR_PARTS)


def is_spread(key: str) -> bool:
    """A run's min or max: how a run varied, not a figure to compare."""
    return key.endswith(("_min_s", "_max_s"))


def direction(key: str) -> int:
    """+1 when a higher value is better, -1 when lower is better, 0 when neither is known."""
    if is_meta(key):
        return 0
    last = key.rsplit(".", 1)[-1]
    if last in ("iops", "pps", "gbps", "mbps") or last.endswith("iops_ratio") or key.endswith(".ratio"):
        return +1  # throughput, or asyncvmm / the limit of a data path
    if key.startswith(("startup.ratio", "memory.ratio")):
        return -1  # asyncvmm / QEMU in seconds or MiB
    if last.endswith(("_us", "_s", "_ms", "_mib")) or "_us_per_" in last:
        return -1
    return 0


def gated(key: str) -> bool:
    """Figures whose worsening makes an A/B comparison fail: asyncvmm's own, directional."""
    return direction(key) != 0 and not is_anchor(key) and not is_spread(key)
