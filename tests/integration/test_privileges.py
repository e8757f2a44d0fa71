"""A plain user in group kvm runs VMs and controls them; the control socket serves only root
and the VM's owner (SO_PEERCRED).

Two throwaway users (useradd, removed afterwards): `owner` runs the VMM, `other` is another
member of group kvm. Each VMM is `asyncvmm run` as that user (setpriv).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm
from users import as_user, needs_root_tools, throwaway_user

from asyncvmm.control.client import ControlClient
from asyncvmm.errors import VmmError

pytestmark = [needs_kvm, needs_root_tools]


@pytest.fixture(scope="module")
def owner():
    with throwaway_user("o") as u:
        yield u


@pytest.fixture(scope="module")
def other():
    with throwaway_user("p") as u:
        yield u


@pytest.fixture
def work(owner):
    """A directory others may enter, with the owner's XDG_RUNTIME_DIR (0700) in it."""
    path = Path(tempfile.mkdtemp(prefix="avmm-priv-"))
    os.chmod(path, 0o755)
    (path / "stash").mkdir()
    xdg = path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, owner.uid, owner.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_env(xdg: Path | None) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = str(xdg)
    return env


def vmm(user, work: Path, *args: str, xdg: Path | None = None) -> list[str]:
    return as_user(user, [sys.executable, "-m", "asyncvmm", *args], work / "stash")


def run_as(user, work: Path, *args: str, xdg: Path | None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(vmm(user, work, *args), env=user_env(xdg), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("asyncvmm: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def hello(guests: Path) -> tuple[str, ...]:
    return ("run", "-m", "64", "--no-reboot", "--kernel", str(guests / "hello.elf"), "--cmdline", "plain")


def test_plain_user_runs_a_guest_with_its_socket_in_xdg_runtime_dir(guests, owner, work):
    xdg = work / "xdg"
    p = subprocess.Popen(vmm(owner, work, *hello(guests)[:-2], "--cmdline", "plain", "hello1"),
                         env=user_env(xdg), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "hello from the guest" in out and "cmdline: plain" in out
    assert f"control socket {xdg}/asyncvmm/hello1.sock" in err
    st = os.stat(xdg / "asyncvmm")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner.uid, 0o700)
    assert os.listdir(xdg / "asyncvmm") == []  # the socket is gone with the VMM


def test_without_xdg_runtime_dir_the_socket_goes_to_tmp(guests, owner, work):
    fallback = Path(f"/tmp/asyncvmm-{owner.uid}")
    shutil.rmtree(fallback, ignore_errors=True)
    try:
        r = run_as(owner, work, *hello(guests), "hello2", xdg=None)
        assert r.returncode == 0, r.stderr
        assert f"control socket {fallback}/hello2.sock" in r.stderr
        st = os.lstat(fallback)
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner.uid, 0o700)
        # Someone else's directory there, or one others may write, is refused: one line, status 2.
        os.chown(fallback, 65534, 65534)
        one_line(run_as(owner, work, *hello(guests), "hello3", xdg=None), str(fallback), "belongs to uid 65534")
        one_line(run_as(owner, work, "ctl", "list", xdg=None), "belongs to uid 65534")
        os.chown(fallback, owner.uid, owner.gid)
        os.chmod(fallback, 0o777)
        one_line(run_as(owner, work, *hello(guests), "hello3", xdg=None), "writable by others", "0777")
    finally:
        shutil.rmtree(fallback, ignore_errors=True)


def test_a_new_tap_is_the_one_thing_that_needs_root(guests, owner, work):
    tap = f"avmmpt{os.getpid() % 100000}"
    r = run_as(owner, work, *hello(guests), "-s", f"3,virtio-net,{tap}", "hello4", xdg=work / "xdg")
    one_line(r, tap, "CAP_NET_ADMIN")
    assert not os.path.exists(f"/sys/class/net/{tap}")


class OwnersVm:
    """The counter guest run by `owner`, its output in a file."""

    def __init__(self, guests: Path, owner, work: Path, name: str):
        self.name = name
        self.xdg = work / "xdg"
        self.socket = self.xdg / "asyncvmm" / f"{name}.sock"
        self.log = open(work / f"{name}.out", "w+b")  # noqa: SIM115 (closed in stop)
        argv = vmm(owner, work, "run", "-m", "64", "--kernel", str(guests / "counter.elf"), "--cmdline", "delay=2000", name)
        self.proc = subprocess.Popen(argv, env=user_env(self.xdg), cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                ControlClient(str(self.socket)).request("state")  # root may
                break
            except VmmError:
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.1)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self.log.close()


def test_ctl_serves_the_owner_and_root_and_refuses_other_users(guests, owner, other, work):
    vm = OwnersVm(guests, owner, work, "ownedvm")
    try:
        # The owner finds the VM by name, as `ctl` finds every VM: in its own run directory.
        r = run_as(owner, work, "ctl", "list", xdg=vm.xdg)
        assert r.returncode == 0 and "ownedvm" in r.stdout and "running" in r.stdout, r.stderr
        r = run_as(owner, work, "ctl", "state", "ownedvm", xdg=vm.xdg)
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        # Another user cannot even reach the socket (0700 directory, 0600 socket) ...
        r = run_as(other, work, "ctl", "state", str(vm.socket), xdg=None)
        one_line(r, "permission denied")
        # ... and with the modes opened by mistake, the peer check still refuses it.
        os.chmod(vm.xdg, 0o711)
        os.chmod(vm.xdg / "asyncvmm", 0o711)
        os.chmod(vm.socket, 0o666)
        r = run_as(other, work, "ctl", "state", str(vm.socket), xdg=None)
        line = one_line(r, f"uid {other.uid} may not control VM ownedvm", f"owner, uid {owner.uid}")
        assert r.stdout == "", r.stdout
        assert "Traceback" not in r.stderr, line
        r = run_as(other, work, "ctl", "destroy", "--force", str(vm.socket), xdg=None)
        assert r.returncode == 2
        # root may; and the VM was never touched by the refused requests.
        assert ControlClient(str(vm.socket)).request("state")["state"] == "running"
        r = run_as(owner, work, "ctl", "destroy", "--force", "ownedvm", xdg=vm.xdg)
        assert r.returncode == 0, r.stderr
        assert vm.proc.wait(30) != 0  # stopped from the host
        assert not vm.socket.exists()
    finally:
        vm.stop()
