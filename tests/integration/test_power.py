"""The fast tier of issue 6: the `acpi` test guest finds the tables as a kernel does and
takes every power path through them; vCPUs come up where the MADT says, with the CPUID
topology it implies; -p pins, -e stops.

The guest (tests/guests/acpi.c) prints what it read ("acpi: ..."); these tests compare
that with what the VMM meant, and check how the VMM ended and what it logged.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm, run_vmm, thread_names

from asyncvmm import VM, VmConfig, platform
from asyncvmm.boot.cpuid import Topology
from asyncvmm.devices.legacy import acpi_pm
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

pytestmark = needs_kvm

EXIT_OK, EXIT_ERROR, EXIT_TRIPLE_FAULT, EXIT_HOST = 0, 1, 3, 4


class Vmm:
    """`asyncvmm run ARGS` in a subprocess, its output collected as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        self.out = bytearray()
        self.err = bytearray()
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncvmm", "run", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
        )
        self._threads = [threading.Thread(target=self._collect, args=(pipe, buf), daemon=True)
                         for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _collect(self, pipe, into: bytearray) -> None:
        while data := os.read(pipe.fileno(), 65536):
            with self._lock:
                into += data

    def text(self) -> tuple[str, str]:
        with self._lock:
            return self.out.decode(errors="replace"), self.err.decode(errors="replace")

    def wait_for(self, needle: str, count: int = 1, timeout: float = 20, where: str = "out") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out, err = self.text()
            if (out if where == "out" else err).count(needle) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        out, err = self.text()
        raise AssertionError(f"{needle!r} x{count} not seen in {where}; out: {out[-2000:]!r} err: {err[-2000:]!r}")

    def finish(self, timeout: float = 20) -> int:
        try:
            status = self.proc.wait(timeout)
        finally:
            self.close()
        for t in self._threads:
            t.join(5)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def acpi_guest(guests: Path, mode: str, *extra: str, name: str | None = None) -> list[str]:
    args = ["-m", "64", "--kernel", str(guests / "acpi.elf"), "--cmdline", f"mode={mode}", *extra]
    return args + ([name] if name else [])


def guest_lines(out: str) -> list[str]:
    return [line[len("acpi: "):] for line in out.splitlines() if line.startswith("acpi: ")]


# -- the tables, as the guest reads them --------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2])
def test_the_guest_finds_every_table_through_the_rsdp(guests, cpus):
    r = run_vmm("run", *acpi_guest(guests, "none", "-c", str(cpus), "--no-reboot"))
    assert r.status == EXIT_OK, r.err
    lines = guest_lines(r.out)
    assert not [line for line in lines if "BAD" in line], r.out
    rsdp = f"{platform.ACPI_TABLES_START:#x}"
    assert lines[0] == f"rsdp {rsdp} (start info) scan {rsdp} revision 2 oem ASYNCV"
    tables = [m.group(1) for line in lines if (m := re.match(r"table (\w{4}) at 0x[0-9a-f]+ len \d+ ok$", line))]
    assert sorted(tables) == ["APIC", "DSDT", "FACP", "MCFG", "XSDT"]
    assert (f"fadt sci {platform.ACPI_SCI_IRQ} pm1a_evt {platform.ACPI_PM1_EVT_PORT:#x}/{platform.ACPI_PM1_EVT_LEN} "
            f"pm1a_cnt {platform.ACPI_PM1_CNT_PORT:#x}/{platform.ACPI_PM1_CNT_LEN} smi_cmd 0x0 "
            f"reset io {platform.RESET_CONTROL_PORT:#x} value {acpi_pm.RESET_VALUE:#x} flags 0x565") in lines
    assert f"s5 slp_typ {acpi_pm.SleepType.S5}" in lines
    assert "facs ok" in lines
    ids = ",".join(str(i) for i in range(cpus))
    assert (f"madt lapics {cpus} ids {ids} ioapic {platform.IOAPIC_START:#x} gsi_base 0 "
            f"sci gsi {platform.ACPI_SCI_IRQ} flags 0xd") in lines
    assert f"mcfg {platform.PCI_ECAM_START:#x} segment 0 bus 0-255" in lines
    assert lines[-1] == "tables ok"


def test_no_acpi_leaves_the_tables_and_the_pm_block_out(guests):
    r = run_vmm("run", *acpi_guest(guests, "power", "--no-acpi", "--no-reboot"))
    assert r.status == EXIT_OK, r.err
    assert guest_lines(r.out) == ["no rsdp"]
    assert "ACPI:" not in r.err


@pytest.mark.parametrize("acpi_on", [True, False], ids=["acpi", "no-acpi"])
def test_both_boot_protocols_are_given_the_rsdp(guests, acpi_on):
    """PVH's hvm_start_info.rsdp_paddr and bzImage's boot_params.acpi_rsdp_addr, as the
    loaders left them in guest RAM (the machine built, not run)."""
    import struct

    from asyncvmm.boot import layout, linux, pvh
    from asyncvmm.console import Console
    from asyncvmm.machine import BootImages, Machine

    want = platform.ACPI_TABLES_START if acpi_on else 0
    for kernel in ("acpi.elf", "bzimage64.bin"):
        cfg = VmConfig(memory=64 << 20, kernel=str(guests / kernel), acpi=acpi_on)
        m = Machine(cfg, Console(), BootImages.load(cfg))
        try:
            m.build()
            if kernel.endswith(".elf"):
                start_info = pvh.HVM_START_INFO.unpack(m.mem.read(layout.PVH_START_INFO_START, pvh.HVM_START_INFO.size))
                rsdp = start_info[6]  # rsdp_paddr
            else:
                offset, fmt = linux.FIELDS["acpi_rsdp_addr"]
                (rsdp,) = struct.unpack("<" + fmt, m.mem.read(layout.ZERO_PAGE_START + offset, 8))
            assert rsdp == want, kernel
            assert (m.mem.read(platform.ACPI_TABLES_START, 8) == b"RSD PTR ") is acpi_on
            assert (m.pio.find(platform.ACPI_PM_PORT) is not None) is acpi_on
        finally:
            m.close()


# -- power off: SIGTERM, ctl destroy, the API -------------------------------------------------
def test_sigterm_presses_the_power_button_and_the_guest_powers_off_through_s5(guests):
    with Vmm(*acpi_guest(guests, "power", "-c", "2")) as vmm:
        vmm.wait_for("acpi: waiting for the power button")
        vmm.proc.send_signal(signal.SIGTERM)
        status = vmm.finish()
    out, err = vmm.text()
    assert status == EXIT_OK, err
    assert "acpi: sci on ioapic pin 9 level active-high" in out  # as the MADT's override says
    assert "acpi: power button pressed, entering S5" in out
    assert "still running" not in out
    assert "SIGTERM: pressed the ACPI power button" in err
    assert "guest powered off through ACPI S5" in err


def test_a_second_sigterm_stops_a_guest_that_ignores_the_button(guests):
    with Vmm(*acpi_guest(guests, "deaf")) as vmm:
        vmm.wait_for("acpi: waiting for the power button (deaf)")
        vmm.proc.send_signal(signal.SIGTERM)
        vmm.wait_for("acpi: power button pressed, ignored")
        vmm.proc.send_signal(signal.SIGTERM)
        status = vmm.finish()
    out, err = vmm.text()
    assert status == EXIT_HOST
    assert "stopped by SIGTERM" in err and "powered off" not in err


def test_sigint_stops_at_once(guests):
    with Vmm(*acpi_guest(guests, "deaf")) as vmm:
        vmm.wait_for("acpi: waiting for the power button (deaf)")
        vmm.proc.send_signal(signal.SIGINT)
        status = vmm.finish()
    out, err = vmm.text()
    assert status == EXIT_HOST and "stopped by SIGINT" in err
    assert "power button pressed" not in out


def test_sigterm_stops_a_guest_that_does_not_listen_for_the_button(guests):
    with Vmm("-m", "64", "--kernel", str(guests / "counter.elf")) as vmm:
        vmm.wait_for("tick 2")
        vmm.proc.send_signal(signal.SIGTERM)
        status = vmm.finish()
    assert status == EXIT_HOST
    assert "stopped by SIGTERM (the guest does not listen for the ACPI power button)" in vmm.text()[1]


@pytest.fixture
def short_run_dir(tmp_path_factory):
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="avmm-pw-"))  # a socket's path must fit in 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ctl_destroy_powers_the_guest_off_through_acpi(guests, short_run_dir):
    env = {**os.environ, "ASYNCVMM_RUN_DIR": str(short_run_dir)}
    with Vmm(*acpi_guest(guests, "power", name="pw"), env=env) as vmm:
        vmm.wait_for("acpi: waiting for the power button")
        t0 = time.monotonic()
        r = run_vmm("ctl", "destroy", "pw", "--timeout", "20", env=env)
        took = time.monotonic() - t0
        status = vmm.finish()
    assert r.status == 0, r.err
    assert r.out.strip() == "VM pw powered off (the guest shut down through ACPI)"
    assert took < 10
    assert status == EXIT_OK
    assert "guest powered off through ACPI S5" in vmm.text()[1]
    r = run_vmm("ctl", "destroy", "pw", "--json", env=env)
    assert r.status == 2  # gone


def test_ctl_destroy_of_a_guest_that_ignores_the_button_stops_it_after_the_timeout(guests, short_run_dir):
    env = {**os.environ, "ASYNCVMM_RUN_DIR": str(short_run_dir)}
    with Vmm(*acpi_guest(guests, "deaf", name="deaf"), env=env) as vmm:
        vmm.wait_for("acpi: waiting for the power button (deaf)")
        t0 = time.monotonic()
        r = run_vmm("ctl", "destroy", "deaf", "--timeout", "1", "--json", env=env)
        took = time.monotonic() - t0
        status = vmm.finish()
    assert r.status == 0, r.err
    assert '"how": "hard"' in r.out
    assert 1 <= took < 8
    assert status == EXIT_HOST
    out, err = vmm.text()
    assert "acpi: power button pressed, ignored" in out
    assert "the guest did not power off within 1 s" in err


def test_api_destroy_says_how_the_vm_ended(guests):
    def cfg(mode: str, name: str) -> VmConfig:
        return VmConfig(name=name, memory=64 << 20, kernel=str(guests / "acpi.elf"), cmdline=f"mode={mode}", cpus=2)

    async def main():
        async with VM(cfg("power", "api-power")) as vm:
            await vm.console.expect(rb"waiting for the power button\n")
            assert await vm.destroy(timeout=20) == "acpi"
            stop = await vm.wait()
            assert stop.reason is StopReason.POWEROFF and "S5" in stop.message
        async with VM(cfg("none", "api-none")) as vm:  # the tables, but nobody enables the event
            await vm.console.expect(rb"tables ok\n")
            t0 = time.monotonic()
            assert await vm.destroy(timeout=20) == "hard"
            assert time.monotonic() - t0 < 2  # not left to wait for a guest that cannot hear
        async with VM(cfg("deaf", "api-deaf")) as vm:
            await vm.console.expect(rb"\(deaf\)\n")
            stop = await vm.shutdown(timeout=0.5)
            assert stop.reason is StopReason.HOST and "did not power off within 0.5 s" in stop.message
            assert b"power button pressed, ignored" in vm.console.transcript

    run_loop(main())


# -- resets ---------------------------------------------------------------------------------
def test_the_acpi_reset_register_resets_the_guest(guests):
    r = run_vmm("run", *acpi_guest(guests, "reset", "--no-reboot"))
    assert r.status == EXIT_OK, r.err
    assert "acpi: reset through RESET_REG" in r.out and "still running" not in r.out
    assert "guest reset through the reset control register (0xCF9)" in r.err  # the FADT's RESET_REG, as q35's


@pytest.mark.parametrize("guest, cmdline, seen, cause", [
    ("acpi", "mode=reset", "acpi: reset through RESET_REG", "guest reset through the reset control register (0xCF9)"),
    ("hello", "", "hello from the guest", "guest reset through the i8042 reset line"),
    ("triple", "", "triple fault next", "triple fault at RIP"),
], ids=["acpi", "i8042", "triple-fault"])
def test_each_reset_path_restarts_the_guest_and_says_why(guests, guest, cmdline, seen, cause):
    with Vmm("-m", "64", "--kernel", str(guests / f"{guest}.elf"), "--cmdline", cmdline) as vmm:
        vmm.wait_for(seen, count=3)
        vmm.proc.send_signal(signal.SIGINT)
        status = vmm.finish()
    out, err = vmm.text()
    assert status == EXIT_HOST
    assert re.search(re.escape(cause) + r".*: restarting the guest", err), err


# -- vCPUs: the MADT's APIC IDs, CPUID's topology, pinning ---------------------------------------
@pytest.mark.parametrize("spec, topo", [
    ("2", Topology(2, 1, 1)),
    ("cpus=6,sockets=2,cores=3", Topology(2, 3, 1)),  # 3 cores: APIC IDs 0,1,2,4,5,6
    ("sockets=1,cores=2,threads=2", Topology(1, 2, 2)),
])
def test_every_vcpu_the_madt_lists_comes_up_with_its_topology_in_cpuid(guests, spec, topo):
    r = run_vmm("run", *acpi_guest(guests, "cpus", "-c", spec, "--no-reboot"), timeout=60)
    assert r.status == EXIT_OK, r.err
    lines = guest_lines(r.out)
    ids = topo.apic_ids()
    assert f"madt lapics {topo.cpus} ids {','.join(map(str, ids))}" in " ".join(lines)
    per_package = 1 << topo.package_bits
    want = {
        f"cpu apic {a} leaf1 {a}/{per_package} leafb {topo.thread_bits}:{topo.threads} "
        f"{topo.package_bits}:{topo.cores * topo.threads} x2apic {a} ext {a}"
        for a in ids
    }
    got = {line for line in lines if line.startswith("cpu apic")}
    assert got == want, r.out
    assert f"{topo.cpus} of {topo.cpus} cpus up" in lines


def test_pinned_vcpu_threads_run_only_on_their_host_cpu(guests):
    allowed = sorted(os.sched_getaffinity(0))
    pins = {0: allowed[-1], 1: allowed[0]}

    def threads() -> dict[str, int]:
        return {name: tid for tid, name in thread_names().items()}

    async def main():
        cfg = VmConfig(name="pinned", memory=64 << 20, kernel=str(guests / "counter.elf"), cpus=2, pins=pins)
        async with VM(cfg) as vm:
            await vm.console.expect(rb"tick 1\n")
            t = threads()
            assert os.sched_getaffinity(t["vcpu0"]) == {pins[0]}
            assert os.sched_getaffinity(t["vcpu1"]) == {pins[1]}
            await vm.kill()
        cfg = VmConfig(name="unpinned", memory=64 << 20, kernel=str(guests / "counter.elf"), cpus=1)
        async with VM(cfg) as vm:
            await vm.console.expect(rb"tick 1\n")
            assert os.sched_getaffinity(threads()["vcpu0"]) == set(allowed)
            await vm.kill()

    run_loop(main())


# -- -e ----------------------------------------------------------------------------------------
def test_strict_io_stops_at_a_port_nothing_emulates(guests):
    args = ["-m", "64", "--kernel", str(guests / "exitbench.elf"), "--cmdline", "n=3 port=0x1234", "--no-reboot"]
    r = run_vmm("run", *args)
    assert r.status == EXIT_OK and "exitbench done" in r.out  # without -e: an empty bus
    r = run_vmm("run", *args, "-e")
    assert r.status == EXIT_ERROR
    assert "exitbench done" not in r.out
    lines = [line for line in r.err.splitlines() if "nothing emulates" in line]
    assert len(lines) == 1, r.err
    assert re.search(r"vCPU 0: write of 1 byte at port 0x1234, which nothing emulates, at RIP 0x[0-9a-f]{6,} \(-e\)$",
                     lines[0]), lines[0]
