"""A running VM's control socket: `asyncvmm ctl` talks to it (see protocol.py).

The socket is claimed before the VM boots: a live socket with the same name means another
VM has that name (refused); a dead one is left over from a VMM that was killed (removed).
It is created mode 0600 and removed on every exit path the process lives through. Beyond
the mode, every connection's peer is checked (SO_PEERCRED): root and the VM's owner — the
user the VMM runs as — are served; anyone else gets one error answer and the connection
is closed, so a socket or a directory made readable by mistake does not open the VM.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING

from ..errors import ConfigError, VmmError
from . import protocol
from .handlers import HANDLERS

if TYPE_CHECKING:
    from ..api import VM


UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (as it was at connect)."""
    _pid, uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return uid


_preclaimed: dict[str, tuple[socket.socket, str]] = {}


def preclaim(name: str, sock: socket.socket, path: str) -> None:
    """A socket claimed before the VM starts (the jail claims it before dropping root):
    the VM's claim_socket takes it."""
    _preclaimed[name] = (sock, path)


def claim_socket(name: str) -> tuple[socket.socket, str]:
    """Bind the VM's control socket; ConfigError if the name is taken by a live VM."""
    if name in _preclaimed:
        return _preclaimed.pop(name)
    if not protocol.NAME_RE.match(name):
        raise ConfigError(f"VM name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    path = protocol.socket_path(name)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {directory} for control sockets: {e.strerror}") from None
    protocol.check_run_dir(directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _remove_if_stale(path, name)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(8)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"a VM named {name} is already running (control socket {path})") from None
        raise ConfigError(f"cannot create the control socket {path}: {e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock, path


def _remove_if_stale(path: str, name: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket: remove it to run a VM named {name}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a VMM that did not live to remove it
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise ConfigError(f"a VM named {name} is already running (control socket {path})")


class ControlServer:
    """Serves protocol requests for one VM on the loop. One request per line."""

    def __init__(self, vm: "VM", sock: socket.socket, path: str):
        self.vm = vm
        self.path = path
        self._sock = sock
        try:
            self._inode: int | None = os.stat(path).st_ino
        except OSError:  # a jailed VMM's socket is outside its jail: its janitor removes it (jail.py)
            self._inode = None
        self.owner = os.geteuid()  # the user the VMM runs as (a jailed VMM's --uid)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=self._sock, limit=protocol.MAX_LINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            refusal = self._refusal(writer.get_extra_info("socket"))
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(protocol.encode({"ok": False, "error": "request line too long"}))
                    break
                if not line:
                    break
                if refusal:  # its request read first: closing on unread bytes would reset the connection
                    writer.write(protocol.encode({"ok": False, "error": refusal, "usage": True}))
                    await writer.drain()
                    break
                writer.write(protocol.encode(await self._answer(line)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def _refusal(self, sock) -> str | None:
        """Why this connection's peer may not control the VM, or None (root or the owner)."""
        try:
            uid = peer_uid(sock)
        except (OSError, AttributeError):
            return "permission denied: the peer's credentials cannot be read"
        if uid in (0, self.owner):
            return None
        return (f"permission denied: uid {uid} may not control VM {self.vm.config.name} "
                f"(only root and its owner, uid {self.owner}, may)")

    async def _answer(self, line: bytes) -> dict:
        try:
            req = protocol.decode(line)
        except (ValueError, RecursionError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        cmd = req.get("cmd")
        handle = HANDLERS.get(cmd) if isinstance(cmd, str) else None
        if handle is None:
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {', '.join(sorted(HANDLERS))})",
                    "usage": True}
        try:
            result = await handle(self.vm, req)
        except ConfigError as e:  # the request, not the VM: `ctl` says so with status 2
            return {"ok": False, "error": str(e), "usage": True}
        except (VmmError, ValueError, TypeError, OverflowError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not cost the client its answer
            return {"ok": False, "error": f"internal error: {e!r}"}
        return {"ok": True, "result": result}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if self._handlers:  # let an answer in flight (destroy's) reach its client
                await asyncio.wait(list(self._handlers), timeout=1)
            for t in list(self._handlers):
                t.cancel()
            await self._server.wait_closed()
            self._server = None
        else:
            self._sock.close()
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket file if it is still ours (not a successor's after a restart)."""
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
