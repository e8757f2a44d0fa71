"""Soak and load (marked `soak`; about a minute and a half together on an idle machine):
VM after VM in one process with its fds, threads and RSS measured flat, twenty VMs at once
in one loop, fifty control clients at once against a running VM, with malformed and
oversized requests among them. Each prints its figures (pytest -s shows them)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest
from conftest import needs_kvm, open_fds, vcpu_threads

from asyncvmm import VM, VmConfig
from asyncvmm.control import protocol
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

pytestmark = [needs_kvm, pytest.mark.soak]

CYCLES = 200
AT_ONCE = 20
CLIENTS = 50


def cfg(guests, name, guest, cmdline="", **kw) -> VmConfig:
    return VmConfig(name=name, memory=64 << 20, kernel=str(guests / f"{guest}.elf"), cmdline=cmdline, **kw)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_vm_cycles_leave_fds_threads_and_rss_flat(guests):
    async def cycle(i: int) -> None:
        async with VM(cfg(guests, f"soak-{i}", "hello", "soak", no_reboot=True)) as vm:
            await vm.console.expect(rb"cmdline: soak\n", timeout=30)
            stop = await asyncio.wait_for(vm.wait(), 30)
        assert stop.reason is StopReason.RESET

    async def main():
        for i in range(10):  # warm-up: the loop's own fds, caches, the allocator's arenas
            await cycle(i)
        before = (open_fds(), threads(), rss_kib())
        t0 = time.monotonic()
        mid = None
        for i in range(CYCLES):
            await cycle(i)
            if i == CYCLES // 2:
                mid = rss_kib()
        return before, (open_fds(), threads(), rss_kib()), mid, time.monotonic() - t0

    (fds0, thr0, rss0), (fds1, thr1, rss1), mid, took = run_loop(main())
    print(f"\nsoak: {CYCLES} VM cycles in {took:.1f} s ({took / CYCLES * 1e3:.0f} ms each): fds {len(fds0)} -> "
          f"{len(fds1)}, threads {thr0} -> {thr1}, RSS {rss0 / 1024:.1f} -> {mid / 1024:.1f} (half-way) -> "
          f"{rss1 / 1024:.1f} MiB")
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds1 - fds0 if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, leaked
    assert thr1 == thr0
    # Flat: the second half of the run grows RSS by less than 8 MiB (a leak of one guest's
    # 64 MiB, or of a few KiB per VM, shows).
    assert rss1 - mid < 8 * 1024, (rss0, mid, rss1)


def test_twenty_vms_at_once_in_one_loop(guests):
    async def guest(i: int, ready: asyncio.Event, done: asyncio.Event) -> int:
        async with VM(cfg(guests, f"many-{i}", "counter", "delay=500")) as vm:
            await vm.console.expect(rb"tick 2\n", timeout=120)
            ready.set()
            await done.wait()
            stop = await vm.kill()
        return stop.reason is StopReason.HOST

    async def warm(i: int) -> None:
        async with VM(cfg(guests, f"many-warm-{i}", "hello", no_reboot=True)) as vm:
            await vm.wait()

    async def main():
        # Warm-up, at once too: the default executor's worker threads (the images are read
        # there) and libuv's fd stay for the loop's life.
        await asyncio.gather(*(warm(i) for i in range(8)))
        base = (threads(), len(open_fds()))
        readies = [asyncio.Event() for _ in range(AT_ONCE)]
        done = asyncio.Event()
        t0 = time.monotonic()
        tasks = [asyncio.create_task(guest(i, readies[i], done)) for i in range(AT_ONCE)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 180)
        all_up = time.monotonic() - t0
        peak = (threads(), len(open_fds()), rss_kib())
        done.set()
        killed = await asyncio.gather(*tasks)
        return base, peak, (threads(), len(open_fds())), all_up, killed

    base, peak, after, all_up, killed = run_loop(main())
    print(f"\nsoak: {AT_ONCE} VMs running at once after {all_up:.1f} s: threads {base[0]} -> {peak[0]} -> {after[0]}, "
          f"fds {base[1]} -> {peak[1]} -> {after[1]}, RSS {peak[2] / 1024:.0f} MiB at the peak")
    assert all(killed)
    assert after[1] == base[1]  # fds
    # Threads: every vCPU thread gone; what may stay beyond those this process had before
    # (earlier tests' in the same run) is the default executor's pool (the images are read
    # there), which grows to its maximum once enough VMs start at once.
    assert vcpu_threads() == 0
    assert after[0] <= base[0] + min(32, (os.cpu_count() or 1) + 4), (base, after)


async def _client(path: str, lines: list[bytes]) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    answers = []
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 30)
            if not answer:
                break
            answers.append(json.loads(answer))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def _oversized(path: str, line: bytes) -> bytes:
    """Send a line longer than the server takes; what it answers before hanging up."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            s.sendall(line)
        except BrokenPipeError:  # it answered and closed while the line was still going
            pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_fifty_control_clients_with_malformed_and_oversized_requests(guests, private_run_dir):
    good = [b'{"cmd":"state"}\n', b'{"cmd":"stats"}\n', b'{"cmd":"regs","vcpu":0}\n']
    bad = [
        b"not json\n", b"[1,2,3]\n", b'{"cmd":"fly"}\n', b'{"cmd":"regs","vcpu":"x"}\n',
        b'{"cmd":"regs","vcpu":99}\n', b'{"cmd":"sysrq"}\n', b'{"cmd":"destroy","timeout":"soon"}\n',
        b"\xff\xfe\n", b"[" * 30000 + b"\n", b'{"cmd":' + b'"' + b"a" * 1000 + b'"}\n',
    ]
    oversized = b'{"cmd":"state","pad":"' + b"x" * (protocol.MAX_LINE + 10) + b'"}\n'

    async def main():
        async with VM(cfg(guests, "soak-ctl", "counter", "delay=1000")) as vm:
            await vm.console.expect(rb"tick 0\n", timeout=30)
            path = protocol.socket_path("soak-ctl")
            t0 = time.monotonic()
            results = await asyncio.gather(*(_client(path, good + bad + good) for _ in range(CLIENTS)))
            took = time.monotonic() - t0
            big = await asyncio.to_thread(_oversized, path, oversized)
            after = await _client(path, [good[0]])  # and the server still serves
            state = vm.state
            await vm.kill()
        return results, took, big, after, state

    results, took, big, after, state = run_loop(main())
    served = sum(len(r) for r in results)
    expected = CLIENTS * (2 * len(good) + len(bad))
    print(f"\nsoak: {CLIENTS} control clients at once: {served}/{expected} requests answered in {took:.2f} s "
          f"({len(bad)} malformed kinds among them), oversized line answered: {big}")
    assert served == expected
    for r in results:
        assert [a["ok"] for a in r] == [True] * len(good) + [False] * len(bad) + [True] * len(good)
        assert not any("internal error" in a.get("error", "") for a in r), r
    assert json.loads(big) == {"ok": False, "error": "request line too long"}
    assert after[0]["ok"] and state == "running"
