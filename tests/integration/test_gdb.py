"""gdb against test guests: `asyncvmm run -g PORT`, and Debian's gdb in batch mode as the
client (tests/gdb_rsp.py where gdb cannot: Ctrl-C at a chosen moment, malformed packets,
leaving mid-packet)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, needs_kvm, run_vmm
from gdb_rsp import RspClient, wait_for

pytestmark = [needs_kvm, pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (tools/setup installs it)")]

# The test guests are 32-bit ELF files; the stub describes an x86-64 target, as QEMU's
# does, so gdb is told the architecture before it reads the file.
GDB_PRELUDE = ("set architecture i386:x86-64", "set confirm off")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GuestUnderGdb:
    """`asyncvmm run` of a test guest with a gdb server; its console in a file."""

    def __init__(self, guests, tmp_path, name="gdbtarget", cmdline="delay=2000", extra=(), gdb_flag=None):
        self.elf = guests / f"{name}.elf"
        self.port = free_port()
        self.console_path = tmp_path / f"console-{self.port}.txt"
        flag = gdb_flag or ("-g", str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(self.elf), "--cmdline", cmdline,
             "-l", f"com1,{self.console_path}", "--no-reboot", *flag, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        wait_for(self._listening, 15, "the gdb server to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the VMM ended: {self.proc.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.close()
            return True
        except OSError:
            return False

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def gdb(self, *commands: str, timeout: float = 60, connect: bool = True) -> str:
        args = ["gdb", "-batch", "-nx"]
        cmds = [*GDB_PRELUDE, f"file {self.elf}"]
        if connect:
            cmds.append(f"target remote 127.0.0.1:{self.port}")
        for c in (*cmds, *commands):
            args += ["-ex", c]
        p = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")

    def rounds_printed(self) -> list[int]:
        return [int(n) for n in re.findall(r"round=(\d+)", self.console())]

    def keeps_running(self, timeout: float = 10.0) -> None:
        before = len(self.rounds_printed())
        wait_for(lambda: len(self.rounds_printed()) > before + 2, timeout, "the guest to print more rounds")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace")
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, err


def symbol(elf, name: str) -> int:
    for line in subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    raise KeyError(name)


@pytest.fixture
def vm_factory(guests, tmp_path):
    made = []

    def make(**kw):
        vm = GuestUnderGdb(guests, tmp_path, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.stop()


def test_break_registers_variable_step_detach(vm_factory):
    vm = vm_factory()
    out = vm.gdb(
        "break tick", "continue", "info registers rip eflags cs cr0", "print value", "set var value = 4242",
        "print value", "stepi", "next", "info registers rip", "delete", "detach",
    )
    assert re.search(r"Breakpoint 1, tick \(", out), out
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <tick>", out), out
    assert re.search(r"cs\s+0x8\s+8", out), out  # the test guests' flat code segment
    assert re.search(r"cr0\s+0x11\s+17", out), out  # PE|ET: 32-bit protected mode, no paging
    assert "$1 = 7" in out and "$2 = 4242" in out, out
    assert re.search(r"^\d+\s+watched = n;\n\d+\s+rounds = n \+ 1;", out, re.M), out  # stepi, then next
    assert "detached" in out, out
    # The write took effect, and the guest runs on after gdb is gone.
    wait_for(lambda: "value=4242" in vm.console(), 15, "the guest to print the new value")
    vm.keeps_running()


def test_software_breakpoint_is_invisible_and_restored(vm_factory, guests):
    vm = vm_factory()
    original = subprocess.run(["objdump", "-d", "--start-address=0x100000", str(guests / "gdbtarget.elf")],
                              capture_output=True, text=True).stdout
    assert "<tick>:" in original
    out = vm.gdb("break tick", "continue", "set breakpoint always-inserted on", "x/2bx tick", "delete",
                 "x/2bx tick", "detach")
    # gdb reads the original bytes under its own int3, inserted or not.
    first = re.findall(r"<tick>:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out)
    assert len(first) == 2 and first[0] == first[1] and first[0][0] != "0xcc", out
    vm.keeps_running()


def test_hardware_breakpoint_and_watchpoint_fire(vm_factory):
    vm = vm_factory(cmdline="delay=100")
    out = vm.gdb("watch watched", "continue", "continue", "delete", "hbreak tick", "continue",
                 "info registers rip", "delete", "detach", timeout=90)
    changes = re.findall(r"Old value = (\d+)\nNew value = (\d+)", out)
    assert len(changes) == 2, out
    for old, new in changes:
        assert int(new) == int(old) + 1, out
    assert "Hardware watchpoint 1: watched" in out, out
    assert re.search(r"Hardware assisted breakpoint 2 at 0x[0-9a-f]+", out), out
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <tick>", out), out
    vm.keeps_running()


def test_two_vcpus_are_two_threads(vm_factory):
    vm = vm_factory(name="smp", cmdline="cpus=2 stay", extra=("-c", "2"))
    wait_for(lambda: "smp: 2 cpus up" in vm.console(), 20, "the AP to come up")
    out = vm.gdb("info threads", "thread 2", "info registers rip", "thread 1", "info registers rip", "detach")
    assert re.search(r"^\*?\s+1\s+Thread 1 \(vCPU 0", out, re.M), out
    assert re.search(r"^\*?\s+2\s+Thread 2 \(vCPU 1", out, re.M), out
    assert "[Switching to thread 2 (Thread 2)]" in out, out


def test_ctrl_c_stops_a_spinning_guest_then_continue(vm_factory, guests):
    vm = vm_factory(cmdline="spin")
    wait_for(lambda: "spinning" in vm.console(), 10, "the guest to spin")
    rounds = symbol(guests / "gdbtarget.elf", "rounds")
    c = RspClient(vm.port)
    try:
        assert b"PacketSize=" in c.ask(b"qSupported:multiprocess+;swbreak+;hwbreak+")
        assert c.ask(b"QStartNoAckMode") == b"OK"
        c.no_ack = True
        assert c.ask(b"?").startswith(b"T05thread:1;")
        a = int.from_bytes(c.read_memory(rounds, 4), "little")
        time.sleep(0.2)
        assert int.from_bytes(c.read_memory(rounds, 4), "little") == a  # stopped: nothing moves
        c.send(b"vCont;c")
        time.sleep(0.5)
        c.interrupt()
        assert c.reply(timeout=10).startswith(b"T02thread:1;")
        b = int.from_bytes(c.read_memory(rounds, 4), "little")
        assert b > a
        regs = c.ask(b"g")
        assert len(regs) == 2 * 608
        c.send(b"c")
        time.sleep(0.3)
        c.interrupt()
        assert c.reply(timeout=10).startswith(b"T02")
        assert int.from_bytes(c.read_memory(rounds, 4), "little") > b
        assert c.ask(b"D") == b"OK"
    finally:
        c.close()
