"""`asyncvmm run --jail DIR --uid UID --gid GID`: the VMM confined before it starts, as
Firecracker's jailer confines firecracker.

The VM's configuration says every host file it will use, so the jail is planned from it
and entered before the VMM opens anything or starts a thread (a mount namespace and a
process's credentials are per thread until then: entering later would leave threads
outside):

1. a new mount namespace (unshare CLONE_NEWNS) in which every mount is private, so
   nothing done here is seen outside;
2. a tmpfs mounted at DIR (inside the namespace only: the host's DIR stays as it was, and
   the jail is gone when the VMM ends, with nothing to clean up);
3. in it, at the same absolute paths, only what the VM uses: /dev/kvm (and /dev/net/tun
   for a TAP) as device nodes of its own owned by UID:GID, the kernel, initrd and disk
   images bind-mounted (read-only where only read), the directories of the control socket
   and of the console sockets, and the Python interpreter's own files read-only (Python
   imports modules as it first needs them); with a TAP, sysfs read-only (a TAP's state is
   read there);
4. pivot_root into it, the old root detached, the jail's root remounted read-only;
5. every capability dropped from the bounding set, supplementary groups cleared, GID and
   UID set (real, effective, saved: no capability is left), PR_SET_NO_NEW_PRIVS.

seccomp comes after (runner.run_vm): the loop's filter refuses mount, unshare and setuid,
which the jail needs once. A TAP must exist already, owned by UID
(`ip tuntap add NAME mode tap user UID vnet_hdr`): creating one needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import stat
import sys
import threading
from dataclasses import dataclass, field
from enum import IntFlag

from .config import VmConfig
from .errors import ConfigError, VmmError

# <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>, <linux/capability.h>
CLONE_NEWNS = 0x00020000


class MountFlag(IntFlag):
    MS_RDONLY = 1
    MS_NOSUID = 2
    MS_NODEV = 4
    MS_NOEXEC = 8
    MS_REMOUNT = 32
    MS_BIND = 4096
    MS_REC = 16384
    MS_PRIVATE = 1 << 18


MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86-64


@dataclass
class JailOptions:
    root: str
    uid: int
    gid: int


def _id(text: str, flag: str, lookup) -> int:
    if text.isdigit():
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise ConfigError(f"{flag} {text}: no such {'user' if flag == '--uid' else 'group'}") from None


def parse_jail(root: str | None, uid: str | None, gid: str | None) -> JailOptions | None:
    """The flags as given, checked: one line for each mistake, nothing done yet."""
    if root is None:
        if uid is not None or gid is not None:
            raise ConfigError("--uid and --gid go with --jail DIR (the user the jailed VMM runs as)")
        return None
    if uid is None or gid is None:
        raise ConfigError(f"--jail {root}: say the user and group the VMM runs as: --uid UID --gid GID")
    uid_n = _id(uid, "--uid", lambda n: pwd.getpwnam(n).pw_uid)
    gid_n = _id(gid, "--gid", lambda n: grp.getgrnam(n).gr_gid)
    if uid_n == 0 or gid_n == 0:
        raise ConfigError("--jail: --uid and --gid must not be root's (0): the jail is for running without it")
    if not os.path.isdir(root):
        raise ConfigError(f"--jail {root}: no such directory")
    if os.listdir(root):
        raise ConfigError(f"--jail {root}: the directory is not empty")
    if os.geteuid() != 0:
        raise ConfigError("--jail needs root: it mounts the jail and changes to --uid/--gid itself")
    return JailOptions(os.path.realpath(root), uid_n, gid_n)


@dataclass
class Plan:
    """What goes into the jail, by host path."""

    devices: list[str] = field(default_factory=list)  # nodes made anew, owned by UID:GID
    files_ro: list[str] = field(default_factory=list)
    files_rw: list[str] = field(default_factory=list)
    dirs_rw: list[str] = field(default_factory=list)  # sockets are made in them
    dirs_ro: list[str] = field(default_factory=list)
    sysfs: bool = False

    def add(self, kind: list[str], path: str) -> None:
        path = os.path.abspath(path)
        if path not in kind:
            kind.append(path)


def plan(cfg: VmConfig) -> Plan:
    """Everything the VM in `cfg` will open, from its configuration (paths as given, made
    absolute: inside the jail they are at the same places, and so is the working directory)."""
    from .devices.virtio.block.formats import check_format  # noqa: PLC0415
    from .devices.virtio.block.image import BlockOptions  # noqa: PLC0415
    from .devices.virtio.console import ConsoleOptions  # noqa: PLC0415
    from .devices.virtio.net.tap import NetOptions  # noqa: PLC0415

    if cfg.kernel.startswith("/proc/"):
        raise ConfigError("--jail: a kernel from a disk's boot menu is not supported in the jail yet: give --kernel")
    p = Plan(devices=["/dev/kvm"])
    for path in (cfg.kernel, cfg.initrd, cfg.symbols, cfg.bootrom):
        if path and os.path.exists(path):
            p.add(p.files_ro, path)
    if cfg.bootrom and cfg.kernel:  # the firmware loads the kernel with QEMU's linuxboot ROM
        from .boot.fw_cfg_items import LINUXBOOT_ROMS  # noqa: PLC0415

        for path in LINUXBOOT_ROMS:
            if os.path.exists(path):
                p.add(p.files_ro, path)
    if cfg.bootvars:
        p.add(p.files_rw, cfg.bootvars)
    if cfg.debugcon:
        p.add(p.dirs_rw, os.path.dirname(os.path.abspath(cfg.debugcon)))
    for spec in (cfg.console, *cfg.serial.values()):
        if spec.startswith("socket="):
            p.add(p.dirs_rw, os.path.dirname(os.path.abspath(spec[len("socket="):])))
        elif spec and spec != "stdio" and not spec.startswith("tcp="):
            p.add(p.dirs_rw, os.path.dirname(os.path.abspath(spec)))  # a file console
    for slot in cfg.slots:
        if slot.driver == "virtio-blk":
            opts = BlockOptions.parse(slot.options)
            # Another process serving the disk (qemu-storage-daemon for qcow2 and the like,
            # a vhost-user back-end) is started or reached from outside: not planned yet.
            if opts.vhost_user:
                raise ConfigError(f"--jail: -s {slot.slot},virtio-blk,vhost-user=...: not supported in the jail yet")
            if not check_format(opts.path, opts.format).raw:
                raise ConfigError(f"--jail: {opts.path} is not a raw image: only raw disks (or format=raw) are "
                                  "supported in the jail yet (other formats need qemu-storage-daemon)")
            p.add(p.files_ro if opts.readonly else p.files_rw, opts.path)
        elif slot.driver == "virtio-console":
            for _name, path in ConsoleOptions.parse(slot.options, "").ports:
                p.add(p.dirs_rw, os.path.dirname(os.path.abspath(path)))
        elif slot.driver == "virtio-net":
            if NetOptions.parse(slot.options).passt is not None:  # the VM starts passt: an exec
                raise ConfigError(f"--jail: -s {slot.slot},virtio-net,passt: not supported in the jail yet (use a TAP)")
            p.add(p.devices, "/dev/net/tun")
            p.sysfs = True
    for path in _python_dirs():
        p.add(p.dirs_ro, path)
    return p


def _python_dirs() -> list[str]:
    """Where this interpreter imports from: its library, its packages, and of the project
    only the asyncvmm package."""
    package = os.path.dirname(os.path.abspath(__file__))
    dirs = [package]
    for d in sys.path:
        if d and os.path.isdir(d) and not os.path.isdir(os.path.join(d, "asyncvmm")):
            dirs.append(d)
    return dirs


# -- entering it -----------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise VmmError(f"jail: {what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind(source: str, target: str, readonly: bool) -> None:
    _mount(source, target, None, MountFlag.MS_BIND | MountFlag.MS_REC)
    flags = MountFlag.MS_BIND | MountFlag.MS_REMOUNT | MountFlag.MS_NOSUID
    if readonly:
        flags |= MountFlag.MS_RDONLY
    if not stat.S_ISCHR(os.stat(source).st_mode) and not stat.S_ISBLK(os.stat(source).st_mode):
        flags |= MountFlag.MS_NODEV
    _check(_libc.mount(None, target.encode(), None, ctypes.c_ulong(flags), None), f"remount {target}")


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _mountpoint(root: str, path: str, directory: bool) -> str:
    target = _inside(root, path)
    os.makedirs(target if directory else os.path.dirname(target), mode=0o755, exist_ok=True)
    if not directory and not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    return target


# Extension modules the VMM imports later whose shared libraries (liblzma, libz, librt...)
# are not in the jail: loaded now, dlopen is not needed again.
PRELOAD = ("uvloop", "zlib", "lzma", "bz2", "hashlib", "asyncvmm._native")


def _preload() -> None:
    import importlib  # noqa: PLC0415

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # not installed: not used either (uvloop is optional)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def enter(opts: JailOptions, cfg: VmConfig) -> Plan:
    """Build the jail from the VM's plan, move into it and drop to UID:GID (see the module)."""
    if _threads() != 1:
        raise VmmError("jail: the VMM already runs threads: the jail must come before them")
    p = plan(cfg)
    for path in (*p.files_ro, *p.files_rw):
        if not os.path.exists(path):
            raise ConfigError(f"--jail: {path} does not exist")
    _preload()
    claim_control_socket(cfg.name)
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())  # noqa: SIM115 (before /proc is gone)
    root = opts.root
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MountFlag.MS_REC | MountFlag.MS_PRIVATE)  # nothing propagates out
    _mount("asyncvmm-jail", root, "tmpfs", MountFlag.MS_NOSUID, "mode=0755,size=1m,nr_inodes=4096")
    for dev in p.devices:
        st = os.stat(dev)
        target = _mountpoint(root, dev, directory=False)
        os.unlink(target)
        os.mknod(target, stat.S_IFCHR | 0o600, st.st_rdev)
        os.chown(target, opts.uid, opts.gid)
    for path in p.files_ro:
        _bind(path, _mountpoint(root, path, directory=False), readonly=True)
    for path in p.files_rw:
        _bind(path, _mountpoint(root, path, directory=False), readonly=False)
    for path in p.dirs_ro:
        _bind(path, _mountpoint(root, path, directory=True), readonly=True)
    for path in p.dirs_rw:
        _bind(path, _mountpoint(root, path, directory=True), readonly=False)
    if p.sysfs:
        sysfs = _mountpoint(root, "/sys", directory=True)
        _mount("sysfs", sysfs, "sysfs", MountFlag.MS_RDONLY | MountFlag.MS_NOSUID | MountFlag.MS_NODEV
               | MountFlag.MS_NOEXEC)
    cwd = os.getcwd()
    os.makedirs(_inside(root, cwd), mode=0o755, exist_ok=True)  # relative paths stay right
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")  # the host's tree is gone
    os.chdir(cwd)
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MountFlag.MS_REMOUNT | MountFlag.MS_RDONLY
                                                         | MountFlag.MS_NOSUID), None), "remount / read-only")
    _drop(opts, last_cap)
    return p


def claim_control_socket(name: str) -> None:
    """The control socket is bound now, as root, in the run directory outside (the VM takes
    the listening socket: claim_socket hands it over). The jailed VMM cannot remove it from
    root's directory when it ends: a janitor process, outside the jail and still root, waits
    for the VMM to end (its pipe's end closes, whatever way the VMM ends) and removes it."""
    from .control.server import claim_socket, preclaim  # noqa: PLC0415

    sock, path = claim_socket(name)
    inode = os.stat(path).st_ino
    preclaim(name, sock, path)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the janitor
        try:
            os.setsid()  # out of the terminal's process group: ^C is the VMM's
            os.closerange(0, r)
            os.closerange(r + 1, 4096)
            while os.read(r, 1):
                pass
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        finally:
            os._exit(0)
    os.close(r)
    os.set_inheritable(w, False)  # held until this process ends
    _janitor_pipe.append(w)


_janitor_pipe: list[int] = []


def _drop(opts: JailOptions, last_cap: int) -> None:
    for cap in range(last_cap + 1):
        r = _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        if r != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(r, f"drop capability {cap}")
    os.setgroups([])
    os.setresgid(opts.gid, opts.gid, opts.gid)
    os.setresuid(opts.uid, opts.uid, opts.uid)  # from root to UID: permitted and effective sets emptied
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
