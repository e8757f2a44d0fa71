"""From disks to a kernel: find the boot menu, choose the entry, read its files.

    disks ──partitions.py──▶ partitions ──filesystems.py──▶ filesystems (blkid, debugfs, mtools)
          ──find_menu──▶ a Menu (grub.py, bls.py, syslinux.py) ──menu.choose──▶ an Entry
          ──read_files──▶ Selection: kernel and initrd bytes, command line, where they came from

Where a menu is looked for, on each disk in turn (the first disk with one wins, unless the
user names one): GRUB's grub.cfg on the non-ESP partitions (/boot/grub, /grub for a /boot
partition, Fedora's grub2), then on the ESP (/EFI/*/grub.cfg, usually a stub that finds
the real one); then Boot Loader Specification entries (/loader/entries); then
extlinux/syslinux configs. A host directory (bhyveload's -h) is looked at the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..boot import elf, linux
from ..errors import BootError
from . import bls, grub, syslinux
from .disks import Disk, Unsupported, Volumes
from .errors import LoaderError
from .filesystems import Filesystem, HostDir
from .menu import Entry, Menu, choose

GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub2/grub.cfg")
MAX_KERNEL = 512 << 20
MAX_INITRD = 2 << 30
GRUBENVS = ("/boot/grub2/grubenv", "/grub2/grubenv", "/boot/grub/grubenv", "/grub/grubenv")


@dataclass
class Selection:
    menu: Menu
    entry: Entry
    path: str  # the entry's place in the menu: "0", "1>2"
    kernel: bytes
    initrd: bytes | None
    cmdline: str
    seconds: float  # what finding, reading and choosing took

    def where(self) -> str:
        return self.entry.kernel.fs.where if self.entry.kernel else ""

    def log_line(self) -> str:
        e = self.entry
        initrd = f", initrd {' '.join(r.path for r in e.initrds)}" if e.initrds else ""
        source = self.menu.source
        menu = source.path if source.fs is e.kernel.fs else source.describe()
        return (
            f"loader: booting entry {self.path} {e.title!r} of the {self.menu.kind} menu {menu}: "
            f"kernel {e.kernel.path}{initrd} from {self.where()} ({self.seconds * 1e3:.0f} ms)"
        )


def open_volumes(disks: list[str], host_dir: str | None = None) -> Volumes:
    if host_dir is not None and not os.path.isdir(host_dir):
        raise LoaderError(f"-h {host_dir}: not a directory")
    return Volumes([Disk(p, i) for i, p in enumerate(disks)], HostDir(host_dir) if host_dir else None)


def find_menu(volumes: Volumes, pinned: dict[str, str] | None = None) -> Menu:
    """The boot menu: on the host directory if there is one, else on the first disk that has
    one. Each disk is tried as (hd0), the disk the firmware would boot from."""
    if volumes.host is not None:
        menu = _menu_on([volumes.host], volumes, pinned)
        if menu is None:
            raise LoaderError(f"{volumes.host.where}: no boot menu (grub.cfg, loader/entries, extlinux.conf) in it")
        return menu
    for i, disk in enumerate(volumes.disks):
        order = Volumes([disk] + volumes.disks[:i] + volumes.disks[i + 1 :])
        for j, d in enumerate(order.disks):
            _name_devices(d, j)
        menu = _menu_on(list(disk.volumes.values()), order, pinned)
        if menu is not None:
            return menu
    for i, d in enumerate(volumes.disks):
        _name_devices(d, i)
    unsupported = [fs for d in volumes.disks for fs in d.volumes.values() if isinstance(fs, Unsupported)]
    if unsupported:
        raise LoaderError(f"no boot menu the loader can read: {unsupported[0].reason}")
    names = ", ".join(d.name for d in volumes.disks) or "no disk"
    raise LoaderError(f"{names}: no boot menu found (grub.cfg, loader/entries/*.conf, extlinux.conf) on an ext2/3/4 or FAT filesystem")


def _name_devices(disk: Disk, index: int) -> None:
    for fs in disk.volumes.values():
        fs.device = f"hd{index}" + (f",{fs.partition.grub_name}" if fs.partition and fs.partition.grub_name else "")


def _menu_on(fss: list[Filesystem], volumes: Volumes, pinned) -> Menu | None:
    readable = [fs for fs in fss if not isinstance(fs, Unsupported)]
    esps = [fs for fs in readable if fs.partition is not None and fs.partition.esp]
    others = [fs for fs in readable if fs not in esps]
    for fs in others:
        for path in GRUB_CONFIGS:
            if fs.is_file(path):
                return grub.Grub(volumes, pinned).run_config(fs, path)
    for fs in esps + [fs for fs in others if fs.type in ("vfat", "msdos")]:
        for vendor, is_dir in sorted((fs.listdir("/EFI") or {}).items()):
            path = f"/EFI/{vendor}/grub.cfg"
            if is_dir and fs.is_file(path):
                return grub.Grub(volumes, pinned).run_config(fs, path)
    for fs in readable:
        if bls.entries_dir(fs):
            return bls.read_loader_conf(fs, {**_grubenv(fs), **(pinned or {})})
    for fs in readable:
        for path in syslinux.CONFIGS:
            if fs.is_file(path):
                return syslinux.read_menu(fs, path)
    return None


def _grubenv(fs: Filesystem) -> dict[str, str]:
    for path in GRUBENVS:
        if fs.is_file(path):
            return grub.parse_grubenv(fs.read(path, grub.GRUBENV_SIZE))
    return {}


def read_files(menu: Menu, entry: Entry, path: str, started: float) -> Selection:
    """Read the entry's kernel and initrds; a kernel that is not one is refused here."""
    if entry.error:
        raise LoaderError(f"entry {path} {entry.title!r}: {entry.error}")
    kernel = entry.kernel.fs.read(entry.kernel.path, MAX_KERNEL)
    why = _not_a_kernel(kernel)
    if why:
        raise LoaderError(f"entry {path} {entry.title!r}: {entry.kernel.describe()} is not a kernel ({why})")
    initrd = None
    if entry.initrds:
        parts = []
        for ref in entry.initrds:
            data = ref.fs.read(ref.path, MAX_INITRD)
            parts.append(data + b"\0" * (-len(data) % 4))  # GRUB places each at a 4-byte boundary
        initrd = b"".join(parts)
    return Selection(menu, entry, path, kernel, initrd, entry.cmdline, time.monotonic() - started)


def _not_a_kernel(image: bytes) -> str:
    """Why `image` cannot be booted, checked as the boot path will check it (headers only)."""
    kind = linux.kernel_kind(image)
    if kind is None:
        return "neither an ELF with a PVH entry nor a bzImage"
    try:
        if kind == "elf":
            elf.parse_elf(image)
        else:
            linux.bzimage_info(image)
    except BootError as e:
        return str(e)
    return ""


def select(disks: list[str], *, host_dir: str | None = None, entry: str | None = None,
           pinned: dict[str, str] | None = None, chooser=None) -> Selection:
    """The whole path: disks → menu → entry → files. `chooser(menu) -> spec or None` lets
    the console menu (--menu) pick the entry when the user did not."""
    started = time.monotonic()
    volumes = open_volumes(disks, host_dir)
    menu = find_menu(volumes, pinned)
    if entry is None and chooser is not None:
        entry = chooser(menu)
    chosen, path = choose(menu, entry)
    return read_files(menu, chosen, path, started)


def parse_assignment(text: str) -> tuple[str, str]:
    """bhyveload's -e NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not name or not name.replace("_", "a").isalnum():
        raise LoaderError(f"-e {text}: use NAME=VALUE")
    return name, value
