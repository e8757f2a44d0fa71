"""The loader on the command line: `asyncvmm load` (bhyveload's analogue) and what
`asyncvmm run` does when it has disks and no --kernel.

    asyncvmm load -d disk.img [-d disk2.img] [-h HOSTDIR] [--list] [--entry N|TITLE|ID] [-e NAME=VALUE]
    asyncvmm run ... -s 2,virtio-blk,disk.img [--entry ...] [--set NAME=VALUE] [--boot-disk PATH|SLOT]
                     [--boot-dir HOSTDIR] [--menu] [NAME]

`run` spells bhyveload's -e as --set (its own -e is bhyve's) and -h as --boot-dir.
"""

from __future__ import annotations

import argparse
import os
import select as select_mod
import sys
from typing import TYPE_CHECKING

from .. import log
from ..errors import ConfigError
from .errors import LoaderError

if TYPE_CHECKING:
    from .boot import Selection
    from .menu import Menu

# The menu readers (.boot, .menu) are imported by the functions that read a disk: every
# `asyncvmm run` builds its parser with add_run_arguments, and a --kernel run reads no menu.

_keep: list[int] = []  # memfds holding the chosen kernel and initrd, for the process's life


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def load_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="asyncvmm load", add_help=False,
        description="Read a disk image's boot menu and say what `asyncvmm run` would boot from it (bhyveload's analogue).",
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-d", "--disk", action="append", default=[], metavar="IMAGE", help="a disk image (repeatable; the first with a menu is used)")
    p.add_argument("-h", "--host-dir", metavar="HOSTDIR", help="a host directory laid out like / (with /boot) or like a /boot partition")
    p.add_argument("--list", action="store_true", help="print the menu only")
    p.add_argument("--entry", metavar="N|TITLE|ID", help="the entry (default: the menu's); N>M goes into a submenu")
    p.add_argument("-e", dest="set", action="append", default=[], metavar="NAME=VALUE", help="set a menu variable (wins over the menu's own)")
    p.add_argument("--menu", action="store_true", help="show the menu on the terminal and wait for a choice until its timeout")
    return p


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """`asyncvmm run`'s loader flags (used only without --kernel)."""
    g = run.add_argument_group("booting from a disk (without --kernel)")
    g.add_argument("--entry", metavar="N|TITLE|ID", help="the boot menu's entry (default: the menu's default)")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set a boot menu variable (bhyveload's -e)")
    g.add_argument("--boot-disk", metavar="PATH|SLOT", help="the disk whose menu boots (default: the first virtio-blk disk with one)")
    g.add_argument("--boot-dir", metavar="HOSTDIR", help="boot from a host directory laid out like / or /boot (bhyveload's -h)")
    g.add_argument("--menu", action="store_true", help="on a terminal, show the boot menu; the default boots after its timeout")


def main_load(argv: list[str]) -> int:
    from ..cli import EXIT_OK, EXIT_USAGE  # noqa: PLC0415
    from .boot import parse_assignment, select  # noqa: PLC0415

    try:
        args = load_parser().parse_args(argv)
        if not args.disk and not args.host_dir:
            raise ConfigError("asyncvmm load: name a disk image (-d IMAGE) or a host directory (-h HOSTDIR)")
        for d in args.disk:
            _check_disk(d)
        pinned = dict(parse_assignment(a) for a in args.set)
        if args.list:
            from .boot import find_menu, open_volumes  # noqa: PLC0415

            menu = find_menu(open_volumes(args.disk, args.host_dir), pinned)
            print(describe_menu(menu))
            return EXIT_OK
        menus: list[Menu] = []

        def chooser(m: Menu) -> str | None:
            menus.append(m)
            return console_menu(m) if args.menu else None

        sel = select(args.disk, host_dir=args.host_dir, entry=args.entry, pinned=pinned, chooser=chooser)
        if not args.menu:
            print(describe_menu(sel.menu))
            print()
        print(describe_selection(sel))
        return EXIT_OK
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE


def describe_menu(menu: Menu) -> str:
    from .menu import choose  # noqa: PLC0415

    default_path = ""
    try:
        default_path = choose(menu, None)[1]
    except LoaderError:
        pass
    timeout = "waits for a choice" if menu.timeout is None else f"timeout {menu.timeout:g} s"
    lines = [f"{menu.kind} menu in {menu.source.describe()} (default {menu.default!r} = {default_path}, {timeout}):"]
    for line in menu.lines():
        mark = "*" if line.strip().split(" ", 1)[0] == default_path else " "
        lines.append(f" {mark} {line}")
    return "\n".join(lines)


def describe_selection(sel: Selection) -> str:
    e = sel.entry
    part = e.kernel.fs.partition
    lines = [
        f"entry:     {sel.path} {e.title!r}" + (f" [{e.id}]" if e.id else ""),
        f"kernel:    {e.kernel.path} ({len(sel.kernel)} bytes, {e.command})",
        f"initrd:    {' '.join(r.path for r in e.initrds)} ({len(sel.initrd)} bytes)" if e.initrds else "initrd:    none",
        f"cmdline:   {sel.cmdline}",
        f"partition: {sel.where()}" + (f", PARTUUID {part.part_uuid}" if part is not None and part.part_uuid else "")
        + (f", UUID {e.kernel.fs.uuid}" if e.kernel.fs.uuid else ""),
    ]
    return "\n".join(lines)


def console_menu(menu: Menu) -> str | None:
    """grub-bhyve's menu on a terminal: the entries, the default marked, a countdown; a
    number (or N>M) and Enter chooses, Enter alone boots the default now."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    sys.stderr.write(describe_menu(menu) + "\n")
    timeout = menu.timeout
    prompt = "Enter boots the default; a number (N>M in a submenu) and Enter chooses"
    sys.stderr.write(f"{prompt}" + (f"; the default boots in {timeout:g} s" if timeout is not None else "") + ": ")
    sys.stderr.flush()
    ready, _, _ = select_mod.select([sys.stdin], [], [], timeout)
    if not ready:
        sys.stderr.write("\n")
        return None
    choice = sys.stdin.readline().strip()
    return choice or None


def boot_from_disks(cfg, args=None, *, entry: str | None = None, assignments: tuple[str, ...] = (),
                    boot_disk: str | None = None, boot_dir: str | None = None, menu: bool = False) -> None:
    """`asyncvmm run` without --kernel (`args`: its parsed flags), or a VmConfig from the API
    (the keywords): boot what the disks' menu (or a host directory) says.

    The chosen kernel and initrd are handed to the ordinary Linux boot path as files
    (memfds named /proc/self/fd/N), the entry's command line as the config's (the user's
    --cmdline is appended to it, as an edited GRUB entry would be). LoaderError (status 2)
    for anything that cannot be booted; nothing has been started then."""
    if args is not None:
        entry, assignments, boot_disk, boot_dir, menu = args.entry, args.set, args.boot_disk, args.boot_dir, args.menu
    disks = [_slot_disk(s) for s in cfg.slots if s.driver == "virtio-blk" and _slot_disk(s)]
    explicit_raw = {_slot_disk(s) for s in cfg.slots if s.driver == "virtio-blk" and ",format=raw" in f",{s.options}"}
    if not disks and not boot_dir:
        return  # nothing to boot from: the config says --kernel is missing
    if boot_disk:
        disks = [_boot_disk(boot_disk, cfg.slots, disks)]
    for d in disks:
        _check_disk(d, raw=d in explicit_raw)
    from .boot import parse_assignment, select  # noqa: PLC0415

    pinned = dict(parse_assignment(a) for a in assignments)
    sel = select([] if boot_dir else disks, host_dir=boot_dir, entry=entry, pinned=pinned,
                 chooser=console_menu if menu else None)
    cfg.kernel = _memfd("kernel", sel.kernel)
    cfg.initrd = _memfd("initrd", sel.initrd) if sel.initrd is not None else ""
    cfg.cmdline = " ".join(p for p in (sel.cmdline, cfg.cmdline) if p)
    log.info(sel.log_line())


def _slot_disk(slot) -> str:
    first = slot.options.split(",", 1)[0]
    return "" if first.startswith("vhost-user=") else first  # a back-end's socket is no image


def _boot_disk(spec: str, slots, disks: list[str]) -> str:
    if spec.isdigit():
        for s in slots:
            if s.driver == "virtio-blk" and s.slot == int(spec):
                return _slot_disk(s)
        raise LoaderError(f"--boot-disk {spec}: no virtio-blk disk in slot {spec}")
    if spec not in disks and os.path.realpath(spec) not in map(os.path.realpath, disks):
        raise LoaderError(f"--boot-disk {spec}: not one of the virtio-blk disks (-s N,virtio-blk,PATH)")
    return spec


def _check_disk(path: str, *, raw: bool = False) -> None:
    """Readable, and raw: the loader reads partitions and file systems from the image's
    bytes, which in another format (qcow2...) are not the disk's (`raw`: format=raw said)."""
    from ..config import check_readable  # noqa: PLC0415
    from ..devices.virtio.block.formats import detect  # noqa: PLC0415

    check_readable(path, "disk")
    found = detect(path)
    if not (found.raw or raw):
        raise LoaderError(f"loader: disk {path} is a {found.what} image; the loader reads raw images only "
                          f"(boot it with --kernel, or convert it: qemu-img convert -O raw {path} DISK.raw)")


def _memfd(name: str, data: bytes) -> str:
    fd = os.memfd_create(f"asyncvmm-loader-{name}", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    _keep.append(fd)
    return f"/proc/self/fd/{fd}"
