"""The machine in-process, on a real KVM: pause/resume, the console fast path, clean-up."""

from __future__ import annotations

import asyncio
import re
import time

from asyncvmm._native import lib
from conftest import needs_kvm
from conftest import open_fds as fds
from conftest import vcpu_threads as threads

from asyncvmm.config import VmConfig
from asyncvmm.console import Console
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import BootImages, Machine, StopReason

pytestmark = needs_kvm


class Capture(Console):
    """Guest output kept in memory, with the time of each batch."""

    def __init__(self):
        super().__init__()
        self.data = bytearray()
        self.times: list[float] = []

    def write(self, data: bytes) -> None:
        self.data += data
        self.times.append(time.monotonic())


def machine(guests, name, cmdline="", cpus=1) -> tuple[Machine, Capture]:
    console = Capture()
    cfg = VmConfig(cpus=cpus, memory=64 << 20, kernel=str(guests / f"{name}.elf"), cmdline=cmdline, no_reboot=True)
    return Machine(cfg, console, BootImages.load(cfg)), console


async def wait_for(console: Capture, needle: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while needle not in console.data:
        assert time.monotonic() < deadline, console.data[-200:]
        await asyncio.sleep(0.01)


def test_pause_stops_the_guest_and_resume_goes_on(guests):
    async def main():
        m, console = machine(guests, "counter", "delay=2000")
        m.build()
        task = asyncio.ensure_future(m.run())
        try:
            await wait_for(console, b"tick 5\n")
            m.pause()
            assert m.vcpu_state(0) in (lib.AVMM_VCPU_PAUSED, lib.AVMM_VCPU_WAITING)
            await asyncio.sleep(0.05)  # let the last drained bytes arrive
            paused_at = len(console.data)
            await asyncio.sleep(0.5)
            assert len(console.data) == paused_at, "the guest printed while paused"
            m.resume()
            last = int(re.findall(rb"tick (\d+)\n", bytes(console.data))[-1])  # a pause may cut a line
            await wait_for(console, b"tick %d\n" % (last + 3))
            assert len(console.data) > paused_at
            m.request_stop(__import__("asyncvmm.machine", fromlist=["Stop"]).Stop(StopReason.HOST, "test"))
            stop = await task
            assert stop.reason is StopReason.HOST
        finally:
            if not task.done():
                task.cancel()
            m.close()

    run_loop(main())


def test_console_bytes_are_batched_in_c(guests):
    """Polled console output (LSR read + THR write per byte) never waits on the loop."""

    async def main():
        m, console = machine(guests, "exitbench", "n=20000 port=0x3f8")
        m.build()
        try:
            stop = await m.run()
            stats = m.vcpu_stats(0)
        finally:
            m.close()
        assert stop.reason is StopReason.RESET
        assert console.data.count(b"\0") + len(console.data) >= 20000
        assert stats["fast_io"] >= 20000
        assert stats["posted"] < 200, stats  # the few exits that did reach the loop
        return console

    c = run_loop(main())
    assert len(c.times) < 20000 / 4  # far fewer batches than bytes


def test_nothing_left_behind(guests):
    """vCPU threads, fds and the guest RAM mapping are gone after close()."""
    run_loop(_one_boot(guests))  # warm up: imports, the probe's one-time VM
    t0, f0 = threads(), fds()
    for _ in range(3):
        run_loop(_one_boot(guests, cpus=3))
    assert threads() == t0
    assert fds() == f0


async def _one_boot(guests, cpus=1):
    m, console = machine(guests, "hello", cpus=cpus)
    m.build()
    try:
        stop = await m.run()
    finally:
        m.close()
    assert stop.reason is StopReason.RESET
    assert b"hello from the guest" in console.data


def test_stop_while_vcpus_run(guests):
    """A guest that never stops by itself is stopped from the host, threads joined."""

    async def main():
        t0 = threads()
        m, console = machine(guests, "counter", cpus=2)
        m.build()
        task = asyncio.ensure_future(m.run())
        await wait_for(console, b"tick 2\n")
        assert threads() == t0 + 2
        from asyncvmm.machine import Stop

        m.request_stop(Stop(StopReason.HOST, "enough"))
        stop = await task
        m.close()
        assert stop.message == "enough"
        assert threads() == t0

    run_loop(main())


def test_a_device_model_bug_stops_the_vm_instead_of_hanging_it(guests):
    async def main():
        m, console = machine(guests, "cmos")
        m.build()

        def broken(port):
            raise RuntimeError("model bug")

        m.legacy.rtc.read = broken
        try:
            stop = await asyncio.wait_for(m.run(), 10)
        finally:
            m.close()
        assert stop.reason is StopReason.ERROR
        assert "internal error serving an exit: RuntimeError: model bug" in stop.message

    run_loop(main())


def test_exit_heavy_guest_through_the_loop(guests, monkeypatch):
    """20000 port writes served by a Python model; with a zero time slice every batch ends
    at the deadline, so an exit collected but left unserved would hang the vCPU."""

    from asyncvmm import poll as poll_mod

    for slice_ns in (poll_mod.POLL_SLICE_NS, 0):
        monkeypatch.setattr(poll_mod, "POLL_SLICE_NS", slice_ns)

        async def main():
            m, console = machine(guests, "exitbench", "n=20000 port=0x3ff")
            m.build()
            try:
                stop = await asyncio.wait_for(m.run(), 30)
                stats = m.vcpu_stats(0)
            finally:
                m.close()
            assert stop.reason is StopReason.RESET
            assert b"exitbench done" in console.data
            assert stats["posted"] >= 20000
            assert m.legacy.uart.read(7) == (20000 - 1) & 0xFF  # SCR holds the last byte written

        run_loop(main())
