"""The COM ports: the port table, their DSDT entries (through iasl), the shared ISA line,
`-l` parsing and the checks made before anything starts, and the LPC bridge."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
from test_acpi import block, needs_iasl, resources

from asyncvmm import platform as p
from asyncvmm.boot import acpi
from asyncvmm.boot.cpuid import Topology
from asyncvmm.config import PciSlot, VmConfig, check_serial, parse_serial, serial_config
from asyncvmm.devices.legacy.isa_line import IsaLine
from asyncvmm.devices.legacy.uart16550 import Ier, Mcr, Reg, Uart16550
from asyncvmm.errors import ConfigError

MiB = 1 << 20


# -- the table ----------------------------------------------------------------------------
def test_the_pc_com_ports():
    assert [(c.name, c.port, c.irq, c.uid) for c in p.COM_PORTS] == [
        ("com1", 0x3F8, 4, 1), ("com2", 0x2F8, 3, 2), ("com3", 0x3E8, 4, 3), ("com4", 0x2E8, 3, 4),
    ]
    assert p.COM1_PORT == p.COM_PORTS[0].port and p.COM1_IRQ == p.COM_PORTS[0].irq
    spans = sorted((c.port, c.port + p.COM_PORT_SIZE) for c in p.COM_PORTS)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


def _dsdt_text(tmp_path, ports) -> str:
    t = acpi.build(Topology.of(1).apic_ids(), 256 * MiB, serial_ports=ports)
    (tmp_path / "dsdt.dat").write_bytes(t.table("DSDT"))
    r = subprocess.run(["iasl", "-d", "dsdt.dat"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return (tmp_path / "dsdt.dsl").read_text()


@needs_iasl
def test_iasl_reads_every_com_port_with_its_uid_ports_and_irq(tmp_path):
    d = _dsdt_text(tmp_path, p.COM_PORTS)
    for c in p.COM_PORTS:
        dev = block(d, f"Device ({c.name.upper()})")
        assert 'Name (_HID, EisaId ("PNP0501")' in dev
        uid = re.search(r"Name \(_UID, (\w+)\)", dev).group(1)
        assert {"One": 1}.get(uid, None) == c.uid or int(uid, 16) == c.uid
        (io, irq) = resources(block(dev, "Name (_CRS, ResourceTemplate ()"))
        assert io == ("IO", "Decode16", {"Range Minimum": c.port, "Range Maximum": c.port, "Alignment": 1,
                                         "Length": p.COM_PORT_SIZE})
        assert irq[0] == "IRQNoFlags" and irq[2]["irqs"] == [c.irq]


@needs_iasl
def test_only_the_ports_configured_are_in_the_dsdt(tmp_path):
    d = _dsdt_text(tmp_path, [p.COM_PORT_BY_NAME["com1"], p.COM_PORT_BY_NAME["com3"]])
    assert sorted(re.findall(r"Device \((COM\d)\)", d)) == ["COM1", "COM3"]


# -- the shared line ------------------------------------------------------------------------
class Pulses:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def test_a_line_pulses_only_when_it_rises():
    pulses = Pulses()
    line = IsaLine(pulses)
    a, b = line.driver("com1"), line.driver("com3")
    a(True)
    assert pulses.count == 1 and line.level
    b(True)  # the wire is high already: no edge
    assert pulses.count == 1
    a(False)  # b still holds it
    assert line.level and pulses.count == 1
    a(True)
    assert pulses.count == 1
    a(False)
    b(False)
    assert not line.level
    b(True)  # quiet, then a request: a fresh edge
    assert pulses.count == 2 and line.edges == 2
    with pytest.raises(ValueError):
        line.driver("com1")


def _uart_on(line: IsaLine, name: str) -> Uart16550:
    uart = Uart16550(line.driver(name), lambda data: None)
    uart.write(Reg.MCR, Mcr.OUT2)  # OUT2 gates the interrupt onto the ISA line
    uart.write(Reg.IER, Ier.ERBFI)
    return uart


def test_two_uarts_on_one_line_as_a_guests_shared_handler_sees_them():
    pulses = Pulses()
    line = IsaLine(pulses)
    com1, com3 = _uart_on(line, "com1"), _uart_on(line, "com3")
    com1.receive(b"a")
    assert pulses.count == 1
    com3.receive(b"b")  # COM1 still asks: the line stays high, no second edge
    assert pulses.count == 1 and line.level
    assert com1.read(Reg.RBR) == ord("a")  # the handler serves COM1 ...
    assert line.level  # ... COM3 still holds the line
    assert com3.read(Reg.RBR) == ord("b")  # ... and COM3: both quiet
    assert not line.level
    com3.receive(b"c")  # the next request is a fresh edge
    assert pulses.count == 2
    assert com3.read(Reg.RBR) == ord("c") and not line.level


def test_one_uart_alone_pulses_per_request():
    pulses = Pulses()
    line = IsaLine(pulses)
    com2 = _uart_on(line, "com2")
    for n, byte in enumerate(b"xyz", 1):
        com2.receive(bytes([byte]))
        assert pulses.count == n
        com2.read(Reg.RBR)
        assert not line.level


# -- -l -------------------------------------------------------------------------------------
def test_parse_serial():
    assert parse_serial("com2,stdio") == ("com2", "stdio")
    assert parse_serial("COM4,/tmp/log") == ("com4", "/tmp/log")
    assert parse_serial("com3,tcp=127.0.0.1:4444") == ("com3", "tcp=127.0.0.1:4444")
    for bad, why in (("com5,stdio", "no such port"), ("com2", "say where"), ("com1,", "say where"),
                     ("com1,tcp=", "say where"), ("lpt1,stdio", "no such port")):
        with pytest.raises(ConfigError, match=why):
            parse_serial(bad)


def test_serial_config():
    cfg = VmConfig()
    serial_config(["com2,/tmp/a", "com1,socket=/tmp/s"], cfg)
    assert cfg.console == "socket=/tmp/s" and cfg.serial == {"com2": "/tmp/a"}
    cfg = VmConfig()
    serial_config(["com2,/tmp/a"], cfg)
    assert cfg.console == "stdio"  # COM1 keeps stdio
    cfg = VmConfig()
    serial_config(["com3,stdio"], cfg)
    assert cfg.console == "" and cfg.serial == {"com3": "stdio"}  # stdio went to COM3: COM1 goes nowhere
    with pytest.raises(ConfigError, match="com2 is given twice"):
        serial_config(["com2,/tmp/a", "COM2,/tmp/b"], VmConfig())


def test_check_serial_refuses_what_cannot_work(tmp_path):
    def check(console="stdio", **serial):
        check_serial(VmConfig(console=console, serial=serial))

    check(com2=str(tmp_path / "log"), com3=f"socket={tmp_path / 'c3.sock'}")
    with pytest.raises(ConfigError, match="com1 already goes to stdio"):
        check(com2="stdio")
    with pytest.raises(ConfigError, match="already goes to"):
        check(com2=str(tmp_path / "log"), com4=str(tmp_path / "log"))
    with pytest.raises(ConfigError, match="no such directory"):
        check(com2=str(tmp_path / "none" / "log"))
    with pytest.raises(ConfigError, match="is a directory"):
        check(com2=str(tmp_path))
    with pytest.raises(ConfigError, match="no such port"):
        check(com9="stdio")
    with pytest.raises(ConfigError, match="tcp=HOST:PORT"):
        check(com2="tcp=localhost")

    live = socket.socket(socket.AF_UNIX)  # a live listener on the path
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    busy = socket.socket()  # and on a TCP port
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(ConfigError, match=r"-l com2,socket=.*live.sock: .*in use"):
            check(com2=f"socket={tmp_path / 'live.sock'}")
        with pytest.raises(ConfigError, match=r"-l com3,tcp=127.0.0.1:\d+: cannot listen on .*: in use"):
            check(com3=f"tcp=127.0.0.1:{busy.getsockname()[1]}")
    finally:
        live.close()
        busy.close()
    # a socket left by a dead VMM is fine (it is replaced)
    check(com2=f"socket={tmp_path / 'live.sock'}")
    assert os.path.exists(tmp_path / "live.sock")


# -- the LPC bridge ---------------------------------------------------------------------------
def test_the_lpc_bridge_is_an_isa_bridge_on_bus_0():
    from asyncvmm.bus import Bus
    from asyncvmm.devices.pci.device import PciBuses
    from asyncvmm.devices.pci.lpc import LpcBridge
    from asyncvmm.devices.pci.root import PciRoot

    root = PciRoot(PciBuses(Bus("mmio"), Bus("pio")))
    root.add(1, 0, LpcBridge())
    dev = root.lookup(0, 1, 0)
    ids = dev.config_read(0x00, 4)
    assert ids == 0x2918_8086  # the ICH9 LPC (devices/pci/lpc.py), Q35's south bridge
    assert dev.config_read(0x08, 4) >> 8 == 0x06_01_00  # class: bridge, ISA
    assert all(dev.config_read(0x10 + 4 * i, 4) == 0 for i in range(6))  # no BARs


def test_lpc_options_and_a_second_bridge_are_refused(tmp_path):
    from asyncvmm.devices.registry import check_slots

    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    check_slots(VmConfig(kernel=str(kernel), slots=[PciSlot(0, 1, 0, "lpc")]))
    with pytest.raises(ConfigError, match="lpc takes no options"):
        check_slots(VmConfig(kernel=str(kernel), slots=[PciSlot(0, 1, 0, "lpc", "com1,stdio")]))
    with pytest.raises(ConfigError, match="only one LPC bridge"):
        check_slots(VmConfig(kernel=str(kernel), slots=[PciSlot(0, 1, 0, "lpc"), PciSlot(0, 31, 0, "lpc")]))


# -- bad input: one line, status 2, nothing started -------------------------------------------
def test_bad_com_ports_are_refused_before_kvm_is_touched(guests, tmp_path):
    from conftest import run_vmm

    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    tcp = busy.getsockname()[1]
    cases = [
        (["-l", "com2,/tmp/a", "-l", "com2,/tmp/b"], "com2 is given twice"),
        (["-l", "com5,stdio"], "no such port 'com5'"),
        (["-l", f"com2,tcp=127.0.0.1:{tcp}"], f"cannot listen on 127.0.0.1:{tcp}: in use"),
        (["-l", f"com3,socket={tmp_path / 'live.sock'}"], "in use by another process"),
        (["-l", "com1,stdio", "-l", "com4,stdio"], "com1 already goes to stdio"),
        (["-s", "1,lpc,com1"], "lpc takes no options"),
    ]
    try:
        for args, words in cases:
            r = run_vmm("run", "-m", "64", "--kernel", str(guests / "hello.elf"), *args)
            assert r.status == 2, (args, r.err)
            lines = r.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("asyncvmm: -") and words in lines[0], (args, r.err)
            assert "Traceback" not in r.err and "KVM:" not in r.err  # the KVM is never opened
    finally:
        live.close()
        busy.close()
