"""The slow tier's one Linux boot: CI may boot Linux at most twice in all, so the checks
that need a Linux kernel share a single boot of the small kernel (the session fixture
`linux_boot`, made a fixture of every test by tests/conftest.py).

What that boot does is described here: `asyncvmm run` flags and kernel parameters, then
steps run in order once the kernel has started its init (it stays up: the init never
makes a system call), then SysRq b resets it and the VMM ends (--no-reboot). Each
issue's checks add their flags (devices), parameters and steps to the lists below and
read what the boot recorded (`LinuxBoot`) in their tests; a step's failure is kept and
reported by the test that reads it, and the boot goes on with the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import os

import pytest

from linux_guest import GuestError, LinuxGuest, small_kernel, spin_initramfs

BOOT_TIMEOUT = 900  # seconds to "Run /init": ~60 s here alone, more on a loaded machine
INIT_PATTERN = r"Run /init as init process"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[LinuxGuest], object]  # what it returns is kept in LinuxBoot.steps


def sysrq_help(g: LinuxGuest) -> str:
    """SysRq h over the serial console, after init: the kernel prints its key list."""
    g.sysrq("h")
    return g.wait_for(r"sysrq: HELP : .*", timeout=120).group(0)


def sysrq_timers(g: LinuxGuest) -> str:
    """SysRq q: the clock event devices; returns the lines from its header to the end."""
    g.sysrq("q")
    g.wait_for(r"sysrq: Show clockevent devices", timeout=120)
    g.wait_for(r"Wakeup Device", timeout=120)
    text = g.console_text(timestamps=False)
    return text[text.rfind("sysrq: Show clockevent devices"):]


# -- the boot: each issue adds to these -------------------------------------------------
LINUX_BOOT_CMDLINE = "console=ttyS0 panic=-1"
LINUX_BOOT_FLAGS: list[str] = ["--profile-rip", "5"]
LINUX_BOOT_STEPS: list[Step] = [
    Step("sysrq-help", sysrq_help),
    Step("sysrq-timers", sysrq_timers),
]


@dataclass
class LinuxBoot:
    guest: LinuxGuest
    init_at: float | None = None  # seconds from start to the init line
    error: str = ""  # why the boot did not reach init
    steps: dict[str, object] = field(default_factory=dict)  # name -> result, or the exception
    reset_seen: bool = False
    status: int | None = None

    def need_init(self) -> None:
        if self.init_at is None:
            pytest.fail(f"the kernel did not reach init: {self.error}")

    def step(self, name: str):
        """A step's result; fails the calling test with the step's own error."""
        self.need_init()
        result = self.steps.get(name)
        if isinstance(result, BaseException):
            pytest.fail(f"step {name} failed: {result}")
        return result


@pytest.fixture(scope="session")
def linux_boot() -> LinuxBoot:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs read/write access to /dev/kvm")
    kernel = small_kernel()
    initrd = spin_initramfs()
    guest = LinuxGuest(kernel / "bzImage", initrd=initrd, cmdline=LINUX_BOOT_CMDLINE, flags=tuple(LINUX_BOOT_FLAGS),
                       name=f"slow-linux-{int(time.time())}")
    boot = LinuxBoot(guest)
    with guest:
        try:
            guest.wait_for(INIT_PATTERN, timeout=BOOT_TIMEOUT)
            boot.init_at = guest.when(INIT_PATTERN)
        except GuestError as e:
            boot.error = str(e)
        if boot.init_at is not None:
            for step in LINUX_BOOT_STEPS:
                try:
                    boot.steps[step.name] = step.run(guest)
                except Exception as e:  # kept for the test that reads it
                    boot.steps[step.name] = e
            try:
                guest.sysrq("b")
                guest.wait_for(r"sysrq: Resetting", timeout=120)
                boot.reset_seen = True
                boot.status = guest.wait_exit(120)
            except GuestError as e:
                boot.steps["reset"] = e
    boot.status = guest.status
    return boot
