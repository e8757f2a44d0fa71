"""fpu-control's pure parts: decoding the served instructions and their memory operands in
16-, 32- and 64-bit code, and the operand's way through segments and page tables (the
guest test fpuctl runs them on KVM; kvm_pvm refuses 32-bit paging, so paging is here)."""

from types import SimpleNamespace

import pytest

from asyncvmm.errors import GuestMemoryError
from asyncvmm.fpu_control import OPS, Address, FxState, RamAndRom, Seg, _linear, _physical, decode
from asyncvmm.vstate.memory import GuestMemory


def regs(**values):
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)), "rip")
    return SimpleNamespace(**{n: values.get(n, 0) for n in names})


def seg(base=0):
    return SimpleNamespace(base=base)


def sregs(cr0=0x11, cr3=0, cr4=0, efer=0, **bases):
    return SimpleNamespace(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                           **{s: seg(bases.get(s, 0)) for s in ("es", "cs", "ss", "ds", "fs", "gs")})


@pytest.mark.parametrize("insn,bits,name,length", [
    ("db e3", 32, "fninit", 2),
    ("db e2", 64, "fnclex", 2),
    ("df e0", 16, "fnstsw ax", 2),
    ("0f 77", 32, "emms", 2),
    ("d9 2d 10 10 10 00", 32, "fldcw", 6),
    ("d9 7c 24 1a", 32, "fnstcw", 4),
    ("dd 3d 04 50 10 00", 32, "fnstsw", 6),
    ("0f ae 15 04 10 10 00", 32, "ldmxcsr", 7),
    ("0f ae 5d fc", 64, "stmxcsr", 4),
    ("67 d9 28", 32, "fldcw", 3),
    ("41 0f ae 54 24 08", 64, "ldmxcsr", 6),
    ("66 d9 2e 00 70", 16, "fldcw", 5),
])
def test_served_instructions_decode_with_their_length(insn, bits, name, length):
    d = decode(bytes.fromhex(insn) + b"\x90" * 4, bits)
    assert d is not None and d.op.name == name and d.length == length


@pytest.mark.parametrize("insn,bits", [
    ("d9 e8", 32),  # fld1: arithmetic, not served
    ("dc 0d 00 00 00 00", 32),  # fmul m64
    ("0f ae 00", 32),  # fxsave: KVM's emulator has it
    ("f3 0f ae d0", 64),  # wrfsbase: F3 prefix
    ("f0 d9 2d 00 00 00 00", 32),  # lock: #UD on a CPU
    ("66 0f ae 10", 32),  # 66 before an SSE control opcode
    ("c5 f8 ae 10", 64),  # vldmxcsr (VEX)
    ("d9 2d 00 00", 32),  # cut short: disp32 missing
    ("d9", 32),
    ("cc", 32),
])
def test_anything_else_is_not_served(insn, bits):
    assert decode(bytes.fromhex(insn), bits) is None


def test_32bit_sib_and_default_segments():
    d = decode(bytes.fromhex("d9 6c 50 02"), 32)  # fldcw 2(%eax,%edx,2)
    assert d.address == Address(Seg.DS, 32, "rax", "rdx", 2, 2)
    assert d.address.offset(regs(rax=0x1000, rdx=3), 0) == 0x1008
    d = decode(bytes.fromhex("d9 7c 24 1a"), 32)  # fnstcw 0x1a(%esp)
    assert d.address.seg is Seg.SS and d.address.base == "rsp" and d.address.index is None
    d = decode(bytes.fromhex("d9 6d f0"), 32)  # fldcw -0x10(%ebp)
    assert d.address.seg is Seg.SS and d.address.disp == -0x10
    d = decode(bytes.fromhex("d9 2c 8d 00 10 00 00"), 32)  # fldcw 0x1000(,%ecx,4): no base
    assert d.address == Address(Seg.DS, 32, None, "rcx", 4, 0x1000)
    assert d.address.offset(regs(rcx=0xFFFF_FFFF), 0) == (0x1000 - 4) & 0xFFFF_FFFF  # wraps at 32 bits


def test_16bit_addressing():
    d = decode(bytes.fromhex("67 d9 28"), 32)  # fldcw (%bx,%si)
    assert d.address == Address(Seg.DS, 16, "rbx", "rsi")
    assert d.address.offset(regs(rbx=0xFFF0, rsi=0x20), 0) == 0x10  # wraps at 16 bits
    d = decode(bytes.fromhex("d9 6e 04"), 16)  # fldcw 4(%bp): SS
    assert d.address == Address(Seg.SS, 16, "rbp", None, 1, 4)
    d = decode(bytes.fromhex("d9 2e 34 12"), 16)  # fldcw 0x1234: a bare disp16
    assert d.address == Address(Seg.DS, 16, disp=0x1234) and d.length == 4


def test_64bit_rip_relative_rex_and_segments():
    d = decode(bytes.fromhex("d9 2d f0 ff ff ff"), 64)  # fldcw -0x10(%rip)
    assert d.address.rip_relative and d.length == 6
    assert d.address.offset(regs(), 0x1006) == 0xFF6
    d = decode(bytes.fromhex("43 0f ae 14 a7"), 64)  # ldmxcsr (%r15,%r12,4)
    assert d.address == Address(Seg.DS, 64, "r15", "r12", 4, 0)
    d = decode(bytes.fromhex("65 0f ae 1c 25 40 00 00 00"), 64)  # stmxcsr %gs:0x40
    assert d.address == Address(Seg.GS, 64, None, None, 1, 0x40)
    # Long mode: only FS and GS have a base.
    s = sregs(ds=0x5000, gs=0xFFFF_8000_0000_0000)
    assert _linear(d.address, regs(), s, 0, 64) == 0xFFFF_8000_0000_0040
    assert _linear(Address(Seg.DS, 64, disp=0x40), regs(), s, 0, 64) == 0x40
    # Elsewhere the segment's base is added, in 32 bits.
    assert _linear(Address(Seg.FS, 32, disp=0x10), regs(), sregs(fs=0xFFFF_FFF8), 0, 32) == 0x8


def test_every_op_in_the_table_decodes():
    for op in OPS:
        modrm = b"" if op.reg is None and op.modrm is None else bytes([op.modrm if op.modrm is not None else (op.reg << 3) | 0x05])
        insn = op.opcode + modrm + b"\0\0\0\0"
        assert decode(insn, 32).op is op


def test_operand_through_long_mode_page_tables_and_across_a_page():
    mem = GuestMemory(2 << 20)
    try:
        # 4-level tables at 0x1000..0x4000: linear 0x4000_0000 + i*4K -> physical 0x10_0000 + i*8K
        pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
        mem.write(pml4, (pdpt | 3).to_bytes(8, "little"))
        mem.write(pdpt + 1 * 8, (pd | 3).to_bytes(8, "little"))
        mem.write(pd, (pt | 3).to_bytes(8, "little"))
        for i in range(2):
            mem.write(pt + i * 8, (0x10_0000 + i * 0x2000 | 3).to_bytes(8, "little"))
        s = sregs(cr0=0x8000_0011, cr3=pml4, cr4=0x20, efer=0x500)
        assert _physical(s, 0x4000_0010, 2, mem) == [(0x10_0010, 2)]
        # A 4-byte operand at the last two bytes of a page: two pieces, two frames apart.
        assert _physical(s, 0x4000_0FFE, 4, mem) == [(0x10_0FFE, 2), (0x10_2000, 2)]
        assert _physical(s, 0x4000_2000, 2, mem) is None  # not mapped
    finally:
        mem.close()


def test_rom_reads_and_dropped_writes():
    mem = GuestMemory(1 << 20)
    try:
        access = RamAndRom(mem, (0xFFFF_0000, b"\x7f\x03" + bytes(0xFFFE)))
        assert access.read(0xFFFF_0000, 2) == b"\x7f\x03"
        access.write(0xFFFF_0000, b"\0\0")  # a write to ROM is dropped
        assert access.read(0xFFFF_0000, 2) == b"\x7f\x03"
        access.write(0x1000, b"\x12\x34")
        assert mem.read(0x1000, 2) == b"\x12\x34"
        with pytest.raises(GuestMemoryError):
            access.read(0xE000_0000, 2)  # neither RAM nor ROM
    finally:
        mem.close()


def test_fxstate_fields_and_xstate_bv():
    area = bytearray(4096)
    fx = FxState(area)
    fx.fcw = 0x27F
    fx.mxcsr = 0x1F80
    assert area[0:2] == b"\x7f\x02" and area[24:28] == b"\x80\x1f\0\0"
    assert fx.fcw == 0x27F and fx.mxcsr == 0x1F80
    assert area[512] & 0b11 == 0b11  # x87 and SSE marked present in XSTATE_BV
