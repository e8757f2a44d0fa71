"""A boot menu as the loader sees it, whatever wrote it (GRUB, BLS, syslinux), and the
choice of an entry: GRUB's `default` rules (an index, a title or an id, `>` into submenus).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import LoaderError
from .filesystems import Filesystem

# Menu commands that load a Linux kernel: GRUB's linux (and its EFI and 16-bit spellings).
LINUX_COMMANDS = {"linux", "linuxefi", "linux16", "kernel"}


@dataclass(frozen=True)
class FileRef:
    """A file on a filesystem the loader can read."""

    fs: Filesystem
    path: str

    def describe(self) -> str:
        return f"{self.path} on {self.fs.where}"


@dataclass
class Entry:
    title: str
    id: str = ""
    command: str = ""  # linux, linuxefi, linux16, chainloader, ... (what loads the kernel)
    kernel: FileRef | None = None
    initrds: list[FileRef] = field(default_factory=list)
    cmdline: str = ""
    error: str = ""  # why this entry cannot be booted, found while reading it
    children: list["Entry"] | None = None  # a submenu's entries

    @property
    def is_submenu(self) -> bool:
        return self.children is not None


@dataclass
class Menu:
    kind: str  # "GRUB", "BLS", "syslinux"
    source: FileRef
    entries: list[Entry] = field(default_factory=list)
    default: str = "0"  # GRUB's syntax: index, title or id, with > into submenus
    timeout: float | None = None  # seconds; None: wait for a choice (the loader then takes the default)

    def lines(self) -> list[str]:
        """The menu as `asyncvmm load --list` prints it: a path (2>1) per entry."""
        out = []

        def walk(entries: list[Entry], prefix: str, depth: int) -> None:
            for i, e in enumerate(entries):
                path = f"{prefix}{i}"
                ident = f"  [{e.id}]" if e.id else ""
                out.append(f"{'  ' * depth}{path:<6} {'submenu: ' if e.is_submenu else ''}{e.title}{ident}")
                if e.children is not None:
                    walk(e.children, path + ">", depth + 1)

        walk(self.entries, "", 0)
        return out


def choose(menu: Menu, spec: str | None) -> tuple[Entry, str]:
    """The entry `spec` names (the menu's default without one) and its path ("2>0").

    Each `>`-separated step is an index, else an entry's id, else its title, as GRUB
    reads `default`. A default naming nothing falls back to the first entry, as GRUB
    does; an entry the user named that does not exist is an error.
    """
    wanted = spec if spec is not None else menu.default
    try:
        return _walk(menu.entries, wanted)
    except LoaderError:
        if spec is not None:
            raise
    return _walk(menu.entries, "0")


def _walk(entries: list[Entry], spec: str) -> tuple[Entry, str]:
    if not entries:
        raise LoaderError("the boot menu has no entries")
    steps = spec.split(">") if spec else ["0"]
    path = []
    level = entries
    for n, step in enumerate(steps):
        i = _find(level, step.strip())
        if i is None:
            raise LoaderError(f"--entry {spec}: no entry {step.strip()!r} in the menu (asyncvmm load --list shows it)")
        entry = level[i]
        path.append(str(i))
        if n < len(steps) - 1:
            if entry.children is None:
                raise LoaderError(f"--entry {spec}: {entry.title!r} is not a submenu")
            level = entry.children
    if entry.children is not None:  # a submenu chosen as a whole boots its first entry
        if not entry.children:
            raise LoaderError(f"submenu {entry.title!r} is empty")
        entry, path = entry.children[0], path + ["0"]
    return entry, ">".join(path)


def _find(entries: list[Entry], step: str) -> int | None:
    if step.isdigit():
        i = int(step)
        return i if i < len(entries) else None
    for i, e in enumerate(entries):
        if e.id and e.id == step:
            return i
    for i, e in enumerate(entries):
        if e.title == step:
            return i
    return None
