"""The slow tier's firmware boot (one Linux boot): SeaBIOS (-l bootrom) → the disk's MBR →
GRUB for i386-pc on COM1 (through SeaBIOS's serial console) → the small kernel from the
ext4 root, on virtio-blk — the image tools/images/build-disk-image makes for test_linux.py's
run 2. Nothing of asyncvmm's loader runs: the firmware reads the disk, GRUB reads its own
grub.cfg.

Checked, kernel-only as the other Linux runs: SeaBIOS's banner and its boot from the hard
disk, GRUB's menu and "Loading Linux", then the kernel's own lines: its command line from
grub.cfg, the GPT read from vda, the root mounted read-only (the disk is given ,ro), and
/sbin/init started.

On an emulating KVM the kernel needs the linux-cmdline quirk's parameters (asyncvmm/quirks.py);
with no VMM-side loader here nothing can append them, so this test writes them into the
copy's grub.cfg, as a user of such a host would put them in GRUB_CMDLINE_LINUX.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import needs_kvm
from linux_guest import GuestError, LinuxGuest, debian_disk_image, small_kernel

from asyncvmm import seccomp
from asyncvmm.quirks import linux_parameters

pytestmark = [needs_kvm, pytest.mark.slow]

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
TIMEOUT = 600.0  # a step of the boot, seconds of wall time (the whole took about 300-400 s here)
UP = rb"Run /sbin/init as init process"


def root_offset(image: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], check=True, capture_output=True, text=True).stdout)
    part = next(p for p in table["partitiontable"]["partitions"] if p.get("name") == "root")
    return part["start"] * 512


def add_to_grub_cfg(image: Path, params: list[str], tmp: Path) -> None:
    """Append `params` to every `linux` line of /boot/grub/grub.cfg in the image's root."""
    spec = f"{image}?offset={root_offset(image)}"
    cfg = tmp / "grub.cfg"
    subprocess.run(["debugfs", "-R", f"dump /boot/grub/grub.cfg {cfg}", spec], check=True, capture_output=True)
    text = cfg.read_text()
    new = re.sub(r"^(\s*linux\s+\S+.*?)\s*$", lambda m: m.group(1) + " " + " ".join(params), text, flags=re.M)
    assert new != text, "grub.cfg has no linux line"
    cfg.write_text(new)
    for request in ("rm /boot/grub/grub.cfg", f"write {cfg} /boot/grub/grub.cfg"):
        subprocess.run(["debugfs", "-w", "-R", request, spec], check=True, capture_output=True)


@pytest.mark.skipif(not SEABIOS.exists(), reason="Debian's seabios package is not installed")
def test_seabios_grub_linux_from_a_virtio_disk(tmp_path, capfd, emulating_kvm):
    small_kernel()
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(debian_disk_image()), str(disk)], check=True)
    if emulating_kvm:
        add_to_grub_cfg(disk, linux_parameters(), tmp_path)
    # `asyncvmm run`, so that the boot runs under every filter of the VMM's (seccomp's
    # default, kill): the loop's, the helpers' and the vCPU's.
    guest = LinuxGuest(None, memory="256M", name="linux-slow-seabios",
                       flags=("-s", "31,lpc", "-l", f"bootrom,{SEABIOS}", "-s", f"3,virtio-blk,{disk},ro"))
    console_log = tmp_path / "console.log"
    marks: dict[str, float] = {}
    modes: dict[str, str] = {}
    with guest:
        try:
            t0 = time.monotonic()
            for name, pattern, timeout in (
                ("SeaBIOS", rb"SeaBIOS \(version [^)]*\)", 30),
                ("its boot from the disk", rb"Booting from Hard Disk\.\.\.", 30),
                # GRUB's own start (its modules read through SeaBIOS's int 13h) and its
                # menu (drawn through SeaBIOS's serial console, int 10h) take minutes here
                ("GRUB", rb"Welcome to GRUB!", TIMEOUT),
                ("GRUB loading Linux", rb"Loading Linux 6\.1", TIMEOUT),
                ("Linux", rb"Linux version 6\.1", TIMEOUT),
                ("init", UP, TIMEOUT),
            ):
                guest.wait_for_text(pattern, timeout=timeout)
                marks[name] = time.monotonic() - t0
                if not modes:
                    modes = guest.seccomp_modes()
        except GuestError as e:
            # One CI run here hung between GRUB and "Loading Linux" (2026-12-04): say what
            # the guest was doing.
            raise AssertionError(f"{e}; reached: {marks}\n{guest.state_of_a_hang()}") from None
        finally:
            console_log.write_text(guest.console_text())
    with capfd.disabled():
        print(f"\nSeaBIOS boot, seconds from start: {', '.join(f'{k} {v:.1f}' for k, v in marks.items())}")
    if seccomp.default_mode() == "kill":
        assert any(t.startswith("vcpu0/") for t in modes) and set(modes.values()) == {"2"}, modes
    log = console_log.read_text(errors="replace")
    assert re.search(r"Kernel command line: BOOT_IMAGE=/boot/vmlinuz-\S+ root=PARTUUID=\S+ ro console=ttyS0", log), log[-3000:]
    assert re.search(r"\bvda: vda1 vda2 vda3\r?$", log, re.M), "the kernel did not read the GPT"
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) readonly on device 254:3\.", log), log[-3000:]
    assert "ACPI: RSDP" in log and "ACPI: FACP" in log, "the kernel did not find the tables the firmware linked"
