"""The x87/SSE control instructions an emulating KVM lacks, executed as the CPU would.

Firmware sets up the FPU before it runs any C (OVMF's SEC: `finit; fldcw m16; ldmxcsr
m32` in InitializeFloatingPointUnits), and KVM's instruction emulator has only a few of
the x87 instructions (fninit, fnstcw, fnstsw m16): the others stop the vCPU with an emulation
failure. These do no arithmetic, only move a control or status word between memory and
the FPU, so the VMM can do what the CPU would: decode the instruction, read or write its
memory operand through the guest's segments and page tables, change the FPU state with
KVM_GET_XSAVE/KVM_SET_XSAVE (FxState says why not KVM_SET_FPU) and move RIP past it. The quirk `fpu-control` (asyncvmm/quirks.py)
calls `execute` on an emulation failure; only on an emulating KVM.

Served (SDM vol. 2; a table, OPS, below):

    fninit          DB E3       FCW=0x37F, FSW=0, all tags empty, FIP/FDP/FOP=0
    fnclex          DB E2       FSW's exception flags, ES and B cleared
    fldcw m16       D9 /5       FCW from memory
    fnstcw m16      D9 /7       FCW to memory
    fnstsw m16      DD /7       FSW to memory
    fnstsw ax       DF E0       FSW to AX
    emms            0F 77       all tags empty
    ldmxcsr m32     0F AE /2    MXCSR from memory (#GP(0) on a reserved bit)
    stmxcsr m32     0F AE /3    MXCSR to memory

The faults the CPU checks first are raised the same way: #NM with CR0.EM or CR0.TS for
x87; #UD with CR0.EM or without CR4.OSFXSR, #NM with CR0.TS, for SSE; #MF for emms with
an unmasked x87 exception pending. Anything else stays an emulation failure (the VM
stops with the instruction in its message): an opcode not in the table, a LOCK, REP or
VEX prefix, and an operand that is not in guest RAM or the firmware's ROM (a CPU would
raise #PF or touch MMIO; neither is modelled here). Segment limits are not checked.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .gdb.paging import Paging, pages, translate
from .vstate.kvm import KvmError
from .vstate.registers import Cr0, Cr4

FCW_INIT = 0x037F  # fninit: all exceptions masked, 64-bit precision, round to nearest
FSW_EXCEPTIONS = 0x3F  # IE DE ZE OE UE PE
FSW_SF = 1 << 6  # stack fault
FSW_ES = 1 << 7  # error summary
FSW_B = 1 << 15  # busy (mirrors ES)
MXCSR_MASK = 0xFFFF  # the bits ldmxcsr may set (FXSAVE's MXCSR_MASK on every CPU with DAZ)


class Vector(enum.IntEnum):
    UD = 6  # invalid opcode
    NM = 7  # device not available
    GP = 13  # general protection
    MF = 16  # x87 floating-point error


class Unit(enum.Enum):
    """Which of the CPU's checks come first (SDM vol. 2, each instruction's exceptions)."""

    X87 = "x87"
    MMX = "mmx"
    SSE = "sse"


class Operand(enum.Enum):
    NONE = 0
    M16 = 2
    M32 = 4
    AX = -1


class Fault(Exception):
    """The instruction raises this exception instead of completing."""

    def __init__(self, vector: Vector, error_code: int | None = None):
        super().__init__(vector.name)
        self.vector = vector
        self.error_code = error_code


# What an instruction does to the FPU (a struct kvm_fpu): given the value its operand
# loads (or None), returns the value it stores (or None).
Action = Callable[["FxState", int | None], int | None]


def _fninit(fpu, _value):
    fpu.fcw, fpu.fsw, fpu.ftwx = FCW_INIT, 0, 0
    fpu.last_opcode = fpu.last_ip = fpu.last_dp = 0


def _fnclex(fpu, _value):
    fpu.fsw &= ~(FSW_EXCEPTIONS | FSW_SF | FSW_ES | FSW_B)


def _fldcw(fpu, value):
    fpu.fcw = value


def _emms(fpu, _value):
    fpu.ftwx = 0  # abridged tag word: 0 is every register empty


def _ldmxcsr(fpu, value):
    if value & ~MXCSR_MASK:
        raise Fault(Vector.GP, 0)
    fpu.mxcsr = value


@dataclass(frozen=True)
class Op:
    name: str
    opcode: bytes
    unit: Unit
    operand: Operand
    action: Action
    loads: bool = False  # its memory operand is read (else written)
    reg: int | None = None  # memory forms: ModRM.reg (the /digit), mod != 3
    modrm: int | None = None  # register forms: the whole ModRM byte (mod == 3)


OPS: tuple[Op, ...] = (
    Op("fninit", b"\xdb", Unit.X87, Operand.NONE, _fninit, modrm=0xE3),
    Op("fnclex", b"\xdb", Unit.X87, Operand.NONE, _fnclex, modrm=0xE2),
    Op("fldcw", b"\xd9", Unit.X87, Operand.M16, _fldcw, loads=True, reg=5),
    Op("fnstcw", b"\xd9", Unit.X87, Operand.M16, lambda fpu, _v: fpu.fcw, reg=7),
    Op("fnstsw", b"\xdd", Unit.X87, Operand.M16, lambda fpu, _v: fpu.fsw, reg=7),
    Op("fnstsw ax", b"\xdf", Unit.X87, Operand.AX, lambda fpu, _v: fpu.fsw, modrm=0xE0),
    Op("emms", b"\x0f\x77", Unit.MMX, Operand.NONE, _emms),
    Op("ldmxcsr", b"\x0f\xae", Unit.SSE, Operand.M32, _ldmxcsr, loads=True, reg=2),
    Op("stmxcsr", b"\x0f\xae", Unit.SSE, Operand.M32, lambda fpu, _v: fpu.mxcsr, reg=3),
)
# (opcode, "m", reg) for memory forms, (opcode, "r", modrm) for register forms,
# (opcode, None, None) for instructions without a ModRM byte.
_INDEX: dict[tuple[bytes, str | None, int | None], Op] = {
    (op.opcode, "m" if op.reg is not None else "r" if op.modrm is not None else None,
     op.reg if op.reg is not None else op.modrm): op
    for op in OPS
}
_NEEDS_MODRM = {op.opcode for op in OPS if op.reg is not None or op.modrm is not None}


class FxState:
    """The x87 and SSE control state in an XSAVE area (KVM_GET_XSAVE), by the names of
    struct kvm_fpu. Not KVM_GET/SET_FPU: KVM_SET_FPU writes the FXSAVE bytes but not the
    XSAVE header, and with the x87 bit clear in XSTATE_BV the next XRSTOR puts the x87
    unit in its init state (FCW 0x37F), dropping the write (measured here)."""

    # name: (offset, size) in the FXSAVE layout (SDM vol. 1, table 10-2, 64-bit format)
    FIELDS = {"fcw": (0, 2), "fsw": (2, 2), "ftwx": (4, 1), "last_opcode": (6, 2), "last_ip": (8, 8),
              "last_dp": (16, 8), "mxcsr": (24, 4)}
    XSTATE_BV = 512  # the header's first field: which components the area holds
    X87_SSE = 0b11  # XSTATE_BV bits 0 (x87) and 1 (SSE)

    area: bytearray

    def __init__(self, area: bytearray):
        object.__setattr__(self, "area", area)

    def __getattr__(self, name: str) -> int:
        try:
            off, size = FxState.FIELDS[name]
        except KeyError:
            raise AttributeError(name) from None
        return int.from_bytes(self.area[off : off + size], "little")

    def __setattr__(self, name: str, value: int) -> None:
        off, size = FxState.FIELDS[name]
        self.area[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        # KVM_GET_XSAVE gives the init values of a component not in XSTATE_BV, so the
        # area holds both whole: mark them present, or XRSTOR would ignore the change.
        bv = self.XSTATE_BV
        self.area[bv : bv + 8] = (int.from_bytes(self.area[bv : bv + 8], "little") | self.X87_SSE).to_bytes(8, "little")


class Seg(enum.IntEnum):
    ES = 0x26
    CS = 0x2E
    SS = 0x36
    DS = 0x3E
    FS = 0x64
    GS = 0x65


OPERAND_SIZE = 0x66
ADDRESS_SIZE = 0x67
REFUSED_PREFIXES = {0xF0, 0xF2, 0xF3}  # lock, repne, rep: none of the served forms has one
# General registers in ModRM/SIB order (struct kvm_regs field names).
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# 16-bit addressing, ModRM.rm: (base, index); rm 6 with mod 0 is a bare disp16.
MODRM16 = (("rbx", "rsi"), ("rbx", "rdi"), ("rbp", "rsi"), ("rbp", "rdi"), ("rsi", None), ("rdi", None),
           ("rbp", None), ("rbx", None))


@dataclass(frozen=True)
class Address:
    """A memory operand as decoded: segment + (base + index * scale + disp), in
    `size`-bit address arithmetic; RIP-relative adds the next instruction's RIP."""

    seg: Seg
    size: int
    base: str | None = None
    index: str | None = None
    scale: int = 1
    disp: int = 0
    rip_relative: bool = False

    def offset(self, regs, next_rip: int) -> int:
        ea = self.disp
        if self.base:
            ea += getattr(regs, self.base)
        if self.index:
            ea += getattr(regs, self.index) * self.scale
        if self.rip_relative:
            ea += next_rip
        return ea & ((1 << self.size) - 1)


@dataclass(frozen=True)
class Decoded:
    op: Op
    length: int
    address: Address | None  # for memory forms


def _signed(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


def decode(insn: bytes, bits: int) -> Decoded | None:
    """The served instruction at the start of `insn` for a vCPU running `bits`-bit code,
    or None if it is not one of OPS (or is cut short)."""
    i = 0
    seg: Seg | None = None
    addr_size = {16: 16, 32: 32, 64: 64}[bits]
    opsize = False
    rex = 0
    while i < len(insn):
        b = insn[i]
        if b in REFUSED_PREFIXES:
            return None
        if b in Seg._value2member_map_:
            seg = Seg(b)
        elif b == ADDRESS_SIZE:
            addr_size = {16: 32, 32: 16, 64: 32}[bits]
        elif b == OPERAND_SIZE:
            opsize = True
        else:
            break
        i += 1
    if bits == 64 and i < len(insn) and insn[i] & 0xF0 == 0x40:
        rex = insn[i]
        i += 1
    opcode = insn[i : i + 2] if insn[i : i + 1] == b"\x0f" else insn[i : i + 1]
    i += len(opcode)
    if opcode not in _NEEDS_MODRM:
        op = _INDEX.get((opcode, None, None))
        if op is None or (opsize and op.unit is not Unit.X87):
            return None
        return Decoded(op, i, None)
    if i >= len(insn):
        return None
    modrm = insn[i]
    i += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    op = _INDEX.get((opcode, "r", modrm)) if mod == 3 else _INDEX.get((opcode, "m", reg))
    if op is None or (opsize and op.unit is not Unit.X87):
        return None
    if mod == 3:
        return Decoded(op, i, None)
    if addr_size == 16:
        address, i = _address16(insn, i, mod, rm, seg)
    else:
        address, i = _address32(insn, i, mod, rm, seg, addr_size, rex, bits)
    if address is None or i > len(insn):
        return None
    return Decoded(op, i, address)


def _address16(insn: bytes, i: int, mod: int, rm: int, seg: Seg | None) -> tuple[Address | None, int]:
    if mod == 0 and rm == 6:
        return Address(seg or Seg.DS, 16, disp=_signed(insn[i : i + 2])), i + 2
    base, index = MODRM16[rm]
    ndisp = (0, 1, 2)[mod]
    disp = _signed(insn[i : i + ndisp]) if ndisp else 0
    default = Seg.SS if base == "rbp" else Seg.DS
    return Address(seg or default, 16, base=base, index=index, disp=disp), i + ndisp


def _address32(insn: bytes, i: int, mod: int, rm: int, seg: Seg | None, size: int, rex: int,
               bits: int) -> tuple[Address | None, int]:
    rex_b, rex_x = (rex & 1) << 3, (rex & 2) << 2
    base: str | None
    index: str | None = None
    scale = 1
    if rm == 4:  # a SIB byte follows
        if i >= len(insn):
            return None, i
        sib = insn[i]
        i += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | rex_x
        index = GPRS[idx] if idx != 4 else None
        if sib & 7 == 5 and mod == 0:
            base = None
            disp, i = _signed(insn[i : i + 4]), i + 4
            return Address(seg or Seg.DS, size, None, index, scale, disp), i
        base = GPRS[(sib & 7) | rex_b]
    elif mod == 0 and rm == 5:  # disp32: RIP-relative in 64-bit mode, absolute otherwise
        disp = _signed(insn[i : i + 4])
        return Address(seg or Seg.DS, size, disp=disp, rip_relative=bits == 64), i + 4
    else:
        base = GPRS[rm | rex_b]
    ndisp = (0, 1, 4)[mod]
    disp = _signed(insn[i : i + ndisp]) if ndisp else 0
    default = Seg.SS if base in ("rsp", "rbp") else Seg.DS
    return Address(seg or default, size, base, index, scale, disp), i + ndisp


class GuestAccess(Protocol):
    """Guest physical memory as the instruction sees it: RAM, and the firmware's ROM
    (read; a write to it is dropped, as a write to ROM is). Raises on anything else."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


_SEG_FIELDS = {Seg.ES: "es", Seg.CS: "cs", Seg.SS: "ss", Seg.DS: "ds", Seg.FS: "fs", Seg.GS: "gs"}


def _linear(address: Address, regs, sregs, next_rip: int, bits: int) -> int:
    offset = address.offset(regs, next_rip)
    if bits == 64 and address.seg not in (Seg.FS, Seg.GS):
        return offset  # long mode: only FS and GS have a base
    base = getattr(sregs, _SEG_FIELDS[address.seg]).base
    linear = base + offset
    return linear & ((1 << 64) - 1) if bits == 64 else linear & 0xFFFF_FFFF


def _physical(sregs, linear: int, length: int, mem: GuestAccess) -> list[tuple[int, int]] | None:
    """(gpa, length) pieces of a linear range, through the guest's page tables."""
    paging = Paging(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
    out = []
    for lin, n in pages(linear, length):
        gpa = translate(paging, lin, mem.read)
        if gpa is None:
            return None
        out.append((gpa, n))
    return out


def _check_unit(op: Op, sregs, fpu) -> None:
    cr0, cr4 = sregs.cr0, sregs.cr4
    if op.unit is Unit.X87:
        if cr0 & (Cr0.EM | Cr0.TS):
            raise Fault(Vector.NM)
    elif op.unit is Unit.MMX:
        if cr0 & Cr0.EM:
            raise Fault(Vector.UD)
        if cr0 & Cr0.TS:
            raise Fault(Vector.NM)
        if fpu.fsw & FSW_ES:
            raise Fault(Vector.MF)
    else:
        if cr0 & Cr0.EM or not cr4 & Cr4.OSFXSR:
            raise Fault(Vector.UD)
        if cr0 & Cr0.TS:
            raise Fault(Vector.NM)


def code_bits(sregs) -> int:
    return 64 if sregs.cs.l else 32 if sregs.cs.db else 16


def execute(vcpu, insn: bytes, mem: GuestAccess) -> tuple[str, Fault | None] | None:
    """Run the served instruction `insn` (at the vCPU's RIP) as the CPU would.

    Returns (its name, None) when it completed (RIP is past it), (its name, the Fault)
    when it raises an exception instead (the caller injects it; RIP stays on it), or None
    when it is not served (nothing was changed)."""
    sregs = vcpu.get_sregs()
    bits = code_bits(sregs)
    decoded = decode(insn, bits)
    if decoded is None:
        return None
    op = decoded.op
    regs = vcpu.get_regs()
    try:
        fpu = FxState(vcpu.get_xsave())
    except KvmError:
        return None  # a KVM without KVM_CAP_XSAVE: not served
    try:
        _check_unit(op, sregs, fpu)  # before the operand, as the CPU checks them
    except Fault as fault:
        return op.name, fault
    pieces = None
    if decoded.address is not None:
        next_rip = regs.rip + decoded.length
        linear = _linear(decoded.address, regs, sregs, next_rip, bits)
        try:
            pieces = _physical(sregs, linear, op.operand.value, mem)
        except Exception:
            pieces = None
        if pieces is None:
            return None  # unmapped: a #PF the VMM does not model
    loaded = None
    if pieces is not None:
        try:  # read first, a store too: nothing is written unless all of it is there
            loaded = int.from_bytes(b"".join(mem.read(gpa, n) for gpa, n in pieces), "little")
        except Exception:
            return None
    try:
        stored = op.action(fpu, loaded if op.loads else None)
    except Fault as fault:
        return op.name, fault
    if stored is not None:
        if op.operand is Operand.AX:
            regs.rax = (regs.rax & ~0xFFFF) | (stored & 0xFFFF)
        elif pieces is not None:
            data = (stored & ((1 << (8 * op.operand.value)) - 1)).to_bytes(op.operand.value, "little")
            try:
                for gpa, n in pieces:
                    mem.write(gpa, data[:n])
                    data = data[n:]
            except Exception:
                return None
    vcpu.set_xsave(fpu.area)
    regs.rip += decoded.length
    if bits != 64:
        regs.rip &= 0xFFFF_FFFF if bits == 32 else 0xFFFF
    vcpu.set_regs(regs)
    return op.name, None


class RamAndRom:
    """GuestAccess over guest RAM (GuestMemory: raises outside it) and, with -l bootrom,
    the firmware's ROM at (base, bytes)."""

    def __init__(self, ram, rom: tuple[int, bytes] | None = None):
        self.ram = ram
        self.rom = rom

    def _in_rom(self, gpa: int, length: int) -> bool:
        return self.rom is not None and self.rom[0] <= gpa and gpa + length <= self.rom[0] + len(self.rom[1])

    def read(self, gpa: int, length: int) -> bytes:
        if self.rom is not None and self._in_rom(gpa, length):
            start = gpa - self.rom[0]
            return self.rom[1][start : start + length]
        return self.ram.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        if self._in_rom(gpa, len(data)):
            return  # a write to ROM is dropped
        self.ram.write(gpa, data)
