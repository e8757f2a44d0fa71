#!/usr/bin/env python3
"""Write an initramfs: a "newc" cpio archive (what the kernel unpacks), gzip-compressed
when OUT ends in .gz. Uncompressed is faster on an instruction-emulating KVM: the kernel
then copies the archive instead of inflating it (inflating 1.1 MB took it 2-3 minutes).

Usage: mkcpio.py OUT[.gz] ENTRY...
  dir:PATH                     a directory (mode 0755)
  file:PATH=SRC[:MODE]         a file's contents (mode in octal; default: SRC's)
  node:PATH=c|b:MAJOR:MINOR    a device node (mode 0600), e.g. node:dev/console=c:5:1
  link:PATH=TARGET             a symbolic link
  tree:PREFIX=SRCDIR           SRCDIR's files, directories and links under PREFIX

Entries are written in the order given (parents first), with uid/gid 0 and mtime 0, so
the same input gives the same bytes; no mknod, so no root is needed. The format is
Documentation/driver-api/early-userspace/buffer-format.rst (magic 070701, eight-digit
hex fields, names and data padded to 4 bytes, ending in TRAILER!!!).
"""

from __future__ import annotations

import gzip
import os
import stat
import sys

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK


class Writer:
    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name_bytes = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
        self.out += b"070701" + b"".join(b"%08x" % f for f in fields)
        self.out += name_bytes
        self._pad()
        self.out += data
        self._pad()
        self.ino += 1

    def _pad(self) -> None:
        self.out += b"\0" * (-len(self.out) % 4)

    def finish(self) -> bytes:
        self.entry("TRAILER!!!", 0)
        return bytes(self.out)


def add(w: Writer, spec: str) -> None:
    kind, _, rest = spec.partition(":")
    path, _, value = rest.partition("=")
    path = path.strip("/")
    if kind == "dir":
        w.entry(path, S_IFDIR | 0o755, nlink=2)
    elif kind == "file":
        src, _, mode = value.partition(":")
        with open(src, "rb") as f:
            data = f.read()
        perm = int(mode, 8) if mode else stat.S_IMODE(os.stat(src).st_mode)
        w.entry(path, S_IFREG | perm, data)
    elif kind == "node":
        typ, major, minor = value.split(":")
        w.entry(path, (S_IFCHR if typ == "c" else S_IFBLK) | 0o600, rdev=(int(major), int(minor)))
    elif kind == "link":
        w.entry(path, S_IFLNK | 0o777, value.encode())
    elif kind == "tree":
        for root, dirs, files in os.walk(value):
            dirs.sort()
            rel = os.path.relpath(root, value)
            base = path if rel == "." else f"{path}/{rel}" if path else rel
            if rel != ".":
                w.entry(base, S_IFDIR | 0o755, nlink=2)
            for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
                src = os.path.join(root, name)
                target = f"{base}/{name}" if base else name
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    w.entry(target, S_IFLNK | 0o777, os.readlink(src).encode())
                elif stat.S_ISREG(st.st_mode):
                    with open(src, "rb") as f:
                        w.entry(target, S_IFREG | stat.S_IMODE(st.st_mode), f.read())
    else:
        raise SystemExit(f"mkcpio: unknown entry {spec!r} (dir:, file:, node:, link:, tree:)")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    w = Writer()
    for spec in argv[1:]:
        add(w, spec)
    data = w.finish()
    tmp = argv[0] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(data, compresslevel=9, mtime=0) if argv[0].endswith(".gz") else data)
    os.replace(tmp, argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
