"""Guest RAM: the layout around the MMIO hole and bounds-checked access."""

import pytest

from asyncvmm.errors import GuestMemoryError
from asyncvmm.vstate.memory import (
    E820_RAM,
    E820_RESERVED,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    GuestMemory,
    ram_layout,
)

MiB = 1 << 20


def test_layout_splits_around_the_hole():
    assert ram_layout(64 * MiB) == [(0, 64 * MiB)]
    assert ram_layout(MMIO_HOLE_START) == [(0, MMIO_HOLE_START)]
    assert ram_layout(4 << 30) == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)]


def test_e820_reserves_the_bios_area():
    with GuestMemory(64 * MiB) as m:
        assert m.e820() == [
            (0, 0x9FC00, E820_RAM),
            (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
            (0x100000, 63 * MiB, E820_RAM),
        ]


def test_e820_above_4g():
    with GuestMemory(MMIO_HOLE_START + 64 * MiB) as m:  # MAP_NORESERVE: nothing is touched
        assert m.e820()[-1] == (MMIO_HOLE_END, 64 * MiB, E820_RAM)
        m.write(MMIO_HOLE_END + 5, b"hi")
        assert m.read(MMIO_HOLE_END + 5, 2) == b"hi"
        with pytest.raises(GuestMemoryError):
            m.read(MMIO_HOLE_START, 1)  # the hole is not RAM


def test_bounds():
    with GuestMemory(2 * MiB) as m:
        m.write(2 * MiB - 4, b"abcd")
        assert m.read(2 * MiB - 4, 4) == b"abcd"
        for gpa, n in [(2 * MiB - 3, 4), (2 * MiB, 1), (-1, 1), ((1 << 64) - 1, 2), (0, -1)]:
            with pytest.raises(GuestMemoryError):
                m.read(gpa, n)
        assert not m.contains(2 * MiB, 1)
        assert m.contains(0, 2 * MiB)


def test_view_is_shared_memory():
    with GuestMemory(2 * MiB) as m:
        v = m.view(0x1000, 4)
        v[:] = b"wxyz"
        assert m.read(0x1000, 4) == b"wxyz"
        v.release()


def test_touched_bytes_counts_only_what_was_written():
    with GuestMemory(64 * MiB) as m:
        before = m.touched_bytes()
        m.write(0, b"\1" * (4 * MiB))
        assert m.touched_bytes() - before >= 4 * MiB
        assert m.touched_bytes() < 16 * MiB


def test_bad_sizes():
    with pytest.raises(GuestMemoryError):
        GuestMemory(1000)
