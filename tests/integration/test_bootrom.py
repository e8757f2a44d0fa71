"""`-l bootrom,FILE[,VARSFILE]`: a firmware image started at the reset vector.

The fast tier: the test ROM (tests/guests/bootrom.S) from the reset vector through fw_cfg's
ports and DMA to a write to its own flash; Debian's SeaBIOS through its whole POST (fw_cfg,
the ACPI table loader, PCI, the serial console) to "No bootable device"; bad firmware files
refused before anything starts; --kernel handed to QEMU's linuxboot option ROM. The slow tier's firmware boot (SeaBIOS, GRUB, Linux) is
in test_linux.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import needs_kvm, run_vmm

from asyncvmm import VM, VmConfig
from asyncvmm.boot import linux
from asyncvmm.config import PciSlot
from asyncvmm.loop import run as run_loop

pytestmark = needs_kvm

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
OVMF_VARS_4M = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def test_test_rom_from_the_reset_vector(guests):
    r = run_vmm("run", "-m", "64", "-s", "31,lpc", "-l", f"bootrom,{guests / 'bootrom.bin'}", "--no-reboot", timeout=30)
    assert r.status == 0, r.err
    assert r.out.splitlines() == [
        "bootrom: reset vector reached",
        "bootrom: fw_cfg signature QEMU",
        "bootrom: fw_cfg DMA read the directory",
        "bootrom: fw_cfg DMA outside RAM: error",
        "bootrom: ROM write ignored",
    ], r.out
    assert f"bootrom: {guests / 'bootrom.bin'} (64 KiB) at 0xffff0000" in r.err
    assert "guest reset through the i8042 reset line" in r.err


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed")
def test_seabios_posts_to_no_bootable_device(tmp_path):
    debug = tmp_path / "debugcon.log"
    r = run_vmm("run", "-m", "128", "-s", "31,lpc", "-l", f"bootrom,{SEABIOS}", "-l", f"debugcon,{debug}", "--no-reboot", timeout=60)
    # With no disk SeaBIOS says so, then resets through 0xCF9 (its reboot writes 0x02, then 0x06).
    assert "SeaBIOS (version" in r.out and "No bootable device." in r.out, r.out
    log = debug.read_text(errors="replace")
    assert "Found QEMU fw_cfg" in log and "QEMU fw_cfg DMA interface supported" in log, log
    assert "qemu/e820: addr 0x0000000000000000 len 0x0000000008000000 [RAM]" in log, log
    # the table loader linked our tables: SeaBIOS found the FADT through the XSDT, and the DSDT
    assert "table(50434146)=" in log and "(via xsdt)" in log and "ACPI: parse DSDT" in log, log
    assert "sercon: using ioport 0x3f8" in log, log
    assert r.status == 0 and "guest reset through the reset control register (0xCF9)" in r.err, r.err


def bad(*args: str) -> tuple[int, str]:
    r = run_vmm("run", "-m", "64", *args, timeout=30)
    return r.status, r.err.strip()


def test_bad_firmware_files_are_one_line_and_status_2(tmp_path):
    status, err = bad("-l", "bootrom,/nonexistent/bios.bin")
    assert (status, err) == (2, "asyncvmm: -l bootrom /nonexistent/bios.bin: no such file")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\xea" * 1000)
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{odd}")
    assert status == 2 and err == (f"asyncvmm: -l bootrom {odd}: 1000 bytes is not a firmware image's size "
                                   "(a whole number of 4 KiB pages, 64 KiB to 16 MiB)")
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(64 << 10))
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{zeros}")
    assert status == 2 and err == f"asyncvmm: -l bootrom {zeros}: not a firmware image (no jump at its reset vector, 16 bytes from its end)"
    status, err = bad("-l", "bootrom")
    assert status == 2 and err == "asyncvmm: -l bootrom: name the firmware file: -l bootrom,FILE[,VARSFILE]"
    assert len(err.splitlines()) == 1
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{SEABIOS}", "-l", "debugcon,/nonexistent/debug.log")
    assert status == 2 and err == ("asyncvmm: -l debugcon,/nonexistent/debug.log: cannot write there "
                                   "(/nonexistent is not a writable directory)")


def test_a_bootrom_needs_the_lpc_bridge_at_slot_31(guests):
    """As bhyve: the boot ROM lives behind the LPC bridge; Q35 firmware reads it at 00:1f.0."""
    rom = guests / "bootrom.bin"
    for lpc in ((), ("-s", "1,lpc"), ("-s", "31:1,lpc")):
        status, err = bad(*lpc, "-l", f"bootrom,{rom}")
        assert (status, err) == (2, f"asyncvmm: -l bootrom {rom}: firmware needs the LPC bridge at 00:1f.0 (-s 31,lpc)")
    with pytest.raises(Exception, match=r"firmware needs the LPC bridge at 00:1f.0 \(slots=\[PciSlot"):
        VmConfig(bootrom=str(rom)).validate()


@pytest.mark.skipif(not (OVMF_CODE.exists() and SEABIOS.exists()), reason="Debian's ovmf and seabios packages are not installed")
def test_vars_files_that_do_not_match_are_refused():
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{OVMF_CODE},{OVMF_VARS_4M}")
    assert status == 2 and "does not match" in err and len(err.splitlines()) == 1, err
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{SEABIOS},{OVMF_VARS}")
    assert status == 2 and "is not a UEFI image, it has no variables file" in err, err
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{OVMF_VARS}")  # a variables file is not a firmware
    assert status == 2 and "not a firmware image" in err, err
    status, err = bad("-s", "31,lpc", "-l", f"bootrom,{OVMF_CODE},{SEABIOS}")
    assert status == 2 and "not a UEFI variable store" in err, err



LINUXBOOT = Path("/usr/share/qemu/linuxboot_dma.bin")


@pytest.mark.skipif(not (SEABIOS.exists() and LINUXBOOT.exists()), reason="Debian's seabios and qemu-system-data are not installed")
def test_kernel_through_fw_cfg_and_the_linuxboot_rom(guests):
    """--kernel with a bootrom: SeaBIOS runs QEMU's linuxboot_dma.bin first, which reads the
    setup code, kernel and command line from fw_cfg into RAM and enters the setup code at
    (0x10000 >> 4) + 0x20 : 0. The synthetic bzImage's setup entry halts there."""
    kernel = (guests / "bzimage64.bin").read_bytes()
    info = linux.bzimage_info(kernel)
    cfg = VmConfig(name=f"fw-kernel-{os.getpid()}", memory=128 << 20, slots=[PciSlot(0, 31, 0, "lpc")], bootrom=str(SEABIOS),
                   kernel=str(guests / "bzimage64.bin"), cmdline="hello=fw_cfg", no_reboot=True)

    async def main():
        async with VM(cfg) as vm:
            await vm.console.expect(rb"Booting from ROM", timeout=60)
            for _ in range(150):
                regs = await vm.regs()
                if regs["cs"]["selector"] == 0x1020:
                    break
                await asyncio.sleep(0.2)
            mem = vm.machine.mem
            seen = (regs, mem.read(0x100000, info.kernel_size), mem.read(0x20000, 64), mem.read(0x10000, info.kernel_offset))
            await vm.kill()
            return seen

    regs, loaded, cmdline, setup = run_loop(main())
    assert regs["cs"]["selector"] == 0x1020 and regs["cr0"] & 1 == 0, regs  # real mode, in the setup code
    assert loaded == kernel[info.kernel_offset :]
    assert cmdline.startswith(b"hello=fw_cfg")
    assert setup[0x210] == 0xB0 and int.from_bytes(setup[0x228:0x22C], "little") == 0x20000
