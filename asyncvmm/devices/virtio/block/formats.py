"""Disk image formats, detected from their magic numbers: an image is never guessed raw.

A qcow2 file served as raw bytes shows the guest no file system, and a guest that writes
to it destroys the image's metadata. So every image is read before it is used: a file
whose header (or trailer) is one of the formats below is that format, anything else is
raw. `format=raw` on the command line says raw explicitly (QEMU's `format=`): then the
bytes are served as they are, whatever they hold (a guest's own LUKS volume, say).

The table follows the formats' own specifications (QEMU's docs/interop/qcow2.txt, the
VMDK, VDI, VHDX and VHD specifications, Apple's UDIF trailer); the names are the
`driver=` names of QEMU's block layer, which serves every one of them (qsd.py).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ....errors import ConfigError

RAW = "raw"
HEAD = 4096  # how much of the image's start the probes read
TAIL = 512  # and of its end (VHD's footer, DMG's koly trailer)


@dataclass(frozen=True)
class Magic:
    """`magic` at byte `offset` (negative: from the end) means `format`."""

    format: str
    offset: int
    magic: bytes
    what: str


# Longest and most specific first: the first match wins.
MAGICS = (
    Magic("qed", 0, b"QED\0", "QED"),
    Magic("vmdk", 0, b"KDMV", "VMDK (sparse extent)"),
    Magic("vmdk", 0, b"COWD", "VMDK (ESX sparse extent)"),
    Magic("vmdk", 0, b"# Disk DescriptorFile", "VMDK (descriptor)"),
    Magic("vdi", 0x40, struct.pack("<I", 0xBEDA107F), "VirtualBox VDI"),
    Magic("vhdx", 0, b"vhdxfile", "VHDX"),
    Magic("vpc", 0, b"conectix", "VHD (dynamic)"),
    Magic("vpc", -512, b"conectix", "VHD (fixed)"),
    Magic("luks", 0, b"LUKS\xba\xbe", "LUKS"),
    Magic("parallels", 0, b"WithoutFreeSpace", "Parallels"),
    Magic("parallels", 0, b"WithouFreSpacExt", "Parallels"),
    Magic("bochs", 0, b"Bochs Virtual HD Image", "Bochs"),
    Magic("cloop", 0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0", "cloop"),
    Magic("dmg", -512, b"koly", "Apple DMG"),
)
QCOW_MAGIC = b"QFI\xfb"  # qcow (version 1) and qcow2 (versions 2, 3) share it
FORMATS = (RAW, "qcow", "qcow2", *dict.fromkeys(m.format for m in MAGICS))


@dataclass(frozen=True)
class Detected:
    format: str  # a QEMU block driver name; "raw" when no magic matched
    what: str  # for messages: "qcow2 (version 3)"

    @property
    def raw(self) -> bool:
        return self.format == RAW


def probe(head: bytes, tail: bytes) -> Detected:
    """What the image's first HEAD and last TAIL bytes say it is."""
    if head[:4] == QCOW_MAGIC and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        fmt = "qcow" if version == 1 else "qcow2"
        return Detected(fmt, f"{fmt} (version {version})")
    for m in MAGICS:
        data, off = (tail, len(tail) + m.offset) if m.offset < 0 else (head, m.offset)
        if off >= 0 and data[off : off + len(m.magic)] == m.magic:
            return Detected(m.format, m.what)
    return Detected(RAW, RAW)


def probe_fd(fd: int) -> Detected:
    """probe() on an open image (a file or a block device)."""
    head = os.pread(fd, HEAD, 0)
    size = os.lseek(fd, 0, os.SEEK_END)  # a block device's end too
    tail = os.pread(fd, TAIL, size - TAIL) if size >= HEAD else b""
    return probe(head, tail)


def detect(path: str, what: str = "disk") -> Detected:
    """Read the image's header and trailer (a ConfigError if it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    try:
        return probe_fd(fd)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)


def check_format(path: str, given: str, what: str = "disk") -> Detected:
    """The image's format, from `format=` (`given`, "" when not given) and its magic.

    format=raw wins over any magic (said explicitly); another given format must be what the
    magic says (QEMU would refuse to open it anyway, with a longer message)."""
    found = detect(path, what)
    if given == RAW:
        return Detected(RAW, RAW if found.raw else f"raw (explicitly; it holds a {found.what} header)")
    if given and given != found.format:
        raise ConfigError(f"{what} {path}: format={given}, but the image is {found.what}"
                          + ("" if found.raw else f" (format={found.format}, or format=raw for its raw bytes)"))
    return found
