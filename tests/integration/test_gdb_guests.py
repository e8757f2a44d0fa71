"""gdb against test guests: `asyncvmm run -g PORT`, and Debian's gdb in batch mode as the
client (tests/gdb_rsp.py where gdb cannot: Ctrl-C at a chosen moment, malformed packets,
leaving mid-packet)."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, free_port, needs_kvm, run_vmm
from gdb_rsp import RspClient, wait_for

pytestmark = [needs_kvm, pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (tools/setup installs it)")]

# The test guests are 32-bit ELF files; the stub describes an x86-64 target, as QEMU's
# does, so gdb is told the architecture before it reads the file.
GDB_PRELUDE = ("set architecture i386:x86-64", "set confirm off")


class GuestUnderGdb:
    """`asyncvmm run` of a test guest with a gdb server; its console in a file."""

    def __init__(self, guests, tmp_path, name="gdbtarget", cmdline="delay=2000", extra=(), gdb_flag=None, port=None):
        self.elf = guests / f"{name}.elf"
        self.port = port or free_port()
        self.console_path = tmp_path / f"console-{self.port}.txt"
        flag = gdb_flag or ("-g", str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(self.elf), "--cmdline", cmdline,
             "-l", f"com1,{self.console_path}", "--no-reboot", *flag, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        try:
            wait_for(self._listening, 15, "the gdb server to listen")
        except BaseException:
            self.stop()  # never leave a VMM behind
            raise

    def _listening(self) -> bool:
        """A listening socket on the port (looked up in /proc/net/tcp: a connection
        would be a gdb client, and stop the guest)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the VMM ended: {self.proc.stderr.read().decode()}")
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.split(":")[1], 16) == self.port and state == "0A":  # TCP_LISTEN
                    return True
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

    def keeps_running(self, timeout: float = 30.0) -> None:
        before = len(self.rounds_printed())
        wait_for(lambda: len(self.rounds_printed()) > before + 2, timeout, "the guest to print more rounds")

    def stop(self) -> tuple[int, str]:
        if self.proc.stderr.closed:
            return self.proc.returncode, ""
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


def read_until(p: subprocess.Popen, marker: bytes, timeout: float = 30.0) -> bytes:
    """A child's stdout until `marker` (or the timeout, or its end)."""
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(p.stdout.fileno(), 4096) if ready else b""
        if ready and not chunk:
            break
        out += chunk
    return out


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
        "break tick", "continue", "info registers rip eflags cs cr0 mxcsr fctrl", "print value", "set var value = 4242",
        "print value", "stepi", "next", "info registers rip", "delete",
        # A register write reaches the vCPU before it runs again: step from a RIP set by hand.
        "x/2i tick", "set $pc = tick", "stepi", "info registers rip", "detach",
    )
    assert re.search(r"Breakpoint 1, tick \(", out), out
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <tick>", out), out
    assert re.search(r"cs\s+0x8\s+8", out), out  # the test guests' flat code segment
    assert re.search(r"cr0\s+0x11\s+17", out), out  # PE|ET: 32-bit protected mode, no paging
    assert "$1 = 7" in out and "$2 = 4242" in out, out
    assert re.search(r"^\d+\s+watched = n;\n\d+\s+rounds = n \+ 1;", out, re.M), out  # stepi, then next
    assert re.search(r"mxcsr\s+0x[0-9a-f]+\s+\[", out) and re.search(r"fctrl\s+0x37f", out), out  # x87 at reset
    second = re.findall(r"^\s+(0x[0-9a-f]+) <tick\+(\d+)>:", out, re.M)
    assert second, out
    assert re.search(rf"rip\s+{second[0][0]}\s+{second[0][0]} <tick\+{second[0][1]}>\n\[Inferior", out), out
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


def test_wait_flag_holds_the_guest_until_gdb_continues(vm_factory):
    port = free_port()
    vm = vm_factory(gdb_flag=("-G", f"w127.0.0.1:{port}"), port=port)
    time.sleep(1.0)
    assert vm.console() == "", "the guest ran before gdb came"
    out = vm.gdb("info registers rip", "break tick", "continue", "delete", "detach")
    assert "Breakpoint 1, tick (" in out, out
    # Before the first instruction: RIP was the PVH entry point, _start.
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <_start>", out), out
    wait_for(lambda: "gdbtarget ready" in vm.console(), 10, "the guest to start")
    vm.keeps_running()


@pytest.mark.parametrize("mode", ["32", "pae"])
def test_memory_by_virtual_address_under_paging(vm_factory, guests, mode, emulating_kvm):
    if emulating_kvm:
        # Measured on kvm_pvm (2026-12-03): a 32-bit guest's CR0.PG does not stick (gdb reads
        # CR0 0x11 after the guest set it) and loads through its new mappings read all ones.
        # The walks of every mode are checked in tests/unit/test_gdb_protocol.py, 4-level live in the
        # slow tier's Linux run.
        pytest.skip("this KVM does not run 32-bit guests with paging on")
    vm = vm_factory(cmdline=f"delay=2000 paging={mode}")
    wait_for(lambda: "value=" in vm.console(), 10, "the guest to print")
    alias = 0x4000_0000 + (symbol(guests / "gdbtarget.elf", "value") & 0xFFF)
    out = vm.gdb("print value", f"x/wd {alias:#x}", f"set var *(unsigned int *){alias:#x} = 515",
                 "print value", "info registers cr0 cr3 cr4", "x/wx 0x7ff00000", "detach")
    assert "$1 = 7" in out, out
    assert re.search(rf"{alias:#x}:\s+7\b", out), out  # the same variable through its alias mapping
    assert "$2 = 515" in out, out  # written through the alias
    assert re.search(r"cr0\s+0x800000(11|13|31|33)", out), out  # PG on
    pae = int(re.search(r"cr4\s+(0x[0-9a-f]+)", out).group(1), 16) & 0x20
    assert bool(pae) == (mode == "pae"), out
    assert "Cannot access memory at address 0x7ff00000" in out, out  # not mapped
    wait_for(lambda: "value=515" in vm.console(), 10, "the guest to print the written value")


def test_rom_and_mmio_writes_are_refused(vm_factory):
    vm = vm_factory()
    c = RspClient(vm.port)
    try:
        assert c.ask(b"?").startswith(b"T05")
        acpi = c.read_memory(0xE0000, 8)
        assert acpi == b"RSD PTR "  # the RSDP, in the BIOS area
        assert c.ask(b"Me0000,2:4142") == b"E0e"  # EFAULT, not a malformed packet
        assert c.read_memory(0xE0000, 8) == acpi
        assert c.ask(b"Mfee00000,4:00000000").startswith(b"E")  # the LAPIC: MMIO, not RAM
        assert c.ask(b"mfee00000,4").startswith(b"E")
        assert c.ask(b"M3fffffe,4:01020304").startswith(b"E")  # runs past the end of RAM
        assert c.ask(b"M200000,4:01020304") == b"OK"
        assert c.read_memory(0x200000, 4) == b"\x01\x02\x03\x04"
        assert c.ask(b"D") == b"OK"
    finally:
        c.close()
    vm.keeps_running()


def test_a_client_that_connects_while_the_machine_is_built_is_served(guests, monkeypatch):
    """The port listens before the machine exists (a busy port is a configuration error);
    a client that connects in between is held, and served once the machine is built."""
    import asyncio

    from asyncvmm import VM, VmConfig
    from asyncvmm.gdb.options import GdbOptions
    from asyncvmm.gdb.server import GdbServer
    from asyncvmm.loop import run as run_loop

    port = free_port()
    early = {}
    start = GdbServer.start

    async def start_then_connect(self):  # the real start, then a client in the gap
        await start(self)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"$?#3f")
        for _ in range(500):  # until the loop has accepted it; no Target exists yet
            if self.connection is not None:
                break
            await asyncio.sleep(0.01)
        assert self.connection is not None and self.target is None
        early["client"] = (reader, writer)

    monkeypatch.setattr(GdbServer, "start", start_then_connect)

    async def main():
        cfg = VmConfig(name="gdb-early", memory=64 << 20, kernel=str(guests / "gdbtarget.elf"), cmdline="delay=2000",
                       no_reboot=True, gdb=GdbOptions(port))
        async with VM(cfg):
            reader, writer = early["client"]
            try:
                assert await asyncio.wait_for(reader.readexactly(1), 10) == b"+"
                reply = await asyncio.wait_for(reader.readuntil(b"#"), 10)
                assert reply.startswith(b"$T05"), reply  # the stop reply to what it sent early
                await reader.readexactly(2)  # the checksum
                writer.write(b"+$D#44")
                assert await asyncio.wait_for(reader.readexactly(1), 10) == b"+"
                assert await asyncio.wait_for(reader.readuntil(b"#"), 10) == b"$OK#"
            finally:
                writer.close()
                await writer.wait_closed()

    run_loop(main())


def test_bad_packets_get_errors_and_the_vm_runs_on(vm_factory):
    vm = vm_factory()
    pid = vm.proc.pid
    wait_for(lambda: "round=" in vm.console(), 10, "the guest to print")

    def fds() -> dict[str, str]:
        out = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                pass
        return out

    fds_before = fds()
    c = RspClient(vm.port)
    try:
        assert c.ask(b"?").startswith(b"T05")
        c.send_raw(b"$g#00")  # a bad checksum: the stub asks again
        assert c.read_byte() == b"-"
        c.send_raw(b"$m" + b"1" * 100_000 + b",4#00")  # far over PacketSize
        assert c.read_byte() == b"+"
        assert c.reply().startswith(b"E")
        for bad in (b"mzz,4", b"m100000", b"M100000,4:zz", b"Z9,100000,1", b"Z0,", b"pffff", b"Pzz=00",
                    b"G00", b"Hgzz", b"vCont;x", b"X100000,4:ab", b"m10000000000000000,1", b"qXfer:features:read:other.xml:0,10"):
            assert c.ask(bad).startswith(b"E"), bad
        assert c.ask(b"qUnknownQuery") == b""  # unknown: an empty reply
        assert c.ask(b"m100000,100000")  # a huge length: at most a packet's worth
        assert len(c.ask(b"m100000,100000")) <= 0x4000
        xml = c.ask(b"qXfer:features:read:target.xml:0,3fff")
        assert xml.startswith(b"l") and b"i386:x86-64" in xml
        assert c.ask(b"Hg2") == b"E02"  # thread 2: there is no vCPU 1
        c.send_raw(b"$m1000")  # and leave mid-packet
    finally:
        c.close()
    vm.keeps_running()
    # A client that leaves mid-step: its breakpoint is removed, the guest runs on.
    c = RspClient(vm.port)
    try:
        assert c.ask(b"?").startswith(b"T05")
        tick = symbol(vm.elf, "tick")
        assert c.ask(b"Z0,%x,1" % tick) == b"OK"
        c.send(b"vCont;c")
        assert c.reply(timeout=10).startswith(b"T05swbreak:;thread:1;")
        c.send(b"vCont;s:1")
    finally:
        c.close()
    vm.keeps_running()
    # A second client while one is connected is refused; the first carries on.
    first = RspClient(vm.port)
    try:
        assert first.ask(b"?").startswith(b"T05")
        second = socket.create_connection(("127.0.0.1", vm.port), timeout=5)
        assert second.recv(10) == b""  # closed by the stub
        second.close()
        assert first.ask(b"qC") == b"QC1"
        assert first.ask(b"D") == b"OK"
    finally:
        first.close()
    vm.keeps_running()
    time.sleep(0.3)
    assert fds() == fds_before, "the VMM leaked fds"
    status, err = vm.stop()
    assert status == 4, err
    assert "Traceback" not in err, err


def test_kill_stops_the_vm(vm_factory):
    vm = vm_factory()
    out = vm.gdb("kill")
    assert "killed" in out, out
    vm.proc.wait(timeout=15)
    status, err = vm.stop()
    assert status == 4 and "killed by gdb" in err, err


def test_port_in_use_is_a_usage_error(guests):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_vmm("run", "-m", "64", "--kernel", str(guests / "gdbtarget.elf"), "-g", str(port), "--no-reboot")
    assert r.status == 2, r.err
    lines = [line for line in r.err.splitlines() if "error" in line.lower() or "in use" in line]
    assert lines == [f"asyncvmm: gdb port 127.0.0.1:{port}: in use"], r.err
    assert "Traceback" not in r.err
    for bad in (["-g", "0"], ["-g", "http"], ["-G", "w:"], ["-G", "notanip:1234"], ["-g", "1", "-G", "2"]):
        r = run_vmm("run", "-m", "64", "--kernel", str(guests / "gdbtarget.elf"), *bad, "--no-reboot")
        assert r.status == 2 and len(r.err.strip().splitlines()) == 1, (bad, r.err)


def test_dash_a_hides_x2apic(guests):
    for flags, cpuid_bit, mode in (((), "1", None), (("-a",), "0", "x2apic-mode=#GP")):
        p = subprocess.Popen([sys.executable, "-m", "asyncvmm", "run", "-q", "-m", "64", "--kernel",
                              str(guests / "gdbtarget.elf"), "--cmdline", "spin", *flags, "--no-reboot"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            out = read_until(p, b"spinning")
        finally:
            p.terminate()
            p.communicate(timeout=15)
        text = out.decode()
        assert f"x2apic={cpuid_bit}\n" in text, (flags, text)
        if mode:  # the CPU the guest sees has no x2APIC: turning it on faults
            assert mode in text, text


def test_dash_s_wires_guest_memory(guests):
    p = subprocess.Popen([sys.executable, "-m", "asyncvmm", "run", "-q", "-S", "-m", "64", "--kernel",
                          str(guests / "gdbtarget.elf"), "--cmdline", "spin", "--no-reboot"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        read_until(p, b"spinning")
        with open(f"/proc/{p.pid}/status") as f:
            locked_kib = int(next(line for line in f if line.startswith("VmLck:")).split()[1])
    finally:
        p.terminate()
        p.communicate(timeout=15)
    assert locked_kib >= 64 * 1024, locked_kib


@pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("prlimit") is None, reason="needs util-linux")
def test_dash_s_with_a_low_memlock_limit_is_a_usage_error(guests):
    # Without CAP_IPC_LOCK (root has it: mlock would ignore the limit) and an 8 MiB limit.
    cmd = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "prlimit", "--memlock=8388608",
           sys.executable, "-m", "asyncvmm", "run", "-S", "-m", "64", "--kernel", str(guests / "gdbtarget.elf"),
           "--no-reboot"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "-S: wiring 64 MiB of guest memory needs RLIMIT_MEMLOCK" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_dash_h_prints_the_usage():
    r = run_vmm("run", "-h")
    assert r.status == 0, r.err
    for flag in ("-g PORT", "-G [w][ADDRESS:]PORT", "-a", "-S"):
        assert flag in r.out, r.out
