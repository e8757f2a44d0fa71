"""Boot Loader Specification entries (uapi-group.org/specifications/specs/boot_loader_specification):
one `/loader/entries/*.conf` per kernel, as Fedora and RHEL install them, read by GRUB's
`blscfg` (Fedora's grub.cfg) or on their own (systemd-boot's `/loader/loader.conf`).

    title      Fedora Linux (6.5.6-300.fc39.x86_64) 39
    version    6.5.6-300.fc39.x86_64
    linux      /vmlinuz-6.5.6-300.fc39.x86_64
    initrd     /initramfs-6.5.6-300.fc39.x86_64.img
    options    root=UUID=... ro $kernelopts     (Fedora < 33 kept the options in grubenv)

An entry's id is its file name without `.conf`; entries are listed newest version first,
as blscfg lists them.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re

from .errors import LoaderError
from .menu import Entry, FileRef, Menu

ENTRY_DIRS = ("/loader/entries", "/boot/loader/entries")
MAX_ENTRY = 64 << 10
MAX_ENTRIES = 256
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def entries_dir(fs) -> str | None:
    for d in ENTRY_DIRS:
        listing = fs.listdir(d)
        if listing and any(n.endswith(".conf") and not is_dir for n, is_dir in listing.items()):
            return d
    return None


def parse_entry(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if "\t" in key:
            key, _, more = key.partition("\t")
            value = more + " " + value
        fields.setdefault(key, []).append(value.strip())
    return fields


def _version_key(text: str) -> list:
    """A natural order: 6.10 after 6.9 (rpm's vercmp, roughly)."""
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.findall(r"\d+|[A-Za-z]+", text)]


def read_entries(fs, variables: dict[str, str]) -> list[Entry]:
    d = entries_dir(fs)
    if d is None:
        return []
    names = sorted(n for n, is_dir in fs.listdir(d).items() if n.endswith(".conf") and not is_dir)[:MAX_ENTRIES]
    parsed = []
    for name in names:
        fields = parse_entry(fs.read(posixpath.join(d, name), MAX_ENTRY).decode("utf-8", errors="replace"))
        ident = name[: -len(".conf")]
        parsed.append((ident, fields))
    parsed.sort(key=lambda item: (_version_key(item[1].get("version", [item[0]])[0]), item[0]), reverse=True)
    return [_entry(fs, d, ident, fields, variables) for ident, fields in parsed]


def _entry(fs, d: str, ident: str, fields: dict[str, list[str]], variables: dict[str, str]) -> Entry:
    title = (fields.get("title") or fields.get("version") or [ident])[0]
    entry = Entry(title, ident, command="linux")
    options = " ".join(fields.get("options", []))
    entry.cmdline = " ".join(_VAR.sub(lambda m: variables.get(m.group(1), ""), options).split())
    try:
        if "linux" not in fields:
            raise LoaderError(f"{ident}.conf has no linux line ({'efi' if 'efi' in fields else 'nothing'} to boot)")
        entry.kernel = _ref(fs, d, fields["linux"][0], "kernel")
        entry.initrds = [_ref(fs, d, path, "initrd") for value in fields.get("initrd", []) for path in value.split()]
    except LoaderError as e:
        entry.error = str(e)
    return entry


def _ref(fs, d: str, path: str, what: str) -> FileRef:
    """A path in an entry is from the root of the partition holding /loader; with /boot
    on the root filesystem Fedora writes it from /boot."""
    candidates = [path] + (["/boot/" + path.lstrip("/")] if d.startswith("/boot/") else [])
    for p in candidates:
        if fs.is_file(p):
            return FileRef(fs, p)
    raise LoaderError(f"{what} {path} does not exist on {fs.where}")


def read_loader_conf(fs, variables: dict[str, str]) -> Menu | None:
    """BLS entries with no grub.cfg: systemd-boot's loader.conf says the default and timeout."""
    entries = read_entries(fs, variables)
    if not entries:
        return None
    default, timeout = "0", None
    if fs.is_file("/loader/loader.conf"):
        conf = parse_entry(fs.read("/loader/loader.conf", MAX_ENTRY).decode("utf-8", errors="replace"))
        pattern = conf.get("default", [""])[0].removesuffix(".conf")
        if pattern:
            hit = next((i for i, e in enumerate(entries) if fnmatch.fnmatch(e.id, pattern)), None)
            default = str(hit) if hit is not None else "0"
        if conf.get("timeout"):
            try:
                timeout = float(conf["timeout"][0])
            except ValueError:
                timeout = None
    return Menu("BLS", FileRef(fs, entries_dir(fs)), entries, default, timeout)
