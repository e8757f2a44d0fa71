"""Partition tables of a raw disk image: MBR (with the extended partition's chain of EBRs)
and GPT (UEFI spec 2.10, section 5.3: header and entry array, both CRC32s checked; the
backup header at the disk's last LBA when the primary one is damaged).

Partitions are numbered as Linux and GRUB number them: MBR primaries 1-4, logicals from
5 in chain order; GPT entries by their index + 1. A partition that runs past the end of
the image, or two that overlap, make the table unusable: LoaderError says which.
"""

from __future__ import annotations

import enum
import os
import struct
import uuid
import zlib
from dataclasses import dataclass

from .errors import LoaderError

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_TABLE_OFFSET = 446  # four 16-byte entries, then the signature at 510
GPT_SIGNATURE = b"EFI PART"
MAX_LOGICAL = 128  # an EBR chain longer than this is a loop
MAX_GPT_ENTRIES = 1024


class MbrType(enum.IntEnum):
    """The MBR entry's system ID byte (those the loader treats specially)."""

    EMPTY = 0x00
    EXTENDED_CHS = 0x05
    EXTENDED_LBA = 0x0F
    LINUX_EXTENDED = 0x85
    LINUX = 0x83
    EFI_SYSTEM = 0xEF
    GPT_PROTECTIVE = 0xEE


EXTENDED = {MbrType.EXTENDED_CHS, MbrType.EXTENDED_LBA, MbrType.LINUX_EXTENDED}

# GPT partition type GUIDs (UEFI spec, and the Discoverable Partitions Specification).
GPT_ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
GPT_BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")  # GRUB's core.img, no filesystem
GPT_LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
GPT_XBOOTLDR = uuid.UUID("bc13c2ff-59e6-4262-a352-b275fd6f7172")  # the BLS /boot

# struct layouts (little-endian): an MBR entry; the GPT header up to its 92 bytes; a GPT entry.
_MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sectors
_GPT_HEADER = struct.Struct("<8sIII4sQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


class Scheme(enum.StrEnum):
    NONE = "none"  # a filesystem on the whole disk
    MBR = "msdos"  # GRUB's name for it, as in (hd0,msdos1)
    GPT = "gpt"


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as Linux and GRUB count
    start: int  # bytes from the start of the image
    size: int  # bytes
    kind: str  # for the log: "0x83", "ESP", a GPT type GUID
    scheme: Scheme
    name: str = ""  # a GPT partition's name
    part_uuid: str = ""  # GPT's unique partition GUID (root=PARTUUID=...)
    esp: bool = False
    no_filesystem: bool = False  # a BIOS boot partition: GRUB's core.img, never a filesystem

    @property
    def grub_name(self) -> str:
        """GRUB's name for it on disk N: (hdN,msdos1), (hdN,gpt2), or (hdN) for a whole disk."""
        return f"{self.scheme.value}{self.number}" if self.scheme is not Scheme.NONE else ""

    def describe(self) -> str:
        if self.scheme is Scheme.NONE:
            return "the whole disk"
        return f"partition {self.number} ({self.scheme.value}, {self.kind})"


@dataclass(frozen=True)
class Table:
    scheme: Scheme
    partitions: list[Partition]
    disk_uuid: str = ""
    note: str = ""  # e.g. that the primary GPT header was damaged and the backup was used


def read_table(f, image_size: int, where: str = "disk") -> Table:
    """Read the partition table of the image open as binary file `f`."""
    mbr = _pread(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return Table(Scheme.NONE, [Partition(0, 0, image_size, "whole disk", Scheme.NONE)])
    entries = [_MBR_ENTRY.unpack_from(mbr, MBR_TABLE_OFFSET + 16 * i) for i in range(4)]
    if any(e[2] == MbrType.GPT_PROTECTIVE for e in entries):
        table = _read_gpt(f, image_size, where)
    elif _looks_like_boot_sector(mbr, entries):
        # A FAT or NTFS boot sector also ends in 55 AA; its "entries" are code.
        return Table(Scheme.NONE, [Partition(0, 0, image_size, "whole disk", Scheme.NONE)])
    else:
        table = _read_mbr(f, entries, image_size, where)
    _check(table.partitions, image_size, where)
    return table


def _looks_like_boot_sector(mbr: bytes, entries) -> bool:
    if mbr[3:11] in (b"NTFS    ", b"EXFAT   ") or mbr[54:62] in (b"FAT12   ", b"FAT16   ") or mbr[82:90] == b"FAT32   ":
        return True
    return any(e[0] not in (0x00, 0x80) for e in entries)  # the status byte is 0 or 0x80


def _read_mbr(f, entries, image_size: int, where: str) -> Table:
    parts: list[Partition] = []
    extended = None
    for i, (_status, _chs0, ptype, _chs1, first, count) in enumerate(entries):
        if ptype == MbrType.EMPTY or count == 0:
            continue
        if ptype in EXTENDED:
            if extended is not None:
                raise LoaderError(f"{where}: MBR has two extended partitions ({extended[0]} and {i + 1})")
            extended = (i + 1, first, count)
            continue
        parts.append(_mbr_part(i + 1, first, count, ptype))
    if extended is not None:
        parts += _read_logicals(f, extended, image_size, where)
    return Table(Scheme.MBR, parts)


def _mbr_part(number: int, first: int, count: int, ptype: int) -> Partition:
    esp = ptype == MbrType.EFI_SYSTEM
    return Partition(number, first * SECTOR, count * SECTOR, "ESP" if esp else f"type {ptype:#04x}", Scheme.MBR, esp=esp)


def _read_logicals(f, extended, image_size: int, where: str) -> list[Partition]:
    """Follow the EBR chain: each EBR's first entry is a logical partition relative to that
    EBR, its second the next EBR relative to the extended partition's start."""
    number, ext_first, ext_count = extended
    if (ext_first + ext_count) * SECTOR > image_size:
        raise LoaderError(f"{where}: the extended partition ({number}) runs past the end of the image")
    parts: list[Partition] = []
    ebr_lba = ext_first
    seen: set[int] = set()
    while True:
        if ebr_lba in seen or len(parts) >= MAX_LOGICAL:
            raise LoaderError(f"{where}: the extended partition's chain of EBRs loops (at sector {ebr_lba})")
        seen.add(ebr_lba)
        ebr = _pread(f, ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != MBR_SIGNATURE:
            if not parts:  # an empty extended partition
                return parts
            raise LoaderError(f"{where}: the EBR at sector {ebr_lba} has no 55 AA signature")
        logical = _MBR_ENTRY.unpack_from(ebr, MBR_TABLE_OFFSET)
        link = _MBR_ENTRY.unpack_from(ebr, MBR_TABLE_OFFSET + 16)
        if logical[2] != MbrType.EMPTY and logical[5]:
            parts.append(_mbr_part(5 + len(parts), ebr_lba + logical[4], logical[5], logical[2]))
        if link[2] == MbrType.EMPTY or link[5] == 0:
            return parts
        ebr_lba = ext_first + link[4]
        if ebr_lba >= ext_first + ext_count:
            raise LoaderError(f"{where}: an EBR points outside the extended partition (sector {ebr_lba})")


def _read_gpt(f, image_size: int, where: str) -> Table:
    last_lba = image_size // SECTOR - 1
    primary, why = _gpt_header(f, 1, image_size, where)
    if primary is not None:
        return primary
    backup, why_backup = _gpt_header(f, last_lba, image_size, where)
    if backup is None:
        raise LoaderError(f"{where}: GPT unusable: primary header {why}; backup header {why_backup}")
    return Table(backup.scheme, backup.partitions, backup.disk_uuid, f"primary GPT header {why}: read the backup")


def _gpt_header(f, lba: int, image_size: int, where: str) -> tuple[Table | None, str]:
    raw = _pread(f, lba * SECTOR, SECTOR)
    if len(raw) < _GPT_HEADER.size or raw[:8] != GPT_SIGNATURE:
        return None, f"at sector {lba} has no 'EFI PART' signature"
    (_sig, _rev, hsize, hcrc, _res, _my, _alt, _first_usable, _last_usable, disk_guid,
     entries_lba, n_entries, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
    if not _GPT_HEADER.size <= hsize <= SECTOR:
        return None, f"has a header size of {hsize} bytes"
    # The header's CRC32 is taken over header-size bytes with the CRC field itself zero.
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        return None, "fails its CRC32"
    if entry_size < _GPT_ENTRY.size or entry_size % 8 or n_entries > MAX_GPT_ENTRIES:
        return None, f"describes {n_entries} entries of {entry_size} bytes"
    array = _pread(f, entries_lba * SECTOR, n_entries * entry_size)
    if len(array) < n_entries * entry_size:
        return None, "has its entry array past the end of the image"
    if zlib.crc32(array) != entries_crc:
        return None, "has an entry array that fails its CRC32"
    parts = []
    for i in range(n_entries):
        type_guid, part_guid, first, last, _attrs, name = _GPT_ENTRY.unpack_from(array, i * entry_size)
        if type_guid == bytes(16):
            continue
        ptype = uuid.UUID(bytes_le=type_guid)
        if last < first:
            raise LoaderError(f"{where}: GPT partition {i + 1} ends (sector {last}) before it starts ({first})")
        kind = {GPT_ESP: "ESP", GPT_BIOS_BOOT: "BIOS boot", GPT_LINUX: "Linux", GPT_XBOOTLDR: "XBOOTLDR"}.get(ptype, str(ptype))
        parts.append(Partition(
            i + 1, first * SECTOR, (last - first + 1) * SECTOR, kind, Scheme.GPT,
            name=name.decode("utf-16-le", "replace").split("\0", 1)[0],
            part_uuid=str(uuid.UUID(bytes_le=part_guid)), esp=ptype == GPT_ESP,
            no_filesystem=ptype == GPT_BIOS_BOOT,
        ))
    return Table(Scheme.GPT, parts, str(uuid.UUID(bytes_le=disk_guid))), ""


def _check(parts: list[Partition], image_size: int, where: str) -> None:
    for p in parts:
        if p.start + p.size > image_size:
            raise LoaderError(
                f"{where}: partition {p.number} (bytes {p.start}-{p.start + p.size - 1}) runs past the end "
                f"of the image ({image_size} bytes)"
            )
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.size:
            raise LoaderError(f"{where}: partitions {a.number} and {b.number} overlap")


def _pread(f, offset: int, size: int) -> bytes:
    return os.pread(f.fileno(), size, offset)
