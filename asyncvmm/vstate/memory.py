"""Guest RAM: where guest physical addresses live in the VMM's address space.

Guest RAM is anonymous memory (or, `shared`, one memfd mapped MAP_SHARED, which a vhost-user
back-end maps too: it is handed over with SET_MEM_TABLE) split around the 32-bit MMIO hole (PCI BARs, IOAPIC,
LAPIC live there): RAM below `MMIO_HOLE_START`, the rest from 4 GiB up. One
`GuestMemory` owns that map; every access goes through it and is bounds-checked, so a
guest address out of range, or a length that wraps, raises `GuestMemoryError` instead of
touching host memory.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from ..errors import ConfigError, GuestMemoryError

MiB = 1 << 20
GiB = 1 << 30

# The 32-bit MMIO hole: the top 1.25 GiB under 4 GiB holds ECAM (from 0xB0000000, where
# Q35 firmware puts it), PCI BARs, the IOAPIC (0xFEC00000) and the LAPIC (0xFEE00000).
# No RAM is mapped there.
MMIO_HOLE_START = 0xB000_0000
MMIO_HOLE_END = 1 << 32

# Legacy PC layout inside the first MiB: conventional memory ends below the EBDA; the
# BIOS area up to 1 MiB is reserved (kernels expect to find no RAM there).
EBDA_START = 0x9_FC00
HIGH_MEMORY_START = 0x10_0000

# e820 entry types (ACPI spec, table "Address Range Types").
E820_RAM = 1
E820_RESERVED = 2


CAP_IPC_LOCK = 14  # <linux/capability.h>: mlock beyond RLIMIT_MEMLOCK


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def wire(hva: int, length: int) -> None:
    """mlock [hva, hva+length): resident now, never swapped (bhyve's -S). A limit too low
    is the user's to raise: ConfigError naming it."""
    import ctypes  # noqa: PLC0415 (only -S needs it)
    import resource  # noqa: PLC0415

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_capability(CAP_IPC_LOCK) and length > soft:
        raise ConfigError(
            f"-S: wiring {length // MiB} MiB of guest memory needs RLIMIT_MEMLOCK of at least that; "
            f"it is {soft // 1024} KiB (raise it: ulimit -l, or LimitMEMLOCK= for a service)"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    if libc.mlock(ctypes.c_void_p(hva), ctypes.c_size_t(length)) != 0:
        err = ctypes.get_errno()
        raise ConfigError(f"-S: cannot wire {length // MiB} MiB of guest memory: {os.strerror(err)} "
                          "(RLIMIT_MEMLOCK, ulimit -l, may be too low)")


def _copy_in(fd: int, offset: int, m: mmap.mmap) -> None:
    """The file's bytes [offset, offset+len(m)) into mapping `m`."""
    view = memoryview(m)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done : done + (64 << 20)]], offset + done)
            if n <= 0:
                raise OSError(0, "the memory file ends early")
            done += n
    finally:
        view.release()


@dataclass(frozen=True)
class Region:
    """One contiguous slot of guest RAM: guest physical [gpa, gpa+size) at host `hva`."""

    slot: int
    gpa: int
    size: int
    hva: int
    offset: int = 0  # where it starts in the memfd (shared memory)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_layout(size: int) -> list[tuple[int, int]]:
    """(gpa, size) of each RAM slot for `size` bytes of guest RAM, around the hole."""
    low = min(size, MMIO_HOLE_START)
    slots = [(0, low)]
    if size > low:
        slots.append((MMIO_HOLE_END, size - low))
    return slots


class GuestMemory:
    """The guest physical address space's RAM, as host mappings.

    Thread ownership: the mapping is created and destroyed on the loop's thread; vCPU
    threads only reach it through KVM. Accessors may be called from any thread.
    """

    def __init__(self, size: int, *, hugepages: bool = False, wired: bool = False, shared: bool = False,
                 backing: tuple[int, int] | None = None):
        """`backing`: (fd, offset) of a file holding the RAM's bytes (a snapshot's memory
        part): each region is mapped from it private, copy-on-write — the guest's writes
        stay in this process, and nothing is read until the guest touches it. With `shared`
        (a memfd, for vhost-user) the bytes are copied in instead."""
        if size < MiB or size % (4096) != 0:
            raise GuestMemoryError(f"guest memory of {size} bytes is not a whole number of pages of at least 1 MiB")
        from .._native import ffi, lib  # noqa: PLC0415 (the extension loads lazily)

        self.size = size
        self._c_table = None
        self._maps: list[mmap.mmap] = []
        self.regions: list[Region] = []
        self._views: list[memoryview] = []
        # Shared: one memfd for all of RAM (only when a vhost-user device needs it: Debian's
        # shmem_enabled is "never", so shared RAM gets no transparent huge pages).
        self.memfd = -1
        if shared:
            try:
                self.memfd = os.memfd_create("asyncvmm-ram", os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepages else 0))
                os.ftruncate(self.memfd, size)
            except OSError as e:
                self.close()
                raise GuestMemoryError(f"cannot make {size // MiB} MiB of shared guest memory: {e.strerror}") from None
        offset = 0
        file_offset = backing[1] if backing is not None else 0
        for slot, (gpa, length) in enumerate(ram_layout(size)):
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            if hugepages and not shared:
                flags |= 0x40000  # MAP_HUGETLB
            try:
                if shared:
                    m = mmap.mmap(self.memfd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                  offset=offset)
                    if backing is not None:  # a memfd cannot be copy-on-write over a file: copy
                        _copy_in(backing[0], file_offset, m)
                    file_offset += length
                elif backing is not None:
                    m = mmap.mmap(backing[0], length, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0),
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=file_offset)
                    file_offset += length
                else:
                    m = mmap.mmap(-1, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                self.close()
                raise GuestMemoryError(f"cannot map {length // MiB} MiB of guest memory: {e.strerror}") from None
            # Guest RAM is not inherited by child processes (the console helper, QEMU in perf).
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTFORK"):
                m.madvise(mmap.MADV_DONTFORK)
            # Transparent huge pages where the host allows them (Debian's default is
            # "madvise", so without asking there are none), as QEMU asks too: fewer TLB
            # misses in the guest, and guest buffers that are physically contiguous, so
            # O_DIRECT I/O from them takes fewer segments on the host's block layer.
            if not hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    m.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass  # a host kernel built without THP: small pages, nothing lost
            hva = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
            self._maps.append(m)
            self._views.append(memoryview(m))
            self.regions.append(Region(slot, gpa, length, hva, offset))
            offset += length
        self._lib = lib
        self._ffi = ffi
        if wired:
            try:
                for r in self.regions:
                    wire(r.hva, r.size)
            except BaseException:
                self.close()
                raise

    # -- lookup -----------------------------------------------------------------------
    def _find(self, gpa: int, length: int) -> tuple[int, int]:
        """(region index, offset) for [gpa, gpa+length), which must lie in one region."""
        if gpa < 0 or length < 0 or gpa + length > (1 << 64):
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} wraps")
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa and gpa + length <= r.end:
                return i, gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}..{gpa + length:#x} is not in guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM [gpa, gpa+length) — no copy."""
        i, off = self._find(gpa, length)
        return self._views[i][off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """The VMM writes guest RAM (a loader, fw_cfg's DMA, gdb, a quirk): KVM's dirty log
        does not see it, so the data path's log (snapshot/dirty.py) is told, while one is kept."""
        self.view(gpa, len(data))[:] = data
        if self._c_table is not None and len(data):
            iov = self._ffi.new("struct iovec *")
            iov.iov_base = self._ffi.cast("void *", self.hva(gpa, len(data)))
            iov.iov_len = len(data)
            self._lib.avmm_gmem_mark_iov(self._c_table, iov, 1, 0, len(data))

    def hva(self, gpa: int, length: int = 1) -> int:
        """The host address of guest physical `gpa` (for the C core and KVM)."""
        i, off = self._find(gpa, length)
        return self.regions[i].hva + off

    # -- layout -----------------------------------------------------------------------
    def e820(self) -> list[tuple[int, int, int]]:
        """The memory map a firmware would report: (addr, size, type), sorted."""
        low = self.regions[0].size
        table = [
            (0, min(EBDA_START, low), E820_RAM),
            (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
        ]
        if low > HIGH_MEMORY_START:
            table.append((HIGH_MEMORY_START, low - HIGH_MEMORY_START, E820_RAM))
        for r in self.regions[1:]:
            table.append((r.gpa, r.size, E820_RAM))
        return table

    def c_table(self):
        """The regions as the C data path's `struct avmm_gmem` (cext/virtq.h), built once."""
        if self._c_table is None:
            t = self._ffi.new("struct avmm_gmem *")
            t.nregions = len(self.regions)
            for i, r in enumerate(self.regions):
                t.r[i].gpa, t.r[i].size = r.gpa, r.size
                t.r[i].hva = self._ffi.cast("uint8_t *", r.hva)
            self._c_table = t
        return self._c_table

    def touched_bytes(self) -> int:
        """Guest RAM the host has actually backed (resident), from /proc/self/smaps."""
        starts = {r.hva for r in self.regions}
        total = 0
        current = None
        with open("/proc/self/smaps", "rb") as f:
            for line in f:
                if b"-" in line.split(b" ", 1)[0]:
                    start = int(line.split(b"-", 1)[0], 16)
                    current = start in starts
                elif current and line.startswith(b"Rss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a caller still holds a view: the map goes with it
                pass
        self._maps.clear()
        self.regions.clear()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        if self._c_table is not None:
            self._c_table.nregions = 0  # a data path still holding it now finds no RAM
            self._c_table = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
