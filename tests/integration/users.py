"""Throwaway users for the privilege tests, and running a command as one of them.

`throwaway_user()` makes a user (in group kvm when asked) with `useradd` and removes it with
`userdel` afterwards. `as_user(user, argv)` is the command line that runs argv as that user
with `setpriv` (its own groups from /etc/group). The interpreter the tests run may live
below a directory only root may enter (pyenv in /root here): then the command first makes
a private mount namespace in which that directory is a tmpfs holding just the interpreter,
so the user runs the same Python and the same .venv; nothing outside that namespace changes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class User:
    name: str
    uid: int
    gid: int


def can_make_users() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("useradd", "userdel", "setpriv", "unshare"))


needs_root_tools = pytest.mark.skipif(not can_make_users(), reason="needs root with useradd, setpriv and unshare")


@contextlib.contextmanager
def throwaway_user(tag: str, groups: tuple[str, ...] = ("kvm",)):
    name = f"avt{tag}{os.getpid()}"[:31]
    argv = ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--user-group"]
    if groups:
        argv += ["--groups", ",".join(groups)]
    subprocess.run([*argv, name], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _hidden_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that others may not enter, if any."""
    parts = Path(path).resolve().parts
    for i in range(2, len(parts)):
        d = Path(*parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return str(d)
    return None


def as_user(user: User, argv: list[str], stash: Path) -> list[str]:
    """`argv` as `user`; `stash` is an empty directory of the test's to move a mount through."""
    drop = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]
    prefix = os.path.realpath(sys.base_prefix)
    hidden = _hidden_ancestor(prefix)
    if hidden is None:
        return [*drop, *argv]
    script = (
        'set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755 avmm-test "$3"; '
        'mkdir -p "$1"; mount --move "$2" "$1"; shift 3; exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            prefix, str(stash), hidden, *drop, *argv]
