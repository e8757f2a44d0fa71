"""The disks given to the loader, their partitions and filesystems, under GRUB's names
for them: (hd0) the first disk, (hd0,gpt2) its second GPT partition, (hd1,msdos5) the
first logical partition of the second disk.
"""

from __future__ import annotations

import os
import re

from . import filesystems
from .errors import LoaderError
from .filesystems import EXT, FAT, ExtFs, FatFs, Filesystem, HostDir
from .partitions import Partition, Scheme, read_table

# blkid's TYPE for filesystems a firmware boot can start from and this loader cannot read.
FIRMWARE_ONLY = {
    "xfs": "XFS", "btrfs": "btrfs", "ufs": "UFS (FreeBSD)", "zfs_member": "ZFS",
    "jfs": "JFS", "ntfs": "NTFS", "LVM2_member": "an LVM physical volume",
    "crypto_LUKS": "a LUKS encrypted volume", "linux_raid_member": "a Linux RAID member",
    "iso9660": "ISO 9660", "f2fs": "F2FS", "bcachefs": "bcachefs", "exfat": "exFAT",
}
FIRMWARE_HINT = "boot it through UEFI firmware instead (-l bootrom,...)"


class Unsupported(Filesystem):
    """A filesystem blkid recognises and the loader cannot read: every use says so."""

    def __init__(self, found: filesystems.Probe, where: str):
        self.type, self.uuid, self.label = found.type, found.uuid, found.label
        self.where = where
        self.what = FIRMWARE_ONLY.get(found.type, found.type)

    @property
    def reason(self) -> str:
        return f"{self.where} holds {self.what}, which the loader does not read (ext2/3/4 and FAT); {FIRMWARE_HINT}"

    def listdir(self, path: str):
        return None

    def read(self, path: str, limit: int) -> bytes:
        raise LoaderError(self.reason)


class Disk:
    def __init__(self, path: str, index: int):
        self.path = path
        self.index = index
        self.name = os.path.basename(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size or _block_size(f)
                self.table = read_table(f, size, self.name)
        except OSError as e:
            raise LoaderError(f"{path}: {e.strerror}") from None
        self.size = size
        self.volumes: dict[int, Filesystem] = {}  # partition number → what is on it
        for part in self.table.partitions:
            fs = self._open(part)
            if fs is not None:
                fs.device = f"hd{index}" + (f",{part.grub_name}" if part.grub_name else "")
                fs.partition = part
                fs.disk = self
                self.volumes[part.number] = fs

    def _open(self, part: Partition) -> Filesystem | None:
        if part.no_filesystem or part.size == 0:
            return None
        where = f"{self.name} {part.describe()}"
        found = filesystems.probe(self.path, part.start, part.size)
        if found.type in EXT:
            return ExtFs(self.path, part.start, found, f"{where}, {found.type}")
        if found.type in FAT:
            return FatFs(self.path, part.start, found, f"{where}, FAT")
        if found.type and found.type != "swap":
            return Unsupported(found, where)
        return None


def _block_size(f) -> int:
    return f.seek(0, os.SEEK_END)  # a block device: its size is where its end is


_DEVICE = re.compile(r"^hd(\d+)(?:,(?:(msdos|gpt))?(\d+))?$")


class Volumes:
    """Every filesystem on the loader's disks (and a host directory, bhyveload's -h)."""

    def __init__(self, disks: list[Disk], host: HostDir | None = None):
        self.disks = disks
        self.host = host
        if host is not None:
            host.device = "host"
            host.partition = None
            host.disk = None

    def all(self) -> list[Filesystem]:
        found = [fs for d in self.disks for fs in d.volumes.values()]
        return ([self.host] if self.host else []) + found

    def device(self, name: str) -> Filesystem:
        """The filesystem GRUB calls (name): hd0, hd0,gpt2, hd0,msdos5, hd0,1."""
        name = name.strip("()")
        if self.host is not None and (name == "host" or not self.disks):
            # With only a host directory (bhyveload's -h), every disk GRUB names is it, as
            # grub-bhyve's device map would make it: a copied grub.cfg's `set root` still works.
            return self.host
        m = _DEVICE.match(name)
        if not m:
            raise LoaderError(f"GRUB device ({name}) is not a disk partition the loader reads")
        disk, scheme, number = int(m.group(1)), m.group(2), m.group(3)
        if disk >= len(self.disks):
            raise LoaderError(f"GRUB device ({name}): there is no disk {disk}")
        d = self.disks[disk]
        n = int(number) if number else 0
        if scheme and d.table.scheme is not Scheme(scheme):
            raise LoaderError(f"GRUB device ({name}): {d.name} has a {d.table.scheme.value} partition table")
        fs = d.volumes.get(n)
        if fs is None:
            raise LoaderError(f"GRUB device ({name}): {d.name} has no readable filesystem there")
        return fs

    def search(self, how: str, needle: str) -> Filesystem | None:
        """GRUB's search: the first filesystem with that UUID, label, or file."""
        for fs in self.all():
            if how == "fs_uuid" and fs.uuid and fs.uuid.lower() == needle.lower():
                return fs
            if how == "label" and fs.label == needle:
                return fs
            if how == "file" and not isinstance(fs, Unsupported) and fs.is_file(needle):
                return fs
        return None
