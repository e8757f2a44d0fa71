"""The OVMF variables flash from the guest's side, on the real KVM: tests/guests/pflash.S,
started at the reset vector, runs OVMF's detection, erases a block, programs bytes and
resets through 0xCF9; a second VM process on the same file reads what the first wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, needs_kvm, run_vmm

pytestmark = needs_kvm

SIZE = 64 << 10
BLOCK = 0x2000


def vars_file(path, marker: bytes = b"original"):
    """A 64 KiB variables file: a firmware volume's zero vector and signature, 0xAB, and
    `marker` where the ROM looks (it goes with the 64 KiB ROM: 128 KiB of flash)."""
    data = bytearray(b"\xab" * SIZE)
    data[0:16] = bytes(16)
    data[40:44] = b"_FVH"
    data[BLOCK : BLOCK + len(marker)] = marker
    path.write_bytes(data)
    return bytes(data)


def lines(read: str, erase: str, program: str, detected: str = "flash", erased: bool = True, back: bool = True):
    return [
        "pflash: reset vector reached",
        f"pflash: detected: {detected}",
        "pflash: manufacturer 89, CFI QRY",
        f"pflash: read {read}",
        f"pflash: erase status {erase}",
        *(["pflash: block erased"] if erased else []),
        f"pflash: program status {program}",
        *(["pflash: programmed, reads back"] if back else []),
        "pflash: bad command status b0, cleared 00",
        "pflash: reset through 0xcf9",
    ]


def test_variables_written_by_one_vm_are_read_by_the_next(guests, tmp_path):
    store = tmp_path / "vars.fd"
    before = vars_file(store)
    rom = f"bootrom,{guests / 'pflash.bin'},{store}"
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", rom, "--no-reboot", timeout=60)
    assert r.status == 0, r.err
    assert r.out.splitlines() == lines("original", "80", "80"), r.out
    assert "variables" in r.err and "(64 KiB, a flash) at 0xfffe0000" in r.err, r.err
    assert "guest reset through the reset control register (0xCF9)" in r.err, r.err
    after = store.read_bytes()
    expected = bytearray(before)
    expected[BLOCK : BLOCK + 0x1000] = b"ASYNCVMM" + b"\xff" * (0x1000 - 8)
    assert after == bytes(expected)  # that block only: OVMF's probe programmed a byte with itself
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", rom, "--no-reboot", timeout=60)
    assert r.status == 0 and r.out.splitlines() == lines("ASYNCVMM", "80", "80"), r.out + r.err


def test_a_write_protected_or_absent_store_is_never_changed(guests, tmp_path):
    store = tmp_path / "vars.fd"
    before = vars_file(store)
    os.chmod(store, 0o444)
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", f"bootrom,{guests / 'pflash.bin'},{store}", "--no-reboot", timeout=60)
    assert r.status == 0, r.err
    assert r.out.splitlines() == lines("original", "b0", "b0", detected="flash, programming error",
                                       erased=False, back=False), r.out
    assert "(64 KiB, write-protected)" in r.err
    assert store.read_bytes() == before
    # no variables file: nothing answers below the code, OVMF's probe sees a ROM
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", f"bootrom,{guests / 'pflash.bin'}", "--no-reboot", timeout=60)
    assert r.status == 0, r.err
    assert r.out.splitlines()[:2] == ["pflash: reset vector reached", "pflash: detected: ROM"], r.out
    assert r.out.splitlines()[-1] == "pflash: reset through 0xcf9"


def test_what_the_guest_saw_done_survives_sigkill(guests, tmp_path):
    """With 'H' at 0x3000 the ROM halts when done instead of resetting: the VMM is killed
    there, with nothing closed or flushed on its way out; the file has the bytes."""
    store = tmp_path / "vars.fd"
    data = bytearray(vars_file(store))
    data[0x3000] = ord("H")
    store.write_bytes(data)
    p = subprocess.Popen([sys.executable, "-m", "asyncvmm", "run", "-m", "64",
                          "-s", "31,lpc", "-l", f"bootrom,{guests / 'pflash.bin'},{store}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        out = b""
        deadline = time.monotonic() + 60
        while b"pflash: halted" not in out and time.monotonic() < deadline and p.poll() is None:
            out += p.stdout.read() or b""
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    assert b"pflash: programmed, reads back\npflash: bad command status b0, cleared 00\npflash: halted" in out, out + err
    assert p.returncode == -signal.SIGKILL
    assert store.read_bytes()[BLOCK : BLOCK + 0x1000] == b"ASYNCVMM" + b"\xff" * (0x1000 - 8)


def test_fw_cfg_flash_and_reset_control_state_in_a_snapshot(guests, tmp_path):
    """fw_cfg's selector, offset and DMA address half, the flash's mode and status and 0xCF9's
    bits go into a snapshot and come back in the VM made from it (the ROM halted; the
    registers set from the host as a guest would leave them mid-transfer)."""
    from asyncvmm import VM, VmConfig
    from asyncvmm.config import PciSlot
    from asyncvmm.devices.legacy.pflash import Mode
    from asyncvmm.loop import run as run_loop

    store = tmp_path / "vars.fd"
    data = bytearray(vars_file(store))
    data[0x3000] = ord("H")
    store.write_bytes(data)
    snap = str(tmp_path / "fw.snap")
    cfg = VmConfig(name=f"pflash-snap-{os.getpid()}", memory=64 << 20, slots=[PciSlot(0, 31, 0, "lpc")], bootrom=str(guests / "pflash.bin"),
                   bootvars=str(store))

    async def main():
        async with VM(cfg) as vm:
            await vm.console.expect(rb"pflash: halted\n", timeout=60)
            legacy, flash = vm.machine.legacy, vm.machine.firmware.flash
            fw = legacy.fw_cfg
            fw.select(0x19)  # the file directory, 3 bytes of it read
            fw.read_data(1), fw.read_data(2)
            fw.dma_high = 0x1234
            flash.write(0, 1, 0x42)  # a bad command: status mode, error bits
            legacy.reset_control.write(1, 1, 0x02)
            saved = (fw.selected, fw.offset, fw.dma_high, flash.mode, int(flash.status))
            await vm.snapshot(snap, stop=True)
        async with VM.from_snapshot(snap, name=f"pflash-snap2-{os.getpid()}") as vm2:
            legacy, flash = vm2.machine.legacy, vm2.machine.firmware.flash
            fw = legacy.fw_cfg
            restored = (fw.selected, fw.offset, fw.dma_high, flash.mode, int(flash.status))
            value = legacy.reset_control.read(1, 1)
            next_byte = fw.read_data(1)
            await vm2.kill()
        return saved, restored, value, next_byte, fw.items[0x19][3]

    saved, restored, value, next_byte, expected = run_loop(main())
    assert saved == (0x19, 3, 0x1234, Mode.STATUS, 0xB0)
    assert restored == saved and value == 0x02 and next_byte == expected
