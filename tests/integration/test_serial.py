"""COM2-COM4 and their backends on a real KVM, with the `comports` test guest: output to a
file, a Unix socket and a TCP port with real clients (bytes both ways, output kept until
one connects, a second client turned away), COM3 sharing IRQ 4 with COM1, and bhyve's
everyday command line."""

from __future__ import annotations

import asyncio
import socket

import pytest

from asyncvmm import VM, VmConfig
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

from conftest import needs_kvm, run_vmm

pytestmark = needs_kvm


def cfg(guests, name, cmdline="", **kw) -> VmConfig:
    return VmConfig(name=name, memory=64 << 20, kernel=str(guests / "comports.elf"), cmdline=cmdline,
                    no_reboot=True, **kw)


async def until(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def read_until(reader: asyncio.StreamReader, needle: bytes, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.readuntil(needle), timeout)


def free_tcp_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_guest_writes_on_com2_and_it_arrives_in_a_file(guests, tmp_path):
    log = tmp_path / "com2.log"

    async def main():
        async with VM(cfg(guests, "com2-file", "noread", serial={"com2": str(log)})) as vm:
            stop = await asyncio.wait_for(vm.wait(), 20)
            stats = vm.stats()
            out = vm.console.transcript
        return stop, stats, bytes(out)

    stop, stats, com1 = run_loop(main())
    assert stop.reason is StopReason.RESET, stop.message
    assert log.read_bytes() == b"hello on 0x2f8\n"
    assert b"comports: writing on 0x2f8" in com1 and b"hello on" not in com1  # COM1 got none of it
    assert stats["serial"]["com2"]["tx_bytes"] == len(b"hello on 0x2f8\n")
    assert stats["ports"]["com2"] > 0


def test_com4_through_a_unix_socket_both_ways(guests, tmp_path):
    path = tmp_path / "com4.sock"

    async def main():
        async with VM(cfg(guests, "com4-sock", "port=0x2e8", serial={"com4": f"socket={path}"})) as vm:
            await vm.console.expect(rb"comports: writing on 0x2e8\n")
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert await read_until(reader, b"\n") == b"hello on 0x2e8\n"
            writer.write(b"abc def\n")
            await writer.drain()
            assert await read_until(reader, b"\n") == b"got ABC DEF\n"
            await vm.console.expect(rb"comports: echoed 7 bytes")
            stop = await asyncio.wait_for(vm.wait(), 20)
            writer.close()
        return stop

    assert run_loop(main()).reason is StopReason.RESET


def test_the_tcp_console_with_real_clients(guests):
    port = free_tcp_port()
    hello = b"hello on 0x2f8\n"

    async def main():
        async with VM(cfg(guests, "com2-tcp", serial={"com2": f"tcp=127.0.0.1:{port}"})) as vm:
            # The guest writes before anyone is connected: the output is kept.
            await until(lambda: vm.stats()["serial"]["com2"]["tx_bytes"] == len(hello), what="the guest's hello")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await read_until(reader, b"\n") == hello
            # One client at a time: a second one is disconnected at once.
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r2.read(100), 10) == b""
            w2.close()
            writer.write(b"over tcp\n")
            await writer.drain()
            assert await read_until(reader, b"\n") == b"got OVER TCP\n"
            stop = await asyncio.wait_for(vm.wait(), 20)
            writer.close()
        return stop

    assert run_loop(main()).reason is StopReason.RESET
    # The VM is gone: so is the listener.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_com3_shares_irq_4_with_com1(guests, tmp_path):
    """COM1 and COM3 both raise receive interrupts on ISA IRQ 4 (one edge-triggered IOAPIC
    pin); the guest's handler serves both until neither is pending. "ping" on both ports
    at once arrives on both."""
    path = tmp_path / "com3.sock"

    async def main():
        async with VM(cfg(guests, "com3-irq", "irq=4 port=0x3e8", serial={"com3": f"socket={path}"})) as vm:
            await vm.console.expect(rb"comports: irq ready\n")
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"ping")
            vm.console.writer.write(b"ping")
            await asyncio.gather(writer.drain(), vm.console.writer.drain())
            m = await vm.console.expect(rb"comports: ping on both after (\d+) interrupts", timeout=20)
            stop = await asyncio.wait_for(vm.wait(), 20)
            stats = vm.stats()
            writer.close()
        return stop, int(m.group(1)), stats

    stop, irqs, stats = run_loop(main())
    assert stop.reason is StopReason.RESET, stop.message
    line = stats["isa_irqs"]["4"]
    assert line["drivers"] == ["com1", "com3"]
    assert 1 <= irqs <= line["edges"]
    assert stats["serial"]["com1"]["rx_read"] == 4 and stats["serial"]["com3"]["rx_read"] == 4


def test_bhyves_everyday_command_line_boots_a_guest(guests, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    r = run_vmm("run", "-c", "1", "-m", "512M", "-A", "-H", "-P", "-s", "0:0,hostbridge", "-s", "1:0,lpc",
                "-s", f"2:0,virtio-blk,{disk}", "-l", "com1,stdio", "--kernel", str(guests / "hello.elf"),
                "--no-reboot", "vm1")
    assert r.status == 0, r.err
    assert "hello from the guest" in r.out
    assert "guest reset through the i8042 reset line" in r.err
