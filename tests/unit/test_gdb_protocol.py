"""The gdb stub's pure parts: RSP framing, page walks in every paging mode, the register
layout, the debug registers' encoding, -g/-G parsing."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest

from asyncvmm.errors import ConfigError
from asyncvmm.gdb import packets
from asyncvmm.gdb.breakpoints import BreakpointError, DebugRegisters, HardwareBreakpoint, Kind, SoftwareBreakpoints
from asyncvmm.gdb.options import GdbOptions, parse_gdb
from asyncvmm.gdb.packets import Kind as Ev
from asyncvmm.gdb.packets import PacketReader, frame
from asyncvmm.gdb.paging import Mode, Paging, pages, translate
from asyncvmm.gdb.registers import G_PACKET_BYTES, LAYOUT, REGNUM, target_xml


# -- packets ---------------------------------------------------------------------------------
def test_frame_and_read_back():
    r = PacketReader()
    events = r.feed(frame(b"qSupported:swbreak+") + b"+\x03-")
    assert [e.kind for e in events] == [Ev.PACKET, Ev.ACK, Ev.INTERRUPT, Ev.NAK]
    assert events[0].payload == b"qSupported:swbreak+"
    assert frame(b"OK") == b"$OK#9a"


def test_bytes_split_anywhere_make_the_same_packets():
    stream = frame(b"m100000,4") + frame(b"g") + b"\x03"
    for cut in range(len(stream)):
        r = PacketReader()
        events = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert [e.payload for e in events if e.kind is Ev.PACKET] == [b"m100000,4", b"g"]


def test_bad_checksums_noise_and_too_long():
    r = PacketReader(limit=16)
    assert [e.kind for e in r.feed(b"$g#00")] == [Ev.BAD_CHECKSUM]
    assert [e.kind for e in r.feed(b"$g#zz")] == [Ev.BAD_CHECKSUM]
    assert r.feed(b"garbage outside packets") == []
    assert [e.kind for e in r.feed(b"$" + b"m" * 1000 + b"#00")] == [Ev.TOO_LONG]
    assert r.feed(b"$abc") == [] and r.mid_packet
    assert [e.payload for e in r.feed(b"$g#67")] == [b"g"]  # a new `$` restarts


def test_escapes():
    data = bytes(range(256))
    assert packets.unescape(packets.escape(data)) == data
    assert b"$" not in packets.escape(b"a$b#c}d*")[0:]


# -- paging ----------------------------------------------------------------------------------
class PhysMem:
    """Guest physical memory as a dict of pages, with a bump allocator for tables."""

    def __init__(self):
        self.data = bytearray(4 << 20)
        self.next = 0x100000

    def read(self, gpa, size):
        if gpa + size > len(self.data):
            raise ValueError("outside RAM")
        return bytes(self.data[gpa : gpa + size])

    def put(self, gpa, value, size):
        self.data[gpa : gpa + size] = value.to_bytes(size, "little")

    def table(self):
        self.next += 0x1000
        return self.next


P, W, PS = 1, 2, 0x80


def map64(mem, root, linear, gpa, shifts, large_at=None):
    table = root
    for shift in shifts:
        idx = (linear >> shift) & 0x1FF
        if shift == 12 or shift == large_at:
            mem.put(table + idx * 8, gpa | P | W | (PS if shift == large_at else 0), 8)
            return
        entry = int.from_bytes(mem.read(table + idx * 8, 8), "little")
        if not entry & P:
            entry = mem.table() | P | W
            mem.put(table + idx * 8, entry, 8)
        table = entry & ~0xFFF


def test_no_paging_is_physical():
    assert translate(Paging(0x11, 0, 0, 0), 0x123456, PhysMem().read) == 0x123456
    assert Paging(0x11, 0, 0, 0).mode is Mode.NONE


def test_32bit_paging_small_and_large_pages():
    mem = PhysMem()
    pd, pt = mem.table(), mem.table()
    mem.put(pd + (0x4000_0000 >> 22) * 4, pt | P, 4)
    mem.put(pt + 5 * 4, 0x0023_4000 | P, 4)
    mem.put(pd + 1 * 4, 0x0080_0000 | P | PS, 4)  # 4 MiB at 4 MiB -> 8 MiB
    paging = Paging(0x8000_0011, pd, 0x10, 0)
    assert paging.mode is Mode.BITS32
    assert translate(paging, 0x4000_5123, mem.read) == 0x0023_4123
    assert translate(paging, 0x0040_0010, mem.read) == 0x0080_0010
    assert translate(paging, 0x4000_6000, mem.read) is None  # PTE not present
    assert translate(paging, 0x8000_0000, mem.read) is None  # PDE not present
    no_pse = Paging(0x8000_0011, pd, 0, 0)  # PS ignored without CR4.PSE: a page table at 8 MiB
    assert translate(no_pse, 0x0040_0010, mem.read) is None


def test_pae_paging():
    mem = PhysMem()
    pdpt = mem.table()
    pd = mem.table()
    mem.put(pdpt + 1 * 8, pd | P, 8)  # 1-2 GiB
    map64(mem, pd, 0x4020_0000, 0x0030_0000, (21, 12))
    mem.put(pd + 3 * 8, 0x0060_0000 | P | PS, 8)  # a 2 MiB page
    paging = Paging(0x8000_0011, pdpt, 0x20, 0)
    assert paging.mode is Mode.PAE
    assert translate(paging, 0x4020_0abc, mem.read) == 0x0030_0abc
    assert translate(paging, 0x4060_1234, mem.read) == 0x0060_1234
    assert translate(paging, 0x0000_1000, mem.read) is None  # PDPTE 0 not present


@pytest.mark.parametrize("la57", [False, True])
def test_long_mode_paging(la57):
    mem = PhysMem()
    root = mem.table()
    shifts = (48, 39, 30, 21, 12) if la57 else (39, 30, 21, 12)
    kernel = 0xFF11_0000_0000_0000 if la57 else 0xFFFF_FFFF_8100_0000
    map64(mem, root, kernel, 0x0020_0000, shifts)
    map64(mem, root, kernel + 0x4000_0000, 0x0040_0000, shifts, large_at=21)
    map64(mem, root, 0x10_0000_0000, 0x4000_0000, shifts, large_at=30)
    paging = Paging(0x8000_0011, root, 0x20 | (0x1000 if la57 else 0), 0x500)
    assert paging.mode is (Mode.LEVEL5 if la57 else Mode.LEVEL4)
    assert translate(paging, kernel + 0x123, mem.read) == 0x0020_0123
    assert translate(paging, kernel + 0x4000_0000 + 0x1_2345, mem.read) == 0x0041_2345
    big = 0x10_0000_0000
    assert translate(paging, big + 0x1234_5678, mem.read) == 0x4000_0000 + 0x1234_5678
    assert translate(paging, kernel + 0x1000, mem.read) is None
    non_canonical = 0x0080_0000_0000_0000 if not la57 else 0x0100_0000_0000_0000 - 0x1000 + (1 << 57)
    assert translate(paging, non_canonical, mem.read) is None


def test_tables_outside_ram_map_nothing():
    mem = PhysMem()
    assert translate(Paging(0x8000_0011, 0x7FFF_F000, 0x20, 0x500), 0x1000, mem.read) is None


def test_pages_split_at_page_boundaries():
    assert list(pages(0xFFE, 4)) == [(0xFFE, 2), (0x1000, 2)]
    assert list(pages(0x1000, 0x2000)) == [(0x1000, 0x1000), (0x2000, 0x1000)]
    assert list(pages(5, 0)) == []


# -- registers -------------------------------------------------------------------------------
def test_target_description_matches_the_layout():
    root = ET.fromstring(target_xml().split(b"?>", 1)[1].split(b">", 1)[1])  # past the XML and DOCTYPE lines
    assert root.find("architecture").text == "i386:x86-64"
    regs = root.findall("feature/reg")
    assert [int(r.get("regnum")) for r in regs] == sorted(int(r.get("regnum")) for r in regs)
    assert [r.get("name") for r in sorted(regs, key=lambda r: int(r.get("regnum")))] == [r.name for r in LAYOUT]
    assert sum(int(r.get("bitsize")) for r in regs) // 8 == G_PACKET_BYTES
    assert REGNUM["rip"] == 16 and REGNUM["eflags"] == 17 and REGNUM["st0"] == 24 and REGNUM["xmm0"] == 40


class FakeSeg:
    def __init__(self, selector=8, long_mode=0, base=0):
        self.selector, self.l, self.base, self.db = selector, long_mode, base, 1


class FakeSregs:
    def __init__(self, long_mode):
        self.cs = FakeSeg(0x10 if long_mode else 8, int(long_mode))
        self.ss = self.ds = self.es = self.fs = self.gs = FakeSeg(0x18 if long_mode else 0x10)
        self.cr0, self.cr2, self.cr3, self.cr4, self.cr8 = (0x8000_0011 if long_mode else 0x11), 0, 0x1000, 0x20, 0
        self.efer = 0x500 if long_mode else 0


class FakeRegs:
    def __init__(self):
        for i, n in enumerate(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                               "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")):
            setattr(self, n, 0x1111_2222_0000_0000 + i)
        self.rip, self.rflags = 0xFFFF_FFFF_8100_0010, 0x246


class FakeFpu:
    def __init__(self):
        self.fpr = [[0] * 16 for _ in range(8)]
        self.fcw, self.fsw, self.ftwx, self.last_opcode, self.last_ip, self.last_dp, self.mxcsr = 0x37F, 0, 0, 0, 0, 0, 0x1F80
        self.xmm = [[i] * 16 for i in range(16)]


class FakeVcpu:
    def __init__(self, long_mode):
        self.regs, self.sregs, self.fpu = FakeRegs(), FakeSregs(long_mode), FakeFpu()
        self.written = []

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def get_fpu(self):
        return self.fpu

    def get_msrs(self, idx):
        return {idx[0]: 0xABC}

    def set_regs(self, r):
        self.written.append("regs")

    def set_sregs(self, s):
        self.written.append("sregs")

    def set_fpu(self, f):
        self.written.append("fpu")


def test_registers_in_long_mode_are_whole():
    from asyncvmm.gdb.registers import RegisterFile

    rf = RegisterFile(FakeVcpu(True), 0xC000_0102)
    assert rf.get(REGNUM["rax"]) == 0x1111_2222_0000_0000
    assert rf.get(REGNUM["r15"]) == 0x1111_2222_0000_000F
    assert rf.get(REGNUM["rip"]) == 0xFFFF_FFFF_8100_0010
    assert rf.get(REGNUM["k_gs_base"]) == 0xABC
    assert rf.get(REGNUM["xmm3"]) == int.from_bytes(bytes([3] * 16), "little")
    assert rf.get(REGNUM["ftag"]) == 0xFFFF  # every x87 register empty
    data = rf.read_all()
    assert len(data) == G_PACKET_BYTES
    assert struct.unpack_from("<Q", data, 16 * 8)[0] == 0xFFFF_FFFF_8100_0010


def test_registers_in_32bit_mode_as_qemu_gives_them():
    from asyncvmm.gdb.registers import RegisterFile

    vcpu = FakeVcpu(False)
    rf = RegisterFile(vcpu, 0xC000_0102)
    assert rf.get(REGNUM["rax"]) == 0  # low 32 bits of 0x1111_2222_0000_0000
    assert rf.get(REGNUM["rbx"]) == 1
    assert rf.get(REGNUM["r8"]) == 0  # no R8-R15 outside 64-bit code
    assert rf.get(REGNUM["rip"]) == 0x8100_0010
    rf.set(REGNUM["rax"], 0xDEAD_BEEF_1234_5678)
    rf.set(REGNUM["r9"], 5)  # ignored, as QEMU does
    assert vcpu.regs.rax == 0x1234_5678 and vcpu.regs.r9 == 0x1111_2222_0000_0009
    rf.flush()
    assert vcpu.written == ["regs"]
    with pytest.raises(ValueError):
        rf.set(REGNUM["cs"], 0x18)  # protected mode: a selector needs its descriptor
    rf.write_all(rf.read_all())  # unchanged values: nothing refused


# -- breakpoints -----------------------------------------------------------------------------
def test_debug_registers_encoding():
    dr = DebugRegisters()
    dr.insert(HardwareBreakpoint(Kind.HARDWARE, 0x100a82, 1))
    dr.insert(HardwareBreakpoint(Kind.WRITE_WATCH, 0x103004, 4))
    dr.insert(HardwareBreakpoint(Kind.ACCESS_WATCH, 0x103008, 8))
    regs = dr.debugreg()
    assert regs[:3] == [0x100a82, 0x103004, 0x103008]
    dr7 = regs[7]
    assert dr7 & 0b10101 == 0b10101  # L0 L1 L2
    assert (dr7 >> 16) & 0xF == 0b0000  # DR0: execute, 1 byte
    assert (dr7 >> 20) & 0xF == 0b1101  # DR1: write, 4 bytes
    assert (dr7 >> 24) & 0xF == 0b1011  # DR2: read/write, 8 bytes
    assert dr.hit(0b010) == HardwareBreakpoint(Kind.WRITE_WATCH, 0x103004, 4)
    dr.insert(HardwareBreakpoint(Kind.HARDWARE, 0x1, 1))
    with pytest.raises(BreakpointError):
        dr.insert(HardwareBreakpoint(Kind.HARDWARE, 0x2, 1))  # all four in use
    with pytest.raises(BreakpointError):
        DebugRegisters().insert(HardwareBreakpoint(Kind.WRITE_WATCH, 0x103002, 4))  # unaligned
    assert dr.remove(HardwareBreakpoint(Kind.HARDWARE, 0x1, 1))
    assert not dr.remove(HardwareBreakpoint(Kind.HARDWARE, 0x1, 1))


def test_software_breakpoints_patch_shadow_and_restore(mem):
    mem.write(0x100000, b"\x55\x89\xe5\x90")
    sw = SoftwareBreakpoints(mem)
    sw.insert(0x100001, 0x100001)
    sw.insert(0x100001, 0x100001)  # twice: one int3
    sw.insert(0xC0100001, 0x100001)  # an alias of the same byte
    assert mem.read(0x100000, 4) == b"\x55\xcc\xe5\x90"
    seen = bytearray(mem.read(0x100000, 4))
    sw.shadow(0x100000, seen)
    assert bytes(seen) == b"\x55\x89\xe5\x90"
    sw.remove(0x100001)
    assert mem.read(0x100000, 4) == b"\x55\xcc\xe5\x90"  # the alias still holds it
    sw.remove_all()
    assert mem.read(0x100000, 4) == b"\x55\x89\xe5\x90"


# -- options ---------------------------------------------------------------------------------
def test_parse_gdb():
    assert parse_gdb("1234", "-g") == GdbOptions(1234)
    assert parse_gdb("w1234") == GdbOptions(1234, wait=True)
    assert parse_gdb("0.0.0.0:1234") == GdbOptions(1234, "0.0.0.0")
    assert parse_gdb("w[::1]:9") == GdbOptions(9, "::1", True)
    for bad in ("", "0", "65536", "w", ":12", "abc"):
        with pytest.raises(ConfigError):
            parse_gdb(bad)
    with pytest.raises(ConfigError):
        parse_gdb("w1234", "-g")  # -g takes a port only


# -- the stub's commands, against a target that records what it is asked -----------------
class RecordingTarget:
    def __init__(self, n=2):
        from asyncvmm.gdb.target import State

        self.n = n
        self.state = State.STOPPED
        self.pending = []
        self.on_stop = None
        self.resumed = []
        self.inserted = []

    def attach(self):
        pass

    def resume(self, actions):
        from asyncvmm.gdb.target import State

        self.resumed.append(actions)
        self.state = State.RUNNING

    def insert(self, vcpu, kind, addr, length):
        self.inserted.append((vcpu, kind, addr, length))

    def describe(self, i):
        return f"vCPU {i} (stopped)"


def session(n=2):
    from asyncvmm.gdb.stub import Session

    sent = []
    t = RecordingTarget(n)
    return Session(t, sent.append, lambda: sent.append(b"killed")), t, sent


def test_vcont_actions_per_vcpu():
    s, t, _ = session(3)
    assert s.handle(b"vCont?") == b"vCont;c;C;s;S"
    assert s.handle(b"vCont;s:2;c") is None  # the reply is the stop, later
    assert t.resumed[-1] == {1: "s", 0: "c", 2: "c"}
    from asyncvmm.gdb.target import State

    t.state = State.STOPPED
    assert s.handle(b"vCont;c:3") is None and t.resumed[-1] == {2: "c"}
    t.state = State.STOPPED
    assert s.handle(b"vCont;s:p1.1") is None and t.resumed[-1] == {0: "s"}
    t.state = State.STOPPED
    assert s.handle(b"vCont;c:9") == b"E01"  # no such thread
    assert s.handle(b"vCont;x") == b"E01"


def test_threads_and_stop_replies():
    from asyncvmm.gdb.target import Signal, State, StopEvent

    s, t, sent = session(2)

    def stopped(event):  # what Target does: parked first, then the callback
        t.state = State.STOPPED
        t.on_stop(event)

    assert s.handle(b"qfThreadInfo") == b"m1,2" and s.handle(b"qsThreadInfo") == b"l"
    assert s.handle(b"Hg2") == b"OK" and s.handle(b"qC") == b"QC2"
    assert s.handle(b"Hg0") == b"OK" and s.handle(b"qC") == b"QC2"  # "any" keeps the current one
    assert s.handle(b"Hg3") == b"E02"
    assert s.handle(b"T2") == b"OK" and s.handle(b"T3") == b"E02"
    assert bytes.fromhex(s.handle(b"qThreadExtraInfo,2").decode()) == b"vCPU 1 (stopped)"
    assert s.handle(b"c") is None
    stopped(StopEvent(1, Signal.TRAP, "watch", 0x103004))
    assert sent[-1] == b"T05watch:103004;thread:2;"
    assert s.handle(b"qC") == b"QC2"  # the stopped thread is current
    assert s.handle(b"s") is None and t.resumed[-1] == {1: "s"}
    stopped(StopEvent(1, Signal.TRAP, "swbreak"))
    assert sent[-1] == b"T05swbreak:;thread:2;"
    assert s.handle(b"?") == b"T05swbreak:;thread:2;"


def test_breakpoint_packets_and_unknowns():
    from asyncvmm.gdb.breakpoints import Kind

    s, t, sent = session(1)
    assert s.handle(b"Z0,100aa8,1") == b"OK"
    assert s.handle(b"Z2,103004,4;X1,ff") == b"OK"  # conditions after ';' are ignored
    assert t.inserted == [(0, Kind.SOFTWARE, 0x100aa8, 1), (0, Kind.WRITE_WATCH, 0x103004, 4)]
    assert s.handle(b"Z5,1,1") == b"E01"
    assert s.handle(b"qSupported:multiprocess+").startswith(b"PacketSize=4000;")
    assert s.handle(b"QStartNoAckMode") == b"OK" and s.no_ack
    assert s.handle(b"vMustReplyEmpty") == b"" and s.handle(b"qTStatus") == b""
    assert s.handle(b"k") == b"OK" and sent[-1] == b"killed" and s.detached
