"""The embedding API on a real KVM: the VMM's messages through `logging`, unnamed VMs."""

from __future__ import annotations

import asyncio
import logging

from conftest import needs_kvm

from asyncvmm import VM, VmConfig
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

pytestmark = needs_kvm


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_service_routes_the_vmm_messages_through_named_loggers(guests):
    machine, quirks = Records(), Records()
    logging.getLogger("asyncvmm.machine").addHandler(machine)
    logging.getLogger("asyncvmm.quirks").addHandler(quirks)
    cfg = VmConfig(memory="64M", kernel=str(guests / "hello.elf"), no_reboot=True)
    try:
        async def main():
            async with VM(cfg) as vm:
                return await asyncio.wait_for(vm.wait(), 20)

        stop = run_loop(main())
    finally:
        logging.getLogger("asyncvmm.machine").removeHandler(machine)
        logging.getLogger("asyncvmm.quirks").removeHandler(quirks)
    assert stop.reason is StopReason.RESET
    said = [r.getMessage() for r in machine.records]
    assert any(m.startswith("KVM: ") and "CPU template" in m for m in said), said  # the probe
    assert any(m.startswith("boot: ") for m in said), said
    assert all(r.name == "asyncvmm.machine" and r.levelno == logging.INFO for r in machine.records)
    emulating = any("quirks for an emulating KVM on" in m for m in said)
    assert bool(quirks.records) == emulating  # the quirks speak only where they apply
    assert all(r.getMessage().startswith("quirks: ") for r in quirks.records)


def test_a_reset_is_one_line_and_the_probe_is_said_once(guests):
    """hello resets at its end: without no_reboot it boots again and again."""
    records = Records()
    logging.getLogger("asyncvmm").addHandler(records)
    cfg = VmConfig(memory="64M", kernel=str(guests / "hello.elf"))
    try:
        async def main():
            async with VM(cfg) as vm:
                while vm.boots < 4:
                    await asyncio.sleep(0.05)
                return await vm.kill()

        run_loop(main())
    finally:
        logging.getLogger("asyncvmm").removeHandler(records)
    said = [r.getMessage() for r in records.records]
    assert sum(m.startswith("KVM: ") for m in said) == 1, said
    assert sum(m.startswith("boot: ") for m in said) == 1, said
    resets = [m for m in said if "restarting the guest" in m]
    assert len(resets) >= 3 and "(boot 2)" in resets[0], resets
    assert len(said) <= 4 + len(resets) + 4, said  # probe, quirks, ACPI, boot; one line per reset


def test_two_unnamed_vms_in_one_process(guests):
    async def main():
        cfgs = [VmConfig(memory="64M", kernel=str(guests / "counter.elf"), cmdline="delay=100") for _ in range(2)]
        async with VM(cfgs[0]) as a, VM(cfgs[1]) as b:
            assert a.config.name != b.config.name and a.control is not None and b.control is not None
            await a.console.expect(rb"tick 1\n", timeout=20)
            await b.console.expect(rb"tick 1\n", timeout=20)

    run_loop(main())


def test_the_readme_snippet_runs_from_any_directory(guests, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("import asyncio, re")
    snippet = readme[start : readme.index("```", start)]
    p = subprocess.run([sys.executable, "-c", snippet], capture_output=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().strip() == "42"
