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
NOT_FOR_A_PLAIN_BOOT = ("json", "bz2", "lzma", "shutil", "asyncvmm.boot.bootrom", "asyncvmm.boot.unpack",
                        "asyncvmm.snapshot", "asyncvmm.gdb", "asyncvmm.profile", "asyncvmm.loader.boot",
                        "asyncvmm.loader.menu")


def _boot(guests, *flags: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "-m", "64", "--kernel", str(guests / "hello.elf"), "--no-reboot", "-q", *flags],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
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
