"""The port/MMIO bus and exit dispatch, with a recording device and no KVM."""

import pytest

from asyncvmm.bus import Bus, BusConflict, ByteRegisters, Sink


class Recorder:
    def __init__(self):
        self.log = []
        self.value = 0x1234_5678

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_register_refuses_overlaps():
    b = Bus("pio")
    b.register(0x3F8, 8, Sink(), "com1")
    with pytest.raises(BusConflict, match="overlaps com1"):
        b.register(0x3FF, 1, Sink(), "x")
    with pytest.raises(BusConflict):
        b.register(0x3F0, 9, Sink(), "y")
    b.register(0x3F0, 8, Sink(), "ok")  # adjacent is fine
    assert b.find(0x3F7).name == "ok" and b.find(0x3F8).name == "com1" and b.find(0x400) is None


def test_access_offsets_sizes_and_masking():
    b = Bus("pio")
    d = Recorder()
    b.register(0x100, 16, d, "dev")
    b.access(0x104, 2, True, 0xBEEF)
    assert b.access(0x108, 1, False) == 0x78  # a byte read sees the low byte only
    assert b.access(0x108, 4, False) == 0x1234_5678
    assert d.log == [("w", 4, 2, 0xBEEF), ("r", 8, 1), ("r", 8, 4)]


def test_unclaimed_reads_all_ones_and_are_counted():
    b = Bus("pio")
    assert b.access(0x80, 1, False) == 0xFF
    assert b.access(0x80, 4, False) == 0xFFFF_FFFF
    assert b.access(0x80, 2, True, 5) == 0
    assert b.unclaimed[0x80] == 3


def test_access_straddling_the_end_is_unclaimed():
    b = Bus("pio")
    d = Recorder()
    b.register(0x100, 2, d, "dev")
    assert b.access(0x101, 2, False) == 0xFFFF
    assert d.log == []


def test_string_io_repeats_at_one_port():
    b = Bus("pio")
    d = Recorder()
    b.register(0x60, 1, d, "dev")
    data = bytearray(b"abc")
    assert b.dispatch(0x60, 1, True, data, 3)
    assert d.log == [("w", 0, 1, ord("a")), ("w", 0, 1, ord("b")), ("w", 0, 1, ord("c"))]
    out = bytearray(4)
    d.value = 0x4241
    b2 = Bus("pio")
    b2.register(0x60, 2, d, "dev")
    assert b2.dispatch(0x60, 2, False, out, 2)
    assert bytes(out) == b"ABAB"


def test_string_io_to_nothing_fills_ones():
    b = Bus("pio")
    out = bytearray(6)
    assert not b.dispatch(0x70, 2, False, out, 3)
    assert bytes(out) == b"\xff" * 6


def test_cache_follows_unregister():
    b = Bus("pio")
    d = Recorder()
    b.register(0x100, 1, d, "dev")
    b.access(0x100, 1, True, 1)
    b.unregister(0x100)
    assert b.access(0x100, 1, False) == 0xFF
    assert len(d.log) == 1


class Bytes:
    def __init__(self):
        self.regs = {}

    def read(self, offset):
        return self.regs.get(offset, 0)

    def write(self, offset, value):
        self.regs[offset] = value


def test_byte_registers_split_wide_accesses():
    m = Bytes()
    r = ByteRegisters(m, offset_base=0x70)
    r.write(0, 2, 0xAABB)
    assert m.regs == {0x70: 0xBB, 0x71: 0xAA}
    assert r.read(0, 2) == 0xAABB


def test_a_guest_cannot_grow_the_bus_without_bound():
    b = Bus("mmio")
    b.register(0x1000, 0x100, Recorder(), "dev")
    for addr in range(0x100000, 0x100000 + 20000 * 8, 8):
        b.access(addr, 4, False)
    assert len(b.unclaimed) == Bus.UNCLAIMED_KEYS
    assert sum(b.unclaimed.values()) + b.unclaimed_other == 20000
    assert len(b._cache) == 0  # misses are not cached


def test_a_strict_bus_refuses_what_nothing_emulates():
    """bhyve's -e: the first unclaimed access raises, naming the access."""
    from asyncvmm.bus import UnclaimedAccess

    b = Bus("pio")
    b.register(0x100, 2, Recorder(), "dev")
    b.strict = True
    assert b.access(0x100, 2, False) == 0x5678  # claimed accesses are unaffected
    with pytest.raises(UnclaimedAccess, match=r"^write of 1 byte at port 0x1234, which nothing emulates$"):
        b.access(0x1234, 1, True, 7)
    with pytest.raises(UnclaimedAccess, match=r"^read of 2 bytes at port 0x101"):
        b.access(0x101, 2, False)  # straddles the end
    with pytest.raises(UnclaimedAccess, match="read of 4 bytes at port 0x200"):
        b.dispatch(0x200, 4, False, bytearray(8), 2)
    assert b.unclaimed[0x1234] == 1 and b.unclaimed[0x200] == 2  # still counted
    m = Bus("mmio")
    m.strict = True
    with pytest.raises(UnclaimedAccess, match="read of 8 bytes at address 0xfed00000"):
        m.access(0xFED0_0000, 8, False)
