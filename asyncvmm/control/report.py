"""The text `ctl` prints for the VM's answers (--json prints the answers themselves):
`list`, `state`, `stats` as a report grouped per vCPU, per device and per queue, units
in the labels; and the short answers (events, MSRs, the RTC, the topology)."""

from __future__ import annotations

import datetime
import json

from ..config import format_size

# -- list and state ----------------------------------------------------------------------

STATE_KEYS = (
    ("name", "name"), ("state", "state"), ("pid", "pid"), ("vcpus", "vCPUs"), ("memory", "memory"),
    ("kernel", "kernel"), ("cpu_template", "CPU template"), ("boots", "boots"),
    ("uptime_s", "uptime"), ("emulating_kvm", "emulating KVM"),
)


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


def _value(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "memory" and isinstance(value, int):
        return format_size(value)
    if key.endswith("_s") and isinstance(value, (int, float)):
        return format_duration(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "-" if value is None or value == "" else str(value)


def format_state(state: dict) -> str:
    rows = []
    shown = {"socket", "devices"}
    for key, label in STATE_KEYS:
        if key in state:
            rows.append((label, _value(key, state[key])))
            shown.add(key)
    for key, value in state.items():
        if key not in shown:
            rows.append((key.replace("_", " "), _value(key, value)))
    devices = state.get("devices")
    if isinstance(devices, list):
        rows.append(("devices", str(len(devices)) if devices else "none"))
    width = max((len(label) for label, _ in rows), default=0) + 1
    lines = [f"{label + ':':<{width}} {value}" for label, value in rows]
    for d in devices or []:
        if isinstance(d, dict):
            lines.append(f"  {d.get('slot', '?'):<8} {d.get('driver', '?'):<12} {d.get('options', '')}".rstrip())
    return "\n".join(lines)


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
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# -- stats ---------------------------------------------------------------------------------

# Units a counter's key ends in, and how the report shows them.
_UNITS = (("_ns", 1e-6, "ms"), ("_us", 1e-3, "ms"), ("_ms", 1.0, "ms"), ("_s", 1.0, "s"))
_PREFIX_UNITS = (("ns_", 1e-6, "ms"),)

# Labels of the C core's per-vCPU counters (cext/vcpu_loop.c, struct avmm_vcpu_stats).
VCPU_LABELS = {
    "ns_in_run": "time in the guest (KVM_RUN), ms",
    "ns_waiting": "time waiting for the loop to serve an exit, ms",
    "fast_io": "exits served in C (COM1's fast path)",
    "ns_fast_io": "time serving them in C, ms",
    "posted": "exits posted to the loop",
    "kicks": "kicks (signals out of KVM_RUN: pause, stop, RIP samples)",
    "samples": "RIP samples taken",
    "samples_dropped": "RIP samples dropped (buffer full)",
}
LOOP_LABELS = {
    "wakeups": "wake-ups for exits",
    "batches": "batches of exits served",
    "exits": "exits served",
    "mean_batch": "exits per batch (mean)",
    "poll_window_ns": "busy-poll window for the next exit, µs",
}
SECTION_TITLES = {
    "ports": "port I/O served on the loop (accesses per device)",
    "unclaimed_ports": "ports nobody claims (accesses)",
    "mmio": "MMIO served on the loop (accesses per device)",
    "unclaimed_mmio": "MMIO addresses nobody claims (accesses)",
    "console": "console (COM1)",
    "pit": "PIT (the VMM's, vmm-pit quirk)",
    "acpi": "ACPI PM1 block",
}
# virtio device_status bits (virtio 1.x, 2.1), to name a device's status in the report.
VIRTIO_STATUS = ((1, "ACKNOWLEDGE"), (2, "DRIVER"), (8, "FEATURES_OK"), (4, "DRIVER_OK"),
                 (64, "NEEDS_RESET"), (128, "FAILED"))


def _number(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _labelled(key: str, value) -> tuple[str, str]:
    """A counter's label with its unit, and its value in that unit."""
    label = str(key)
    if label.endswith("poll_window_ns") and isinstance(value, (int, float)):
        return f"{label[:-3].replace('_', ' ')}, µs", _number(round(value / 1000, 1))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for suffix, scale, unit in _UNITS:
            if label.endswith(suffix):
                return f"{label[: -len(suffix)].replace('_', ' ')}, {unit}", _number(round(value * scale, 3))
        for prefix, scale, unit in _PREFIX_UNITS:
            if label.startswith(prefix):
                return f"{label[len(prefix):].replace('_', ' ')} time, {unit}", _number(round(value * scale, 3))
    return label.replace("_", " "), _number(value)


def _rows(pairs: list[tuple[str, str]], indent: str) -> list[str]:
    width = max((len(label) for label, _ in pairs), default=0) + 1
    return [f"{indent}{label + ':':<{width}} {value}" for label, value in pairs]


def _table(d: dict, indent: str) -> list[str]:
    """Scalars as aligned label: value rows; nested dicts and lists as their own blocks."""
    pairs, blocks = [], []
    for key, value in d.items():
        if isinstance(value, dict):
            blocks += _block(str(key).replace("_", " "), value, indent)
        elif isinstance(value, list):
            blocks += _list(str(key), value, indent)
        else:
            pairs.append(_labelled(key, value))
    return _rows(pairs, indent) + blocks


def _loop_lines(loop: dict) -> list[str]:
    pairs = []
    for key, value in loop.items():
        if key == "poll_window_ns" and isinstance(value, (int, float)):
            pairs.append((LOOP_LABELS[key], _number(round(value / 1000, 1))))
        elif key in LOOP_LABELS:
            pairs.append((LOOP_LABELS[key], _number(value)))
        elif not isinstance(value, (dict, list)):
            pairs.append(_labelled(key, value))
    return ["loop (the asyncio thread that serves exits)"] + _rows(pairs, "  ")


def _block(title: str, d: dict, indent: str) -> list[str]:
    if not d:
        return [f"{indent}{title}: none"]
    if all(not isinstance(v, (dict, list)) for v in d.values()) and len(d) <= 4:
        return [f"{indent}{title}: " + ", ".join(f"{lbl} {val}" for lbl, val in (_labelled(k, v) for k, v in d.items()))]
    return [f"{indent}{title}:"] + _table(d, indent + "  ")


def _list(key: str, items: list, indent: str) -> list[str]:
    """A device's queues (or pairs): one block per item, numbered."""
    singular = {"queues": "queue", "pairs": "queue pair"}.get(key, key.rstrip("s"))
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            scalars = {k: v for k, v in item.items() if not isinstance(v, (dict, list))}
            nested = {k: v for k, v in item.items() if isinstance(v, (dict, list))}
            line = f"{indent}{singular} {i}: " + ", ".join(
                f"{lbl} {val}" for lbl, val in (_labelled(k, v) for k, v in scalars.items()))
            out.append(line.rstrip(": "))
            out += _table(nested, indent + "  ")
        else:
            out.append(f"{indent}{singular} {i}: {item}")
    return out


def _virtio_status(value) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return str(value)
    names = [name for bit, name in VIRTIO_STATUS if n & bit]
    return f"{n} ({' '.join(names)})" if names else f"{n} (reset)"


def _vcpu_lines(i: int, s: dict) -> list[str]:
    lines = [f"vCPU {i}"]
    exits = s.get("exits") if isinstance(s.get("exits"), dict) else {}
    ns_exits = s.get("ns_exits") if isinstance(s.get("ns_exits"), dict) else {}
    total = sum(v for v in exits.values() if isinstance(v, int))
    lines.append(f"  exits: {_number(total)}")
    if exits or ns_exits:
        kinds = sorted(set(exits) | set(ns_exits), key=lambda k: (-exits.get(k, 0), k))
        width = max([len("kind")] + [len(k) for k in kinds])
        lines.append(f"    {'kind':<{width}}  {'count':>10}  {'time serving, ms':>16}")
        for k in kinds:
            lines.append(f"    {k:<{width}}  {_number(exits.get(k, 0)):>10}  {_number(round(ns_exits.get(k, 0) * 1e-6, 3)):>16}")
    pairs = []
    for key, label in VCPU_LABELS.items():
        if key in s:
            value = s[key]
            if key.startswith("ns_"):
                value = round(value * 1e-6, 3)
            pairs.append((label, _number(value)))
    first = s.get("first_high_rip_after_s")
    if isinstance(first, (int, float)) and first > 0:
        pairs.append(("first RIP sample in the kernel's upper half, s after start", _number(first)))
    known = set(VCPU_LABELS) | {"exits", "ns_exits", "vcpu", "first_high_rip_ns", "first_high_rip_after_s"}
    pairs += [_labelled(k, v) for k, v in s.items() if k not in known and not isinstance(v, (dict, list))]
    return lines + _rows(pairs, "  ")


def _quirk_lines(q) -> list[str]:
    if not isinstance(q, dict):
        return []
    if "on" not in q and "applied" not in q:  # an older VMM: counts only
        return [f"quirks applied: {', '.join(f'{k} {v}' for k, v in q.items()) or 'none'}"]
    on = q.get("on") or []
    applied = q.get("applied") or {}
    lines = [f"quirks on: {', '.join(on) if on else 'none (KVM runs guest code natively, or --no-quirks)'}"]
    if applied:
        lines.append("quirks applied (times): " + ", ".join(f"{k} {_number(v)}" for k, v in applied.items()))
    return lines


def _device_lines(name: str, d: dict) -> list[str]:
    title = name
    if d.get("location"):
        title = f"{d['location']} {name.split('@')[0]}"
    lines = [title]
    pairs = []
    rest = {}
    for key, value in d.items():
        if key == "location":
            continue
        if key == "status":
            pairs.append(("status", _virtio_status(value)))
        elif key == "features":
            pairs.append(("features negotiated", str(value)))
        elif isinstance(value, (dict, list)):
            rest[key] = value
        else:
            pairs.append(_labelled(key, value))
    lines += _rows(pairs, "  ")
    for key, value in rest.items():
        if key == "transport" and isinstance(value, dict):
            lines += _block("transport (virtio-pci) events", value, "  ")
        elif isinstance(value, dict):
            lines += _block(key.replace("_", " "), value, "  ")
        else:
            lines += _list(key, value, "  ")
    return lines


def format_stats(stats: dict) -> str:
    lines: list[str] = []
    vcpus = stats.get("vcpus")
    for i, s in enumerate(vcpus if isinstance(vcpus, list) else []):
        if isinstance(s, dict):
            lines += _vcpu_lines(int(s.get("vcpu", i)), s)
    loop = stats.get("loop")
    if isinstance(loop, dict):
        lines += _loop_lines(loop)
    for key in ("ports", "unclaimed_ports", "mmio", "unclaimed_mmio"):
        value = stats.get(key)
        if isinstance(value, dict):
            title = SECTION_TITLES[key]
            if not value:
                lines.append(f"{title}: none")
            else:
                lines.append(f"{title}:")
                width = max(len(str(k)) for k in value)
                lines += [f"  {str(k):<{width}}  {_number(v)}" for k, v in value.items()]
    pci = stats.get("pci")
    if isinstance(pci, dict):
        if not pci:
            lines.append("PCI devices: none")
        for name, d in pci.items():
            if isinstance(d, dict):
                lines += _device_lines(str(name), d)
    serial = stats.get("serial")
    for key in ("console", "pit", "acpi"):
        value = stats.get(key)
        if key == "console" and isinstance(serial, dict) and value in serial.values():
            continue  # the same counters as its port's, below
        if isinstance(value, dict):
            lines.append(SECTION_TITLES[key])
            lines += _table(value, "  ") if value else ["  none"]
    if isinstance(serial, dict) and serial:
        lines.append("serial ports")
        for name, counters in serial.items():
            lines += _block(str(name), counters, "  ") if isinstance(counters, dict) else []
    irqs = stats.get("isa_irqs")
    if isinstance(irqs, dict) and irqs:
        lines.append("ISA interrupt lines")
        for irq, line in irqs.items():
            if isinstance(line, dict):
                drivers = ", ".join(str(d) for d in line.get("drivers") or []) or "nobody"
                lines.append(f"  IRQ {irq}: {drivers}; {_number(line.get('edges', 0))} edges raised")
    lines += _quirk_lines(stats.get("quirks"))
    known = {"vcpus", "loop", "ports", "unclaimed_ports", "mmio", "unclaimed_mmio", "pci", "console", "pit", "acpi",
             "quirks", "serial", "isa_irqs"}
    for key, value in stats.items():
        if key in known:
            continue
        if isinstance(value, dict):
            lines += _block(key.replace("_", " "), value, "")
        elif isinstance(value, list):
            lines += [key.replace("_", " ")] + _list(key, value, "  ")
        else:
            label, text = _labelled(key, value)
            lines.append(f"{label}: {text}")
    return "\n".join(lines)


# -- the short answers -----------------------------------------------------------------------

EXCEPTIONS = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
              10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
              19: "#XM", 20: "#VE", 21: "#CP"}


def format_events(result: dict) -> str:
    """KVM_GET_VCPU_EVENTS in words: what is pending, what is being delivered."""
    ex, it, nmi = result.get("exception", {}), result.get("interrupt", {}), result.get("nmi", {})
    lines = [f"vCPU {result.get('vcpu', 0)}"]
    if ex.get("injected") or ex.get("pending"):
        what = "being delivered" if ex.get("injected") else "pending"
        vector = ex.get("vector", 0)
        code = f", error code {ex.get('error_code', 0):#x}" if ex.get("has_error_code") else ""
        lines.append(f"  exception: vector {vector} ({EXCEPTIONS.get(vector, '?')}) {what}{code}")
    else:
        lines.append("  exception: none")
    if it.get("injected"):
        kind = "software interrupt" if it.get("soft") else "external interrupt"
        lines.append(f"  interrupt: vector {it.get('vector', 0)} ({kind}) being delivered")
    else:
        lines.append("  interrupt: none")
    nmi_state = [w for w, k in (("being delivered", "injected"), ("pending", "pending")) if nmi.get(k)]
    masked = "masked (the guest is in its NMI handler, until its IRET)" if nmi.get("masked") else "not masked"
    lines.append(f"  NMI: {', '.join(nmi_state) or 'none'}; {masked}")
    if it.get("shadow"):
        lines.append("  interrupt shadow: yes (after STI or MOV SS)")
    return "\n".join(lines)


def format_msrs(result: dict) -> str:
    vcpu = result.get("vcpu", 0)
    return "\n".join(f"vCPU {vcpu} MSR {index}: 0x{value:016x}" for index, value in result.get("msrs", {}).items())


def rtc_date(seconds: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "out of range"


def format_rtc(result: dict) -> str:
    t = result.get("time")
    lines = [f"RTC: {rtc_date(t)} ({t} s since 1970)"] if isinstance(t, int) else []
    if "offset" in result:
        lines.append(f"RTC NVRAM[{result['offset']}]: 0x{result.get('value', 0):02x}")
    return "\n".join(lines)


def format_topology(result: dict) -> str:
    return (f"{result.get('sockets')} socket(s) x {result.get('cores')} core(s) x {result.get('threads')} thread(s): "
            f"{result.get('maxcpus')} vCPU(s)")
