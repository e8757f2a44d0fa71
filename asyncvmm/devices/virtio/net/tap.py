"""A TAP device for a VM: `-s N,virtio-net,TAPNAME[,mac=52:54:..][,queues=N]`.

The TAP is opened with IFF_VNET_HDR (frames carry the 12-byte virtio_net_hdr_v1, so
checksum and segmentation offloads pass between guest and host kernel untouched) and,
for more than one queue pair, IFF_MULTI_QUEUE: one fd per pair. A TAP that does not exist
is created — and, being ours and not persistent, it disappears when the VM's fds close; a
TAP that existed (`ip tuntap add ... multi_queue`) is left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import struct
from dataclasses import dataclass

from ...._native import lib
from ....errors import ConfigError
from .passt import PasstOptions
from .passt import parse_option as parse_passt_option

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags (the union is 24 bytes)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
HDR_LEN = 12  # sizeof(struct virtio_net_hdr_v1)

# TUN_F_USO4/6 arrived in Linux 6.2 (if_tun.h of this build host is older): the TAP may
# then pass UDP segmentation offload. Probed, not assumed.
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_TAPNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class NetOptions:
    tap: str
    mac: bytes | None = None
    queues: int = 0  # 0: one pair per vCPU
    passt: PasstOptions | None = None  # `passt` in place of a TAP name: user-mode networking (passt.py)

    @classmethod
    def parse(cls, conf: str, where: str = "") -> "NetOptions":
        """TAPNAME[,mac=XX:XX:XX:XX:XX:XX][,queues=N], or passt[,mac=..][,fwd=tcp:H[:G]][,mtu=N]"""
        what = f"-s {where}virtio-net,{conf}"
        parts = conf.split(",") if conf else []
        if not parts or not parts[0]:
            raise ConfigError(f"{what}: say which TAP: virtio-net,TAPNAME[,mac=..][,queues=N]")
        name = parts[0]
        if not _TAPNAME.match(name):
            raise ConfigError(f"{what}: {name!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
        mac, queues = None, 0
        passt: dict | None = {} if name == "passt" else None  # never a TAP of that name
        for p in parts[1:]:
            key, sep, value = p.partition("=")
            if passt is not None and parse_passt_option(passt, key, value, what):
                continue
            if passt is not None and key == "queues":
                raise ConfigError(f"{what}: passt serves one queue pair (queues= is for a TAP)")
            if key == "mac" and _MAC.match(value):
                mac = bytes(int(b, 16) for b in value.split(":"))
                if mac[0] & 1:
                    raise ConfigError(f"{what}: mac={value} is a multicast address")
            elif key == "queues" and sep:
                if not (value.isdigit() and 1 <= int(value) <= lib.AVMM_NET_MAX_PAIRS):
                    raise ConfigError(f"{what}: queues={value}: a number of queue pairs from 1 to {lib.AVMM_NET_MAX_PAIRS}")
                queues = int(value)
            elif passt is not None:
                raise ConfigError(f"{what}: unknown option {p!r} (mac=XX:XX:XX:XX:XX:XX, fwd=tcp:[HOSTADDR:]HOSTPORT[:GUESTPORT], "
                                  "fwd=udp:..., mtu=N)")
            else:
                raise ConfigError(f"{what}: unknown option {p!r} (mac=XX:XX:XX:XX:XX:XX, "
                                  f"queues=1-{lib.AVMM_NET_MAX_PAIRS})")
        if passt is not None:
            return cls(name, mac, 1, PasstOptions(tuple(passt.get("forwards", ())), tuple(passt.get("addresses", ())),
                                                  passt.get("mtu", 0)))
        return cls(name, mac, queues)


def check_is_tap(name: str, what: str) -> None:
    """A network interface `name` that exists must be a TUN/TAP device (one that does not
    is created at start). Its sysfs directory has `tun_flags` if it is one."""
    sysfs = f"/sys/class/net/{name}"
    if os.path.exists(sysfs) and not os.path.exists(f"{sysfs}/tun_flags"):
        kind = "a bridge" if os.path.isdir(f"{sysfs}/bridge") else "a loopback" if name == "lo" else "not a TAP"
        raise ConfigError(f"{what}: {name} is a network interface of the host, {kind}: name a TAP "
                          "(ip tuntap add NAME mode tap vnet_hdr), or a new name to have one created")


def stable_mac(vm_name: str, slot: str) -> bytes:
    """A locally administered unicast MAC that is the same for the same VM and slot."""
    return b"\x52\x54\x00" + hashlib.sha256(f"{vm_name}/{slot}".encode()).digest()[:3]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Tap:
    """The open TAP: one non-blocking fd per queue pair."""

    def __init__(self, name: str, pairs: int):
        self.name = name
        self.fds: list[int] = []
        self.created = not os.path.exists(f"/sys/class/net/{name}")
        flags = lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR | (lib.IFF_MULTI_QUEUE if pairs > 1 else 0)
        try:
            for _ in range(pairs):
                self.fds.append(self._open(flags))
            if self.created:
                self._set_up()
        except BaseException:
            self.close()
            raise
        self.offload = -1
        self.uso = self._probe_uso()

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"TAP {self.name}: {TUN_DEVICE} does not exist (load the tun module)") from None
        except PermissionError:
            raise ConfigError(f"TAP {self.name}: no permission to open {TUN_DEVICE}") from None
        try:
            fcntl.ioctl(fd, lib.TUNSETIFF, IFREQ.pack(self.name.encode(), flags))
            fcntl.ioctl(fd, lib.TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                raise ConfigError(f"TAP {self.name} is in use by another program") from None
            if e.errno == errno.EINVAL:
                raise ConfigError(f"TAP {self.name} exists with other flags (for queues>1 it must be multi_queue; "
                                  "a TUN device is not a TAP)") from None
            if e.errno == errno.EPERM:
                raise ConfigError(f"TAP {self.name}: not permitted (CAP_NET_ADMIN is needed to create it)") from None
            raise ConfigError(f"TAP {self.name}: {e.strerror}") from None
        return fd

    def _set_up(self) -> None:
        """A TAP we created starts down; a VMM's users expect the link up."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = IFREQ.pack(self.name.encode(), 0)
            flags = IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ.pack(self.name.encode(), flags | IFF_UP))

    def _probe_uso(self) -> bool:
        try:
            fcntl.ioctl(self.fds[0], lib.TUNSETOFFLOAD, lib.TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
        except OSError:
            return False
        finally:
            fcntl.ioctl(self.fds[0], lib.TUNSETOFFLOAD, 0)
        return True

    def set_offload(self, flags: int) -> None:
        """What the TAP may hand the guest: TUN_F_* (checksum, TSO, UFO, USO)."""
        if flags == self.offload:
            return
        for fd in self.fds:
            fcntl.ioctl(fd, lib.TUNSETOFFLOAD, flags)
        self.offload = flags

    def set_active_queues(self, n: int) -> None:
        """Steer frames to the first n queues only (the others are detached)."""
        if len(self.fds) == 1:
            return
        for i, fd in enumerate(self.fds):
            flag = lib.IFF_ATTACH_QUEUE if i < n else lib.IFF_DETACH_QUEUE
            try:
                fcntl.ioctl(fd, lib.TUNSETQUEUE, IFREQ.pack(b"", flag))
            except OSError as e:
                if e.errno != errno.EINVAL:  # already in that state
                    raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)  # a TAP we created goes with its last fd
        self.fds = []
