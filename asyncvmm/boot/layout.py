"""Where the boot structures go in guest physical memory.

Everything the loaders write besides the kernel itself lives in low memory, below
the EBDA at 0x9FC00 (the 64-bit and PVH entries need nothing from real mode, so the
whole area is ours). Page 0 stays empty: a 0 in any hvm_start_info address field
means "not present", and a stray null pointer in the guest then reads zeros.

    0x0000_0000  (unused)
    0x0000_1000  GDT
    0x0000_2000  struct boot_params ("zero page")
    0x0000_3000  struct hvm_start_info
    0x0000_4000  struct hvm_modlist_entry[]
    0x0000_5000  struct hvm_memmap_table_entry[]
    0x0000_6000  PML4, PDPT, 4 page directories (to 0xC000)
    0x0002_0000  kernel command line (64 KiB)
    0x0003_0000  PVH module command lines (64 KiB)
    0x0010_0000  the kernel (1 MiB, where bzImage and most PVH kernels load)
        ...      initrd / PVH modules: placed per image, see linux.py and pvh.py
"""

from __future__ import annotations

from ..vstate.memory import EBDA_START, HIGH_MEMORY_START, MMIO_HOLE_START

PAGE_SIZE = 0x1000

# The boot GDT (cpu_state.write_gdt): a handful of 8-byte descriptors, one page.
GDT_START = 0x1000
GDT_SIZE = 0x1000

# Linux boot_params, 4096 bytes by definition (zero-page.rst); %rsi points here.
ZERO_PAGE_START = 0x2000
ZERO_PAGE_SIZE = 0x1000

# PVH: struct hvm_start_info (56 bytes); %ebx points here.
PVH_START_INFO_START = 0x3000
PVH_START_INFO_SIZE = 0x1000

# PVH: struct hvm_modlist_entry[] (32 bytes each, so 128 modules fit).
PVH_MODLIST_START = 0x4000
PVH_MODLIST_SIZE = 0x1000

# PVH: struct hvm_memmap_table_entry[] (24 bytes each, 170 fit; the e820 has a handful).
PVH_MEMMAP_START = 0x5000
PVH_MEMMAP_SIZE = 0x1000

# Identity page tables for the 64-bit entry: PML4, one PDPT, four page directories of
# 2 MiB pages covering the first 4 GiB (cpu_state.write_identity_page_tables).
PML4_START = 0x6000
PDPT_START = 0x7000
PD_START = 0x8000
PD_COUNT = 4
PAGE_TABLES_SIZE = (2 + PD_COUNT) * PAGE_SIZE

# The kernel command line, NUL included. boot.rst: anywhere below 0xA0000.
CMDLINE_START = 0x2_0000
CMDLINE_SIZE = 0x1_0000

# Command lines of PVH modules, packed NUL-terminated strings.
MODULE_CMDLINES_START = 0x3_0000
MODULE_CMDLINES_SIZE = 0x1_0000

# bzImage protected-mode code loads here (boot.rst: 0x100000 for bzImage kernels).
KERNEL_START = HIGH_MEMORY_START

# Everything above as (name, start, size), for overlap checks.
BOOT_STRUCTURES: tuple[tuple[str, int, int], ...] = (
    ("GDT", GDT_START, GDT_SIZE),
    ("boot_params", ZERO_PAGE_START, ZERO_PAGE_SIZE),
    ("hvm_start_info", PVH_START_INFO_START, PVH_START_INFO_SIZE),
    ("hvm_modlist", PVH_MODLIST_START, PVH_MODLIST_SIZE),
    ("hvm_memmap", PVH_MEMMAP_START, PVH_MEMMAP_SIZE),
    ("page tables", PML4_START, PAGE_TABLES_SIZE),
    ("command line", CMDLINE_START, CMDLINE_SIZE),
    ("module command lines", MODULE_CMDLINES_START, MODULE_CMDLINES_SIZE),
)

# The span a kernel image must stay out of.
BOOT_AREA_START = min(start for _, start, _ in BOOT_STRUCTURES)
BOOT_AREA_END = max(start + size for _, start, size in BOOT_STRUCTURES)

# Checked at import so a careless edit cannot silently move a table onto the EBDA.
assert BOOT_AREA_END <= EBDA_START and PDPT_START == PML4_START + PAGE_SIZE
assert PD_START == PDPT_START + PAGE_SIZE and BOOT_AREA_END <= KERNEL_START


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def low_ram_end(mem) -> int:
    """End of the RAM below the 32-bit MMIO hole: the ceiling for boot payloads."""
    return min(mem.regions[0].end, MMIO_HOLE_START)


def place_high(size: int, floor: int, ceiling: int, alignment: int = PAGE_SIZE) -> int | None:
    """Highest `alignment`-aligned start with [start, start+size) inside [floor, ceiling).

    None when it does not fit. Initrds go high so the kernel's own early allocations,
    which grow up from its image, don't run into them.
    """
    start = align_down(ceiling - size, alignment)
    if size < 0 or start < align_up(floor, alignment):
        return None
    return start


def overlaps(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size
