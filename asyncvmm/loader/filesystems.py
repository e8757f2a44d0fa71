"""Files on a partition of a disk image, read with Debian's own tools:

    what is there        how it is read
    (any)                util-linux's `blkid -p -O OFFSET -S SIZE`: the type, UUID and label
    ext2, ext3, ext4     e2fsprogs' `debugfs -c` on `IMAGE?offset=N` (the unix I/O manager's
                         option): `ls -p` lists a directory, `cat` reads a file, `stat` a link
    FAT12/16/32 (ESP)    mtools on `IMAGE@@OFFSET`: `mdir -b` lists, `mcopy -n ... -` reads
    a host directory     os (bhyveload's -h): paths may not leave it

These are the implementations the filesystems' own maintainers keep (e2fsprogs is the ext
family's reference, mtools Debian's FAT tool): an image a distribution wrote is read the
way its own tools read it, journal replay and extents included, and nothing here parses
an on-disk structure of a filesystem. The files a boot needs are few (a menu, a kernel,
an initrd): a process per file costs milliseconds (perf/loader.py measures it).

Other filesystems are recognised by blkid and named in the error (UnsupportedFs): XFS,
btrfs, FreeBSD's UFS and ZFS need the firmware path.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .errors import LoaderError

if TYPE_CHECKING:
    from .disks import Disk
    from .partitions import Partition

EXT = {"ext2", "ext3", "ext4"}
FAT = {"vfat", "msdos"}
TOOL_TIMEOUT = 60  # seconds for one tool run (a 100 MB kernel read included)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Probe:
    """What blkid found on a region of the image."""

    type: str = ""  # blkid's TYPE: ext4, vfat, xfs, btrfs, ufs, zfs_member, swap, ...
    uuid: str = ""
    label: str = ""


def probe(image: str, offset: int, size: int) -> Probe:
    out = _run(["blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), image], ok=(0, 2))
    fields = dict(line.split("=", 1) for line in out.decode(errors="replace").splitlines() if "=" in line)
    return Probe(fields.get("TYPE", ""), fields.get("UUID", ""), fields.get("LABEL", ""))


class Filesystem:
    """A tree of files the loader reads: paths are absolute within the filesystem."""

    type = ""
    uuid = ""
    label = ""
    where = ""  # for messages: "disk.img partition 2 (gpt, Linux), ext4"
    device = ""  # GRUB's name for it: hd0,gpt2 (disks.py sets it)
    partition: Partition | None = None  # None for a whole disk or a host directory
    disk: Disk | None = None

    def listdir(self, path: str) -> dict[str, bool] | None:
        """Names in the directory `path` → whether each is a directory; None if no such directory."""
        raise NotImplementedError

    def read(self, path: str, limit: int) -> bytes:
        """The file's bytes; LoaderError if it is missing or longer than `limit`."""
        raise NotImplementedError

    def is_file(self, path: str) -> bool:
        parent, name = posixpath.split(normalize(path))
        listing = self.listdir(parent)
        return listing is not None and listing.get(name) is False

    def is_dir(self, path: str) -> bool:
        return self.listdir(normalize(path)) is not None


def normalize(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/")).replace("//", "/")


class ExtFs(Filesystem):
    """ext2/3/4 through debugfs (read-only, `-c`: catastrophic mode skips the bitmaps)."""

    def __init__(self, image: str, offset: int, found: Probe, where: str):
        self.spec = f"{image}?offset={offset}" if offset else image
        self.type, self.uuid, self.label, self.where = found.type, found.uuid, found.label, where
        self._dirs: dict[str, dict[str, bool] | None] = {}
        self._links: set[str] = set()  # paths listed as symbolic links

    def _debugfs(self, request: str, limit: int = CHUNK) -> tuple[bytes, str]:
        out, err = _run_capped(["debugfs", "-c", "-R", request, self.spec], limit, f"{self.where}: {request.split(' ', 1)[-1]}")
        # debugfs exits 0 even when a request fails: its errors are on stderr, after the banner.
        errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("debugfs ")
                  and "catastrophic mode" not in ln]
        return out, "; ".join(errors)

    def listdir(self, path: str) -> dict[str, bool] | None:
        path = normalize(path)
        if path not in self._dirs:
            out, err = self._debugfs(f'ls -p "{_quoted(path)}"', 16 * CHUNK)
            if err:
                self._dirs[path] = None
            else:
                entries = {}
                for line in out.decode(errors="surrogateescape").splitlines():
                    # /inode/mode/uid/gid/name/size/
                    fields = line.split("/")
                    if len(fields) >= 7 and fields[5] not in (".", ".."):
                        mode = int(fields[2], 8)
                        if mode & 0o170000 == 0o120000:  # a symbolic link: what it names decides
                            self._links.add(posixpath.join(path, fields[5]))
                            target = self._link_target(posixpath.join(path, fields[5]))
                            entries[fields[5]] = target is not None and self.is_dir(target)
                        else:
                            entries[fields[5]] = mode & 0o170000 == 0o040000
                self._dirs[path] = entries
        return self._dirs[path]

    def _link_target(self, path: str) -> str | None:
        out, err = self._debugfs(f'stat "{_quoted(path)}"')
        m = re.search(rb'Fast link dest: "(.*)"', out)
        if err or not m:
            return None
        target = m.group(1).decode(errors="surrogateescape")
        return normalize(posixpath.join(posixpath.dirname(path), target))

    def resolve(self, path: str, depth: int = 0) -> str:
        """The path with symbolic links in its last component followed (/vmlinuz → /boot/vmlinuz-6.1...)."""
        path = normalize(path)
        self.listdir(posixpath.dirname(path))  # lists the links in it
        if path in self._links and depth < 8:
            target = self._link_target(path)
            if target:
                return self.resolve(target, depth + 1)
        return path

    def read(self, path: str, limit: int) -> bytes:
        path = self.resolve(path)
        out, err = self._debugfs(f'cat "{_quoted(path)}"', limit)
        if err:
            err = _short(err)
            raise LoaderError(f"{self.where}: {err if err.startswith(path + ':') else f'{path}: {err}'}")
        if not out and not self.is_file(path):
            raise LoaderError(f"{self.where}: {path}: not a file")
        return out


class FatFs(Filesystem):
    """FAT (an EFI system partition) through mtools."""

    def __init__(self, image: str, offset: int, found: Probe, where: str):
        self.spec = f"{image}@@{offset}"
        self.type, self.uuid, self.label, self.where = found.type, found.uuid, found.label, where
        self._dirs: dict[str, dict[str, bool] | None] = {}

    def listdir(self, path: str) -> dict[str, bool] | None:
        path = normalize(path)
        if path not in self._dirs:
            try:
                out = _run(["mdir", "-b", "-i", self.spec, "::" + path], env=_MTOOLS_ENV)
            except LoaderError:
                self._dirs[path] = None
            else:
                entries = {}
                for line in out.decode(errors="surrogateescape").splitlines():
                    is_dir = line.endswith("/")
                    name = posixpath.basename(line.rstrip("/"))
                    if name and name not in (".", ".."):
                        entries[name] = is_dir
                # FAT is case-insensitive: look names up in lower case too
                entries.update({k.lower(): v for k, v in list(entries.items())})
                self._dirs[path] = entries
        return self._dirs[path]

    def read(self, path: str, limit: int) -> bytes:
        path = normalize(path)
        out, err = _run_capped(["mcopy", "-n", "-i", self.spec, "::" + path, "-"], limit, f"{self.where}: {path}", env=_MTOOLS_ENV)
        if err.strip() and not out:
            raise LoaderError(f"{self.where}: {path}: {_short(err)}")
        return out


class HostDir(Filesystem):
    """A host directory (bhyveload's -h): the guest's files under it, never outside it."""

    type = "host directory"

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.where = f"host directory {root}"

    def _host(self, path: str) -> str | None:
        real = os.path.realpath(os.path.join(self.root, normalize(path).lstrip("/")))
        return real if real == self.root or real.startswith(self.root + os.sep) else None

    def listdir(self, path: str) -> dict[str, bool] | None:
        host = self._host(path)
        if host is None or not os.path.isdir(host):
            return None
        names = {}
        for name in os.listdir(host):  # a link that leads out of the directory is not there
            if self._host(posixpath.join(normalize(path), name)) is not None:
                names[name] = os.path.isdir(os.path.join(host, name))
        return names

    def read(self, path: str, limit: int) -> bytes:
        host = self._host(path)
        if host is None:
            raise LoaderError(f"{self.where}: {path} leads outside the directory")
        try:
            with open(host, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise LoaderError(f"{self.where}: {normalize(path)}: {e.strerror}") from None
        if len(data) > limit:
            raise LoaderError(f"{self.where}: {normalize(path)} is larger than {limit} bytes")
        return data


_MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}


def _quoted(path: str) -> str:
    if '"' in path or "\n" in path:
        raise LoaderError(f"{path!r}: a path with a quote or a newline cannot be read")
    return path


def _short(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else "cannot be read"


def _need(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        package = {"debugfs": "e2fsprogs", "blkid": "util-linux", "mdir": "mtools", "mcopy": "mtools"}[tool]
        raise LoaderError(f"{tool} is not installed (apt-get install {package}): the loader reads disks with it")
    return path


def _run(cmd: list[str], ok: tuple[int, ...] = (0,), env=None) -> bytes:
    cmd = [_need(cmd[0]), *cmd[1:]]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=TOOL_TIMEOUT, env=env)
    if p.returncode not in ok:
        raise LoaderError(f"{os.path.basename(cmd[0])}: {_short(p.stderr.decode(errors='replace'))}")
    return p.stdout


def _run_capped(cmd: list[str], limit: int, what: str, env=None) -> tuple[bytes, str]:
    """Run a tool and keep at most `limit` bytes of its output: a file larger than that is
    an error, found without reading it whole."""
    cmd = [_need(cmd[0]), *cmd[1:]]
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as p:
        stdout = cast(io.BufferedReader, p.stdout)  # stdout=PIPE, buffered: a BufferedReader
        chunks, total = [], 0
        while True:
            chunk = stdout.read1(CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                p.kill()
                p.communicate()
                raise LoaderError(f"{what} is larger than {limit} bytes")
            chunks.append(chunk)
        err = p.stderr.read()
        p.wait(TOOL_TIMEOUT)
    return b"".join(chunks), err.decode(errors="replace")
