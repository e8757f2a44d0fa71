"""The registers gdb sees: an i386:x86-64 target description and its `g` packet layout.

gdb reads the description (qXfer:features:read:target.xml) and then exchanges all
registers in one `g`/`G` packet, in the order of their `regnum`, each little-endian in
its `bitsize`. The layout below is gdb's own amd64 order for the core, x87 and SSE
registers, followed by the segment bases and the system registers (control registers,
EFER, KERNEL_GS_BASE), as QEMU's stub gives them.

A vCPU that is not in 64-bit code (32-bit protected or real mode) still answers in this
64-bit layout — gdb cannot change its register set within a session — with what QEMU's
stub gives: RAX..RSP and RIP cut to 32 bits, R8..R15 as 0; writes there take the low 32
bits and leave R8..R15 alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..vstate.registers import Efer


class Feature(enum.StrEnum):
    CORE = "org.gnu.gdb.i386.core"
    SSE = "org.gnu.gdb.i386.sse"
    SEGMENTS = "org.gnu.gdb.i386.segments"
    SYSTEM = "org.asyncvmm.gdb.x86.sys"  # not one gdb knows: shown under `info registers system`


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: Feature
    group: str = ""


GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSTEM = ("k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")

C, S, SEG, SYS = Feature.CORE, Feature.SSE, Feature.SEGMENTS, Feature.SYSTEM
LAYOUT: tuple[Reg, ...] = (
    *(Reg(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", C, "general") for n in GPRS),
    Reg("rip", 64, "code_ptr", C, "general"),
    Reg("eflags", 32, "i386_eflags", C, "general"),
    *(Reg(n, 32, "int32", C, "general") for n in SEGMENTS),
    *(Reg(f"st{i}", 80, "i387_ext", C, "float") for i in range(8)),
    *(Reg(n, 32, "int", C, "float") for n in X87_CONTROL),
    *(Reg(f"xmm{i}", 128, "vec128", S, "vector") for i in range(16)),
    Reg("mxcsr", 32, "i386_mxcsr", S, "vector"),
    Reg("fs_base", 64, "int", SEG, "general"),
    Reg("gs_base", 64, "int", SEG, "general"),
    *(Reg(n, 64, "int", SYS, "system") for n in SYSTEM),
)
REGNUM = {r.name: i for i, r in enumerate(LAYOUT)}
G_PACKET_BYTES = sum(r.bits // 8 for r in LAYOUT)

# The flag registers' bits, by name, for gdb's display ([ IF ZF ]).
EFLAGS_BITS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
               ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
               ("VIP", 20), ("ID", 21))
MXCSR_BITS = (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
              ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15))


def _flags_xml(tid: str, bits) -> str:
    fields = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in bits)
    return f'<flags id="{tid}" size="4">{fields}</flags>'


def _types_xml() -> str:
    vectors = (("v8bf16", "bfloat16", 8), ("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2),
               ("v16i8", "int8", 16), ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2))
    out = "".join(f'<vector id="{i}" type="{t}" count="{n}"/>' for i, t, n in vectors)
    members = "".join(f'<field name="{i}" type="{i}"/>' for i, _, _ in vectors)
    return out + f'<union id="vec128">{members}<field name="uint128" type="uint128"/></union>'


def target_xml() -> bytes:
    """The target description (gdb's "Target Descriptions" appendix)."""
    parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target><architecture>i386:x86-64</architecture>"]
    for feature in Feature:
        parts.append(f'<feature name="{feature.value}">')
        if feature is Feature.CORE:
            parts.append(_flags_xml("i386_eflags", EFLAGS_BITS))
        if feature is Feature.SSE:
            parts.append(_types_xml() + _flags_xml("i386_mxcsr", MXCSR_BITS))
        for num, r in enumerate(LAYOUT):
            if r.feature is feature:
                parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{num}" group="{r.group}"/>')
        parts.append("</feature>")
    parts.append("</target>")
    return "".join(parts).encode()


# -- values ----------------------------------------------------------------------------
def long_mode_code(sregs) -> bool:
    """Whether the vCPU runs 64-bit code (EFER.LMA and CS.L): then registers are whole."""
    return bool(sregs.efer & Efer.LMA) and bool(sregs.cs.l)


def _x87_tag_word(ftwx: int) -> int:
    """gdb's full tag word from FXSAVE's abridged one: an empty register is 11, any other
    00 (valid; the abridged form does not keep zero/special apart)."""
    tag = 0
    for i in range(8):
        if not ftwx & (1 << i):
            tag |= 3 << (2 * i)
    return tag


def _x87_abridged(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


class RegisterFile:
    """One vCPU's registers as gdb numbers them, read from and written to KVM.

    `vcpu` is a VcpuFd of a vCPU that is not running; changes are written back with
    flush(), before it runs again.
    """

    def __init__(self, vcpu, kernel_gs_base_msr: int):
        self.vcpu = vcpu
        self.msr = kernel_gs_base_msr
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self.fpu = vcpu.get_fpu()
        self.long = long_mode_code(self.sregs)
        self._dirty: set[str] = set()
        self._k_gs_base: int | None = None

    # -- one register as bytes -----------------------------------------------------
    def read(self, num: int) -> bytes:
        r = LAYOUT[num]
        return self.get(num).to_bytes(r.bits // 8, "little")

    def get(self, num: int) -> int:
        r = LAYOUT[num]
        name = r.name
        if name in GPRS:
            value = getattr(self.regs, name)
            if self.long:
                return value
            return value & 0xFFFF_FFFF if GPRS.index(name) < 8 else 0
        if name == "rip":
            return self.regs.rip if self.long else self.regs.rip & 0xFFFF_FFFF
        if name == "eflags":
            return self.regs.rflags & 0xFFFF_FFFF
        if name in SEGMENTS:
            return getattr(self.sregs, name).selector
        if name.startswith("st"):
            return int.from_bytes(bytes(self.fpu.fpr[int(name[2:])])[:10], "little")
        if name in X87_CONTROL:
            f = self.fpu
            return {"fctrl": f.fcw, "fstat": f.fsw, "ftag": _x87_tag_word(f.ftwx), "fiseg": 0,
                    "fioff": f.last_ip & 0xFFFF_FFFF, "foseg": 0, "fooff": f.last_dp & 0xFFFF_FFFF,
                    "fop": f.last_opcode}[name]
        if name.startswith("xmm"):
            return int.from_bytes(bytes(self.fpu.xmm[int(name[3:])]), "little")
        if name == "mxcsr":
            return self.fpu.mxcsr
        if name == "fs_base":
            return self.sregs.fs.base
        if name == "gs_base":
            return self.sregs.gs.base
        if name == "k_gs_base":
            if self._k_gs_base is None:
                self._k_gs_base = self.vcpu.get_msrs([self.msr]).get(self.msr, 0)
            return self._k_gs_base
        return getattr(self.sregs, name)  # cr0 cr2 cr3 cr4 cr8 efer

    def write(self, num: int, data: bytes) -> None:
        r = LAYOUT[num]
        if len(data) != r.bits // 8:
            raise ValueError(f"{r.name} is {r.bits // 8} bytes, not {len(data)}")
        self.set(num, int.from_bytes(data, "little"))

    def set(self, num: int, value: int) -> None:
        """Change one register (raises ValueError for a change KVM cannot make)."""
        r = LAYOUT[num]
        name = r.name
        if name in GPRS:
            if self.long:
                setattr(self.regs, name, value)
            elif GPRS.index(name) < 8:
                setattr(self.regs, name, value & 0xFFFF_FFFF)
            self._dirty.add("regs")
        elif name == "rip":
            self.regs.rip = value if self.long else value & 0xFFFF_FFFF
            self._dirty.add("regs")
        elif name == "eflags":
            self.regs.rflags = value & 0xFFFF_FFFF
            self._dirty.add("regs")
        elif name in SEGMENTS:
            seg = getattr(self.sregs, name)
            if value == seg.selector:
                return
            if self.sregs.cr0 & 1:  # CR0.PE: a selector's descriptor comes from the GDT
                raise ValueError(f"{name}: loading a selector in protected mode is not supported")
            seg.selector = value & 0xFFFF
            seg.base = (value & 0xFFFF) << 4  # real mode: the base follows the selector
            self._dirty.add("sregs")
        elif name.startswith("st"):
            raw = value.to_bytes(10, "little") + bytes(6)
            self.fpu.fpr[int(name[2:])] = list(raw)
            self._dirty.add("fpu")
        elif name in X87_CONTROL:
            f = self.fpu
            if name == "fctrl":
                f.fcw = value & 0xFFFF
            elif name == "fstat":
                f.fsw = value & 0xFFFF
            elif name == "ftag":
                f.ftwx = _x87_abridged(value)
            elif name == "fioff":
                f.last_ip = value
            elif name == "fooff":
                f.last_dp = value
            elif name == "fop":
                f.last_opcode = value & 0x7FF
            self._dirty.add("fpu")
        elif name.startswith("xmm"):
            self.fpu.xmm[int(name[3:])] = list(value.to_bytes(16, "little"))
            self._dirty.add("fpu")
        elif name == "mxcsr":
            self.fpu.mxcsr = value
            self._dirty.add("fpu")
        elif name in ("fs_base", "gs_base"):
            getattr(self.sregs, name[:2]).base = value
            self._dirty.add("sregs")
        elif name == "k_gs_base":
            self._k_gs_base = value
            self._dirty.add("msr")
        else:
            setattr(self.sregs, name, value)
            self._dirty.add("sregs")

    # -- the whole file ----------------------------------------------------------------
    def read_all(self) -> bytes:
        return b"".join(self.read(i) for i in range(len(LAYOUT)))

    def write_all(self, data: bytes) -> None:
        if len(data) != G_PACKET_BYTES:
            raise ValueError(f"a G packet holds {G_PACKET_BYTES} bytes of registers, not {len(data)}")
        off = 0
        for num, r in enumerate(LAYOUT):
            n = r.bits // 8
            chunk = data[off : off + n]
            off += n
            if int.from_bytes(chunk, "little") != self.get(num):
                self.set(num, int.from_bytes(chunk, "little"))

    def flush(self) -> None:
        """Write what changed back to KVM (before the vCPU runs again)."""
        if "sregs" in self._dirty:
            self.vcpu.set_sregs(self.sregs)
            self.long = long_mode_code(self.sregs)
        if "regs" in self._dirty:
            self.vcpu.set_regs(self.regs)
        if "fpu" in self._dirty:
            self.vcpu.set_fpu(self.fpu)
        if "msr" in self._dirty and self._k_gs_base is not None:
            self.vcpu.set_msrs({self.msr: self._k_gs_base})
        self._dirty.clear()
