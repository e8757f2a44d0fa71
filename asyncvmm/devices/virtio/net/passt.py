"""passt, user-mode networking: `-s N,virtio-net,passt[,fwd=tcp:[HOSTADDR:]HOSTPORT[:GUESTPORT]][,mtu=N]`.

passt (https://passt.top, Debian's `passt`) is a process that gives a guest a network with no
privileges and no TAP: it answers DHCP, DHCPv6, NDP and ARP itself, and carries the guest's
TCP, UDP and ICMP through ordinary sockets of the host. It speaks QEMU's stream protocol on
a Unix stream socket: every Ethernet frame preceded by its length as a 32-bit big-endian
number, without a vnet header (so the device offers no checksum or segmentation offloads).

The VM starts one passt per device, giving it one end of a socketpair (`--fd`), so there is
no socket path to find, race for or leave behind; `--one-off` makes passt exit when that
end closes — when the VM stops, or if the VMM dies. `--foreground` keeps it our child, so
its pid is the one we wait for. The data path is C's stream mode (cext/net.c).

What passt does with the guest's traffic (its defaults, passt(1)): the guest gets the host's
own address and gateway; a connection to the gateway's address reaches the host's loopback
(`--map-gw`), so a service on the host listening on 127.0.0.1 is the gateway's to the guest.
`fwd=tcp:8080:80` is passt's `-t 8080:80`: the host's port 8080 (all its addresses) is
forwarded to the guest's port 80; `fwd=tcp:127.0.0.1:8080:80` listens on that address
only (`-t 127.0.0.1/8080:80`); `fwd=udp:...` likewise with `-u`.

Root: passt refuses to keep root. Started by root it changes itself to the user `nobody`
(after taking the socket and binding the forwarded ports), so a VMM run as root gets the same
unprivileged passt as a plain user's; a plain user's passt runs as that user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ....errors import ConfigError
from ....log import get_logger

PASST = "passt"
STOP_WAIT = 2.0  # seconds passt gets to exit by itself after its socket closes
SOCKET_BUFFER = 1 << 20  # bytes each way: a burst of frames waits in the kernel, not in passt
log = get_logger(__name__)
_FWD = re.compile(r"^(tcp|udp):(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(\d{1,5})(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class PasstOptions:
    forwards: tuple[tuple[str, int, int], ...] = ()  # (tcp|udp, host port, guest port)
    addresses: tuple[str, ...] = ()  # per forward: the host address it listens on ("": all)
    mtu: int = 0  # 0: passt's default (65520)

    def args(self) -> list[str]:
        """passt's command-line options for these."""
        out = []
        for (proto, host, guest), addr in zip(self.forwards, self.addresses or [""] * len(self.forwards)):
            out += ["-t" if proto == "tcp" else "-u", f"{addr}/{host}:{guest}" if addr else f"{host}:{guest}"]
        if self.mtu:
            out += ["--mtu", str(self.mtu)]
        return out


def parse_option(opts: dict, key: str, value: str, what: str) -> bool:
    """One of passt's own CONF options into `opts` (forwards, mtu); False if not one."""
    if key == "fwd":
        m = _FWD.match(value)
        ports = [int(p) for p in m.groups()[2:] if p is not None] if m else []
        addr = m.group(2) or "" if m else ""
        if not m or not all(1 <= p <= 65535 for p in ports) or (addr and not _is_ipv4(addr)):
            raise ConfigError(f"{what}: fwd={value}: say tcp:[HOSTADDR:]HOSTPORT[:GUESTPORT] or udp:... "
                              "(ports 1-65535, HOSTADDR an IPv4 address of this host)")
        opts.setdefault("forwards", []).append((m.group(1), ports[0], ports[-1]))
        opts.setdefault("addresses", []).append(addr)
        return True
    if key == "mtu":
        if not (value.isdigit() and 68 <= int(value) <= 65520):
            raise ConfigError(f"{what}: mtu={value}: an MTU from 68 to 65520")
        opts["mtu"] = int(value)
        return True
    return False


def _is_ipv4(addr: str) -> bool:
    try:
        socket.inet_aton(addr)
    except OSError:
        return False
    return all(int(part) <= 255 for part in addr.split("."))


def check_forwards(opts: PasstOptions, what: str) -> None:
    """Each forwarded host port can be bound now (passt, failing to bind one, says nothing
    and forwards nothing): one line for a port in use or one a plain user may not bind."""
    for (proto, host, _), addr in zip(opts.forwards, opts.addresses or [""] * len(opts.forwards)):
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as passt's own: a TIME_WAIT is no conflict
            try:
                s.bind((addr or "0.0.0.0", host))
            except PermissionError:
                raise ConfigError(f"{what}: fwd={proto}:{host}: a plain user may not bind ports below "
                                  "net.ipv4.ip_unprivileged_port_start (1024)") from None
            except OSError as e:
                raise ConfigError(f"{what}: fwd={proto}:{host}: the host's {proto.upper()} port {host} "
                                  f"cannot be bound ({e.strerror})") from None


def check_installed(what: str) -> None:
    if shutil.which(PASST) is None:
        raise ConfigError(f"{what}: passt is not installed (apt-get install passt)")


class Passt:
    """A running passt and our end of its socket (the one fd of the device's one queue pair)."""

    name = "passt"
    created = False
    uso = False

    def __init__(self, opts: PasstOptions, what: str = "passt"):
        self.what = what
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            ours.setblocking(False)
            # passt's messages, kept to say why it stopped; an unlinked file leaves nothing behind.
            self._log = tempfile.TemporaryFile()
            cmd = [PASST, "--foreground", "--one-off", "--quiet", "--stderr", "--fd", str(theirs.fileno()),
                   *opts.args()]
            try:
                # Its own session: a ^C at the terminal is the VMM's to handle; passt stops
                # when the VMM closes the socket.
                self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                             stdout=self._log, stderr=self._log, start_new_session=True)
            except OSError as e:
                self._log.close()
                raise ConfigError(f"{what}: cannot start passt: {e.strerror}") from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.fds = [ours.fileno()]
        self.pid = self.proc.pid
        self.offload = 0
        # The stream's unfinished bytes between one boot's device and the next (a guest
        # reset builds a new machine; passt and its socket stay): set by VirtioNet.close.
        self.carry: tuple[bytes, bytes] | None = None
        self._exit_watch: tuple[asyncio.AbstractEventLoop, int, list[Callable[[str], None]]] | None = None

    def set_offload(self, flags: int) -> None:
        """The stream carries no vnet header: nothing to tell passt."""

    def set_active_queues(self, n: int) -> None:
        """One queue pair, one socket."""

    def why_gone(self) -> str:
        """One phrase on how passt went (called on the loop when its socket closed): never
        waits for it, so a passt still exiting is "closed its socket" (on_exit tells more)."""
        code = self.proc.poll()
        if code is None:
            return f"passt (pid {self.pid}) closed its socket"
        if code < 0:
            return f"passt (pid {self.pid}) killed by {signal.Signals(-code).name}"
        said = self._said() if code else ""
        return f"passt (pid {self.pid}) exited with status {code}" + (f": {said}" if said else "")

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """`callback(why_gone())` on the running loop once passt has exited (reaped then,
        without blocking: a pidfd); at once if it has. Nothing after close()."""
        if self.proc.poll() is not None:
            callback(self.why_gone())
            return
        if self._exit_watch is not None:
            self._exit_watch[2].append(callback)
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return  # no pidfd: the cause stays "closed its socket"
        loop = asyncio.get_running_loop()
        self._exit_watch = (loop, fd, [callback])
        loop.add_reader(fd, self._exited)

    def _exited(self) -> None:
        callbacks = self._exit_watch[2] if self._exit_watch else []
        self._unwatch_exit()
        self.proc.poll()
        why = self.why_gone()
        for cb in callbacks:
            cb(why)

    def _unwatch_exit(self) -> None:
        if self._exit_watch is not None:
            loop, fd, _ = self._exit_watch
            self._exit_watch = None
            if not loop.is_closed():
                loop.remove_reader(fd)
            os.close(fd)

    def _said(self) -> str:
        """passt's last message (not its complaints that syslog is unreachable)."""
        try:
            self._log.seek(0)
            lines = self._log.read()[-4096:].decode(errors="replace").splitlines()
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in lines if ln.strip() and "syslog" not in ln]
        return lines[-1] if lines else ""

    def close(self) -> None:
        self._unwatch_exit()
        if self.fds:
            self.sock.close()  # --one-off: passt exits on its own
            self.fds = []
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                log.warning(f"{self.what}: passt (pid {self.pid}) did not exit; killed")
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def passt_user() -> str:
    """Who passt runs as, for the log: root's passt drops to nobody."""
    uid = os.geteuid()
    if uid == 0:
        return "nobody"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
