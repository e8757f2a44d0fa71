"""The slow tier: the small Linux kernel (tools/kernel/build-small-kernel) in ONE VM run.

CI may boot Linux at most twice, so every Linux check shares this run:

    boot 1   -c 2 and a virtio-blk disk; FIRST_BOOT_CHECKS read its log
    SysRq b  the kernel resets through the ACPI reset register; the VM restarts it
    boot 2   SECOND_BOOT_CHECKS read its log
    SysRq o  the kernel powers off through ACPI S5: the VM ends, status 0

Another issue's checks fold in as one more function in FIRST_BOOT_CHECKS (a check reads
a boot's console log and raises AssertionError), or as one more step in `main`. Every
check runs even when an earlier one fails; the test then fails with all of them.

On this emulating KVM user space cannot run, so the kernel is the client: its initrd
holds one program, /init (tools/kernel/spin-init.S), which spins in user mode without a
system call, so the kernel stays up after "Run /init" (with its console open, which is
when serial SysRq works). The kernel is the bzImage: on an emulating KVM the VMM unpacks
its payload and enters it through PVH, and appends the parameters that KVM needs (issue
3's quirks); --profile-boot's report is checked at the end.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from asyncvmm import VM, VmConfig
from asyncvmm.config import parse_slot
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason
from asyncvmm.quirks import LINUX_CLEARCPUID, linux_parameters
from asyncvmm.runner import STATUS

from conftest import needs_kvm
from linux_guest import PRINTK_TIME, small_kernel, spin_initramfs

pytestmark = [pytest.mark.slow, needs_kvm]

CPUS = 2
DISK_SLOT = 3  # a virtio-blk disk, so the PCI root the DSDT describes has a device behind it
DISK_SECTORS = 16384
CMDLINE = "console=ttyS0 panic=-1"  # what a user types: the VMM adds what this KVM needs
RIP_SAMPLE_MS = 5
BOOT_TIMEOUT = 420.0  # one boot, seconds of wall time (about 100-200 s here, loaded)
UP = rb"Run /init as init process"


# -- checks of a boot's log ---------------------------------------------------------------
def check_cpus_came_up(log: str) -> None:
    assert f"smp: Brought up 1 node, {CPUS} CPUs" in log, "the kernel did not bring up both vCPUs"
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in log


def check_acpi_is_clean(log: str) -> None:
    """No ACPI error, warning or firmware bug about our tables."""
    bad = [line for line in log.splitlines()
           if re.search(r"ACPI (Error|Warning|BIOS Error|BIOS Warning)|ACPI Exception|\[Firmware (Bug|Warn)\]", line)
           # not about tables: the AMD TSC's HWCR MSR bit (TscFreqSel) KVM leaves clear
           and "TSC doesn't count with P0 frequency" not in line]
    assert not bad, "\n".join(bad)
    for line in (
        "ACPI: PM: (supports S0 S5)",
        "ACPI: Interpreter enabled",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved in ACPI motherboard resources",
        "ACPI: button: Power Button [PWRF]",
        "ttyS0 at I/O 0x3f8 (irq = 4",  # COM1 through its PNP0501 device
    ):
        assert line in log, f"missing from the log: {line!r}"


def check_every_pci_device_was_found(log: str) -> None:
    """The host bridge and the disk enumerated on bus 0 behind the DSDT's root (Linux
    takes ECAM, as the MCFG says, for the extended config space), their BARs inside the
    root's windows."""
    for slot in (0, DISK_SLOT):
        found = re.search(rf"pci 0000:00:{slot:02x}\.0: \[[0-9a-f]{{4}}:[0-9a-f]{{4}}\]", log)
        assert found, f"no device at 00:{slot:02x}.0"
    bad = [line for line in log.splitlines()
           if re.search(r"can't claim|no space for|failed to assign|BAR \d+: .*conflict", line)]
    assert not bad, "\n".join(bad)
    assert f"virtio_blk virtio0: [vda] {DISK_SECTORS} 512-byte logical blocks" in log


def check_the_command_line(log: str, emulating: bool) -> None:
    """The user's command line first, then exactly the parameters the VMM appended (on an
    emulating KVM only), and the kernel took the clearcpuid list: it names each bit."""
    got = re.search(r"Kernel command line: (.*)", log).group(1).split()
    assert got[:2] == CMDLINE.split()
    if not emulating:
        assert got == CMDLINE.split()
        return
    assert got[2:] == linux_parameters()
    cleared = re.search(r"Clearing CPUID bits: (.*)", log).group(1).split()
    assert cleared == [name for name, _, _ in LINUX_CLEARCPUID]


def check_kvm_and_its_clock(log: str) -> None:
    assert "Hypervisor detected: KVM" in log
    assert "kvm-clock: Using msrs" in log


FIRST_BOOT_CHECKS = [check_cpus_came_up, check_acpi_is_clean, check_every_pci_device_was_found,
                     check_kvm_and_its_clock]
SECOND_BOOT_CHECKS = [check_cpus_came_up]


# -- the run ------------------------------------------------------------------------------
async def boot_log(vm: VM, boots: int, timeout: float = BOOT_TIMEOUT) -> str:
    """The console output of boot number `boots`, up to the kernel starting /init."""
    m = await vm.console.expect(rb"(?s)(Linux version .*?" + UP + rb")", timeout=timeout)
    assert vm.boots == boots, f"expected boot {boots}, the VM is at boot {vm.boots}"
    return m.group(1).decode(errors="replace")


async def sysrq(vm: VM, key: bytes) -> None:
    """A serial break, then the SysRq key (the 8250 driver takes the next byte as one)."""
    await vm.sysrq(key.decode())


async def sysrq_output(vm: VM, key: bytes, first: bytes, last: bytes, quiet: float = 2.0) -> str:
    """What the kernel prints for a SysRq key, from `first` to `last`, without timestamps;
    returns once the console has been quiet for `quiet` seconds (a key sent while the
    kernel still prints may have its own message lost, as a reset's would)."""
    await sysrq(vm, key)
    m = await vm.console.expect(rb"(?s)(" + first + rb".*?" + last + rb")", timeout=120)
    text = m.group(1).decode(errors="replace")
    while True:
        try:
            await vm.console.expect(rb"\n", timeout=quiet)
        except TimeoutError:
            break
    return "\n".join(PRINTK_TIME.sub("", line) for line in text.splitlines())


def run_checks(checks, log: str, boot: str, failures: list[str]) -> None:
    for check in checks:
        try:
            check(log)
        except AssertionError as e:
            failures.append(f"{boot}: {check.__name__}: {e}")


def test_linux_smp_acpi_reset_and_power_off(tmp_path, capfd, emulating_kvm):
    kernel = small_kernel() / "bzImage"
    initrd = spin_initramfs()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(DISK_SECTORS * 512))
    cfg = VmConfig(name="linux-slow", cpus=CPUS, memory=256 << 20, kernel=str(kernel), initrd=str(initrd),
                   cmdline=CMDLINE, slots=[parse_slot(f"{DISK_SLOT},virtio-blk,{disk}")],
                   profile_boot=True, profile_rip_ms=RIP_SAMPLE_MS)
    failures: list[str] = []
    times: dict[str, float] = {}
    console_log = tmp_path / "console.log"
    report: list[str] = []

    async def main():
        async with VM(cfg) as vm:
            try:
                return await steps(vm)
            finally:  # the whole console, for whoever reads a failure
                console_log.write_bytes(bytes(vm.console.transcript))

    async def steps(vm: VM):
        t0 = time.monotonic()
        first = await boot_log(vm, 1)
        times["first boot"] = time.monotonic() - t0
        run_checks(FIRST_BOOT_CHECKS, first, "boot 1", failures)
        run_checks([lambda log: check_the_command_line(log, emulating_kvm)], first, "boot 1", failures)

        # The kernel stays up after init: SysRq over the serial line works.
        help_text = await sysrq_output(vm, b"h", rb"sysrq: HELP :", rb"show-all-timers\(q\)")
        if "reboot(b)" not in help_text or "show-all-timers(q)" not in help_text:
            failures.append(f"boot 1: SysRq h: {help_text!r}")
        timers = await sysrq_output(vm, b"q", rb"sysrq: Show clockevent devices", rb"Wakeup Device")
        # The MADT gives Linux its local APIC timer (KVM's): the PIT only served early boot.
        if not re.search(r"Per CPU device: 0\s+Clock Event Device:\s+lapic", timers):
            failures.append(f"boot 1: SysRq q: the tick device is not the LAPIC's:\n{timers}")

        await sysrq(vm, b"b")
        await vm.console.expect(rb"sysrq: Resetting", timeout=60)
        t1 = time.monotonic()
        second = await boot_log(vm, 2)  # the VM restarted the guest: boot 2
        times["second boot"] = time.monotonic() - t1
        run_checks(SECOND_BOOT_CHECKS, second, "boot 2", failures)

        await sysrq(vm, b"o")
        await vm.console.expect(rb"sysrq: Power Off", timeout=60)
        stop = await asyncio.wait_for(vm.wait(), 120)
        report.append(vm.profile.report())  # of the first boot
        return stop, bytes(vm.console.transcript)

    try:
        stop, transcript = run_loop(main())
    except (TimeoutError, EOFError) as e:
        raise AssertionError(f"{e} (the console: {console_log})") from None
    err = capfd.readouterr().err
    with capfd.disabled():
        print(f"\nwall time: {', '.join(f'{k} {v:.1f} s' for k, v in times.items())}")
    # SysRq b took the ACPI reset register (Linux's first choice), not the i8042 or a triple fault.
    assert "guest reset through the ACPI reset register: restarting the guest" in err, err
    assert stop.reason is StopReason.POWEROFF, (stop, transcript[-3000:])
    assert stop.message == "guest powered off through ACPI S5"  # not a triple fault, not the host
    assert STATUS[stop.reason] == 0  # `asyncvmm run`'s status for it
    assert b"reboot: Power down" in transcript
    check_the_vmm_log(err, report[0], emulating_kvm, failures)
    assert not failures, "\n".join(failures)


def check_the_vmm_log(err: str, report: str, emulating: bool, failures: list[str]) -> None:
    """What the VMM said: the boot path and the quirks (only on an emulating KVM), and the
    boot profile of the first boot."""
    expected = [
        "payload unpacked by the VMM (lz4," if emulating else "the kernel decompresses itself",
        "entered through the vmlinux's PVH entry" if emulating else "64-bit boot protocol",
    ]
    if emulating:
        expected += [
            "quirks for an emulating KVM on",
            "quirks: kvm-pv-hypercalls: hidden from the guest: kvm_pv_unhalt, kvm_pv_send_ipi",
            "quirks: vmm-pit:",
            f"appended to the kernel command line: {' '.join(linux_parameters())}",
        ]
    failures += [f"VMM log: missing {line!r}" for line in expected if line not in err]
    if not emulating and "quirks" in err:
        failures.append("VMM log: quirks on hardware KVM")
    phases = dict(re.findall(r"^  (VMM set-up|entry to kernel|kernel to init|after init)\s+([\d.]+) s", report, re.M))
    if set(phases) != {"VMM set-up", "entry to kernel", "kernel to init", "after init"}:
        failures.append(f"profile: phases {sorted(phases)}:\n{report}")
    elif not (float(phases["VMM set-up"]) < 5 and float(phases["entry to kernel"]) < 5):
        failures.append(f"profile: set-up or entry too long (the VMM unpacks):\n{report}")
    if not re.search(r"^  IO\s+\d+\s+[\d.]+ s \(of which \d+ served in C", report, re.M):
        failures.append(f"profile: no IO exits line:\n{report}")
    m = re.search(rf"RIP samples: (\d+) \(every {RIP_SAMPLE_MS} ms, all vCPUs\), named from (\S+?);", report)
    hottest = re.findall(r"^\s+[\d.]+%\s+\d+\s+(\S+)$", report, re.M)
    if not (m and int(m.group(1)) > 1000 and m.group(2).endswith("System.map") and len(hottest) >= 10
            and not all(name.startswith("0x") for name in hottest)):
        failures.append(f"profile: RIP samples not named:\n{report}")
