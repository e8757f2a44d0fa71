"""The Q35 chipset on real KVM, driven by a test ROM (tests/guests/q35.S) from the reset vector
that does what OVMF's PlatformPei and SeaBIOS's pciinit.c do to it: the host bridge's ID,
PCIEXBAR and ECAM at the new base, the LPC's PMBASE/ACPI_EN and the PM timer's rate against
the PIT, PAM, SMRAM, PIRQ routing — then waits for a key and resets through 0xCF9."""

from __future__ import annotations

import os

from conftest import needs_kvm, run_vmm

from asyncvmm import VM, VmConfig
from asyncvmm.config import PciSlot
from asyncvmm.devices.legacy.acpi_pm import PM_TIMER_HZ
from asyncvmm.loop import run as run_loop

pytestmark = needs_kvm

PIT_HZ = 1_193_182
PIT_COUNTS = 59659  # the ROM's 50 ms of PIT channel 2


def report(out: str) -> dict[str, int]:
    """The ROM's "q35: LABEL HEX" lines."""
    values = {}
    for line in out.splitlines():
        label, _, value = line.removeprefix("q35: ").rpartition(" ")
        if label and len(value) == 8:
            values[label] = int(value, 16)
    return values


def test_the_chipset_as_q35_firmware_programs_it(guests):
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", f"bootrom,{guests / 'q35.bin'}", "--no-reboot",
                input=b"x", timeout=60)
    assert r.status == 0, r.err
    v = report(r.out)
    assert v.pop("host bridge id") == 0x29C0_8086  # what PlatformPei switches on
    assert v.pop("ecam before pciexbar") == 0xFFFF_FFFF  # a firmware boot: PCIEXBAR's reset value
    assert v.pop("pciexbar") == 0xB000_0001
    assert v.pop("ecam 00:00.0 id") == 0x29C0_8086
    assert v.pop("ecam 00:1f.0 id") == 0x2918_8086
    assert v.pop("ecam at 0xe0000000 id") == 0x29C0_8086  # PCIEXBAR moved it (128 MiB)
    assert v.pop("ecam old base") == 0xFFFF_FFFF
    assert v.pop("ecam bus 128 of 128") == 0xFFFF_FFFF
    assert v.pop("lpc id") == 0x2918_8086
    assert v.pop("pm timer before acpi_en") == 0xFFFF_FFFF  # nothing decoded until ACPI_EN
    assert v.pop("pmbase") == 0x601
    ticks = v.pop("pm timer ticks in 50 ms of pit")
    expected = PM_TIMER_HZ * PIT_COUNTS / PIT_HZ  # 178977
    # never fewer (both count the host's time); more by the poll loop's exits under load
    assert 0.97 < ticks / expected < 1.25, (ticks, expected)
    assert 0 < v.pop("pm timer ticks for 1000 reads") < PM_TIMER_HZ  # each read answered, in under 1 ms
    assert v.pop("pm timer high half") <= 0xFFFF
    assert v.pop("smi_en") == 0x20  # APMC_EN: "SMM set up" (there is none)
    assert v.pop("pam 0x90") == 0x3333_3330
    assert v.pop("pam 0x94") == 0x0033_3333
    assert v.pop("smram") == 0x02
    assert v.pop("pirqa_rout") == 0x0B
    assert v == {}, v
    assert r.out.endswith("q35: waiting for a key\nq35: reset through 0xcf9\n"), r.out
    assert "guest reset through the reset control register (0xCF9)" in r.err, r.err


def test_pm_timer_reads_are_served_in_c_and_the_chipset_state_is_in_a_snapshot(guests, tmp_path):
    """The PM timer never reaches the loop's model; the firmware's PCIEXBAR, PMBASE, PAM and
    PIRQ values go into a snapshot, and the VM made from it decodes ECAM and the PM block
    where the firmware put them, and carries on to its reset."""
    snap = str(tmp_path / "q35.snap")
    cfg = VmConfig(name=f"q35-{os.getpid()}", memory=64 << 20, bootrom=str(guests / "q35.bin"),
                   slots=[PciSlot(0, 31, 0, "lpc")], no_reboot=True)

    def chipset(machine) -> dict:
        mch = machine.pci.root.host_bridge
        lpc = machine.pci.root.lookup(0, 31, 0)
        ecam, pm = machine.mmio.find(0xB000_0000), machine.pio.find(0x608)
        return {"ecam": ecam.name if ecam else None, "ecam_window": mch.ecam_window, "pam": mch.pam(),
                "pm": pm.name if pm else None, "pm_port": lpc.pm_port, "pirq": lpc.pirq_routes()[:1]}

    async def main():
        async with VM(cfg) as vm:
            await vm.console.expect(rb"q35: waiting for a key\n", timeout=60)
            model_reads = vm.machine.legacy.acpi_pm.counters["timer_reads"]
            saved = chipset(vm.machine)
            await vm.snapshot(snap, stop=True)
        async with VM.from_snapshot(snap, name=f"q35-2-{os.getpid()}") as vm2:
            restored = chipset(vm2.machine)
            vm2.console.writer.write(b"x")
            await vm2.console.expect(rb"q35: reset through 0xcf9\n", timeout=60)
            stop = await vm2.wait()
        return model_reads, saved, restored, stop

    model_reads, saved, restored, stop = run_loop(main())
    assert model_reads == 0  # all the dword reads and the word read answered by the vCPU thread
    assert saved == {"ecam": "pci-ecam", "ecam_window": (0xB000_0000, 256 << 20), "pam": bytes([0x30] + [0x33] * 6),
                     "pm": "acpi-pm", "pm_port": 0x600, "pirq": b"\x0b"}
    assert restored == saved
    assert "0xCF9" in str(stop), stop
