"""Guests in the background for tests: find or build the small kernel and the spinning
initramfs (tools/kernel, cached), run any guest with `asyncvmm run`, keep a timestamped
transcript, wait for patterns, send SysRq through `asyncvmm ctl`.

    kernel = small_kernel()                          # tools/kernel/build-small-kernel, cached
    with LinuxGuest(kernel / "bzImage", initrd=spin_initramfs(), cmdline="console=ttyS0") as g:
        g.wait_for(rb"Run /init as init process", timeout=600)
        g.sysrq("h")
        g.wait_for(rb"sysrq: HELP")
        g.sysrq("b")                                 # the kernel resets; --no-reboot ends the VMM
        assert g.wait_exit(60) == 0

Boots cost a minute or more on an emulating KVM and CI may boot Linux at most twice: the
slow tier's one VM run (tests/integration/test_linux.py) takes its kernel and initramfs
from here; the fast tier runs test guests with LinuxGuest. The guest's console is the
VMM's stdout (a pipe), its log the VMM's stderr; both are read by threads into `console`
and `log` as (seconds since start, line).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from asyncvmm.console import CONTROL_SEQUENCE

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TOOLS = ROOT / "tools" / "kernel"
PRINTK_TIME = re.compile(r"^\[\s*\d+\.\d+\] ?")
CSI = re.compile(CONTROL_SEQUENCE.pattern.decode())  # on the decoded lines
BUILD_TIMEOUT = 45 * 60  # a first build of the small kernel: 4-11 minutes on 2 cores


class GuestError(AssertionError):
    """A wait that failed: the message carries the end of the transcript."""


def _tool(name: str, timeout: float) -> Path:
    """Run a tools/kernel builder (cached: seconds when built); its last stdout line is
    the result's directory. Its progress lines go to our stderr."""
    p = subprocess.run(
        [str(KERNEL_TOOLS / name)], stdout=subprocess.PIPE, stderr=None, timeout=timeout, text=True, cwd=ROOT
    )
    if p.returncode != 0:
        raise RuntimeError(f"tools/kernel/{name} failed with status {p.returncode} (its log is above)")
    return Path(p.stdout.strip().splitlines()[-1])


def small_kernel() -> Path:
    """The small kernel's cache directory (bzImage, vmlinux, System.map, config)."""
    return _tool("build-small-kernel", BUILD_TIMEOUT)


def debian_disk_image() -> Path:
    """tools/images/build-disk-image's disk (GPT, ESP, ext4 root with the small kernel in
    /boot, GRUB for BIOS and UEFI, grub.cfg from grub-mkconfig): cached, seconds to build."""
    p = subprocess.run([str(ROOT / "tools" / "images" / "build-disk-image")], stdout=subprocess.PIPE,
                       stderr=None, timeout=BUILD_TIMEOUT, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"tools/images/build-disk-image failed with status {p.returncode} (its log is above)")
    return Path(p.stdout.strip().splitlines()[-1]) / "disk.img"


def spin_initramfs() -> Path:
    """An initramfs whose /init never makes a system call (tools/kernel/spin-init.S)."""
    return _tool("build-spin-initramfs", 120) / "initramfs.cpio.gz"


def seccomp_modes(pid: int | str = "self") -> dict[str, str]:
    """`pid`'s threads, "comm/tid" → the Seccomp field of their /proc status (0 none, 2 filtered).
    Kernel workers in the thread group (KVM's kvm-nx-lpage-recovery) are left out."""
    modes = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                mode = re.search(r"^Seccomp:\s+(\d)", f.read(), re.M).group(1)
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if not comm.startswith("kvm-"):
            modes[f"{comm}/{tid}"] = mode
    return modes


def unfiltered_vcpus() -> list[str]:
    """This process's vCPU threads without a seccomp filter, when the default mode asks
    for one (an in-process VM's vCPU threads carry the vCPU filter: asyncvmm/seccomp.py)."""
    from asyncvmm import seccomp  # noqa: PLC0415

    if seccomp.default_mode() == "off":
        return []
    modes = seccomp_modes()
    return [t for t, m in modes.items() if t.startswith("vcpu") and m != "2"] or (
        [] if any(t.startswith("vcpu") for t in modes) else ["no vCPU thread"])


class LinuxGuest:
    """`asyncvmm run` of a Linux kernel in the background. See the module docstring."""

    def __init__(self, kernel: Path | str | None, *, initrd: Path | str | None = None, cmdline: str = "console=ttyS0",
                 memory: str = "256M", flags: tuple[str, ...] = (), name: str | None = None):
        self.name = name or f"linux-{os.getpid()}"
        self.args = ["run", "-m", memory, "--no-reboot"]
        if kernel is not None:  # None: the flags name a firmware (-l bootrom,FILE)
            self.args += ["--kernel", str(kernel), "--cmdline", cmdline]
        if initrd is not None:
            self.args += ["--initrd", str(initrd)]
        self.args += [*flags, self.name]
        self.console: list[tuple[float, str]] = []
        self.log: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._positions = {"console": 0, "log": 0}  # where the next wait_for starts
        self.started = 0.0
        self.status: int | None = None

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> "LinuxGuest":
        self.started = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "asyncvmm", *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )
        for stream, lines in ((self._proc.stdout, self.console), (self._proc.stderr, self.log)):
            t = threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __enter__(self) -> "LinuxGuest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """End the VMM if it still runs (SIGTERM, then SIGKILL) and join the readers."""
        p = self._proc
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdin:
            p.stdin.close()
        for t in self._threads:
            t.join(5)
        self.status = p.returncode

    def _read(self, stream, lines: list) -> None:
        partial = b""
        for chunk in iter(lambda: stream.read1(65536), b""):
            now = time.monotonic() - self.started
            partial += chunk
            *complete, partial = partial.split(b"\n")
            with self._cond:
                lines.extend((now, line.decode(errors="replace").rstrip("\r")) for line in complete)
                self._cond.notify_all()
        with self._cond:
            if partial:
                lines.append((time.monotonic() - self.started, partial.decode(errors="replace")))
            self._cond.notify_all()
        stream.close()

    # -- waiting --------------------------------------------------------------------------
    def wait_for(self, pattern: bytes | str, timeout: float = 60, *, stream: str = "console") -> re.Match:
        """The first line (after the last match in that stream) that matches `pattern`;
        GuestError with the transcript's end if the VMM ends or `timeout` passes first."""
        rx = re.compile(pattern.decode() if isinstance(pattern, bytes) else pattern)
        lines = self.console if stream == "console" else self.log
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._positions[stream] < len(lines):
                    t, line = lines[self._positions[stream]]
                    self._positions[stream] += 1
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if self._proc.poll() is not None and all(not t.is_alive() for t in self._threads):
                    raise GuestError(f"the VMM ended (status {self._proc.returncode}) before {rx.pattern!r}\n{self.tail()}")
                if left <= 0:
                    raise GuestError(f"{rx.pattern!r} not seen within {timeout:g} s\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def wait_for_text(self, pattern: bytes | str, timeout: float = 60) -> re.Match:
        """`pattern` searched in the whole console so far, lines joined and terminal control
        sequences taken out: for a firmware's and a bootloader's output, whose marks may
        share a line, and where GRUB puts cursor moves in the middle of a word (its file
        progress indicator, drawn on a timer, wrote "Loading Linu\\e[03;12H\\e[03;13Hx" on a
        loaded machine)."""
        rx = re.compile(pattern.decode() if isinstance(pattern, bytes) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(CSI.sub("", "\n".join(line for _, line in self.console)))
                if m:
                    return m
                if self._proc.poll() is not None and all(not t.is_alive() for t in self._threads):
                    raise GuestError(f"the VMM ended (status {self._proc.returncode}) before {rx.pattern!r}\n{self.tail()}")
                if time.monotonic() >= deadline:
                    raise GuestError(f"{rx.pattern!r} not seen within {timeout:g} s\n{self.tail()}")
                self._cond.wait(1.0)

    def when(self, pattern: str, stream: str = "console") -> float | None:
        """Seconds since start of the first line matching `pattern`, or None."""
        rx = re.compile(pattern)
        with self._cond:
            return next((t for t, line in (self.console if stream == "console" else self.log) if rx.search(line)), None)

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the VMM did not end within {timeout:g} s\n{self.tail()}") from None
        for t in self._threads:
            t.join(10)
        self.status = self._proc.returncode
        return self.status

    # -- talking to it ----------------------------------------------------------------------
    def sysrq(self, key: str) -> str:
        """`asyncvmm ctl sysrq NAME KEY`: a break on COM1, then the key."""
        p = subprocess.run([sys.executable, "-m", "asyncvmm", "ctl", "sysrq", self.name, key],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        if p.returncode != 0:
            raise GuestError(f"ctl sysrq {key} failed ({p.returncode}): {p.stderr.strip()}\n{self.tail()}")
        return p.stdout.strip()

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "asyncvmm", "ctl", *args, self.name],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)

    def state_of_a_hang(self) -> str:
        """What a guest that stopped making progress is doing, while its VMM still runs: its
        vCPU registers and the VMM's counters (`asyncvmm ctl regs`, `asyncvmm ctl stats`), for
        the message of a step that timed out."""
        if self._proc.poll() is not None:
            return "(the VMM has ended)"
        out = []
        for cmd in ("regs", "stats"):
            try:
                p = self.ctl(cmd)
                out.append(f"--- asyncvmm ctl {cmd} ---\n{(p.stdout or p.stderr).strip()}")
            except subprocess.TimeoutExpired:
                out.append(f"--- asyncvmm ctl {cmd}: no answer within 30 s ---")
        return "\n".join(out)

    # -- transcripts --------------------------------------------------------------------------
    def console_text(self, timestamps: bool = True) -> str:
        """The console so far; without the kernel's printk timestamps if asked (a message
        printed in pieces, as SysRq's are, then reads as it was meant)."""
        with self._cond:
            lines = [line for _, line in self.console]
        if not timestamps:
            lines = [PRINTK_TIME.sub("", line) for line in lines]
        return "\n".join(lines)

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.log)

    @property
    def pid(self) -> int:
        """The VMM's process ID (start() first)."""
        return self._proc.pid

    def seccomp_modes(self) -> dict[str, str]:
        """Each thread of the running VMM: its name (vcpuN, python...) and tid → its seccomp
        mode (/proc: 0 none, 2 filtered)."""
        return seccomp_modes(self._proc.pid)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            console = [f"{t:8.2f} | {line}" for t, line in self.console[-n:]]
            log = [f"{t:8.2f} | {line}" for t, line in self.log[-15:]]
        return "--- console (last lines) ---\n" + "\n".join(console) + "\n--- VMM log ---\n" + "\n".join(log)
