"""The fast tier for issue 3's machinery, with freestanding test guests: the VMM's PIT
(and KVM's, without quirks), SysRq over the control socket, the boot profile, and that
test guests get no Linux parameters."""

from __future__ import annotations

import re

from conftest import needs_kvm, run_vmm
from linux_guest import LinuxGuest

pytestmark = needs_kvm


def boot(guests, name, *extra, cmdline="", timeout=30):
    return run_vmm("run", "-m", "64", "--kernel", str(guests / f"{name}.elf"), "--cmdline", cmdline, "--no-reboot",
                   *extra, timeout=timeout)


def pit_numbers(out: str) -> tuple[float, int]:
    m = re.search(r"10ms tsc=(\d+) 50ms tsc=(\d+)", out)
    irqs = re.search(r"1000 Hz for 500 ms: (\d+) interrupts", out)
    assert m and irqs, out
    return int(m.group(2)) / int(m.group(1)), int(irqs.group(1))


def test_the_pit_as_linux_uses_it(guests, emulating_kvm):
    r = boot(guests, "pit")
    assert r.status == 0, r.err
    ratio, irqs = pit_numbers(r.out)
    assert 3.5 < ratio < 6.5  # channel 2's OUT through port 0x61 keeps time
    if emulating_kvm:  # the VMM's PIT: IRQ0 at most every 20 ms
        assert "quirks: vmm-pit" in r.err
        assert 15 <= irqs <= 26, r.out
    else:  # KVM's PIT at the programmed 1000 Hz
        assert "vmm-pit" not in r.err
        assert irqs > 250, r.out


def test_kvms_pit_without_quirks(guests):
    r = boot(guests, "pit", "--no-quirks")
    assert r.status == 0, r.err
    ratio, irqs = pit_numbers(r.out)
    assert 3.5 < ratio < 6.5 and irqs > 250, r.out
    assert "vmm-pit" not in r.err


def test_test_guests_get_no_linux_parameters(guests):
    r = boot(guests, "hello", cmdline="console=ttyS0")
    assert "cmdline: console=ttyS0\n" in r.out
    assert "linux-cmdline" not in r.err


def test_sysrq_through_the_control_socket(guests):
    with LinuxGuest(guests / "sysrq.elf", memory="64M", cmdline="") as g:
        g.wait_for(r"sysrq ready", timeout=20)
        assert "SysRq h sent" in g.sysrq("h")
        g.wait_for(r"^break$", timeout=10)
        g.wait_for(r"^sysrq h$", timeout=10)
        bad = g.ctl("sysrq", "--json")  # no key
        assert bad.returncode == 2
        g.sysrq("q")  # the guest resets on q after a break
        g.wait_for(r"^sysrq q$", timeout=10)
        assert g.wait_exit(20) == 0
    assert "byte" not in g.console_text()  # the 0 of each break was never taken for data


def test_sysrq_key_must_be_one_character(guests):
    r = run_vmm("ctl", "sysrq", "no-such-vm", "hh")
    assert r.status == 2 and "one printable character" in r.err
    r = run_vmm("ctl", "sysrq", "no-such-vm", "h")
    assert r.status == 2


def test_profile_boot_of_a_test_guest(guests):
    r = boot(guests, "pit", "--profile-rip", "1")
    assert r.status == 0, r.err
    assert "boot profile (wall time):" in r.err
    assert re.search(r"VMM set-up\s+[\d.]+ s\s+images", r.err)
    assert re.search(r"kernel \(init not reached\)\s+[\d.]+ s\s+-> guest reset", r.err)
    assert re.search(r"^  IO\s+\d+\s+[\d.]+ s", r.err, re.M)
    m = re.search(r"RIP samples: (\d+) \(every 1 ms, all vCPUs\), named from \S+pit.elf \(.symtab\)", r.err)
    assert m and int(m.group(1)) > 100, r.err
    assert re.search(r"^\s+[\d.]+%\s+\d+\s+ch2_wait$", r.err, re.M), r.err  # where the guest spins
    # KVM's own counters: the exits the VMM served are among KVM's (which does not count
    # every kind itself: kvm_pvm leaves io_exits at 0), and the guest's IRQ0s were injected
    io = re.search(r"^  IO\s+(\d+)", r.err, re.M)
    m = re.search(r"^  exits (\d+):", r.err, re.M)
    assert io and m and int(m.group(1)) >= int(io.group(1)) > 100, r.err
    m = re.search(r"^  injected: interrupts (\d+)", r.err, re.M)
    assert m and int(m.group(1)) >= 10, r.err
