"""The control protocol: where a VM's socket lives and what goes over it.

One request per connection line, one answer line, both JSON objects:

    → {"cmd": "state"}
    ← {"ok": true, "result": {...}}       or  {"ok": false, "error": "what went wrong"}

An answer {"ok": false, "usage": true, ...} refuses the request itself (no such vCPU, a
value no register can hold): `ctl` exits with status 2 for it, 1 for any other error.

The commands and their fields are the table in handlers.py (HANDLERS); each one's
docstring there, and `asyncvmm ctl --help`, say what it takes and answers.
"""

from __future__ import annotations

import os
import re
import stat

from ..errors import ConfigError

SOCKET_SUFFIX = ".sock"
# A VM's name becomes a file name: keep it to what needs no quoting anywhere.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_LINE = 64 * 1024


def run_dir() -> str:
    """Where control sockets live: $ASYNCVMM_RUN_DIR, /run/asyncvmm for root, else
    $XDG_RUNTIME_DIR/asyncvmm (or /tmp/asyncvmm-UID without one)."""
    override = os.environ.get("ASYNCVMM_RUN_DIR")
    if override:
        return override
    if os.geteuid() == 0:
        return "/run/asyncvmm"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "asyncvmm") if xdg else f"/tmp/asyncvmm-{os.geteuid()}"


def check_run_dir(directory: str) -> None:
    """ConfigError unless `directory` is a real directory of this user's (or root's) that
    nobody else may write: in /tmp anyone could have made /tmp/asyncvmm-UID first, to
    catch the sockets or answer for a VM."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"control socket directory {directory}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"control socket directory {directory} is not a directory: remove it or set ASYNCVMM_RUN_DIR")
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"control socket directory {directory} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.geteuid()}): remove it or set ASYNCVMM_RUN_DIR")
    if st.st_mode & 0o022:
        raise ConfigError(f"control socket directory {directory} is writable by others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}): make it 0700 or set ASYNCVMM_RUN_DIR")


def socket_path(name: str) -> str:
    return os.path.join(run_dir(), name + SOCKET_SUFFIX)


# json is imported at the first request, not by every VM's start (~1.5 ms).
def encode(obj: dict) -> bytes:
    import json  # noqa: PLC0415

    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict:
    import json  # noqa: PLC0415

    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj
