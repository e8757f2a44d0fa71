"""The fast tier through the loader: `asyncvmm run -s 2,virtio-blk,IMG` with no --kernel
boots the test guest that a disk's grub.cfg names, on the real KVM; `asyncvmm load` says
what it would boot; what must be refused is refused in one line, status 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import needs_kvm, run_vmm
from loader_images import MiB, blank, ext4, fat, gpt, mbr, needs_disk_tools

pytestmark = needs_disk_tools

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "loader"
ROOT_UUID = "5d1f0c2a-7b3e-4c9d-8e6f-1a2b3c4d5e6f"
PARTUUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
KVER = "6.1.0-13-amd64"


@pytest.fixture(scope="module")
def disk(tmp_path_factory, guests) -> Path:
    """A Debian-shaped disk (tools/images/build-disk-image's layout: BIOS boot, ESP with
    the stub, ext4 root), grub-mkconfig's grub.cfg, and the hello guest as the kernel."""
    img = blank(tmp_path_factory.mktemp("disk") / "debian.img", 64 * MiB)
    gpt(img, "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:+16M", "-t", "2:ef00", "-n", "3:0:0", "-t", "3:8300")
    fat(img, 4096 * 512, 16 * MiB, {"EFI/debian/grub.cfg": (
        f"search.fs_uuid {ROOT_UUID} root hd0,gpt3 \nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n").encode()})
    cfg = (FIXTURES / "debian-12-grub-mkconfig.cfg").read_text()
    cfg = cfg.replace("@ROOT_UUID@", ROOT_UUID).replace("@ROOT_PARTUUID@", PARTUUID).replace("@KVER@", KVER)
    start = (4096 + 32768) * 512
    ext4(img, start, 64 * MiB - start - 34 * 512, {
        f"boot/vmlinuz-{KVER}": (guests / "hello.elf").read_bytes(), "boot/grub/grub.cfg": cfg.encode(),
        "boot/not-a-kernel": b"\x7fELF but no more", "boot/grub/custom.cfg":
        b"menuentry 'Not a kernel' --id bogus {\n linux /boot/not-a-kernel\n}\n"
        b"menuentry 'Gone' --id gone {\n linux /boot/vmlinuz-0.0\n}\n",
    }, uuid=ROOT_UUID)
    return img


def boot(*args: str):
    return run_vmm("run", "-m", "64", "--no-reboot", *args, timeout=60)


def refused(r, message: str) -> None:
    """One line naming the problem, status 2, no traceback, no VM started."""
    assert r.status == 2, (r.status, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.err
    assert "Traceback" not in r.err and "KVM:" not in r.err and not r.out


@needs_kvm
def test_a_disk_boots_its_default_entry(disk):
    r = boot("-s", f"2,virtio-blk,{disk}")
    assert r.status == 0, r.err
    assert "hello from the guest\n" in r.out
    assert f"cmdline: root=PARTUUID={PARTUUID} ro console=ttyS0 panic=-1\n" in r.out
    assert (f"loader: booting entry 0 'Debian GNU/Linux' of the GRUB menu /boot/grub/grub.cfg: kernel "
            f"/boot/vmlinuz-{KVER} from debian.img partition 3 (gpt, Linux), ext4 (") in r.err
    assert "through its PVH entry" in r.err


@needs_kvm
def test_entry_set_and_cmdline(disk, tmp_path):
    data = blank(tmp_path / "data.img", 8 * MiB)
    r = boot("-s", f"2,virtio-blk,{data}", "-s", f"3,virtio-blk,{disk},ro", "--entry", "1>2",
             "--set", "grub_platform=pc", "--cmdline", "extra=1")
    assert r.status == 0, r.err
    assert f"cmdline: root=PARTUUID={PARTUUID} ro single console=ttyS0 panic=-1 extra=1\n" in r.out
    assert "booting entry 1>2 " in r.err
    refused(boot("-s", f"2,virtio-blk,{data}", "-s", f"3,virtio-blk,{disk}", "--boot-disk", "2"),
            "data.img: no boot menu found")


@needs_kvm
def test_boot_dir_is_bhyveloads_host_directory(guests, tmp_path):
    (tmp_path / "boot/grub").mkdir(parents=True)
    (tmp_path / "boot/hello").write_bytes((guests / "hello.elf").read_bytes())
    (tmp_path / "boot/grub/grub.cfg").write_text("menuentry 'from the host' {\n linux /boot/hello from=host\n}\n")
    r = boot("--boot-dir", str(tmp_path))
    assert r.status == 0, r.err
    assert "cmdline: from=host\n" in r.out and "kernel /boot/hello from host directory" in r.err


def test_load_prints_the_menu_and_what_would_boot(disk):
    r = run_vmm("load", "-d", str(disk))
    assert r.status == 0, r.err
    assert f" * 0      Debian GNU/Linux  [gnulinux-simple-{ROOT_UUID}]" in r.out
    assert "     1>2    Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)" in r.out
    assert "   3      Gone  [gone]" in r.out  # from custom.cfg, sourced through ${config_directory}
    assert f"kernel:    /boot/vmlinuz-{KVER} (" in r.out
    assert f"cmdline:   root=PARTUUID={PARTUUID} ro console=ttyS0 panic=-1" in r.out
    assert "partition: debian.img partition 3 (gpt, Linux), ext4, PARTUUID " in r.out and f"UUID {ROOT_UUID}" in r.out
    r = run_vmm("load", "-d", str(disk), "--list", "-e", "default=gone")
    assert r.status == 0 and "(default 'gone' = 3," in r.out and "kernel:" not in r.out


@pytest.mark.parametrize("args, message", [
    (["--entry", "bogus"], "entry 2 'Not a kernel': /boot/not-a-kernel on debian.img partition 3 (gpt, Linux), ext4 is not a kernel"),
    (["--entry", "gone"], "entry 3 'Gone': kernel /boot/vmlinuz-0.0 does not exist on debian.img partition 3"),
    (["--entry", "9"], "--entry 9: no entry '9' in the menu"),
    (["--set", "nonsense"], "-e nonsense: use NAME=VALUE"),
    (["--boot-disk", "/nope.img"], "--boot-disk /nope.img: not one of the virtio-blk disks"),
])
def test_bad_choices_are_refused_before_anything_starts(disk, args, message):
    refused(boot("-s", f"2,virtio-blk,{disk}", *args), message)


def test_bad_disks_are_refused_before_anything_starts(tmp_path, guests):
    past = blank(tmp_path / "past.img", 16 * MiB)
    mbr(past, "2048,,83\n")
    past.write_bytes(past.read_bytes()[: 8 * MiB])
    refused(boot("-s", f"2,virtio-blk,{past}"), "past.img: partition 1 (bytes 1048576-16777215) runs past the end of the image")
    loop = blank(tmp_path / "loop.img", 8 * MiB)
    ext4(loop, 0, 8 * MiB, {"boot/grub/grub.cfg": b"source /boot/grub/grub.cfg\n"})
    refused(boot("-s", f"2,virtio-blk,{loop}"), "/boot/grub/grub.cfg sources itself")
    refused(run_vmm("load", "-d", str(tmp_path / "missing.img")), "disk")
    refused(boot(), "no kernel given")


def _with_terminal(args: list[str], typed: bytes | None, timeout: float = 30) -> tuple[int, str, str]:
    """`asyncvmm ARGS` with a terminal as its stdin and stderr (a pty), stdout a pipe."""
    import os  # noqa: PLC0415
    import pty  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    from conftest import ROOT  # noqa: PLC0415

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "asyncvmm", *args], stdin=slave, stderr=slave,
                             stdout=subprocess.PIPE, cwd=ROOT)
        seen = b""
        deadline = time.monotonic() + timeout
        while b"Enter boots the default" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
        if typed is not None:
            os.write(master, typed)
        out, _ = p.communicate(timeout=timeout)
        os.set_blocking(master, False)
        try:
            seen += os.read(master, 65536)
        except BlockingIOError:
            pass
        return p.returncode, out.decode(), seen.decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)


def test_menu_on_a_terminal_takes_a_choice(disk):
    status, out, term = _with_terminal(["load", "-d", str(disk), "--menu"], b"1>2\n")
    assert status == 0, term
    assert " * 0      Debian GNU/Linux" in term and "the default boots in 1 s" in term
    assert "entry:     1>2 " in out and " single " in out


def test_menu_on_a_terminal_boots_the_default_after_its_timeout(disk):
    status, out, term = _with_terminal(["load", "-d", str(disk), "--menu", "-e", "timeout=0.2"], None)
    assert status == 0, term
    assert "the default boots in 0.2 s" in term and "entry:     0 'Debian GNU/Linux'" in out
