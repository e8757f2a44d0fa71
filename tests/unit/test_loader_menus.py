"""The loader's menus on real layouts: Debian's grub.cfg as grub-mkconfig wrote it (in
tools/images/build-disk-image's chroot; kept in tests/fixtures/loader), Ubuntu's and
Fedora's (BLS) in their generated shapes, /boot on its own partition, an ESP stub that
hands over with configfile, extlinux.conf, systemd-boot's loader.conf; and configs that
must be refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_images import MiB, blank, ext4, fat, gpt, mbr, needs_disk_tools

from asyncvmm.loader import boot, grub
from asyncvmm.loader.disks import Disk
from asyncvmm.loader.errors import LoaderError
from asyncvmm.loader.menu import choose
from asyncvmm.loader.partitions import SECTOR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "loader"
ROOT_UUID = "3f1d2b8e-5c47-4d0a-9a61-0c2e7b9d4f11"
BOOT_UUID = "8a0c7d31-2f4b-4e5c-b1d9-6e3a2c1f0b77"
KVER = "6.1.0-13-amd64"
GRUBENV_EMPTY = b"# GRUB Environment Block\n"


def grubenv(**values: str) -> bytes:
    body = GRUBENV_EMPTY + b"".join(f"{k}={v}\n".encode() for k, v in values.items())
    return body + b"#" * (1024 - len(body))


def fixture(name: str, **subst: str) -> bytes:
    text = (FIXTURES / name).read_text()
    for k, v in subst.items():
        text = text.replace(f"@{k}@", v)
    return text.encode()


@pytest.fixture(scope="module")
def kernel(guests) -> bytes:
    return (guests / "hello.elf").read_bytes()


def gpt_layout(img: Path, boot_size: int = 24 * MiB) -> list:
    """As build-disk-image lays it out: BIOS boot, ESP, then the rest."""
    gpt(img, "-n", "1:2048:+1M", "-t", "1:ef02", "-n", f"2:0:+{boot_size // MiB}M", "-t", "2:ef00",
        "-n", "3:0:0", "-t", "3:8300")
    with open(img, "rb") as f:
        from asyncvmm.loader.partitions import read_table  # noqa: PLC0415

        return read_table(f, img.stat().st_size, img.name).partitions


# -- Debian (grub-mkconfig's own output) ------------------------------------------------------


@pytest.fixture(scope="module")
def debian(tmp_path_factory, kernel) -> Path:
    img = blank(tmp_path_factory.mktemp("debian") / "debian.img", 64 * MiB)
    _, esp, root = gpt_layout(img, 16 * MiB)
    fat(img, esp.start, esp.size, {"EFI/debian/grub.cfg": (
        f"search.fs_uuid {ROOT_UUID} root hd0,gpt3 \nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n").encode()})
    cfg = fixture("debian-12-grub-mkconfig.cfg", ROOT_UUID=ROOT_UUID, ROOT_PARTUUID="0f0e0d0c-1111-2222-3333-444455556666", KVER=KVER)
    ext4(img, root.start, root.size, {
        f"boot/vmlinuz-{KVER}": kernel, "boot/grub/grub.cfg": cfg, "boot/grub/grubenv": grubenv(),
        "vmlinuz": f"boot/vmlinuz-{KVER}",
    }, uuid=ROOT_UUID)
    return img


@needs_disk_tools
def test_debian_grub_mkconfig_default_entry(debian):
    sel = boot.select([str(debian)])
    assert sel.menu.kind == "GRUB" and sel.menu.source.path == "/boot/grub/grub.cfg"
    assert sel.path == "0" and sel.entry.title == "Debian GNU/Linux"
    assert sel.entry.id == f"gnulinux-simple-{ROOT_UUID}"
    assert sel.entry.kernel.path == f"/boot/vmlinuz-{KVER}" and sel.entry.kernel.fs.device == "hd0,gpt3"
    assert sel.cmdline == "root=PARTUUID=0f0e0d0c-1111-2222-3333-444455556666 ro console=ttyS0 panic=-1"
    assert sel.initrd is None and sel.menu.timeout == 1


@needs_disk_tools
def test_debian_submenu_by_path_id_and_title(debian):
    volumes = boot.open_volumes([str(debian)])
    menu = boot.find_menu(volumes)
    advanced = menu.entries[1]
    assert advanced.is_submenu and [e.title for e in advanced.children] == [
        f"Debian GNU/Linux, with Linux {KVER}", f"Debian GNU/Linux, with Linux {KVER} (systemd)",
        f"Debian GNU/Linux, with Linux {KVER} (recovery mode)"]
    recovery, path = choose(menu, "1>2")
    assert path == "1>2" and " single " in f" {recovery.cmdline} "
    by_id, path = choose(menu, f"gnulinux-advanced-{ROOT_UUID}>gnulinux-{KVER}-init-systemd-{ROOT_UUID}")
    assert path == "1>1" and by_id.cmdline.endswith("init=/lib/systemd/systemd")
    by_title, path = choose(menu, f"Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux {KVER}")
    assert path == "1>0"
    assert choose(menu, "1")[1] == "1>0"  # a submenu boots its first entry
    with pytest.raises(LoaderError, match="no entry '7'"):
        choose(menu, "7")


@needs_disk_tools
def test_the_esp_stub_hands_over_with_configfile(debian):
    volumes = boot.open_volumes([str(debian)])
    esp = volumes.device("hd0,gpt2")
    menu = grub.Grub(volumes).run_config(esp, "/EFI/debian/grub.cfg")
    assert [e.title for e in menu.entries][0] == "Debian GNU/Linux"
    assert menu.entries[0].kernel.fs.device == "hd0,gpt3"


@needs_disk_tools
def test_set_variables_pin_the_menus_own(debian):
    sel = boot.select([str(debian)], pinned={"default": "1>2"})
    assert sel.path == "1>2"


# -- Ubuntu (GRUB_DEFAULT=saved, grubenv, initrds, gfxmode, memtest) -----------------------------


@pytest.fixture(scope="module")
def ubuntu(tmp_path_factory, kernel) -> Path:
    img = blank(tmp_path_factory.mktemp("ubuntu") / "ubuntu.img", 64 * MiB)
    gpt(img, "-n", "1:2048:+16M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300")
    start = 2048 * SECTOR + 16 * MiB
    saved = f"gnulinux-advanced-{ROOT_UUID}>gnulinux-5.15.0-86-generic-advanced-{ROOT_UUID}"
    files = {"boot/grub/grub.cfg": fixture("ubuntu-22.04-grub.cfg", ROOT_UUID=ROOT_UUID),
             "boot/grub/grubenv": grubenv(saved_entry=saved), "boot/memtest86+.bin": b"\xeb\xfe" * 512}
    for v in ("5.15.0-88-generic", "5.15.0-86-generic"):
        files[f"boot/vmlinuz-{v}"] = kernel
        files[f"boot/initrd.img-{v}"] = f"initrd {v}\n".encode()
    ext4(img, start, 64 * MiB - start - 34 * SECTOR, files, uuid=ROOT_UUID)
    fat(img, 2048 * SECTOR, 16 * MiB, {"EFI/ubuntu/grub.cfg": b"configfile (hd0,gpt2)/boot/grub/grub.cfg\n"})
    return img


@needs_disk_tools
def test_ubuntu_saved_entry_from_grubenv(ubuntu):
    sel = boot.select([str(ubuntu)])
    assert sel.path == "1>2" and sel.entry.title == "Ubuntu, with Linux 5.15.0-86-generic"
    # gfxmode keep (Ubuntu's function, run as GRUB runs it) sets vt_handoff
    assert sel.cmdline == f"root=UUID={ROOT_UUID} ro quiet splash vt.handoff=7"
    assert [r.path for r in sel.entry.initrds] == ["/boot/initrd.img-5.15.0-86-generic"]
    assert sel.initrd == b"initrd 5.15.0-86-generic\n" + b"\0" * 3  # GRUB's 4-byte alignment
    assert sel.menu.timeout == 0  # timeout_style=hidden, timeout=0


@needs_disk_tools
def test_ubuntu_menu_lists_memtest_and_skips_the_efi_only_entry(ubuntu):
    menu = boot.find_menu(boot.open_volumes([str(ubuntu)]))
    titles = [e.title for e in menu.entries]
    assert titles == ["Ubuntu", "Advanced options for Ubuntu", "Memory test (memtest86+)",
                      "Memory test (memtest86+, serial console 115200)"]  # no 'UEFI Firmware Settings' on pc
    assert menu.entries[2].command == "linux16"
    with pytest.raises(LoaderError, match=r"entry 2 'Memory test \(memtest86\+\)': /boot/memtest86\+.bin on .* is not a kernel"):
        boot.select([str(ubuntu)], entry="2")


@needs_disk_tools
def test_ubuntu_recovery_entry_and_next_entry(ubuntu):
    sel = boot.select([str(ubuntu)], entry="Advanced options for Ubuntu>Ubuntu, with Linux 5.15.0-88-generic (recovery mode)")
    assert sel.path == "1>1" and sel.cmdline == f"root=UUID={ROOT_UUID} ro recovery nomodeset dis_ucode_ldr"
    sel = boot.select([str(ubuntu)], pinned={"next_entry": f"gnulinux-simple-{ROOT_UUID}"})
    assert sel.path == "0"


# -- Fedora (blscfg, /boot on its own partition, kernelopts in grubenv) ----------------------------

MACHINE_ID = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


@pytest.fixture(scope="module")
def fedora(tmp_path_factory, kernel) -> Path:
    img = blank(tmp_path_factory.mktemp("fedora") / "fedora.img", 96 * MiB)
    gpt(img, "-n", "1:2048:+16M", "-t", "1:ef00", "-n", "2:0:+48M", "-t", "2:8300", "-n", "3:0:0", "-t", "3:8300")
    esp_at, boot_at = 2048 * SECTOR, 2048 * SECTOR + 16 * MiB
    entries = {}
    for version, opts in (("6.5.6-300.fc39.x86_64", f"root=UUID={ROOT_UUID} ro rhgb quiet"),
                          ("6.4.15-200.fc38.x86_64", "$kernelopts"),
                          ("0-rescue-" + MACHINE_ID, f"root=UUID={ROOT_UUID} ro")):
        entries[f"loader/entries/{MACHINE_ID}-{version}.conf"] = (
            f"title Fedora Linux ({version}) 38 (Workstation Edition)\nversion {version}\n"
            f"linux /vmlinuz-{version}\ninitrd /initramfs-{version}.img\noptions {opts}\n"
            "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class fedora\n").encode()
        entries[f"vmlinuz-{version}"] = kernel
        entries[f"initramfs-{version}.img"] = b"cpio"
    entries["grub2/grub.cfg"] = fixture("fedora-38-grub.cfg", BOOT_UUID=BOOT_UUID)
    entries["grub2/grubenv"] = grubenv(saved_entry=f"{MACHINE_ID}-6.4.15-200.fc38.x86_64",
                                       kernelopts=f"root=UUID={ROOT_UUID} ro resume=UUID=x rhgb quiet", boot_success="1")
    ext4(img, boot_at, 48 * MiB, entries, uuid=BOOT_UUID, label="boot")
    fat(img, esp_at, 16 * MiB, {"EFI/fedora/grub.cfg": (
        f"search --no-floppy --fs-uuid --set=dev {BOOT_UUID}\nset prefix=($dev)/grub2\n\nexport $prefix\n"
        "configfile $prefix/grub.cfg\n").encode()})
    return img


@needs_disk_tools
def test_fedora_blscfg_entries_newest_first_and_saved_entry(fedora):
    sel = boot.select([str(fedora)])
    titles = [e.title for e in sel.menu.entries]
    assert titles == ["Fedora Linux (6.5.6-300.fc39.x86_64) 38 (Workstation Edition)",
                      "Fedora Linux (6.4.15-200.fc38.x86_64) 38 (Workstation Edition)",
                      f"Fedora Linux (0-rescue-{MACHINE_ID}) 38 (Workstation Edition)"]
    assert sel.path == "1" and sel.entry.id == f"{MACHINE_ID}-6.4.15-200.fc38.x86_64"
    assert sel.cmdline == f"root=UUID={ROOT_UUID} ro resume=UUID=x rhgb quiet"  # $kernelopts from grubenv
    assert sel.entry.kernel.path == "/vmlinuz-6.4.15-200.fc38.x86_64" and sel.entry.kernel.fs.label == "boot"
    assert sel.menu.source.path == "/grub2/grub.cfg" and sel.menu.timeout == 5


@needs_disk_tools
def test_fedora_kernelopts_set_by_the_user(fedora):
    sel = boot.select([str(fedora)], pinned={"kernelopts": "root=/dev/vda3 rw"})
    assert sel.cmdline == "root=/dev/vda3 rw"


@needs_disk_tools
def test_fedora_esp_stub_with_set_dev(fedora):
    volumes = boot.open_volumes([str(fedora)])
    menu = grub.Grub(volumes).run_config(volumes.device("hd0,gpt1"), "/EFI/fedora/grub.cfg")
    assert len(menu.entries) == 3 and menu.entries[0].kernel.fs.device == "hd0,gpt2"


# -- /boot on its own partition, MBR with a logical root -----------------------------------------


@needs_disk_tools
def test_separate_boot_partition_on_mbr_with_logical_root(tmp_path, kernel):
    img = blank(tmp_path / "mbr.img", 64 * MiB)
    mbr(img, "2048,32768,83\n34816,,5\n36864,,83\n")
    cfg = f"""set default="0"
insmod part_msdos
insmod ext2
set root='hd0,msdos1'
if [ x$feature_platform_search_hint = xy ]; then
  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,msdos1 --hint-efi=hd0,msdos1 --hint-baremetal=ahci0,msdos1  {BOOT_UUID}
else
  search --no-floppy --fs-uuid --set=root {BOOT_UUID}
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{ROOT_UUID}' {{
	linux	/vmlinuz-{KVER} root=UUID={ROOT_UUID} ro quiet
	initrd	/initrd.img-{KVER}
}}
""".encode()
    ext4(img, 2048 * SECTOR, 32768 * SECTOR, {"grub/grub.cfg": cfg, f"vmlinuz-{KVER}": kernel,
                                              f"initrd.img-{KVER}": b"initrd"}, uuid=BOOT_UUID, kind="ext2")
    ext4(img, 36864 * SECTOR, 64 * MiB - 36864 * SECTOR, {"etc/fstab": b""}, uuid=ROOT_UUID)
    disk = Disk(str(img), 0)
    assert sorted(disk.volumes) == [1, 5] and disk.volumes[5].device == "hd0,msdos5"
    sel = boot.select([str(img)])
    assert sel.entry.kernel.fs.device == "hd0,msdos1" and sel.entry.kernel.fs.type == "ext2"
    assert sel.menu.source.path == "/grub/grub.cfg" and sel.initrd == b"initrd\0\0"


@needs_disk_tools
def test_the_first_disk_with_a_menu_boots(tmp_path, debian):
    data = blank(tmp_path / "data.img", 16 * MiB)
    ext4(data, 0, 16 * MiB, {"srv/x": b"x"})
    sel = boot.select([str(data), str(debian)])
    assert sel.entry.kernel.fs.disk.name == "debian.img" and sel.entry.kernel.fs.device == "hd0,gpt3"
    with pytest.raises(LoaderError, match="data.img: no boot menu found"):
        boot.select([str(data)])


# -- extlinux.conf and systemd-boot's loader.conf ------------------------------------------------


def test_a_copied_debian_boot_in_a_host_directory(tmp_path, kernel):
    """bhyveload's -h with a directory laid out like /: grub.cfg's `set root='hd0,gpt3'`
    and its failing `search --fs-uuid` lead to the directory."""
    cfg = fixture("debian-12-grub-mkconfig.cfg", ROOT_UUID=ROOT_UUID, ROOT_PARTUUID="x", KVER=KVER)
    (tmp_path / "boot/grub").mkdir(parents=True)
    (tmp_path / "boot/grub/grub.cfg").write_bytes(cfg.replace(b"insmod ext2", b"insmod ext2\n\tset root='hd0,gpt3'"))
    (tmp_path / f"boot/vmlinuz-{KVER}").write_bytes(kernel)
    sel = boot.select([], host_dir=str(tmp_path), entry="1>1")
    assert sel.entry.kernel.path == f"/boot/vmlinuz-{KVER}" and sel.cmdline.endswith("init=/lib/systemd/systemd")


def test_extlinux_conf_in_a_host_directory(tmp_path, kernel):
    (tmp_path / "boot/extlinux").mkdir(parents=True)
    (tmp_path / "boot/vmlinuz-virt").write_bytes(kernel)
    (tmp_path / "boot/initramfs-virt").write_bytes(b"init")
    (tmp_path / "boot/extlinux/extlinux.conf").write_text(
        "# Generated by update-extlinux\nDEFAULT menu.c32\nPROMPT 0\nMENU TITLE Alpine/Linux Boot Menu\n"
        "MENU HIDDEN\nMENU AUTOBOOT Alpine will be booted automatically in # seconds.\nTIMEOUT 30\n"
        "LABEL virt\n  MENU DEFAULT\n  MENU LABEL Linux virt\n  LINUX /boot/vmlinuz-virt\n"
        "  INITRD /boot/initramfs-virt\n  APPEND root=UUID=abc modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4\n"
        "LABEL rescue\n  MENU LABEL Rescue\n  KERNEL ../vmlinuz-virt\n  APPEND initrd=../initramfs-virt single\n"
        "MENU SEPARATOR\n")
    sel = boot.select([], host_dir=str(tmp_path))
    assert sel.menu.kind == "syslinux" and sel.menu.timeout == 3
    assert sel.entry.id == "virt" and sel.entry.title == "Linux virt"
    assert sel.cmdline == "root=UUID=abc modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4"
    rescue = boot.select([], host_dir=str(tmp_path), entry="rescue")
    assert rescue.entry.kernel.path == "/boot/vmlinuz-virt" and rescue.cmdline == "single" and rescue.initrd == b"init"


@needs_disk_tools
def test_systemd_boot_entries_on_an_esp(tmp_path, kernel):
    img = blank(tmp_path / "sdboot.img", 48 * MiB)
    mbr(img, "2048,,ef\n")
    fat(img, 2048 * SECTOR, 48 * MiB - 2048 * SECTOR, {
        "loader/loader.conf": b"default debian-*\ntimeout 4\n",
        "loader/entries/arch.conf": b"title Arch Linux\nlinux /vmlinuz-linux\noptions root=/dev/vda2 rw\n",
        "loader/entries/debian-6.1.conf": b"title Debian\nversion 6.1\nlinux /debian/vmlinuz\ninitrd /debian/initrd.img\noptions root=/dev/vda3 ro\n",
        "vmlinuz-linux": kernel, "debian/vmlinuz": kernel, "debian/initrd.img": b"1234",
    })
    sel = boot.select([str(img)])
    assert sel.menu.kind == "BLS" and sel.menu.timeout == 4
    assert sel.entry.title == "Debian" and sel.cmdline == "root=/dev/vda3 ro" and sel.initrd == b"1234"
    assert sel.entry.kernel.fs.type == "vfat"


# -- configs that must be refused ----------------------------------------------------------------


def _host(tmp_path, cfg: str | bytes, kernel: bytes | None = None) -> Path:
    (tmp_path / "boot/grub").mkdir(parents=True)
    (tmp_path / "boot/grub/grub.cfg").write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())
    if kernel is not None:
        (tmp_path / "boot/vmlinuz").write_bytes(kernel)
    return tmp_path


def test_a_grub_cfg_that_sources_itself(tmp_path):
    _host(tmp_path, "set timeout=5\nsource $prefix/grub.cfg\n")
    with pytest.raises(LoaderError, match=r"/boot/grub/grub.cfg sources itself \(\(host\)/boot/grub/grub.cfg -> \(host\)/boot/grub/grub.cfg\)"):
        boot.select([], host_dir=str(tmp_path))


def test_configfiles_that_loop_through_each_other(tmp_path):
    _host(tmp_path, "configfile /boot/grub/b.cfg\n")
    (tmp_path / "boot/grub/b.cfg").write_text("configfile /boot/grub/grub.cfg\n")
    with pytest.raises(LoaderError, match="sources itself"):
        boot.select([], host_dir=str(tmp_path))


def test_a_huge_grub_cfg(tmp_path):
    _host(tmp_path, b"# padding\n" * 200_000)
    with pytest.raises(LoaderError, match=r"/boot/grub/grub.cfg is larger than 1048576 bytes"):
        boot.select([], host_dir=str(tmp_path))


def test_a_config_that_does_not_end(tmp_path):
    _host(tmp_path, "function f {\n f\n}\nf\n")
    with pytest.raises(LoaderError, match="functions call each other more than 32 deep"):
        boot.select([], host_dir=str(tmp_path))


def test_an_entry_whose_kernel_does_not_exist(tmp_path, kernel):
    _host(tmp_path, "menuentry 'gone' {\n linux /boot/vmlinuz-6.1.0-99-amd64 root=/dev/vda1\n}\n"
                    "menuentry 'here' {\n linux /boot/vmlinuz\n}\n", kernel)
    menu = boot.find_menu(boot.open_volumes([], str(tmp_path)))
    assert "kernel /boot/vmlinuz-6.1.0-99-amd64 does not exist on host directory" in menu.entries[0].error
    with pytest.raises(LoaderError, match=r"entry 0 'gone': kernel /boot/vmlinuz-6.1.0-99-amd64 does not exist"):
        boot.select([], host_dir=str(tmp_path))
    assert boot.select([], host_dir=str(tmp_path), entry="here").entry.title == "here"


def test_a_kernel_that_is_not_one(tmp_path):
    _host(tmp_path, "menuentry 'text' {\n linux /boot/vmlinuz\n}\n", b"#!/bin/sh\necho I am not a kernel\n")
    with pytest.raises(LoaderError, match=r"entry 0 'text': /boot/vmlinuz on host directory .* is not a kernel"):
        boot.select([], host_dir=str(tmp_path))


@pytest.mark.parametrize("cfg, message", [
    ("menuentry 'x' {\n linux '/boot/vmlinuz\n}\n", "line 2: a ' is not closed"),
    ("if true; then\n set a=b\n", "at its end: missing elif or else or fi"),
    ("for x in 1 2; do echo $x; done\n", "`for` loops are not something a generated grub.cfg has"),
    ("menuentry 'x'\n", "menuentry without a {"),
])
def test_malformed_scripts_name_the_line(tmp_path, cfg, message):
    _host(tmp_path, cfg)
    with pytest.raises(LoaderError, match=message.replace("(", r"\(").replace("{", r"\{")):
        boot.select([], host_dir=str(tmp_path))


def test_a_host_directory_cannot_be_left(tmp_path, kernel):
    (tmp_path / "outside").write_bytes(kernel)
    _host(tmp_path / "dir", "menuentry 'escape' {\n linux /../outside\n}\nmenuentry 'link' {\n linux /boot/link\n}\n")
    (tmp_path / "dir/boot/link").symlink_to(tmp_path / "outside")
    menu = boot.find_menu(boot.open_volumes([], str(tmp_path / "dir")))
    assert all(e.error for e in menu.entries)


def test_grub_script_details(tmp_path, kernel):
    """Quoting, ${var}, unquoted expansion splitting, elif, test -a/-o, functions with $1."""
    _host(tmp_path, r"""
set opts="quiet   splash"
set a=1
if [ "$a" = 2 ]; then set which=two; elif [ -n "$a" -a x$a = x1 ]; then set which=one; else set which=none; fi
function args { set first="$1"; set count=$# ; }
args "x y" z
menuentry "T ${which}" --id 'the-id' {
	linux /boot/vmlinuz a\ b "c  d" 'e $a' ${opts} $first$count
}
""", kernel)
    sel = boot.select([], host_dir=str(tmp_path), entry="the-id")
    assert sel.entry.title == "T one"
    assert sel.cmdline == "a b c  d e $a quiet splash x y2"
