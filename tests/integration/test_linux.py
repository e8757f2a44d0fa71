"""The slow tier: what the small Linux kernel reports when asyncvmm boots it (one boot for
all of these, tests/linux_boot.py). On an emulating KVM the bzImage's payload is
unpacked by the VMM and entered through PVH, under the quirks; on hardware KVM the kernel
decompresses itself and no quirk applies."""

from __future__ import annotations

import re

import pytest

from asyncvmm.quirks import LINUX_CLEARCPUID, PIT_MIN_IRQ_INTERVAL_NS, linux_parameters

pytestmark = pytest.mark.slow


def test_the_kernel_reaches_init(linux_boot):
    linux_boot.need_init()
    text = linux_boot.guest.console_text()
    assert "Linux version 6.1" in text
    assert "Kernel panic" not in text  # the init never returns nor faults: no panic after it


def test_the_log_says_how_it_booted(linux_boot, emulating_kvm):
    log = linux_boot.guest.log_text()
    if emulating_kvm:
        assert "quirks for an emulating KVM on" in log
        assert "quirks: kvm-pv-hypercalls: hidden from the guest: kvm_pv_unhalt" in log
        assert "quirks: vmm-pit:" in log
        assert re.search(r"payload unpacked by the VMM \(lz4, [\d.]+ MB -> [\d.]+ MB in [\d.]+ s\), "
                         r"entered through the vmlinux's PVH entry", log), log
    else:
        assert "the kernel decompresses itself" in log
        assert "quirks" not in log


def test_linux_parameters_reach_the_kernel_only_on_an_emulating_kvm(linux_boot, emulating_kvm):
    linux_boot.need_init()
    text = linux_boot.guest.console_text()
    m = re.search(r"Kernel command line: (.*)", text)
    assert m, "the kernel printed no command line"
    got = m.group(1).split()
    assert got[:2] == ["console=ttyS0", "panic=-1"]  # what the user typed comes first
    if emulating_kvm:
        assert got[2:] == linux_parameters()
        assert f"appended to the kernel command line: {' '.join(linux_parameters())}" in linux_boot.guest.log_text()
        # The kernel took the list: it names every feature it cleared.
        cleared = re.search(r"Clearing CPUID bits: (.*)", text).group(1).split()
        assert cleared == [name for name, _, _ in LINUX_CLEARCPUID]
    else:
        assert got == ["console=ttyS0", "panic=-1"]


def test_the_kernel_finds_kvm_and_its_clock(linux_boot):
    text = linux_boot.guest.console_text()
    assert "Hypervisor detected: KVM" in text
    assert re.search(r"kvm-clock: Using msrs", text)


def test_sysrq_on_the_serial_console_after_init(linux_boot):
    help_line = linux_boot.step("sysrq-help")
    assert "reboot(b)" in help_line and "show-all-timers(q)" in help_line


def test_the_tick_comes_from_the_vmm_pit(linux_boot, emulating_kvm):
    timers = linux_boot.step("sysrq-timers")
    # Without an ACPI MADT (or MP table) Linux sets up no local APIC timer and the PIT is
    # its tick device; with one, the LAPIC's (KVM's) takes over and the PIT is stopped.
    no_madt = "APIC: ACPI MADT or MP tables are not detected" in linux_boot.guest.console_text()
    tick = "pit" if no_madt else "lapic"
    assert re.search(rf"Per CPU device: 0\s+Clock Event Device:\s+{tick}", timers), timers
    log = linux_boot.guest.log_text()
    m = re.search(r"VMM PIT: (\d+) IRQ0s raised", log)
    if not emulating_kvm:
        assert m is None  # the in-kernel PIT
        return
    assert m, log
    irqs = int(m.group(1))
    total = float(re.search(r"total\s+([\d.]+) s", log).group(1))
    assert irqs <= total / (PIT_MIN_IRQ_INTERVAL_NS / 1e9) + 1  # at most one every 20 ms
    if no_madt:
        assert irqs > 100  # it ticked the whole boot


def test_sysrq_b_resets_and_the_vmm_ends_cleanly(linux_boot):
    linux_boot.need_init()
    assert linux_boot.reset_seen, linux_boot.steps.get("reset")
    assert linux_boot.status == 0  # a reset with --no-reboot
    assert "guest reset" in linux_boot.guest.log_text()


def test_the_boot_profile(linux_boot):
    linux_boot.need_init()
    log = linux_boot.guest.log_text()
    assert "boot profile (wall time):" in log
    phases = dict(re.findall(r"^  (VMM set-up|entry to kernel|kernel to init|after init)\s+([\d.]+) s", log, re.M))
    assert set(phases) == {"VMM set-up", "entry to kernel", "kernel to init", "after init"}, log
    assert float(phases["VMM set-up"]) < 5 and float(phases["kernel to init"]) > 1
    assert re.search(r"^  IO\s+\d+\s+[\d.]+ s \(of which \d+ served in C", log, re.M)
    m = re.search(r"RIP samples: (\d+) \(every 5 ms, all vCPUs\), named from (\S+?);", log)
    assert m and int(m.group(1)) > 1000 and m.group(2).endswith("System.map"), log
    hottest = re.findall(r"^\s+[\d.]+%\s+\d+\s+(\S+)$", log, re.M)
    assert len(hottest) >= 10 and not all(name.startswith("0x") for name in hottest)
