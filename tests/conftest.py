"""Shared fixtures: the test guests (built with gcc by make), and running the VMM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS_SRC = ROOT / "tests" / "guests"
GUESTS_OUT = ROOT / "build" / "guests"


def have_kvm() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def thread_names() -> dict[int, str]:
    """This process's threads: id -> name (the C core names its threads: vcpuN, blk..., net...)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except FileNotFoundError:  # it ended meanwhile
            pass
    return out


def threads_named(prefix: str) -> list[str]:
    return [name for name in thread_names().values() if name.startswith(prefix)]


def vcpu_threads() -> int:
    """vCPU threads of this process."""
    return len(threads_named("vcpu"))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def warm_up_process(guests: Path, name: str) -> None:
    """Run the hello guest to its end once, so the fds and threads a process keeps once it
    has run a VM (the default executor, libuv's) exist before a leak check counts them."""
    from asyncvmm import VM, VmConfig  # noqa: PLC0415

    async with VM(VmConfig(name=name, memory=64 << 20, kernel=str(guests / "hello.elf"), no_reboot=True)) as vm:
        await vm.wait()


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_kvm = pytest.mark.skipif(not have_kvm(), reason="needs read/write access to /dev/kvm")


@pytest.fixture(scope="session", autouse=True)
def private_run_dir(tmp_path_factory):
    """Control sockets of the VMs tests start go to a directory of the test run's own."""
    path = tmp_path_factory.mktemp("run")
    old = os.environ.get("ASYNCVMM_RUN_DIR")
    os.environ["ASYNCVMM_RUN_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["ASYNCVMM_RUN_DIR"]
    else:
        os.environ["ASYNCVMM_RUN_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def vmm_messages_on_stderr():
    """The VMM's messages (the logging module's, under "asyncvmm") printed as `asyncvmm run`
    prints them, for the VMs tests start in this process: a failure shows them, and tests
    read them from stderr."""
    from asyncvmm import log

    log.use_cli_output()


@pytest.fixture(scope="session")
def guests() -> Path:
    """The directory of built test guests (make is incremental, so this is quick)."""
    subprocess.run(["make", "-s", "-C", str(GUESTS_SRC), f"OUT={GUESTS_OUT}"], check=True)
    return GUESTS_OUT


@pytest.fixture(scope="session")
def emulating_kvm() -> bool:
    from asyncvmm.vstate.probe import probe

    return probe().emulating


@dataclass
class Result:
    status: int
    out: str
    err: str


def run_vmm(*args: str, input: bytes | None = None, timeout: float = 30, env=None) -> Result:
    """`asyncvmm ARGS...` in a subprocess; its status, stdout and stderr."""
    p = subprocess.run(
        [sys.executable, "-m", "asyncvmm", *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


@pytest.fixture
def mem():
    """64 MiB of guest RAM with no VM: what loaders and models write into."""
    from asyncvmm.vstate.memory import GuestMemory

    m = GuestMemory(64 << 20)
    yield m
    m.close()
