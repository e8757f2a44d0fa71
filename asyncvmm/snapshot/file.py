"""The snapshot file (docs/SNAPSHOT.md has the format for readers of other languages).

    page 0        the header: magic, version, the part table, the header's own CRC-32
    STAT part     the machine's state as JSON (UTF-8), from offset 4096
    MEMO part     guest RAM, page aligned: every RAM region in guest-physical order; pages
                  of zeros are holes (never written: the file is sparse)

Each part has a CRC-32 (zlib's). The header's and the state part's are checked by every
restore. The memory part's covers the bytes of the non-zero pages in file order; it is
checked by `verify_memory` (and `asyncvmm ctl`-free tools), not by restore: a restore maps
the memory part copy-on-write and reads none of it (its time does not grow with RAM, as
Firecracker's does not), so reading it all to check it would undo that.

Every problem with a file is a SnapshotError: one line, exit status 2, nothing started.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass

from .._native import ffi, lib
from ..errors import ConfigError

MAGIC = b"AVMMSNAP"
VERSION = 1
PAGE = lib.AVMM_PAGE_SIZE
HEADER = struct.Struct("<8sII")  # magic, version, number of parts
PART = struct.Struct("<4sIQQI4x")  # kind, flags, offset, length, crc32
KIND_STATE = b"STAT"
KIND_MEMORY = b"MEMO"
FLAG_DIFF = 1  # the memory part holds only the pages the state's diff_runs list (over a base)
MAX_STATE = 64 << 20  # a state part larger than this is not one asyncvmm wrote
WRITE_CHUNK = 8 << 20  # pwrite at most this much at once (a run of non-zero pages)
SCAN_CHUNK = 1 << 30  # pages scanned per C call: the bitmap stays small


class SnapshotError(ConfigError):
    """The snapshot cannot be used (one line naming the problem)."""


@dataclass
class Part:
    kind: bytes
    flags: int
    offset: int
    length: int
    crc: int


def _align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _header(parts: list[Part]) -> bytes:
    body = HEADER.pack(MAGIC, VERSION, len(parts)) + b"".join(
        PART.pack(p.kind, p.flags, p.offset, p.length, p.crc) for p in parts)
    return body + struct.pack("<I", zlib.crc32(body))


# -- writing ------------------------------------------------------------------------------
async def write(path: str, state: dict, regions: list[tuple[memoryview, int]],
                diff: list[list[tuple[int, int]]] | None = None) -> dict:
    """Write `state` and guest RAM (`regions`: (view, host address) per RAM slot, in
    guest-physical order) to `path` (through PATH.tmp, renamed when whole). Returns what
    was written: bytes of RAM, pages written, the file's size and blocks.

    `diff`: a diff snapshot — per region, the runs (first page, count) written since the
    base: only those pages are written (zero or not), and the state lists them.

    The file is created, sized and renamed on the loop's thread (those are the loop's
    system calls under --seccomp); the pages are scanned and written by a worker thread
    (the C scan and pwrite release the GIL): the loop is never blocked by RAM's size."""
    ram = sum(len(v) for v, _ in regions)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if diff is not None:
            state = {**state, "diff_runs": [[i, first, count] for i, rs in enumerate(diff) for first, count in rs]}
        state_bytes = json.dumps(state, separators=(",", ":")).encode()
        stat = Part(KIND_STATE, 0, PAGE, len(state_bytes), zlib.crc32(state_bytes))
        mem = Part(KIND_MEMORY, FLAG_DIFF if diff is not None else 0, _align(PAGE + len(state_bytes)), ram, 0)
        os.ftruncate(fd, mem.offset + ram)  # holes where no page is written
        pages, mem.crc = await asyncio.to_thread(_write_memory, fd, regions, diff, mem.offset, state_bytes)
        os.pwrite(fd, _header([stat, mem]), 0)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    return {"ram_bytes": ram, "pages_written": pages, "file_bytes": mem.offset + ram, "state_crc": stat.crc,
            "disk_bytes": os.stat(path).st_blocks * 512}


def _write_memory(fd: int, regions, diff, offset: int, state_bytes: bytes) -> tuple[int, int]:
    """The worker thread's part: the state part, then RAM's pages; (pages, CRC)."""
    os.pwrite(fd, state_bytes, PAGE)
    pages, crc, base = 0, 0, offset
    for i, (view, hva) in enumerate(regions):
        if diff is not None:
            n, crc = _write_runs(fd, view, diff[i], base, crc)
        else:
            n, crc = _write_region(fd, view, hva, base, crc)
        pages += n
        base += len(view)
    return pages, crc


def _write_runs(fd: int, view: memoryview, runs: list[tuple[int, int]], file_off: int, crc: int) -> tuple[int, int]:
    written = 0
    for first, count in runs:
        for a in range(first * PAGE, (first + count) * PAGE, WRITE_CHUNK):
            chunk = view[a : min((first + count) * PAGE, a + WRITE_CHUNK)]
            crc = zlib.crc32(chunk, crc)
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], file_off + a + done)
        written += count
    return written, crc


def _write_region(fd: int, view: memoryview, hva: int, file_off: int, crc: int) -> tuple[int, int]:
    """The non-zero pages of one region, as runs; (pages written, running CRC)."""
    written = 0
    total = len(view) // PAGE
    bitmap = ffi.new("uint8_t[]", min(total, SCAN_CHUNK // PAGE) or 1)
    for first in range(0, total, SCAN_CHUNK // PAGE):
        count = min(SCAN_CHUNK // PAGE, total - first)
        if not lib.avmm_nonzero_pages(ffi.cast("uint8_t *", hva + first * PAGE), count, bitmap):
            continue
        flags = bytes(ffi.buffer(bitmap, count))
        i = flags.find(1)
        while i >= 0:
            j = flags.find(0, i)
            j = count if j < 0 else j
            start, end = (first + i) * PAGE, (first + j) * PAGE
            for a in range(start, end, WRITE_CHUNK):
                chunk = view[a : min(end, a + WRITE_CHUNK)]
                crc = zlib.crc32(chunk, crc)
                done = 0
                while done < len(chunk):
                    done += os.pwrite(fd, chunk[done:], file_off + a + done)
            written += j - i
            i = flags.find(1, j)
    return written, crc


# -- reading ------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """A snapshot file, checked: its state, and where its memory part is."""

    path: str
    state: dict
    memory: Part
    state_crc: int = 0
    base: "Snapshot | None" = None  # a diff's base (itself full, or a diff)

    @property
    def is_diff(self) -> bool:
        return bool(self.memory.flags & FLAG_DIFF)

    def root(self) -> "Snapshot":
        """The full snapshot at the bottom of a chain of diffs (self if full)."""
        return self.base.root() if self.base is not None else self

    def diffs(self) -> list["Snapshot"]:
        """The diffs over root(), oldest first."""
        return (self.base.diffs() + [self]) if self.base is not None else []

    def apply_diff(self, mem) -> int:
        """This diff's pages onto guest RAM `mem` (mapped from its base); pages copied."""
        runs = self.state.get("diff_runs", [])
        regions = mem.regions
        offsets = [sum(r.size for r in regions[:i]) for i in range(len(regions))]
        copied = 0
        fd = self.open_memory()
        try:
            for i, first, count in runs:
                view = mem.view(regions[i].gpa + first * PAGE, count * PAGE)
                at = self.memory.offset + offsets[i] + first * PAGE
                done = 0
                while done < len(view):
                    n = os.preadv(fd, [view[done:]], at + done)
                    if n <= 0:
                        raise SnapshotError(f"snapshot {self.path}: its memory part ends early")
                    done += n
                view.release()
                copied += count
        finally:
            os.close(fd)
        return copied

    def open_memory(self) -> int:
        """An fd of the file for mapping its memory part (the caller closes it)."""
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError(f"snapshot {self.path}: {e.strerror}") from None


def read(path: str, *, _depth: int = 0) -> Snapshot:
    """Read and check a snapshot's header and state part (small: no RAM is read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(PAGE)
            parts = _parse_header(path, head, size)
            stat = parts.get(KIND_STATE)
            mem = parts.get(KIND_MEMORY)
            if stat is None or mem is None:
                raise SnapshotError(f"snapshot {path}: it has no {'state' if stat is None else 'memory'} part")
            if stat.length > MAX_STATE:
                raise SnapshotError(f"snapshot {path}: a state part of {stat.length} bytes is not one asyncvmm wrote")
            f.seek(stat.offset)
            data = f.read(stat.length)
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: {e.strerror}") from None
    if zlib.crc32(data) != stat.crc:
        raise SnapshotError(f"snapshot {path}: the state part's checksum does not match (the file is damaged)")
    if mem.offset % PAGE:
        raise SnapshotError(f"snapshot {path}: the memory part is not page aligned")
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise SnapshotError(f"snapshot {path}: the state part is not JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        raise SnapshotError(f"snapshot {path}: the state part is not a machine's state")
    if state.get("config", {}).get("memory") != mem.length:
        raise SnapshotError(f"snapshot {path}: the memory part's {mem.length} bytes are not the machine's RAM")
    snap = Snapshot(path, state, mem, stat.crc)
    if snap.is_diff:
        ref = state.get("base")
        if _depth > 64 or not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or "\0" in ref["path"]:
            raise SnapshotError(f"snapshot {path}: a diff without a usable base")
        base_path = ref["path"] if os.path.isabs(ref["path"]) else os.path.join(os.path.dirname(path), ref["path"])
        snap.base = read(base_path, _depth=_depth + 1)
        if snap.base.state_crc != ref.get("state_crc"):
            raise SnapshotError(f"snapshot {path}: its base {base_path} is not the snapshot it was taken over "
                                "(its state differs)")
    return snap


def _parse_header(path: str, head: bytes, size: int) -> dict[bytes, Part]:
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise SnapshotError(f"{path} is not an asyncvmm snapshot" + (" (it is empty)" if not head else ""))
    magic, version, nparts = HEADER.unpack_from(head)
    if version != VERSION:
        raise SnapshotError(f"snapshot {path}: format version {version}; this asyncvmm reads version {VERSION}")
    end = HEADER.size + nparts * PART.size
    if nparts > 16 or len(head) < end + 4:
        raise SnapshotError(f"snapshot {path}: the header is truncated or damaged")
    if struct.unpack_from("<I", head, end)[0] != zlib.crc32(head[:end]):
        raise SnapshotError(f"snapshot {path}: the header's checksum does not match (the file is damaged)")
    parts = {}
    for i in range(nparts):
        p = Part(*PART.unpack_from(head, HEADER.size + i * PART.size))
        if p.offset + p.length > size:
            raise SnapshotError(f"snapshot {path}: truncated: its {_kind_name(p.kind)} part ends at "
                                f"byte {p.offset + p.length}, the file has {size}")
        parts[p.kind] = p
    return parts


def _kind_name(kind: bytes) -> str:
    """A part's kind for a message: as is if letters and digits, else escaped (one line)."""
    return kind.decode() if kind.isalnum() else repr(kind)


def verify_memory(snap: Snapshot) -> bool:
    """Whether the memory part's CRC matches (reads all of it: a check, not a restore)."""
    fd = snap.open_memory()
    try:
        if not snap.memory.length:
            return snap.memory.crc == 0
        m = mmap.mmap(fd, snap.memory.length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=snap.memory.offset)
    finally:
        os.close(fd)
    try:
        hva = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
        _, crc = _scan_crc(memoryview(m), hva)
        return crc == snap.memory.crc
    finally:
        m.close()


def _scan_crc(view: memoryview, hva: int) -> tuple[int, int]:
    """The CRC the writer computed: over the non-zero pages, in order (no file written)."""
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return _write_region(devnull, view, hva, 0, 0)
    finally:
        os.close(devnull)
