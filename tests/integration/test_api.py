"""The embedding API on a real KVM: VMs in the caller's loop, beside other asyncio work."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import pytest
from conftest import ROOT, needs_kvm, vcpu_threads
from conftest import open_fds as fds

from asyncvmm import VM, VmConfig
from asyncvmm.api import VmState
from asyncvmm.control import protocol
from asyncvmm.errors import BootError, ConfigError
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

pytestmark = needs_kvm


def cfg(guests, name, guest, cmdline="", **kw) -> VmConfig:
    return VmConfig(name=name, memory=64 << 20, kernel=str(guests / f"{guest}.elf"), cmdline=cmdline, **kw)


def test_console_expect_and_write(guests):
    async def main():
        async with VM(cfg(guests, "api-echo", "echo", no_reboot=True)) as vm:
            await vm.console.expect(rb"echo ready\n")
            vm.console.writer.write(b"hello from asyncio")
            await vm.console.writer.drain()
            m = await vm.console.expect(rb"HELLO FROM ASYNCIO", timeout=10)
            assert m.group(0) == b"HELLO FROM ASYNCIO"
            vm.console.writer.write(b"q")
            stop = await asyncio.wait_for(vm.wait(), 10)
        assert stop.reason is StopReason.RESET  # the guest resets on 'q'; --no-reboot ends it

    run_loop(main())


def test_expect_text_takes_out_terminal_control_sequences(guests):
    async def main():
        async with VM(cfg(guests, "api-echo-csi", "echo", no_reboot=True)) as vm:
            await vm.console.expect(rb"echo ready\n")
            # GRUB's progress indicator once wrote cursor moves inside a word, so:
            vm.console.writer.write(b"loading linu\x1b[03;12h\x1b[03;13hx.")
            await vm.console.writer.drain()
            with pytest.raises(TimeoutError):  # the raw bytes have the moves inside the word
                await vm.console.expect(rb"LOADING LINUX", timeout=2)
            m = await vm.console.expect(rb"LOADING LINUX\.", timeout=10, text=True)
            assert m.group(0) == b"LOADING LINUX."
            vm.console.writer.write(b"q")
            stop = await asyncio.wait_for(vm.wait(), 10)
        assert stop.reason is StopReason.RESET

    run_loop(main())


def test_expect_times_out_with_the_tail_of_the_output(guests):
    async def main():
        async with VM(cfg(guests, "api-timeout", "echo")) as vm:
            with pytest.raises(TimeoutError, match="echo ready"):
                await vm.console.expect(rb"never printed", timeout=0.3)

    run_loop(main())


def test_pause_resume_regs_stats_and_shutdown(guests):
    async def main():
        async with VM(cfg(guests, "api-ctl", "counter", "delay=2000")) as vm:
            await vm.console.expect(rb"tick 3\n")
            await vm.pause()
            assert vm.state == "paused"
            await asyncio.sleep(0.05)
            seen = len(vm.console.transcript)
            await asyncio.sleep(0.4)
            assert len(vm.console.transcript) == seen  # paused: not a byte more
            regs = await vm.regs(0)
            assert 0x100000 <= regs["rip"] < 0x200000  # flat: registers by name
            assert regs["cs"]["db"] == 1  # 32-bit code: the PVH guest
            assert regs["state"] == "paused"
            await vm.resume()
            assert vm.state == "running" and vm.state is VmState.RUNNING and isinstance(vm.state, str)
            assert f"{vm.state}" == "running"
            await vm.console.expect(rb"tick %d\n" % (int(vm.console.transcript.split(b"tick ")[-1].split(b"\n")[0]) + 2))
            stats = vm.stats()
            assert stats["vcpus"][0]["fast_io"] > 0
            assert stats["console"]["tx_bytes"] > 0
            stop = await vm.shutdown(timeout=5)
            assert stop.reason is StopReason.HOST
            assert stop.message == "stopped hard by shutdown() (the guest does not listen for the ACPI power button)"
            assert vm.state == "stopped"
        assert vm.state == "closed"

    run_loop(main())


def test_set_registers_nmi_and_the_rtc_from_the_api(guests):
    """The embedding API's control methods are what ctl uses: a write, an NMI, the RTC."""
    import subprocess

    symbols = subprocess.run(["nm", str(guests / "poke.elf")], capture_output=True, text=True, check=True).stdout
    poked = next(int(line.split()[0], 16) for line in symbols.splitlines() if line.endswith(" poked"))

    async def main():
        async with VM(cfg(guests, "api-poke", "poke", "delay=2000")) as vm:
            await vm.console.expect(rb"tick 2\n")
            await vm.nmi()
            await vm.console.expect(rb"nmi 1\n")
            assert (await vm.events())["nmi"]["masked"] == 1
            with pytest.raises(ConfigError, match="no vCPU 1"):
                await vm.nmi(1)
            with pytest.raises(ConfigError, match="not a canonical|beyond 32 bits"):
                await vm.set_registers(rax=5, rip=1 << 47)
            assert vm.state == "running"  # paused for the attempt, resumed after
            after = await vm.set_registers({"rip": poked}, rax=0xC0FFEE)
            assert (after["rip"], after["rax"], after["state"]) == (poked, 0xC0FFEE, "running")
            await vm.console.expect(rb"poked 0xc0ffee\n")
            vm.set_rtc_time(1_000_000_000)
            assert vm.rtc_time() in (1_000_000_000, 1_000_000_001)
            assert vm.topology() == {"sockets": 1, "cores": 1, "threads": 1, "maxcpus": 1}
            msrs = await vm.read_msrs([0x277])
            assert set(msrs) == {0x277}

    run_loop(main())


def test_two_vms_beside_a_timer_then_one_is_cancelled(guests, private_run_dir):
    """Both guests boot and print while a 10 ms timer keeps its time; cancelling one
    `async with` midway leaves no vCPU thread, fd or socket of it behind."""

    async def timer(lateness: list[float], stop: asyncio.Event):
        period = 0.01
        next_at = time.monotonic() + period
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            lateness.append(time.monotonic() - next_at)
            next_at += period

    async def guest(name: str, ready: asyncio.Event, ticks: int):
        async with VM(cfg(guests, name, "counter", "delay=2000")) as vm:
            await vm.console.expect(rb"tick 0\n")
            ready.set()
            await vm.console.expect(b"tick %d\n" % ticks, timeout=30)
            await asyncio.sleep(3600)  # until cancelled

    async def main():
        # Warm up: libuv keeps one fd (on /dev/null) per loop once it has a listening socket.
        async with VM(cfg(guests, "api-warmup", "hello", no_reboot=True)) as vm:
            await vm.wait()
        base_threads, base_fds = vcpu_threads(), fds()
        lateness: list[float] = []
        done = asyncio.Event()
        t = asyncio.create_task(timer(lateness, done))
        a_ready, b_ready = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(guest("api-a", a_ready, 40))
        b = asyncio.create_task(guest("api-b", b_ready, 40))
        await asyncio.wait_for(asyncio.gather(a_ready.wait(), b_ready.wait()), 20)
        assert vcpu_threads() == base_threads + 2
        assert sorted(os.listdir(private_run_dir)) == ["api-a.sock", "api-b.sock"]
        await asyncio.sleep(1.0)  # both print side by side

        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        assert vcpu_threads() == base_threads + 1
        assert os.listdir(private_run_dir) == ["api-b.sock"]
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        done.set()
        await t
        assert vcpu_threads() == base_threads
        assert os.listdir(private_run_dir) == []
        leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds() - base_fds if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not leaked, leaked
        return lateness

    lateness = run_loop(main())
    print(f"timer lateness over {len(lateness)} ticks: median {statistics.median(lateness) * 1e3:.2f} ms, "
          f"max {max(lateness) * 1e3:.2f} ms")
    assert len(lateness) > 50
    assert statistics.median(lateness) < 0.005
    assert max(lateness) < 0.1


def test_a_live_name_is_refused_and_a_failed_start_leaves_nothing(guests, private_run_dir):
    async def main():
        async with VM(cfg(guests, "api-same", "counter")):
            with pytest.raises(ConfigError, match="already running"):
                async with VM(cfg(guests, "api-same", "counter")):
                    pass
            assert os.listdir(private_run_dir) == ["api-same.sock"]  # the first one's, untouched
        before = fds()
        with pytest.raises(BootError, match="not a kernel"):
            async with VM(VmConfig(name="api-bad", kernel=str(ROOT / "pyproject.toml"))):
                pass
        assert os.listdir(private_run_dir) == []
        assert fds() <= before  # nothing new (the loop may have let go of one of its own)
        assert vcpu_threads() == 0

    run_loop(main())


def test_a_stale_socket_is_cleaned_up(guests, private_run_dir):
    import socket

    path = protocol.socket_path("api-stale")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound, never listening: what a killed VMM leaves

    async def main():
        async with VM(cfg(guests, "api-stale", "counter")) as vm:
            assert os.stat(path).st_mode & 0o777 == 0o600
            assert vm.state == "running"
        assert not os.path.exists(path)

    run_loop(main())


def test_the_default_asyncio_loop_works_too(guests):
    async def main():
        async with VM(cfg(guests, "api-plain", "hello", "x=1", no_reboot=True)) as vm:
            stop = await vm.wait()
            assert b"cmdline: x=1" in vm.console.transcript
            return stop

    stop = asyncio.run(main())
    assert stop.reason is StopReason.RESET


def test_the_readme_example_service(guests, tmp_path):
    """tools/examples/shell_service.py, the README's example, as a user runs it (from a
    directory of their own)."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, str(ROOT / "tools/examples/shell_service.py"), "echo hello", "add 2 40", "mem"],
        capture_output=True, cwd=tmp_path, timeout=60,
    )
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == "$ echo hello\nhello\n$ add 2 40\n42\n$ mem\nram=65151 KiB\n"


def test_console_after_the_vm_ended(guests):
    """A break or input after the VM stopped is a no-op; a writer waiting in drain() is
    released when the VM closes."""

    async def main():
        async with VM(cfg(guests, "api-after", "echo")) as vm:
            await vm.console.expect(rb"echo ready")
            vm.console.writer.write(b"x" * (200 * 1024))  # far more than the guest reads
            drain = asyncio.ensure_future(vm.console.writer.drain())
            await asyncio.sleep(0.1)
            assert not drain.done()
            await vm.kill()
            vm.console.send_break()  # the machine is gone: nothing happens
        await asyncio.wait_for(drain, 5)

    run_loop(main())


def test_a_socket_console_client_that_does_not_read_never_stalls_the_loop(guests, tmp_path):
    import socket

    from asyncvmm.console import SocketConsole

    async def main():
        path = tmp_path / "com1.sock"
        console = SocketConsole(str(path))
        try:
            # Small socket buffers, so the guest's output overflows them within the test.
            console._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            async with VM(cfg(guests, "api-slow", "exitbench", "n=400000 port=0x3f8"), console=console) as vm:
                client = socket.socket(socket.AF_UNIX)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(str(path))  # and never reads
                t0 = time.monotonic()
                worst = 0.0
                while time.monotonic() - t0 < 2.0 and vm.state == "running":
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    worst = max(worst, time.monotonic() - before - 0.01)
                assert worst < 0.2, f"the loop stalled for {worst:.3f} s"
                assert vm.stats()["console"]["tx_bytes"] > 64 * 1024  # the guest kept printing
                client.close()
        finally:
            console.close()

    run_loop(main())
