"""The loader's partition tables and filesystems on layouts made by Debian's tools
(sfdisk, sgdisk, mkfs.ext4, mkfs.vfat, mkfs.xfs), compared with what those tools say."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest
from loader_images import MiB, blank, ext4, fat, fs_uuid, gpt, mbr, needs_disk_tools, run

from asyncvmm.loader.disks import Disk, Unsupported
from asyncvmm.loader.errors import LoaderError
from asyncvmm.loader.filesystems import ExtFs, FatFs
from asyncvmm.loader.partitions import SECTOR, Scheme, read_table

pytestmark = needs_disk_tools


def table(path):
    with open(path, "rb") as f:
        return read_table(f, os.path.getsize(path), path.name)


def sfdisk_json(path):
    return json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]["partitions"]


def test_mbr_with_extended_and_logical_partitions_as_sfdisk_reads_them(tmp_path):
    img = blank(tmp_path / "mbr.img", 64 * MiB)
    mbr(img, "2048,16384,83\n18432,8192,ef\n26624,,5\n28672,8192,83\n38912,4096,82\n")
    t = table(img)
    assert t.scheme is Scheme.MBR
    want = {int(p["node"].removeprefix(str(img))): (p["start"], p["size"]) for p in sfdisk_json(img) if p["type"] != "5"}
    got = {p.number: (p.start // SECTOR, p.size // SECTOR) for p in t.partitions}
    assert got == want and sorted(got) == [1, 2, 5, 6]
    assert next(p for p in t.partitions if p.number == 2).esp


def test_gpt_as_sgdisk_wrote_it(tmp_path):
    img = blank(tmp_path / "gpt.img", 64 * MiB)
    gpt(img, "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:+16M", "-t", "2:ef00", "-c", "2:esp",
        "-n", "3:0:0", "-t", "3:8300", "-c", "3:root")
    t = table(img)
    assert t.scheme is Scheme.GPT and not t.note
    want = sfdisk_json(img)
    assert [(p.start // SECTOR, p.size // SECTOR) for p in t.partitions] == [(p["start"], p["size"]) for p in want]
    assert [p.part_uuid.upper() for p in t.partitions] == [p["uuid"] for p in want]
    bios, esp, root = t.partitions
    assert bios.no_filesystem and esp.esp and root.kind == "Linux" and root.name == "root"
    assert esp.grub_name == "gpt2"


def _corrupt(img, offset, length=4):
    with open(img, "r+b") as f:
        f.seek(offset)
        b = f.read(length)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def test_a_gpt_whose_primary_header_fails_its_crc_is_read_from_the_backup(tmp_path):
    img = blank(tmp_path / "gpt.img", 32 * MiB)
    gpt(img, "-n", "1:2048:+8M", "-n", "2:0:0")
    good = table(img).partitions
    _corrupt(img, SECTOR + 40)  # first usable LBA: the header's CRC no longer matches
    t = table(img)
    assert t.partitions == good and "fails its CRC32" in t.note
    _corrupt(img, os.path.getsize(img) - SECTOR + 40)
    with pytest.raises(LoaderError, match="GPT unusable: primary header fails its CRC32; backup header fails its CRC32"):
        table(img)


def test_a_gpt_entry_array_that_fails_its_crc_is_read_from_the_backup(tmp_path):
    img = blank(tmp_path / "gpt.img", 32 * MiB)
    gpt(img, "-n", "1:2048:+8M", "-n", "2:0:0")
    good = table(img).partitions
    _corrupt(img, 2 * SECTOR + 32)  # the first entry's first LBA
    t = table(img)
    assert t.partitions == good and "entry array that fails its CRC32" in t.note


def test_a_partition_past_the_end_of_the_image(tmp_path):
    img = blank(tmp_path / "big.img", 64 * MiB)
    mbr(img, "2048,,83\n")
    os.truncate(img, 32 * MiB)  # the image was cut short after partitioning
    with pytest.raises(LoaderError, match=r"big.img: partition 1 \(bytes 1048576-67108863\) runs past the end of the image \(33554432 bytes\)"):
        table(img)


def _mbr_entries(img, entries):
    """Write MBR entries by hand: sfdisk refuses overlapping ones."""
    with open(img, "r+b") as f:
        for i, (ptype, first, count) in enumerate(entries):
            f.seek(446 + 16 * i)
            f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype, b"\0\0\0", first, count))
        f.seek(510)
        f.write(b"\x55\xaa")


def test_overlapping_partitions(tmp_path):
    img = blank(tmp_path / "overlap.img", 16 * MiB)
    _mbr_entries(img, [(0x83, 2048, 8192), (0x83, 8192, 4096)])
    with pytest.raises(LoaderError, match="overlap.img: partitions 1 and 2 overlap"):
        table(img)


def test_an_ebr_chain_that_loops(tmp_path):
    img = blank(tmp_path / "loop.img", 16 * MiB)
    _mbr_entries(img, [(0x05, 2048, 8192)])
    with open(img, "r+b") as f:  # the EBR: one logical, then a link back to itself
        f.seek(2048 * SECTOR + 446)
        f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x83, b"\0" * 3, 63, 100))
        f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x05, b"\0" * 3, 0, 8192))
        f.seek(2048 * SECTOR + 510)
        f.write(b"\x55\xaa")
    with pytest.raises(LoaderError, match="chain of EBRs loops"):
        table(img)


def test_no_partition_table_is_a_filesystem_on_the_whole_disk(tmp_path):
    img = blank(tmp_path / "whole.img", 8 * MiB)
    ext4(img, 0, 8 * MiB, {"boot/x": b"x"})
    t = table(img)
    assert t.scheme is Scheme.NONE and t.partitions[0].size == 8 * MiB
    disk = Disk(str(img), 0)
    assert disk.volumes[0].device == "hd0" and disk.volumes[0].read("/boot/x", 10) == b"x"


def test_ext4_and_fat_at_their_offsets(tmp_path):
    img = blank(tmp_path / "disk.img", 64 * MiB)
    gpt(img, "-n", "1:2048:+16M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300")
    t = table(img)
    esp, root = t.partitions
    fat(img, esp.start, esp.size, {"EFI/debian/grub.cfg": b"configfile x\n"})
    kernel = os.urandom(3 * MiB)
    ext4(img, root.start, root.size, {"boot/vmlinuz-6.1.0-13-amd64": kernel, "vmlinuz": "boot/vmlinuz-6.1.0-13-amd64",
                                      "boot/grub/grub.cfg": b"set default=0\n"}, label="rootfs")
    disk = Disk(str(img), 0)
    f, e = disk.volumes[1], disk.volumes[2]
    assert isinstance(f, FatFs) and isinstance(e, ExtFs)
    assert (f.device, e.device) == ("hd0,gpt1", "hd0,gpt2")
    assert e.uuid == fs_uuid(img, root.start, root.size) and e.label == "rootfs"
    assert f.listdir("/EFI") == {"debian": True}
    assert f.read("/EFI/debian/grub.cfg", 100) == b"configfile x\n"
    assert e.read("/boot/vmlinuz-6.1.0-13-amd64", 4 * MiB) == kernel
    assert e.read("/vmlinuz", 4 * MiB) == kernel  # Debian's symbolic link at /
    assert e.listdir("/boot") == {"vmlinuz-6.1.0-13-amd64": False, "grub": True}
    assert e.is_file("/vmlinuz") and not e.is_file("/boot/grub") and e.is_dir("/boot/grub")
    with pytest.raises(LoaderError, match=r"disk.img partition 2 \(gpt, Linux\), ext4: /boot/nope: File not found"):
        e.read("/boot/nope", 100)
    with pytest.raises(LoaderError, match="is larger than 1048576 bytes"):
        e.read("/vmlinuz", MiB)
    with pytest.raises(LoaderError, match="/EFI/nope"):
        f.read("/EFI/nope", 100)


@pytest.mark.skipif(shutil.which("mkfs.xfs", path="/usr/sbin:/sbin") is None, reason="needs mkfs.xfs (xfsprogs)")
def test_xfs_is_named_and_points_to_firmware(tmp_path):
    img = blank(tmp_path / "xfs.img", 400 * MiB)
    mbr(img, "2048,,83\n")
    subprocess.run(["mkfs.xfs", "-q", "-d", f"file,name={img},size={398 * MiB}", "-d", "offset=1048576"],
                   capture_output=True)
    if Disk(str(img), 0).volumes.get(1) is None:  # mkfs.xfs without -d offset: format a copy and place it
        part = tmp_path / "part.img"
        subprocess.run(["mkfs.xfs", "-q", "-f", "-d", f"file,name={part},size={398 * MiB}"], check=True)
        with open(part, "rb") as src, open(img, "r+b") as dst:
            dst.seek(MiB)
            shutil.copyfileobj(src, dst)
    fs = Disk(str(img), 0).volumes[1]
    assert isinstance(fs, Unsupported) and fs.type == "xfs"
    with pytest.raises(LoaderError, match=r"xfs.img partition 1 \(msdos, type 0x83\) holds XFS, which the loader does not read .* firmware"):
        fs.read("/boot/grub/grub.cfg", 100)
