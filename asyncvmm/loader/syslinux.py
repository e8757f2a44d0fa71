"""extlinux.conf / syslinux.cfg (the Syslinux project's config, wiki.syslinux.org/wiki/index.php?title=Config):

    DEFAULT debian                 the label booted without a choice
    TIMEOUT 50                     tenths of a second (0: wait)
    LABEL debian
        MENU LABEL Debian GNU/Linux
        KERNEL /boot/vmlinuz       (or LINUX); relative paths are from the config's directory
        INITRD /boot/initrd.img    (also APPEND's initrd=a,b)
        APPEND root=/dev/vda1 ro
    INCLUDE other.cfg

Keywords are case-insensitive. An entry's id is its LABEL.
"""

from __future__ import annotations

import posixpath
from typing import Any

from .errors import LoaderError
from .menu import Entry, FileRef, Menu

CONFIGS = (
    "/boot/extlinux/extlinux.conf", "/extlinux/extlinux.conf", "/boot/syslinux/syslinux.cfg",
    "/syslinux/syslinux.cfg", "/syslinux.cfg", "/extlinux.conf", "/boot/extlinux.conf",
)
MAX_CONFIG = 256 << 10
MAX_INCLUDES = 8


def read_menu(fs, path: str) -> Menu:
    labels: list[dict] = []
    state: dict[str, Any] = {"default": "", "timeout": None, "menu_default": None}  # timeout: float | None
    _read(fs, path, labels, state, [])
    entries = [_entry(fs, path, label) for label in labels]
    default = state["menu_default"] or state["default"]
    index = next((str(i) for i, e in enumerate(entries) if e.id == default), "0")
    return Menu("syslinux", FileRef(fs, path), entries, index, state["timeout"])


def _read(fs, path: str, labels: list[dict], state: dict, reading: list[str]) -> None:
    if path in reading or len(reading) >= MAX_INCLUDES:
        raise LoaderError(f"{fs.where}: {path} includes itself ({' -> '.join(reading + [path])})")
    reading = reading + [path]
    text = fs.read(path, MAX_CONFIG).decode("utf-8", errors="replace")
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        key, value = key.lower(), value.strip()
        if key == "menu":
            sub, _, rest = value.partition(" ")
            sub = sub.lower()
            if sub == "label" and current is not None:
                current["title"] = rest.strip().replace("^", "")
            elif sub == "default" and current is not None:
                state["menu_default"] = current["label"]
            continue
        if key == "label":
            current = {"label": value, "title": value, "kernel": "", "initrd": [], "append": ""}
            labels.append(current)
        elif key in ("kernel", "linux") and current is not None:
            current["kernel"] = value
        elif key == "initrd" and current is not None:
            current["initrd"] += [p for p in value.split(",") if p]
        elif key == "append" and current is not None:
            current["append"] = value
        elif key == "default":
            state["default"] = value
        elif key == "timeout":
            try:
                t = int(value) / 10
                state["timeout"] = t if t > 0 else None
            except ValueError:
                pass
        elif key == "include":
            _read(fs, _path(path, value), labels, state, reading)


def _path(config: str, path: str) -> str:
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(posixpath.dirname(config), path))


def _entry(fs, config: str, label: dict) -> Entry:
    args = label["append"].split()
    initrds = list(label["initrd"])
    for a in args:
        if a.startswith("initrd="):
            initrds += [p for p in a[len("initrd=") :].split(",") if p]
    args = [a for a in args if not a.startswith("initrd=")]
    entry = Entry(label["title"], label["label"], command="linux", cmdline=" ".join(args))
    try:
        if not label["kernel"]:
            raise LoaderError(f"label {label['label']} has no KERNEL or LINUX line")
        entry.kernel = _ref(fs, _path(config, label["kernel"]), "kernel")
        entry.initrds = [_ref(fs, _path(config, p), "initrd") for p in initrds]
    except LoaderError as e:
        entry.error = str(e)
    return entry


def _ref(fs, path: str, what: str) -> FileRef:
    if not fs.is_file(path):
        raise LoaderError(f"{what} {path} does not exist on {fs.where}")
    return FileRef(fs, path)
