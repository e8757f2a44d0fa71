"""A vCPU's registers by name: what `ctl regs`/`ctl set` and bhyvectl's --get-/--set- read
and write, and the checks a write passes before KVM sees it.

Pure: no cffi here. `apply()` works on KVM's structs (kvm_regs, kvm_sregs, kvm_debugregs)
or anything with the same fields, and checks the state the write leaves as a whole (a RIP
is canonical or not in the mode the new CS and EFER give), so that a refused write names
the problem and leaves the vCPU as it was. Names and bits follow the SDM, vol. 3, 2.5
(control registers), 2.2.1 (EFER), vol. 1, 3.4.3 (RFLAGS), vol. 3, 24.4.1 (access rights
in VMX's layout: what bhyvectl's --desc-access takes).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from ..errors import ConfigError

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GENERAL = GPRS + ("rip", "rflags")  # struct kvm_regs
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")  # in struct kvm_sregs (apic_base is read only here)
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
TABLES = ("gdt", "idt")
DEBUG = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")  # struct kvm_debugregs
ALIASES = {"ldtr": "ldt", "gdtr": "gdt", "idtr": "idt", "eflags": "rflags"}
WRITABLE = GENERAL + CONTROL + SEGMENTS + TABLES + DEBUG

SEGMENT_FIELDS = ("selector", "base", "limit", "access")  # what a write may give for a segment
TABLE_FIELDS = ("base", "limit")

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


class Msr(IntEnum):
    """MSRs by name (SDM vol. 4): those a VMM sets at boot, and those `ctl msr` names."""

    IA32_TSC = 0x10
    IA32_APIC_BASE = 0x1B
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MISC_ENABLE = 0x1A0
    IA32_PAT = 0x277
    EFER = 0xC000_0080
    STAR = 0xC000_0081
    LSTAR = 0xC000_0082
    CSTAR = 0xC000_0083
    SYSCALL_MASK = 0xC000_0084
    FS_BASE = 0xC000_0100
    GS_BASE = 0xC000_0101
    KERNEL_GS_BASE = 0xC000_0102


def msr_index(text: str) -> int:
    """An MSR by number (0x277) or name (IA32_PAT, pat, lstar)."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    key = text.strip().upper().replace("-", "_")
    for name in (key, "IA32_" + key):
        if name in Msr.__members__:
            return int(Msr[name])
    raise ConfigError(f"MSR {text!r}: a number (0x277) or a name ({', '.join(m.name for m in Msr)})")


class Cr0(IntFlag):
    PE = 1 << 0  # protected mode
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29  # not write-through: only with CD
    CD = 1 << 30
    PG = 1 << 31  # paging: only with PE


class Cr4(IntFlag):
    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5  # needed for long mode
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    KL = 1 << 19
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23
    PKS = 1 << 24
    UINTR = 1 << 25
    LAM_SUP = 1 << 28


class Efer(IntFlag):
    SCE = 1 << 0  # syscall/sysret
    LME = 1 << 8  # long mode enable
    LMA = 1 << 10  # long mode active: LME with paging on
    NXE = 1 << 11
    SVME = 1 << 12
    LMSLE = 1 << 13
    FFXSR = 1 << 14
    TCE = 1 << 15
    AUTOIBRS = 1 << 21


class Rflags(IntFlag):
    CF = 1 << 0
    FIXED = 1 << 1  # always 1
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    IOPL = 3 << 12
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21


class Access(IntFlag):
    """A segment's access rights as VMX lays them out (bhyvectl's --desc-access)."""

    TYPE = 0xF
    S = 1 << 4  # code/data (clear: a system segment)
    DPL = 3 << 5
    P = 1 << 7  # present
    AVL = 1 << 12
    L = 1 << 13  # 64-bit code
    DB = 1 << 14  # 32-bit default operand size
    G = 1 << 15  # the limit counts 4 KiB pages
    UNUSABLE = 1 << 16


def _all(flags) -> int:
    n = 0
    for f in flags.__members__.values():  # multi-bit fields too (iteration skips them)
        n |= int(f)
    return n


CR0_DEFINED = _all(Cr0)
CR4_DEFINED = _all(Cr4)
EFER_DEFINED = _all(Efer)
RFLAGS_DEFINED = _all(Rflags)
ACCESS_DEFINED = _all(Access)
CR3_MAX = (1 << 52) - 1  # the architectural limit of a physical address


def canonical(addr: int) -> bool:
    """Bits 63..47 all equal (48-bit linear addresses)."""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def access_of(seg) -> int:
    """A kvm_segment's fields as VMX access rights."""
    return (seg.type & 0xF | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7
            | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15
            | (seg.unusable & 1) << 16)


def _set_access(seg, access: int) -> None:
    seg.type = access & Access.TYPE
    seg.s = int(bool(access & Access.S))
    seg.dpl = (access & Access.DPL) >> 5
    seg.present = int(bool(access & Access.P))
    seg.avl = int(bool(access & Access.AVL))
    seg.l = int(bool(access & Access.L))
    seg.db = int(bool(access & Access.DB))
    seg.g = int(bool(access & Access.G))
    seg.unusable = int(bool(access & Access.UNUSABLE))


def canonical_name(name: str) -> str:
    n = name.strip().lower()
    return ALIASES.get(n, n)


def _int(name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise ConfigError(f"{name}={value}: not a number") from None
        else:
            raise ConfigError(f"{name}: a number, not {value!r}")
    if not 0 <= value <= limit:
        raise ConfigError(f"{name}={value:#x}: out of range (0 to {limit:#x})")
    return value


def normalize(changes: dict) -> dict:
    """Names made canonical, values checked for type and width: {name: int | {field: int}}.
    A segment takes {"selector", "base", "limit", "access"} (any of them), a table
    {"base", "limit"}; a bare number for a segment is its selector, as bhyvectl's --set-cs."""
    if not isinstance(changes, dict) or not changes:
        raise ConfigError("no register to set: give REG=VALUE (e.g. rip=0x100000)")
    out: dict = {}
    for raw, value in changes.items():
        name = canonical_name(str(raw))
        if name not in WRITABLE:
            raise ConfigError(f"{raw}: no such register (registers: {', '.join(WRITABLE)})")
        if name in out:
            raise ConfigError(f"{name} is given twice")
        if name in SEGMENTS or name in TABLES:
            allowed = SEGMENT_FIELDS if name in SEGMENTS else TABLE_FIELDS
            if not isinstance(value, dict):
                if name in TABLES:
                    raise ConfigError(f"{name}: give its base and limit ({name}.base=..., {name}.limit=...)")
                value = {"selector": value}
            if not value:
                raise ConfigError(f"{name}: nothing to set")
            fields = {}
            for f, v in value.items():
                if f not in allowed:
                    raise ConfigError(f"{name}.{f}: no such field (fields: {', '.join(allowed)})")
                width = {"selector": U16, "base": U64, "access": U32,
                         "limit": U16 if name in TABLES else U32}[f]
                fields[f] = _int(f"{name}.{f}", v, width)
            out[name] = fields
        else:
            out[name] = _int(name, value, U64)
    return out


def apply(regs, sregs, debugregs, changes: dict) -> list[str]:
    """Write `changes` (from normalize()) into the structs and check the result; returns the
    names of the structs changed ("regs", "sregs", "debugregs"). ConfigError, with the
    structs' old contents unknowable, if the result is not a state a CPU can be in: the
    caller writes the structs back only when this returns."""
    touched = []
    for name, value in changes.items():
        if name in GENERAL:
            setattr(regs, name, value)
            touched.append("regs")
        elif name in CONTROL:
            setattr(sregs, name, value)
            touched.append("sregs")
        elif name in DEBUG:
            if debugregs is None:
                raise ConfigError(f"{name}: this KVM does not give the debug registers")
            if name in ("dr6", "dr7"):
                setattr(debugregs, name, value)
            else:
                debugregs.db[int(name[2])] = value
            touched.append("debugregs")
        else:
            seg = getattr(sregs, name)
            for f, v in value.items():
                if f == "access":
                    _set_access(seg, v)
                else:
                    setattr(seg, f, v)
            touched.append("sregs")
    check(regs, sregs, debugregs, changes)
    return sorted(set(touched))


def check(regs, sregs, debugregs, changes: dict) -> None:
    """Refuse a register state a CPU cannot be in (checks what `changes` touched, in the
    context of the whole state it leaves)."""
    cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
    if cr0 & ~CR0_DEFINED & U64:
        raise ConfigError(f"cr0={cr0:#x}: reserved bits {cr0 & ~CR0_DEFINED & U64:#x} set")
    if cr0 & Cr0.PG and not cr0 & Cr0.PE:
        raise ConfigError(f"cr0={cr0:#x}: paging (PG) needs protected mode (PE)")
    if cr0 & Cr0.NW and not cr0 & Cr0.CD:
        raise ConfigError(f"cr0={cr0:#x}: NW without CD")
    if cr4 & ~CR4_DEFINED & U64:
        raise ConfigError(f"cr4={cr4:#x}: reserved bits {cr4 & ~CR4_DEFINED & U64:#x} set")
    if efer & ~EFER_DEFINED & U64:
        raise ConfigError(f"efer={efer:#x}: reserved bits {efer & ~EFER_DEFINED & U64:#x} set")
    if sregs.cr3 > CR3_MAX:
        raise ConfigError(f"cr3={sregs.cr3:#x}: beyond the largest physical address")
    if sregs.cr8 > 0xF:
        raise ConfigError(f"cr8={sregs.cr8:#x}: the task priority is 0 to 15")
    long_mode = bool(efer & Efer.LME and cr0 & Cr0.PG)
    if long_mode:
        if not cr4 & Cr4.PAE:
            raise ConfigError("long mode (EFER.LME with CR0.PG) needs CR4.PAE")
        if not efer & Efer.LMA:
            raise ConfigError("long mode (EFER.LME with CR0.PG) needs EFER.LMA set too")
    elif efer & Efer.LMA:
        raise ConfigError(f"efer={efer:#x}: LMA without long mode (LME and CR0.PG)")
    elif sregs.cs.l:
        raise ConfigError("cs: 64-bit code (L) outside long mode")
    rflags = regs.rflags
    if rflags & ~RFLAGS_DEFINED & U64:
        raise ConfigError(f"rflags={rflags:#x}: reserved bits {rflags & ~RFLAGS_DEFINED & U64:#x} set")
    if not rflags & Rflags.FIXED:
        raise ConfigError(f"rflags={rflags:#x}: bit 1 is always 1")
    rip = regs.rip
    if long_mode and sregs.cs.l:
        if not canonical(rip):
            raise ConfigError(f"rip={rip:#x}: not a canonical address")
    elif rip > U32:
        raise ConfigError(f"rip={rip:#x}: beyond 32 bits, and the vCPU is not running 64-bit code")
    for name, value in changes.items():
        if name in SEGMENTS and "access" in value and value["access"] & ~ACCESS_DEFINED:
            raise ConfigError(f"{name}.access={value['access']:#x}: reserved bits set")
    if debugregs is not None:
        for i in range(4):
            if not canonical(debugregs.db[i]):
                raise ConfigError(f"dr{i}={debugregs.db[i]:#x}: not a canonical address")
        for name in ("dr6", "dr7"):
            if getattr(debugregs, name) > U32:
                raise ConfigError(f"{name}={getattr(debugregs, name):#x}: bits 63..32 are reserved")


def parse_assignment(text: str) -> tuple[str, str | None, int]:
    """'rip=0x1000' -> ('rip', None, 0x1000); 'cs.base=0' -> ('cs', 'base', 0)."""
    name, eq, value = text.partition("=")
    if not eq or not name or not value:
        raise ConfigError(f"{text!r}: give REG=VALUE (e.g. rip=0x100000, cs.base=0)")
    reg, dot, field = name.partition(".")
    try:
        number = int(value, 0)
    except ValueError:
        raise ConfigError(f"{text}: {value!r} is not a number (decimal, or 0x... hex)") from None
    return canonical_name(reg), (field.lower() if dot else None), number


def assignments(texts: list[str]) -> dict:
    """REG=VALUE and SEG.FIELD=VALUE words into the protocol's {"rip": n, "cs": {...}}."""
    out: dict = {}
    for text in texts:
        reg, field, number = parse_assignment(text)
        if field is None:
            if reg in out:
                raise ConfigError(f"{reg} is given twice")
            out[reg] = number
        else:
            target = out.setdefault(reg, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{reg} is given both as a number and by fields")
            if field in target:
                raise ConfigError(f"{reg}.{field} is given twice")
            target[field] = number
    return out
