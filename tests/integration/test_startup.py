"""`asyncvmm run`'s start-up: what a plain boot imports and which threads it starts.

A plain boot (a small PVH kernel, no disks, no firmware) must not pay for what it does not
use: each such module is milliseconds of every start (perf/README.md, "Where asyncvmm's
start-up goes"). The boot runs in a fresh interpreter, as the command does.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, needs_kvm

pytestmark = needs_kvm

PROBE = r"""
import sys, threading
started = []
start = threading.Thread.start
def recording_start(self):
    started.append(self.name)
    start(self)
threading.Thread.start = recording_start
from asyncvmm.cli import main
status = main(sys.argv[1:])
modules = sorted(sys.modules)
import json  # after the modules are taken: json is one of those a plain boot should not need
sys.stderr.write("\nRESULT " + json.dumps({"status": status, "threads": started, "modules": modules}) + "\n")
"""

# What only another kind of boot needs: firmware, a bzImage's unpacker, snapshots, gdb,
# the boot profile, a disk's boot menu; json is the control socket's, at its first request.
# termios and tty: only a terminal's console (here stdin and stdout are pipes).
NOT_FOR_A_PLAIN_BOOT = ("json", "bz2", "lzma", "shutil", "termios", "tty", "asyncvmm.boot.bootrom",
                        "asyncvmm.boot.unpack", "asyncvmm.snapshot", "asyncvmm.gdb", "asyncvmm.profile",
                        "asyncvmm.loader.boot", "asyncvmm.loader.menu", "asyncvmm.devices.virtio", "asyncvmm.jail")

# Every asyncvmm module a plain boot (with its ACPI tables) imports. Each costs every start
# its module body, its enum tables and dataclasses (~0.2-2 ms apiece): a module that joins
# this path is a choice, made here, not an accident of an import at the top of a file.
PLAIN_BOOT_MODULES = {
    "asyncvmm", "asyncvmm._abi", "asyncvmm._native", "asyncvmm._native.lib", "asyncvmm.api", "asyncvmm.boot",
    "asyncvmm.boot.acpi", "asyncvmm.boot.aml", "asyncvmm.boot.cpu_state", "asyncvmm.boot.cpuid",
    "asyncvmm.boot.elf", "asyncvmm.boot.layout", "asyncvmm.boot.linux", "asyncvmm.boot.loader",
    "asyncvmm.boot.pvh", "asyncvmm.boot.setup", "asyncvmm.bus", "asyncvmm.cli", "asyncvmm.cli_help",
    "asyncvmm.config", "asyncvmm.console", "asyncvmm.control", "asyncvmm.control.handlers",
    "asyncvmm.control.protocol", "asyncvmm.control.server", "asyncvmm.device_manager",
    "asyncvmm.device_manager.legacy", "asyncvmm.device_manager.pci", "asyncvmm.devices",
    "asyncvmm.devices.legacy", "asyncvmm.devices.legacy.acpi_pm", "asyncvmm.devices.legacy.i8042",
    "asyncvmm.devices.legacy.i8254", "asyncvmm.devices.legacy.isa_line", "asyncvmm.devices.legacy.reset_control",
    "asyncvmm.devices.legacy.rtc", "asyncvmm.devices.legacy.uart16550", "asyncvmm.devices.pci",
    "asyncvmm.devices.pci.config_space", "asyncvmm.devices.pci.device", "asyncvmm.devices.pci.q35",
    "asyncvmm.devices.pci.regs", "asyncvmm.devices.pci.root", "asyncvmm.devices.registry", "asyncvmm.devices.slots",
    "asyncvmm.disasm", "asyncvmm.errors", "asyncvmm.irq", "asyncvmm.loader", "asyncvmm.loader.cli",
    "asyncvmm.loader.errors", "asyncvmm.log", "asyncvmm.loop", "asyncvmm.machine", "asyncvmm.platform",
    "asyncvmm.poll", "asyncvmm.quirks", "asyncvmm.runner", "asyncvmm.seccomp", "asyncvmm.vstate",
    "asyncvmm.vstate.kvm", "asyncvmm.vstate.memory", "asyncvmm.vstate.probe", "asyncvmm.vstate.registers",
    "asyncvmm.vstate.vcpu", "asyncvmm.vstate.vcpus", "asyncvmm.vstate.vm",
}


def _boot(guests, *flags: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "-m", "64", "--kernel", str(guests / "hello.elf"), "--no-reboot", "-q", *flags],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        stdin=subprocess.DEVNULL,  # not pytest's terminal, if it has one: a terminal's console needs termios
    )
    assert "hello from the guest" in r.stdout, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("RESULT ")]
    assert line, r.stderr
    return json.loads(line[-1][len("RESULT "):])


def test_a_plain_boot_imports_nothing_it_does_not_use_and_starts_two_threads(guests):
    """Besides the vCPUs (C threads): the KVM probe's, which also makes the VM and maps its
    RAM while the main thread imports, and the console's output. A 9 KB kernel is read on
    the loop, so no worker thread (and no thread to shut the executor down)."""
    got = _boot(guests)
    assert got["status"] == 0
    assert sorted(got["threads"]) == ["console-stdout", "kvm-probe"]
    loaded = [m for m in got["modules"] if m in NOT_FOR_A_PLAIN_BOOT or m.startswith(tuple(p + "." for p in NOT_FOR_A_PLAIN_BOOT))]
    assert loaded == []


def test_without_acpi_the_tables_modules_are_not_imported(guests):
    with_acpi, without = _boot(guests)["modules"], _boot(guests, "--no-acpi")["modules"]
    tables = {"asyncvmm.boot.acpi", "asyncvmm.boot.aml", "asyncvmm.devices.legacy.acpi_pm"}
    assert tables <= set(with_acpi)
    assert not tables & set(without)


def test_a_plain_boot_imports_no_asyncvmm_module_beyond_its_list(guests):
    """The list above is the whole of asyncvmm a plain boot loads: a new module on that path
    (a device, a feature's import at the top of a shared file) fails here until it is
    either made lazy or added to PLAIN_BOOT_MODULES on purpose."""
    got = _boot(guests)
    assert got["status"] == 0
    extra = sorted(m for m in got["modules"] if m.startswith("asyncvmm") and m not in PLAIN_BOOT_MODULES)
    assert extra == [], f"a plain boot now imports {extra}: import them where they are used, or list them"
