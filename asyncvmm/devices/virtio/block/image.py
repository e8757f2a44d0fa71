"""A disk image: `-s N,virtio-blk,PATH[,ro][,direct][,serial=ID][,queues=N][,engine=E][,format=F]`,
or a vhost-user back-end: `-s N,virtio-blk,vhost-user=SOCKET[,queues=N]`.

Raw image files and block devices. Opening one checks what would otherwise fail later:
it exists, is a regular file or a block device, it is raw (formats.py: no other format's
magic, or `format=raw` said), its size is a whole number of 512-byte
sectors, no other VM has it (an flock: exclusive, or shared for `ro`), and with `direct`
the file system takes O_DIRECT. Each failure is a ConfigError naming the disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from ....errors import ConfigError
from .formats import FORMATS, RAW, check_format, probe_fd

SECTOR = 512
BLKGETSIZE64 = 0x80081272  # <linux/fs.h> _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268  # logical sector size
BLKPBSZGET = 0x127B  # physical sector size
DEFAULT_DIO_ALIGN = 4096  # when the device's logical block size cannot be read
ENGINES = ("uring", "sync")


@dataclass(frozen=True)
class BlockOptions:
    path: str
    readonly: bool = False
    direct: bool = False
    serial: str = ""
    queues: int = 0  # 0: one per vCPU
    engine: str = "uring"
    format: str = ""  # "": detected from the image (formats.py); "raw": raw whatever it holds
    vhost_user: str = ""  # a vhost-user back-end's socket instead of an image

    @classmethod
    def parse(cls, conf: str, where: str = "") -> "BlockOptions":
        """PATH[,ro][,direct][,serial=ID][,queues=N][,engine=uring|sync][,format=F],
        or vhost-user=SOCKET[,queues=N]"""
        what = f"-s {where}virtio-blk,{conf}"
        parts = conf.split(",") if conf else []
        if not parts or not parts[0]:
            raise ConfigError(f"{what}: say which image: virtio-blk,PATH[,ro][,direct][,serial=ID]")
        path = parts[0]
        opts: dict[str, Any] = {}  # ro/direct: bool, serial/engine/format/vhost_user: str, queues: int
        if path.startswith("vhost-user="):
            opts["vhost_user"], path = path.partition("=")[2], ""
            if not opts["vhost_user"]:
                raise ConfigError(f"{what}: vhost-user=SOCKET: say which socket")
            for p in parts[1:]:
                if not p.startswith("queues="):
                    raise ConfigError(f"{what}: {p!r}: a vhost-user back-end decides that itself "
                                      "(vhost-user=SOCKET takes only queues=N)")
        for p in parts[1:]:
            key, sep, value = p.partition("=")
            if key in ("ro", "direct") and not sep:
                opts[key] = True
            elif key == "serial" and sep:
                if len(value.encode()) > 20 or not value.isprintable():
                    raise ConfigError(f"{what}: serial={value}: at most 20 printable bytes")
                opts["serial"] = value
            elif key == "queues" and sep:
                if not (value.isdigit() and 1 <= int(value) <= 64):
                    raise ConfigError(f"{what}: queues={value}: a number of queues from 1 to 64")
                opts["queues"] = int(value)
            elif key == "engine" and value in ENGINES:
                opts["engine"] = value
            elif key == "format" and value in FORMATS:
                opts["format"] = value
            elif key == "format":
                raise ConfigError(f"{what}: format={value}: not an image format ({', '.join(FORMATS)})")
            else:
                raise ConfigError(f"{what}: unknown option {p!r} (ro, direct, serial=ID, queues=1-64, engine=uring|sync, "
                                  "format=raw|qcow2|...)")
        return cls(path, opts.get("ro", False), opts.get("direct", False), opts.get("serial", ""),
                   opts.get("queues", 0), opts.get("engine", "uring"), opts.get("format", ""),
                   opts.get("vhost_user", ""))


def needs_backend(opts: BlockOptions) -> bool:
    """Whether the disk is served by a vhost-user back-end (named, or qemu-storage-daemon for
    an image that is not raw), not by the in-process data path."""
    return bool(opts.vhost_user) or not check_format(opts.path, opts.format).raw


def default_serial(path: str) -> str:
    """A serial that stays the same for the same image (bhyve derives it from the path too)."""
    return "avmm-" + hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:15]


def _sysfs_int(dev: int, name: str) -> int | None:
    """A queue attribute of the block device `dev` (or of the disk a partition is on)."""
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for path in (f"{base}/queue/{name}", f"{base}/../queue/{name}"):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt)))
    return struct.unpack(fmt, buf)[0]


class DiskImage:
    """The open image: fds (buffered, and O_DIRECT with `direct`), size, geometry."""

    def __init__(self, opts: BlockOptions):
        self.opts = opts
        self.path = opts.path
        self.fd = -1
        self.fd_direct = -1
        flags = (os.O_RDONLY if opts.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(opts.path, flags)
        except FileNotFoundError:
            raise ConfigError(f"disk {opts.path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"disk {opts.path}: is a directory") from None
        except PermissionError:
            mode = "read" if opts.readonly else "read and write (add ,ro for a read-only disk)"
            raise ConfigError(f"disk {opts.path}: no permission to {mode}") from None
        except OSError as e:
            raise ConfigError(f"disk {opts.path}: {e.strerror}") from None
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"disk {self.path}: neither a regular file nor a block device")
        self.size = _ioctl_int(self.fd, BLKGETSIZE64, "Q") if self.is_block_device else st.st_size
        self._check_raw()  # first: another format's image is no sector multiple either
        if self.size == 0 or self.size % SECTOR:
            raise ConfigError(f"disk {self.path} is {self.size} bytes: not a whole number of 512-byte sectors")
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.opts.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"disk {self.path} is in use by another VM (it holds a lock on the image)") from None
        dev = st.st_rdev if self.is_block_device else st.st_dev
        if self.is_block_device:
            self.logical_block = _ioctl_int(self.fd, BLKSSZGET, "i")
            self.physical_block = _ioctl_int(self.fd, BLKPBSZGET, "I")
        else:
            self.logical_block = SECTOR  # a file takes any 512-byte aligned request
            self.physical_block = max(st.st_blksize, SECTOR)
        self.min_io = _sysfs_int(dev, "minimum_io_size") or 0
        self.opt_io = _sysfs_int(dev, "optimal_io_size") or 0
        self.dio_align = 0
        if self.opts.direct:
            self.dio_align = _sysfs_int(dev, "logical_block_size") or DEFAULT_DIO_ALIGN
            try:
                self.fd_direct = os.open(self.path, (os.O_RDONLY if self.opts.readonly else os.O_RDWR)
                                         | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise ConfigError(f"disk {self.path}: its file system does not take O_DIRECT (drop ,direct)") from None
                raise ConfigError(f"disk {self.path}: {e.strerror}") from None

    def _check_raw(self) -> None:
        """This is the raw data path: an image with another format's magic is refused
        unless format=raw says its bytes are what the guest gets."""
        if self.opts.format == RAW:
            return
        if self.size == 0:
            return
        found = probe_fd(self.fd)
        if not found.raw:
            raise ConfigError(f"disk {self.path} is a {found.what} image, not raw: it is not served as raw bytes "
                              f"(format=raw says to; qemu-storage-daemon serves format={found.format})")

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def close(self) -> None:
        for name in ("fd_direct", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)  # closing the last fd of the description drops the flock
                setattr(self, name, -1)
