"""bhyve-style option parsing."""

import os

import pytest

from asyncvmm.boot.cpuid import Topology
from asyncvmm.config import (
    PciSlot,
    VmConfig,
    parse_console,
    parse_cpus,
    parse_memory,
    parse_pin,
    parse_slot,
    parse_topology,
)
from asyncvmm.errors import ConfigError

MiB = 1 << 20


@pytest.mark.parametrize(
    "text, size",
    [("64", 64 * MiB), ("64M", 64 * MiB), ("64m", 64 * MiB), ("2G", 2 << 30), ("2g", 2 << 30),
     ("512K", 512 << 10), ("1T", 1 << 40), ("256MB", 256 * MiB)],
)
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "12X", "1K1"])
def test_bad_memory_sizes(text):
    with pytest.raises(ConfigError, match="-m"):
        parse_memory(text)


def test_memory_must_be_pages():
    with pytest.raises(ConfigError, match="4 KiB pages"):
        parse_memory("6K")


def test_cpus_forms():
    assert parse_cpus("4") == 4
    assert parse_cpus("cpus=4") == 4
    assert parse_cpus("sockets=2,cores=2,threads=2") == 8
    assert parse_cpus("cpus=4,sockets=1,cores=2,threads=2") == 4
    for bad in ("0", "cpus=0", "cpus=3,cores=2", "cores=x", "dies=2"):
        with pytest.raises(ConfigError):
            parse_cpus(bad)


def test_cpus_topology():
    assert parse_topology("4") == Topology(sockets=4)  # bhyve: N alone is N sockets
    assert parse_topology("cpus=4") == Topology(sockets=4)
    assert parse_topology("sockets=2,cores=3") == Topology(2, 3, 1)
    assert parse_topology("cpus=8,sockets=1,cores=4,threads=2") == Topology(1, 4, 2)
    assert parse_topology("threads=2") == Topology(1, 1, 2)


def test_config_checks_the_topology(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    cfg = VmConfig(kernel=str(kernel), cpus=6, topology=Topology(2, 3, 1))
    assert cfg.validate().cpu_topology.apic_ids() == [0, 1, 2, 4, 5, 6]
    assert VmConfig(kernel=str(kernel), cpus=3).cpu_topology == Topology(3, 1, 1)
    with pytest.raises(ConfigError, match="do not match"):
        VmConfig(kernel=str(kernel), cpus=4, topology=Topology(2, 3, 1)).validate()
    with pytest.raises(ConfigError, match="APIC IDs up to 257"):  # 129 sockets of 2 cores
        VmConfig(kernel=str(kernel), cpus=258, topology=Topology(129, 2, 1)).validate()


def test_pins_must_be_cpus_this_process_may_use(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    allowed = sorted(os.sched_getaffinity(0))
    assert VmConfig(kernel=str(kernel), pins={0: allowed[-1]}).validate()
    with pytest.raises(ConfigError, match="no vCPU 1"):
        VmConfig(kernel=str(kernel), pins={1: allowed[0]}).validate()
    with pytest.raises(ConfigError, match="this host has no CPU"):
        VmConfig(kernel=str(kernel), pins={0: os.cpu_count()}).validate()


def test_console_specs():
    assert parse_console("com1,stdio") == "stdio"
    assert parse_console("COM1,/tmp/log") == "/tmp/log"
    assert parse_console("com1,socket=/run/x.sock") == "socket=/run/x.sock"
    for bad in ("com2,stdio", "com1", "com1,", "com1,socket="):
        with pytest.raises(ConfigError):
            parse_console(bad)


def test_slot_forms():
    assert parse_slot("3,virtio-blk,disk.img,ro") == PciSlot(0, 3, 0, "virtio-blk", "disk.img,ro")
    assert parse_slot("3:1,virtio-blk,d") == PciSlot(0, 3, 1, "virtio-blk", "d")
    assert parse_slot("1:3:2,virtio-blk") == PciSlot(1, 3, 2, "virtio-blk", "")
    for bad in ("3", "x,virtio-blk", "1:2:3:4,virtio-blk", "32,virtio-blk", "3:8,virtio-blk", "256:0:0,virtio-blk"):
        with pytest.raises(ConfigError):
            parse_slot(bad)


def test_slots_refuse_drivers_not_built_yet():
    with pytest.raises(ConfigError, match="not available"):
        parse_slot("4,xhci")
    with pytest.raises(ConfigError, match="no such driver"):
        parse_slot("4,floppy")


def test_pins():
    assert parse_pin("0:1") == (0, 1)
    for bad in ("0", "a:1", "0:", ":1"):
        with pytest.raises(ConfigError):
            parse_pin(bad)
