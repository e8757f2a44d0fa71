"""The boot memory layout: fixed addresses, no overlaps, placement helpers."""

import itertools

import pytest

from asyncvmm.boot import layout
from asyncvmm.vstate.memory import EBDA_START


def test_fixed_addresses():
    assert layout.GDT_START == 0x1000
    assert layout.ZERO_PAGE_START == 0x2000
    assert layout.PVH_START_INFO_START == 0x3000
    assert layout.PVH_MODLIST_START == 0x4000
    assert layout.PVH_MEMMAP_START == 0x5000
    assert (layout.PML4_START, layout.PDPT_START, layout.PD_START) == (0x6000, 0x7000, 0x8000)
    assert layout.PAGE_TABLES_SIZE == 0x6000
    assert (layout.CMDLINE_START, layout.CMDLINE_SIZE) == (0x20000, 0x10000)
    assert (layout.MODULE_CMDLINES_START, layout.MODULE_CMDLINES_SIZE) == (0x30000, 0x10000)
    assert layout.KERNEL_START == 0x100000
    assert (layout.BOOT_AREA_START, layout.BOOT_AREA_END) == (0x1000, 0x40000)


@pytest.mark.parametrize(
    "a, b", list(itertools.combinations(layout.BOOT_STRUCTURES, 2)), ids=lambda r: r[0]
)
def test_boot_structures_do_not_overlap(a, b):
    (_, a_start, a_size), (_, b_start, b_size) = a, b
    assert a_start + a_size <= b_start or b_start + b_size <= a_start


@pytest.mark.parametrize("name, start, size", layout.BOOT_STRUCTURES)
def test_boot_structures_page_aligned_and_below_ebda(name, start, size):
    assert start % layout.PAGE_SIZE == 0
    assert size % layout.PAGE_SIZE == 0
    assert start >= layout.PAGE_SIZE  # page 0 stays empty: 0 means "absent" in hvm_start_info
    assert start + size <= EBDA_START
    assert start + size <= layout.KERNEL_START


def test_page_tables_hold_four_page_directories():
    # PML4 + PDPT + 4 PDs, contiguous, covering 4 GiB with 2 MiB pages.
    assert layout.PD_COUNT * 512 * (2 << 20) == 4 << 30
    assert layout.PD_START + layout.PD_COUNT * layout.PAGE_SIZE == layout.PML4_START + layout.PAGE_TABLES_SIZE


def test_struct_areas_hold_their_tables():
    assert layout.ZERO_PAGE_SIZE == 4096  # sizeof(struct boot_params)
    assert layout.PVH_START_INFO_SIZE >= 56  # sizeof(struct hvm_start_info), version 1
    assert layout.PVH_MODLIST_SIZE // 32 == 128
    assert layout.PVH_MEMMAP_SIZE // 24 == 170
    assert layout.GDT_SIZE >= 6 * 8


def test_align():
    assert layout.align_up(0, 0x1000) == 0
    assert layout.align_up(1, 0x1000) == 0x1000
    assert layout.align_up(0x1000, 0x1000) == 0x1000
    assert layout.align_down(0x1FFF, 0x1000) == 0x1000
    assert layout.align_up(0x100000, 0x200000) == 0x200000


def test_place_high():
    # Highest page-aligned start whose end is within the ceiling.
    assert layout.place_high(0x1800, 0x100000, 0x400000) == 0x3FE000
    assert layout.place_high(0x1000, 0x100000, 0x400000) == 0x3FF000
    # Unaligned ceiling: rounds the start down.
    assert layout.place_high(0x1000, 0x100000, 0x400800) == 0x3FF000
    # Exactly fits above the floor.
    assert layout.place_high(0x300000, 0x100000, 0x400000) == 0x100000
    # Does not fit.
    assert layout.place_high(0x300001, 0x100000, 0x400000) is None
    # Unaligned floor: the start must not go below it.
    assert layout.place_high(0x2FF001, 0x100001, 0x400000) is None
    assert layout.place_high(0x2FF000, 0x100001, 0x400000) == 0x101000


def test_overlaps():
    assert layout.overlaps(0, 0x1000, 0xFFF, 1)
    assert not layout.overlaps(0, 0x1000, 0x1000, 1)
    assert not layout.overlaps(0x1000, 0x1000, 0, 0x1000)
    assert layout.overlaps(0x1000, 0x1000, 0, 0x1001)
