"""GRUB 2's grub.cfg, read as GRUB reads it, for the configs distributions generate
(Debian's and Ubuntu's update-grub, Fedora's with `blscfg`, the ESP's stub that searches
for the real one and `configfile`s it).

GRUB's script language is a small shell: words with '...' and "..." quoting, $var and
${var}, `;` and newlines, `if/elif/else/fi`, `function NAME { }`, and the two blocks that
make a menu, `menuentry TITLE [--class C] [--id ID] { }` and `submenu TITLE { }`. The
script runs once, top to bottom, as GRUB runs it at start (variables, `search`,
`load_env`, `source`, `configfile`, `blscfg`); what only draws the menu or loads modules
(insmod, load_video, terminal_output, loadfont, ...) is passed over. Each entry's body then
runs in a copy of the variables to find what it would boot: `linux` (or linuxefi,
linux16) with its command line, and `initrd`.

Limits that stop a config from running away: the file at most MAX_CONFIG bytes, `source`
and `configfile` at most MAX_DEPTH deep and never back into a file being read (a config
that sources itself), functions at most MAX_CALLS deep, MAX_STEPS commands in all.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from . import bls
from .errors import LoaderError
from .filesystems import Filesystem
from .grub_script import Block, Cmd, If, Word, parse
from .menu import LINUX_COMMANDS, Entry, FileRef, Menu

MAX_CONFIG = 1 << 20  # bytes; Debian's grub.cfg with a dozen kernels is ~20 KB
MAX_DEPTH = 8
MAX_CALLS = 32
MAX_STEPS = 100_000
GRUBENV_SIZE = 4096  # the environment block is 1024 bytes; read a little more to say it is wrong

# What a GRUB 2.06 sets before it reads grub.cfg (normal/main.c and the `feature_*`
# variables), as on a BIOS (i386-pc) machine: the loader enters the kernel as a BIOS
# GRUB would hand it over, so `if [ "$grub_platform" = efi ]` branches are not taken.
GRUB_DEFAULTS = {
    "grub_platform": "pc",
    "grub_cpu": "i386",
    "feature_chainloader_bpb": "y",
    "feature_ntldr": "y",
    "feature_platform_search_hint": "y",
    "feature_default_font_path": "y",
    "feature_all_video_module": "y",
    "feature_menuentry_id": "y",
    "feature_menuentry_options": "y",
    "feature_200_final": "y",
    "feature_nativedisk_cmd": "y",
    "feature_timeout_style": "y",
    "menuentry_id_option": "--id",
}

# Commands that only draw the menu, load modules or talk to the firmware: they succeed
# and do nothing here (GRUB's own modules the loader has no use for).
PASSED_OVER = {
    "insmod", "set_gfxpayload", "terminal_output", "terminal_input", "terminal", "serial",
    "echo", "save_env", "export", "play", "font", "background_color", "background_image",
    "gfxterm_background", "clear", "sleep", "savedefault", "recordfail", "videoinfo",
    "rmmod", "setparams", "load_video", "gfxmode", "probe", "cryptomount", "fwsetup",
    "smbios", "terminfo", "loadfont",
}
# Of those, the ones whose success a config tests, and the answer that draws no menu.
FAILS = {"loadfont", "keystatus", "background_image"}


# -- running ----------------------------------------------------------------------------


class _Return(Exception):
    pass


@dataclass
class _Pending:
    entry: Entry
    body: list
    args: list[str]
    where: str


@dataclass
class _Boot:
    """What an entry's body asked for, as it ran."""

    command: str = ""
    kernel: str = ""
    args: list[str] = field(default_factory=list)
    initrds: list[str] = field(default_factory=list)
    root: str = ""


class Grub:
    """One run of a grub.cfg over the loader's volumes; `pinned` are the user's -e NAME=VALUE,
    which the config's own `set` does not change."""

    def __init__(self, volumes, pinned: dict[str, str] | None = None):
        self.volumes = volumes
        self.pinned = dict(pinned or {})
        self.vars: dict[str, str] = {**GRUB_DEFAULTS, **self.pinned}
        self.functions: dict[str, Block] = {}
        self.reading: list[str] = []  # the files being read, outermost first
        self.steps = 0
        self.calls = 0
        self.entries: list[Entry] = []
        self.target = self.entries
        self.pending: list[_Pending] = []
        self.boot: _Boot | None = None  # set while an entry's body runs
        self.where = ""

    # -- files ------------------------------------------------------------------------
    def run_config(self, fs: Filesystem, path: str) -> Menu:
        """Run the grub.cfg at `path` on `fs` (GRUB's prefix device) and make its menu."""
        self._set("root", fs.device)
        self._set("prefix", f"({fs.device}){posixpath.dirname(path)}")
        self._set("cmdpath", f"({fs.device}){posixpath.dirname(path)}")
        self.source(fs, path)
        for p in self.pending:
            self._evaluate(p)
        timeout = _timeout(self.vars.get("timeout", ""))
        if self.vars.get("timeout_style") == "hidden" and timeout is None:
            timeout = 0.0
        return Menu("GRUB", FileRef(fs, path), self.entries, self.vars.get("default", "0") or "0", timeout)

    def source(self, fs: Filesystem, path: str) -> int:
        key = f"({fs.device}){path}"
        if key in self.reading:
            chain = " -> ".join(self.reading + [key])
            raise LoaderError(f"{fs.where}: {path} sources itself ({chain})")
        if len(self.reading) >= MAX_DEPTH:
            raise LoaderError(f"{fs.where}: {path}: source/configfile nested more than {MAX_DEPTH} deep")
        data = fs.read(path, MAX_CONFIG)
        where, outer = f"{fs.where}: {path}", self.where
        text = data.decode("utf-8", errors="replace")
        if "\0" in text:
            raise LoaderError(f"{where}: not a text file")
        self.reading.append(key)
        self.where = where
        self._set("config_directory", f"({fs.device}){posixpath.dirname(path)}")
        self._set("config_file", key)
        try:
            return self.run(parse(text, where))
        finally:
            self.reading.pop()
            self.where = outer

    def file(self, name: str) -> tuple[Filesystem, str]:
        """A GRUB file name: (device)/path, or /path on $root."""
        if name.startswith("("):
            end = name.find(")")
            if end < 0:
                raise LoaderError(f"{self.where}: {name}: a ( without a )")
            device, path = name[1:end], name[end + 1 :] or "/"
        else:
            device, path = self.vars.get("root", ""), name
        if not device:
            raise LoaderError(f"{self.where}: {name}: $root is not set")
        return self.volumes.device(device), path

    # -- statements -------------------------------------------------------------------
    def run(self, statements: list) -> int:
        status = 0
        for st in statements:
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise LoaderError(f"{self.where}: more than {MAX_STEPS} commands run: the config does not end")
            if isinstance(st, Cmd):
                status = self.command(self.expand(st.words))
            elif isinstance(st, If):
                status = self._if(st)
            elif st.kind == "function":
                name = "".join(self.expand(st.words[:1]))
                self.functions[name] = st
                status = 0
            else:
                status = self._menu_block(st)
            self.vars["?"] = str(status)
        return status

    def _if(self, st: If) -> int:
        for cond, body in st.branches:
            if self.run(cond) == 0:
                return self.run(body)
        return self.run(st.otherwise) if st.otherwise is not None else 0

    def expand(self, words: list[Word]) -> list[str]:
        out: list[str] = []
        for w in words:
            fields = [""]
            literal = False
            for kind, text, quoted in w.parts:
                if kind == "lit":
                    fields[-1] += text
                    literal = True
                    continue
                value = self.vars.get(text, "")
                if quoted:
                    fields[-1] += value
                    literal = True
                else:
                    split = value.split()
                    if split:
                        fields[-1] += split[0]
                        fields.extend(split[1:])
            if literal or fields != [""]:
                out.extend(fields)
        return out

    def _set(self, name: str, value: str) -> None:
        if name not in self.pinned:
            self.vars[name] = value

    def _menu_block(self, st: Block) -> int:
        args = self.expand(st.words)
        title, ident, rest = _entry_options(args)
        if title is None:
            raise LoaderError(f"{self.where} line {st.words[0].line if st.words else '?'}: {st.kind} without a title")
        if st.kind == "submenu":
            entry = Entry(title, ident, children=[])
            self.target.append(entry)
            outer, self.target = self.target, entry.children
            try:
                self.run(st.body)
            finally:
                self.target = outer
        else:
            entry = Entry(title, ident)
            self.target.append(entry)
            self.pending.append(_Pending(entry, st.body, rest, self.where))
        return 0

    def command(self, argv: list[str]) -> int:
        if not argv:
            return 0
        name, args = argv[0], argv[1:]
        if "=" in name and not name.startswith("="):  # name=value without `set`
            key, _, value = name.partition("=")
            self._set(key, value)
            return 0
        handler = _COMMANDS.get(name)
        if handler is not None:
            return handler(self, args)
        if name in self.functions:
            return self._call(self.functions[name], args)
        if self.boot is not None and name in LINUX_COMMANDS:
            self.boot.command, self.boot.kernel, self.boot.args = name, args[0] if args else "", args[1:]
            self.boot.root = self.vars.get("root", "")
            return 0
        if name in FAILS:
            return 1
        if name in PASSED_OVER:
            return 0
        return 1  # a command GRUB would not know either: it fails, the script goes on

    def _call(self, fn: Block, args: list[str]) -> int:
        if self.calls >= MAX_CALLS:
            raise LoaderError(f"{self.where}: functions call each other more than {MAX_CALLS} deep")
        saved = {k: self.vars.get(k) for k in ("#", "@", "*", *map(str, range(1, 10)))}
        self.vars.update({str(i + 1): a for i, a in enumerate(args[:9])})
        self.vars.update({"#": str(len(args)), "@": " ".join(args), "*": " ".join(args)})
        self.calls += 1
        try:
            return self.run(fn.body)
        except _Return:
            return 0
        finally:
            self.calls -= 1
            for k, v in saved.items():
                if v is None:
                    self.vars.pop(k, None)
                else:
                    self.vars[k] = v

    # -- entries ----------------------------------------------------------------------
    def _evaluate(self, p: _Pending) -> None:
        """Run an entry's body in a copy of the variables, recording what it boots."""
        entry = p.entry
        saved_vars, self.vars = self.vars, dict(self.vars)
        self.vars.update({str(i + 1): a for i, a in enumerate(p.args[:9])})
        self.vars["chosen"] = entry.title
        self.boot = _Boot()
        self.where = p.where
        try:
            self.run(p.body)
            boot = self.boot
            if not boot.command:
                entry.error = f"{entry.title!r} loads no Linux kernel (no linux command in it)"
                return
            entry.command = boot.command
            entry.cmdline = " ".join(boot.args)
            entry.kernel = self._ref(boot.kernel, "kernel")
            entry.initrds = [self._ref(path, "initrd") for path in boot.initrds]
        except LoaderError as e:
            entry.error = str(e)
        finally:
            self.vars, self.boot = saved_vars, None

    def _ref(self, name: str, what: str) -> FileRef:
        if not name:
            raise LoaderError(f"{self.where}: {what} command without a file")
        fs, path = self.file(name)
        if not fs.is_file(path):
            raise LoaderError(f"{what} {path} does not exist on {fs.where}")
        return FileRef(fs, path)


# -- commands ---------------------------------------------------------------------------


def _cmd_set(g: Grub, args: list[str]) -> int:
    for a in args:
        key, _, value = a.partition("=")
        g._set(key, value)
    return 0


def _cmd_unset(g: Grub, args: list[str]) -> int:
    for a in args:
        if a not in g.pinned:
            g.vars.pop(a, None)
    return 0


def _cmd_test(g: Grub, args: list[str]) -> int:
    if args and args[-1] == "]":
        args = args[:-1]
    negate = False
    while args and args[0] == "!":
        negate, args = not negate, args[1:]
    result = _test(g, args)
    return 0 if result != negate else 1


def _test(g: Grub, args: list[str]) -> bool:
    if "-o" in args:  # test(1)'s -o binds looser than -a
        i = args.index("-o")
        return _test(g, args[:i]) or _test(g, args[i + 1 :])
    if "-a" in args:
        i = args.index("-a")
        return _test(g, args[:i]) and _test(g, args[i + 1 :])
    if args and args[0] == "!":
        return not _test(g, args[1:])
    if not args:
        return False
    if len(args) == 1:
        return args[0] != ""
    if len(args) == 2:
        op, arg = args
        if op == "-n":
            return arg != ""
        if op == "-z":
            return arg == ""
        if op in ("-e", "-f", "-s", "-d"):
            try:
                fs, path = g.file(arg)
            except LoaderError:
                return False
            return fs.is_dir(path) if op == "-d" else fs.is_file(path)
        return False
    a, op, b = args[0], args[1], args[2]
    if op in ("=", "=="):
        return a == b
    if op == "!=":
        return a != b
    numeric = {"-eq": int.__eq__, "-ne": int.__ne__, "-lt": int.__lt__, "-gt": int.__gt__, "-le": int.__le__, "-ge": int.__ge__}
    if op in numeric:
        try:
            return numeric[op](int(a), int(b))
        except ValueError:
            return False
    return False


def _cmd_search(g: Grub, args: list[str], how: str = "file", positional_var: bool = False) -> int:
    var, needle, rest = None, None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-u", "--fs-uuid"):
            how = "fs_uuid"
        elif a in ("-l", "--label"):
            how = "label"
        elif a in ("-f", "--file"):
            how = "file"
        elif a in ("-s", "--set"):
            var = "root"
        elif a.startswith("--set="):
            var = a[len("--set=") :]
        elif a.startswith("--hint") and "=" not in a:
            i += 1  # --hint DEVICE
        elif a.startswith("-"):
            pass  # --no-floppy, --hint-bios=..., --efidisk-only
        else:
            rest.append(a)
        i += 1
    if rest:
        needle = rest[0]
    if positional_var:  # search.fs_uuid UUID [VAR]
        var = rest[1] if len(rest) > 1 else "root"
    if needle is None:
        return 1
    fs = g.volumes.search(how, needle)
    if fs is None:
        return 1
    if var:
        g._set(var, fs.device)
    return 0


def _cmd_load_env(g: Grub, args: list[str]) -> int:
    path, names = None, []
    i = 0
    while i < len(args):
        if args[i] in ("-f", "--file"):
            path = args[i + 1] if i + 1 < len(args) else None
            i += 2
            continue
        if args[i].startswith("--file="):
            path = args[i][len("--file=") :]
        elif not args[i].startswith("-"):
            names.append(args[i])
        i += 1
    path = path or g.vars.get("prefix", "") + "/grubenv"
    try:
        fs, p = g.file(path)
        if not fs.is_file(p):
            return 1
        env = parse_grubenv(fs.read(p, GRUBENV_SIZE))
    except LoaderError:
        return 1
    for k, v in env.items():
        if not names or k in names:
            g._set(k, v)
    return 0


def parse_grubenv(data: bytes) -> dict[str, str]:
    """GRUB's environment block: a header line, NAME=VALUE lines (\\\\ and \\n escaped),
    padding of '#' to 1024 bytes."""
    text = data.decode("utf-8", errors="replace")
    env = {}
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            env[key] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
    return env


def _cmd_source(g: Grub, args: list[str]) -> int:
    if not args:
        return 1
    fs, path = g.file(args[0])
    return g.source(fs, path)


def _cmd_configfile(g: Grub, args: list[str]) -> int:
    """A new menu from another file (the ESP's stub hands over to the real grub.cfg)."""
    if not args:
        return 1
    fs, path = g.file(args[0])
    g.entries.clear()
    g.pending.clear()
    g.target = g.entries
    return g.source(fs, path)


def _cmd_initrd(g: Grub, args: list[str]) -> int:
    if g.boot is not None:
        g.boot.initrds = [a for a in args if not a.startswith("--")]
    return 0


def _cmd_blscfg(g: Grub, args: list[str]) -> int:
    """Fedora's blscfg: the Boot Loader Specification entries on $root become menu entries."""
    fs, _ = g.file("/")
    g.target.extend(bls.read_entries(fs, g.vars))
    return 0


def _cmd_chainloader(g: Grub, args: list[str]) -> int:
    if g.boot is not None:
        raise LoaderError("chainloader: the entry starts another boot loader; the loader boots Linux kernels only")
    return 0


def _cmd_return(g: Grub, args: list[str]) -> int:
    raise _Return()


_COMMANDS = {
    "set": _cmd_set,
    "unset": _cmd_unset,
    "[": _cmd_test,
    "test": _cmd_test,
    "true": lambda g, a: 0,
    "false": lambda g, a: 1,
    "search": _cmd_search,
    "search.fs_uuid": lambda g, a: _cmd_search(g, a, "fs_uuid", True),
    "search.fs_label": lambda g, a: _cmd_search(g, a, "label", True),
    "search.file": lambda g, a: _cmd_search(g, a, "file", True),
    "search_fs_uuid": lambda g, a: _cmd_search(g, a, "fs_uuid", True),
    "search_label": lambda g, a: _cmd_search(g, a, "label", True),
    "search_fs_file": lambda g, a: _cmd_search(g, a, "file", True),
    "load_env": _cmd_load_env,
    "source": _cmd_source,
    ".": _cmd_source,
    "configfile": _cmd_configfile,
    "initrd": _cmd_initrd,
    "initrdefi": _cmd_initrd,
    "initrd16": _cmd_initrd,
    "blscfg": _cmd_blscfg,
    "chainloader": _cmd_chainloader,
    "multiboot": _cmd_chainloader,
    "multiboot2": _cmd_chainloader,
    "return": _cmd_return,
}


def _entry_options(args: list[str]) -> tuple[str | None, str, list[str]]:
    """menuentry TITLE [--class C] [--users U] [--hotkey K] [--id ID] [--unrestricted] [ARG...]."""
    title, ident, rest = None, "", []
    i = 0
    takes_value = {"--class", "--users", "--hotkey", "--id", "--source"}
    while i < len(args):
        a = args[i]
        if a in takes_value:
            if a == "--id" and i + 1 < len(args):
                ident = args[i + 1]
            i += 2
            continue
        if a.startswith("--id="):
            ident = a[len("--id=") :]
        elif a.startswith("--") and a != "--":
            pass
        elif title is None:
            title = a
        else:
            rest.append(a)
        i += 1
    return title, ident, rest


def _timeout(text: str) -> float | None:
    try:
        t = float(text)
    except ValueError:
        return None
    return None if t < 0 else t
