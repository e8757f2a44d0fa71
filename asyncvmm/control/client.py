"""The client side of a VM's control socket: one request, one answer, then close.

    client = ControlClient("web1")            # or a socket's path
    state = client.request("state")           # the answer's "result" object
    regs = client.request("regs", vcpu=0)

Every failure is a VmmError whose message is what the user reads:
    ConfigError   the VM is not there: no socket, a stale socket (nobody listening), a name
                  that cannot be a VM's, a socket this user may not open
    VmmError      the VM is there but the command failed: its error answer, no answer in
                  time, a connection closed half-way, an answer that is not the protocol's

`list_vms()` asks every socket in run_dir() for its state; a socket nobody listens on is
listed as stale rather than skipped, so that `ctl list` shows what is left behind.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from ..errors import ConfigError, VmmError
from .protocol import MAX_LINE, NAME_RE, SOCKET_SUFFIX, check_run_dir, decode, encode, run_dir, socket_path

DEFAULT_TIMEOUT = 10.0  # seconds for one request: connect, send, answer
SNAPSHOT_TIMEOUT = 600.0  # seconds more for a snapshot's answer


class NoSuchVm(ConfigError):
    """No VM of that name runs: no socket at its path."""


class StaleSocket(NoSuchVm):
    """A socket is there but nobody listens: its VMM ended without removing it."""


class ControlClient:
    """Talks to one VM's control socket, named by the VM's name or by the socket's path."""

    def __init__(self, name_or_path: str, timeout: float = DEFAULT_TIMEOUT):
        self.by_path = os.sep in name_or_path
        if self.by_path:
            self.path = name_or_path
            base = os.path.basename(name_or_path)
            self.name = base[: -len(SOCKET_SUFFIX)] if base.endswith(SOCKET_SUFFIX) else base
        else:
            if not NAME_RE.match(name_or_path):
                raise ConfigError(
                    f"{name_or_path!r} cannot be a VM's name "
                    "(letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64)"
                )
            self.name = name_or_path
            self.path = socket_path(name_or_path)
            check_run_dir(os.path.dirname(self.path))  # a socket found by name is trusted only there
        self.timeout = timeout

    def request(self, cmd: str, /, **fields) -> dict:
        """Send {"cmd": cmd, **fields}; return the answer's result, or raise.

        The answer is awaited for the client's timeout; a destroy that gives the guest
        `timeout` seconds to power off is awaited that much longer."""
        timeout = self.timeout
        if cmd == "destroy" and not fields.get("force") and isinstance(fields.get("timeout"), (int, float)):
            timeout += fields["timeout"]
        if cmd in ("snapshot", "migrate"):  # guest RAM written out: seconds per GiB on a slow disk
            timeout += SNAPSHOT_TIMEOUT
        deadline = time.monotonic() + timeout
        sock = self._connect(timeout)
        try:
            try:
                sock.sendall(encode({"cmd": cmd, **fields}))
                line = self._read_line(sock, deadline)
            except TimeoutError:
                raise VmmError(f"VM {self.name} did not answer {cmd!r} within {timeout:g} s") from None
            except (ConnectionResetError, BrokenPipeError):
                raise VmmError(f"VM {self.name} closed the connection before answering {cmd!r}") from None
            except OSError as e:
                raise VmmError(f"VM {self.name}: {cmd!r} failed: {e.strerror or e}") from None
        finally:
            sock.close()
        try:
            answer = decode(line)
        except (ValueError, UnicodeDecodeError):
            raise VmmError(f"VM {self.name} sent an answer that is not a JSON object: {line[:80]!r}") from None
        if answer.get("ok") is True:
            result = answer.get("result", {})
            if not isinstance(result, dict):
                raise VmmError(f"VM {self.name} sent a result that is not a JSON object for {cmd!r}")
            return result
        if answer.get("ok") is False:
            if answer.get("usage") is True:  # the request, not the VM: status 2
                raise ConfigError(str(answer.get("error") or f"VM {self.name} refused {cmd!r}"))
            raise VmmError(str(answer.get("error") or f"VM {self.name} refused {cmd!r} and gave no reason"))
        raise VmmError(f"VM {self.name} sent an answer with no \"ok\": {line[:80]!r}")

    # -- the socket ----------------------------------------------------------------------
    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            if self.by_path:
                raise NoSuchVm(f"no VM is running at {self.path} (no such socket)") from None
            raise NoSuchVm(f"no VM named {self.name} is running (no socket at {self.path})") from None
        except ConnectionRefusedError:
            sock.close()
            if _is_socket(self.path):
                raise StaleSocket(f"VM {self.name} is not running (stale socket {self.path})") from None
            raise ConfigError(f"{self.path} is not a VM's control socket") from None
        except PermissionError:
            sock.close()
            raise ConfigError(f"cannot open VM {self.name}'s control socket {self.path}: permission denied") from None
        except TimeoutError:
            sock.close()
            raise VmmError(f"VM {self.name} did not accept a connection within {timeout:g} s") from None
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot connect to VM {self.name} at {self.path}: {e.strerror or e}") from None
        return sock

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            sock.settimeout(left)
            chunk = sock.recv(4096)
            if not chunk:
                if buf:
                    raise VmmError(f"VM {self.name} closed the connection in the middle of its answer")
                raise VmmError(f"VM {self.name} closed the connection without answering")
            buf += chunk
            end = buf.find(b"\n")
            if end >= 0:
                return bytes(buf[:end])
            if len(buf) > MAX_LINE:
                raise VmmError(f"VM {self.name} sent an answer longer than {MAX_LINE} bytes")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def list_vms(timeout: float = 2.0) -> list[dict]:
    """Every VM with a socket in run_dir(), sorted by name: its state result, or, for one that
    does not answer, {"name", "state": "stale" | "not answering", "error", "socket"}."""
    directory = run_dir()
    check_run_dir(directory)
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"cannot read {directory}: {e.strerror}") from None
    vms = []
    for entry in entries:
        path = os.path.join(directory, entry)
        if not entry.endswith(SOCKET_SUFFIX) or not _is_socket(path):
            continue
        client = ControlClient(path, timeout=timeout)
        try:
            state = client.request("state")
        except StaleSocket as e:
            vms.append({"name": client.name, "state": "stale", "error": str(e), "socket": path})
            continue
        except NoSuchVm:
            continue  # it ended while we looked
        except ConfigError as e:
            vms.append({"name": client.name, "state": "unreachable", "error": str(e), "socket": path})
            continue
        except VmmError as e:
            vms.append({"name": client.name, "state": "not answering", "error": str(e), "socket": path})
            continue
        state.setdefault("name", client.name)
        state["socket"] = path
        vms.append(state)
    return vms
