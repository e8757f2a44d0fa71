"""A vCPU's registers as `ctl regs` prints them, and the pieces bhyvectl's dump shares:
segments decoded from KVM's fields (type, DPL, 16/32/64-bit), access rights in VMX's
layout, RFLAGS' bits by name. The answer is flat: {"rip": n, "cs": {"selector": ...}}."""

from __future__ import annotations

from ..vstate.registers import ALIASES, DEBUG, GPRS, SEGMENTS, TABLES

# RFLAGS bits worth naming in a dump (SDM vol. 1, 3.4.3).
RFLAGS_BITS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
               (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"),
               (19, "VIF"), (20, "VIP"), (21, "ID"))
_SEG_FIELDS = ("type", "s", "dpl", "present", "avl", "l", "db", "g", "unusable")


def as_int(value) -> int | None:
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
    """A regs answer: registers by name (aliases such as ldtr/gdtr/eflags accepted)."""

    def __init__(self, result: dict):
        self.result = result

    def get(self, name: str) -> int | None:
        value = self.result.get(ALIASES.get(name, name))
        return None if isinstance(value, dict) else as_int(value)

    def segment(self, name: str) -> dict | None:
        seg = self.result.get(ALIASES.get(name, name))
        return seg if isinstance(seg, dict) else None


def hex_or_dash(value: int | None, digits: int = 16) -> str:
    return "-" if value is None else f"0x{value:0{digits}x}"


def rflags_names(value: int) -> str:
    names = [n for bit, n in RFLAGS_BITS if value & (1 << bit)]
    iopl = (value >> 12) & 3
    if iopl:
        names.append(f"IOPL={iopl}")
    return " ".join(names)


def seg_field(seg: dict, *names: str) -> int | None:
    for n in names:
        if n in seg:
            return as_int(seg[n])
    return None


def _seg_flags(seg: dict) -> dict[str, int]:
    return {n: seg_field(seg, n) or 0 for n in _SEG_FIELDS}


def segment_access(seg: dict) -> int | None:
    """The access rights in VMX's layout (what bhyvectl prints), from KVM's fields."""
    if "type" not in seg:
        return seg_field(seg, "access")
    f = _seg_flags(seg)
    return (f["type"] & 0xF | (f["s"] & 1) << 4 | (f["dpl"] & 3) << 5 | (f["present"] & 1) << 7
            | (f["avl"] & 1) << 12 | (f["l"] & 1) << 13 | (f["db"] & 1) << 14 | (f["g"] & 1) << 15
            | (f["unusable"] & 1) << 16)


def segment_attrs(seg: dict) -> str:
    if "type" not in seg:
        ar = segment_access(seg)
        return "" if ar is None else f"access 0x{ar:x}"
    f = _seg_flags(seg)
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


def format_regs(result: dict) -> str:
    regs = Registers(result)
    state = result.get("state")
    how = {"running": "the VM runs; paused for the read", "paused": "the VM is paused"}.get(state, state or "")
    lines = [f"vCPU {result.get('vcpu', 0)}" + (f" ({how})" if how else "")]
    for row in range(0, len(GPRS), 4):
        lines.append("  ".join(f"{n:<3} {hex_or_dash(regs.get(n))}" for n in GPRS[row:row + 4]))
    rflags = regs.get("rflags")
    names = rflags_names(rflags) if rflags is not None else ""
    lines.append(f"rip {hex_or_dash(regs.get('rip'))}  rflags {hex_or_dash(rflags)}" + (f" [{names}]" if names else ""))
    lines.append("")
    lines.append(f"{'':<4} {'selector':<8}  {'base':<18}  {'limit':<10}  attributes")
    for name in SEGMENTS:
        seg = regs.segment(name)
        if seg is None:
            continue
        lines.append(
            f"{name:<4} {hex_or_dash(seg_field(seg, 'selector'), 4):<8}  {hex_or_dash(seg_field(seg, 'base'))}  "
            f"{hex_or_dash(seg_field(seg, 'limit'), 8):<10}  {segment_attrs(seg)}".rstrip()
        )
    for name in TABLES:
        seg = regs.segment(name)
        if seg is not None:
            lines.append(f"{name:<4} {'':<8}  {hex_or_dash(seg_field(seg, 'base'))}  "
                         f"{hex_or_dash(seg_field(seg, 'limit'), 4)}")
    lines.append("")
    lines.append("  ".join(f"{n} {hex_or_dash(regs.get(n))}" for n in ("cr0", "cr2", "cr3", "cr4")))
    extra = [n for n in ("cr8", "efer", "apic_base") if regs.get(n) is not None]
    if extra:
        lines.append("  ".join(f"{n} {hex_or_dash(regs.get(n))}" for n in extra))
    debug = [n for n in DEBUG if regs.get(n) is not None]
    if debug:
        lines.append("  ".join(f"{n} {hex_or_dash(regs.get(n))}" for n in debug))
    return "\n".join(lines)


def format_set(result: dict, names: list[str]) -> str:
    """After `ctl set`: the registers written, as they read back."""
    regs = Registers(result)
    parts = []
    for name in names:
        seg = regs.segment(name)
        if seg is not None:
            widths = {"selector": 4, "base": 16, "limit": 8}
            fields = [f"{f} {hex_or_dash(seg_field(seg, f), widths[f])}" for f in widths if f in seg]
            access = segment_access(seg)
            if name not in TABLES and access is not None:
                fields.append(f"access 0x{access:x}")
            parts.append(f"{name} " + " ".join(fields))
        else:
            parts.append(f"{name} {hex_or_dash(regs.get(name))}")
    state = result.get("state")
    after = "it stays paused" if state == "paused" else "it runs on from there"
    return f"vCPU {result.get('vcpu', 0)}: set " + ", ".join(parts) + f" ({after})"
