"""The fast tier: boot the freestanding test guests with `asyncvmm run` and check what
they printed and how the VMM ended."""

from __future__ import annotations

import datetime as dt
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, needs_kvm, run_vmm

pytestmark = needs_kvm


def boot(guests, name, *extra, cmdline="", input=None, timeout=30):
    return run_vmm(
        "run", "-m", "64", "--kernel", str(guests / f"{name}.elf"), "--cmdline", cmdline, "--no-reboot", *extra,
        input=input, timeout=timeout,
    )


def test_hello_prints_and_resets_cleanly(guests):
    r = boot(guests, "hello", cmdline="console=ttyS0 hello=world")
    assert r.status == 0, r.err
    assert "hello from the guest\n" in r.out
    assert "cmdline: console=ttyS0 hello=world\n" in r.out
    assert "guest reset through the i8042 reset line" in r.err
    assert "through its PVH entry" in r.err


def test_pvh_guest_not_from_tests(guests):
    # tools/examples/hello-pvh.S: plain assembly, its own Xen note, built by tools/setup.
    r = boot(guests, "hello-pvh")
    assert r.status == 0, r.err
    assert "Hello from a PVH guest that is not from tests/" in r.out


def test_log_names_the_kvm_and_cpu_template(guests, emulating_kvm):
    r = boot(guests, "hello")
    expected = "baseline (chosen by probing KVM)" if emulating_kvm else "host (chosen by probing KVM)"
    assert f"CPU template {expected}" in r.err
    r = boot(guests, "hello", "--cpu", "host")
    assert "CPU template host;" in r.err or r.err.count("CPU template host") == 1


def test_cmos_clock_reads_host_time(guests):
    r = boot(guests, "cmos")
    assert r.status == 0, r.err
    m = re.search(r"rtc: (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)", r.out)
    assert m, r.out
    guest = dt.datetime(*map(int, m.groups()), tzinfo=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    assert abs((now - guest).total_seconds()) < 60


def test_reset_restarts_the_guest_without_no_reboot(guests):
    p = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "hello.elf")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"hello from the guest") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], 1)
            if ready:
                seen += os.read(p.stdout.fileno(), 4096)
        assert seen.count(b"hello from the guest") >= 3
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 4
    assert b"restarting the guest" in err
    assert b"stopped by SIGTERM" in err


def test_bzimage_through_the_64bit_boot_protocol(guests, tmp_path):
    """tests/guests/bzimage: a synthetic bzImage whose 64-bit entry reads boot_params."""
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"RDSK" + bytes(100))
    r = run_vmm(
        "run", "-m", "128", "--kernel", str(guests / "bzimage64.bin"), "--initrd", str(initrd),
        "--cmdline", "console=ttyS0 bz=1", "--no-reboot",
    )
    assert r.status == 0, r.err
    assert "through the Linux 64-bit boot protocol" in r.err
    assert "BAD" not in r.out
    for line in (
        "bzimage64: long mode entry ok",
        "bzimage64: cmdline=console=ttyS0 bz=1",
        "bzimage64: e820 entries=3",
        f"bzimage64: ram={639 + 127 * 1024} KiB",
        "bzimage64: initrd size=104",
        "bzimage64: initrd starts RDSK",
        "bzimage64: paging+lma ok",
    ):
        assert line + "\n" in r.out, r.out


def test_bzimage_with_ram_above_4g(guests):
    r = run_vmm("run", "-m", "5G", "--kernel", str(guests / "bzimage64.bin"), "--no-reboot")
    assert r.status == 0, r.err
    assert "bzimage64: e820 entries=4" in r.out
    assert f"bzimage64: ram={5 * 1024 * 1024 - 1024 + 639} KiB" in r.out


def test_triple_fault_stops_with_its_status(guests):
    r = boot(guests, "triple")
    assert "triple fault next" in r.out
    assert r.status == 3
    assert re.search(r"vCPU 0: triple fault at RIP 0x[0-9a-f]+", r.err)
    assert "survived" not in r.out
    assert "Traceback" not in r.err


def test_int3_reaches_the_guest_as_a_breakpoint(guests):
    r = boot(guests, "int3")
    assert r.status == 0, r.err
    assert "int3 handled, eip=" in r.out
    assert "int3 eip ok" in r.out


def test_emulation_failure_stops_with_one_line(guests, emulating_kvm):
    r = boot(guests, "emufail")
    assert "emufail next" in r.out
    if not emulating_kvm:  # hardware runs popcnt
        assert r.status == 0 and "popcnt ran" in r.out
        return
    assert r.status == 1
    lines = [line for line in r.err.splitlines() if "emulation failure" in line]
    assert len(lines) == 1, r.err
    assert re.search(r"vCPU 0: emulation failure at RIP 0x[0-9a-f]+: f3 0f b8 c0 \(popcnt eax, eax\)$", lines[0]), lines[0]
    assert "popcnt ran" not in r.out


def test_int3_without_quirks_is_an_emulation_failure(guests, emulating_kvm):
    if not emulating_kvm:
        pytest.skip("int3 runs natively on hardware KVM")
    r = boot(guests, "int3", "--no-quirks")
    assert r.status == 1
    assert re.search(r"emulation failure at RIP 0x[0-9a-f]+: cc \(int3\)", r.err), r.err


def test_fwait_runs_as_on_a_cpu(guests):
    r = boot(guests, "fwait")
    assert r.status == 0, r.err
    assert "fwait next\nfwait ok\n" in r.out


def test_fpu_control_instructions_run_as_on_a_cpu(guests):
    """fpuctl reads back what each x87/SSE control instruction set, through several
    addressing forms, and checks the #NM and #GP(0) a CPU raises instead."""
    r = boot(guests, "fpuctl")
    assert r.status == 0, r.err
    assert "BAD" not in r.out and "fpuctl done\n" in r.out, r.out
    for check in ("fldcw disp32", "fldcw sib", "fldcw addr16", "fldcw fs", "fnstsw", "fnstsw ax", "ldmxcsr",
                  "ldmxcsr reserved #GP", "ldmxcsr #GP error code", "fldcw with TS #NM", "fldcw after #NM"):
        assert f"{check} ok\n" in r.out, r.out


def test_fldcw_without_quirks_is_an_emulation_failure(guests, emulating_kvm):
    if not emulating_kvm:
        pytest.skip("fldcw runs natively on hardware KVM")
    r = boot(guests, "fpuctl", "--no-quirks")
    assert r.status == 1
    assert re.search(r"emulation failure at RIP 0x[0-9a-f]+: d9 2d( [0-9a-f]{2}){4} \(fldcw", r.err), r.err
    assert "fldcw disp32" not in r.out


@pytest.mark.parametrize("cpus", [2, 4])
def test_application_processors_start_and_run(guests, cpus):
    """The BSP wakes the others with INIT/SIPI through the in-kernel LAPIC; each vCPU
    thread then runs guest code and prints."""
    r = run_vmm(
        "run", "-c", str(cpus), "-m", "64", "--kernel", str(guests / "smp.elf"), "--cmdline", f"cpus={cpus}",
        "--no-reboot",
    )
    assert r.status == 0, r.err
    for ap in range(1, cpus):
        assert f"ap {ap} up\n" in r.out
    assert f"smp: {cpus} cpus up\n" in r.out


def test_console_input_reaches_the_guest(guests):
    r = boot(guests, "echo", input=b"hello worldq")
    assert r.status == 0, r.err
    assert "echo ready" in r.out
    assert "HELLO WORLD" in r.out
    assert "bye" in r.out


def test_uart_interrupt_through_the_ioapic(guests):
    # The guest waits in hlt for IRQ 4 (IOAPIC pin 4 → LAPIC): the UART's receive
    # interrupt must travel the irqfd for it to see "ping".
    r = boot(guests, "uartirq", input=b"ping")
    assert r.status == 0, r.err
    assert "irq ready" in r.out
    assert re.search(r"irq got ping after \d+ interrupts", r.out), r.out


def test_console_to_a_file(guests, tmp_path):
    log = tmp_path / "console.log"
    r = boot(guests, "hello", "-l", f"com1,{log}", cmdline="to a file")
    assert r.status == 0, r.err
    assert r.out == ""
    assert "cmdline: to a file" in log.read_text()


def test_console_to_a_unix_socket(guests, tmp_path):
    import socket

    path = tmp_path / "com1.sock"
    p = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "echo.elf"),
         "--no-reboot", "-l", f"com1,socket={path}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(10)
        got = b""
        while b"echo ready" not in got:
            got += s.recv(4096)
        s.sendall(b"abcq")
        while b"bye" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert b"ABC" in got
    assert p.returncode == 0
    assert not path.exists()  # the socket is removed on exit


def test_terminal_raw_mode_escape_and_restore(guests):
    """On a terminal: raw mode while the guest runs, Ctrl-A x quits, the mode comes back."""
    import pty
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "counter.elf")],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        got = b""
        deadline = time.monotonic() + 20
        while b"tick 3" not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                got += os.read(master, 4096)
        assert b"tick 3" in got
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO  # raw
        assert b"\r\n" in got  # raw mode: the VMM adds the CR the terminal no longer does
        for keys, answer in ((b"\x01h", b"C-a x    exit"), (b"\x01c", b"no monitor on this console")):
            os.write(master, keys)  # as QEMU's Ctrl-A h: the escape keys, on a line of their own
            got = b""
            while answer not in got and time.monotonic() < deadline:
                if select.select([master], [], [], 1)[0]:
                    got += os.read(master, 4096)
            assert answer in got, got
            assert re.search(rb"(^|\r\n)" + re.escape(answer), got), got
        os.write(master, b"\x01x")
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    after = termios.tcgetattr(slave)
    os.close(master)
    os.close(slave)
    assert p.returncode == 4
    assert b"quit from the console" in p.stderr.read()
    assert after == before


def test_the_quit_message_starts_a_line(guests):
    """Ctrl-A x after a prompt (no newline): the VMM's last word is on a line of its own."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "tinysh.elf")],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
    )
    got = b""
    try:
        deadline = time.monotonic() + 20
        while not got.endswith(b"# ") and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                got += os.read(master, 4096)
        assert got.endswith(b"# "), got
        os.write(master, b"\x01x")
        p.wait(timeout=10)
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)
    assert p.returncode == 4
    assert b"# \r\nasyncvmm: quit from the console" in got, got[-200:]
