"""Image formats are detected from their magic, never guessed raw (formats.py): made by
qemu-img where it writes the format, and from the specifications' headers where it does not."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from conftest import run_vmm
from test_cli import assert_usage_error

from asyncvmm.devices.virtio.block.formats import check_format, detect, probe
from asyncvmm.devices.virtio.block.image import BlockOptions, DiskImage
from asyncvmm.errors import ConfigError

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed (apt-get install qemu-utils)")
MiB = 1 << 20

# Every format qemu-img creates, and what detect() must call it.
QEMU_IMG_FORMATS = ["qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels"]


@needs_qemu_img
@pytest.mark.parametrize("fmt", QEMU_IMG_FORMATS)
def test_qemu_img_formats_are_detected(tmp_path, fmt):
    image = tmp_path / f"disk.{fmt}"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(image), "8M"], check=True)
    assert detect(str(image)).format == fmt


@needs_qemu_img
def test_a_fixed_vhd_is_found_by_its_footer(tmp_path):
    image = tmp_path / "fixed.vhd"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(image), "8M"], check=True)
    assert detect(str(image)).what == "VHD (fixed)"


@pytest.mark.parametrize("head,tail,fmt", [
    (b"QFI\xfb\0\0\0\x03", b"", "qcow2"),
    (b"QFI\xfb\0\0\0\x01", b"", "qcow"),
    (b"Bochs Virtual HD Image\0", b"", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount", b"", "cloop"),
    (bytes(4096), bytes(508) + b"koly", "raw"),  # a 4 KiB probe that is not a whole trailer: at -512
    (bytes(4096), b"koly" + bytes(508), "dmg"),
    (bytes(0x40) + struct.pack("<I", 0xBEDA107F), b"", "vdi"),
    (b"LUKS\xba\xbe\0\x02", b"", "luks"),  # (qemu-img cannot make one here: its PBKDF timing fails)
    (b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa", b"", "raw"),  # an MBR: raw
    (b"", b"", "raw"),
])
def test_magics(head, tail, fmt):
    assert probe(head, tail).format == fmt


@needs_qemu_img
def test_a_qcow2_is_never_served_as_raw(tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    with pytest.raises(ConfigError, match=r"disk .*disk.qcow2 is a qcow2 \(version 3\) image, not raw"):
        DiskImage(BlockOptions(str(image)))
    padded = tmp_path / "padded.qcow2"  # a whole number of sectors, as a raw disk must be
    padded.write_bytes(image.read_bytes().ljust(MiB, b"\0"))
    DiskImage(BlockOptions(str(padded), format="raw")).close()  # said explicitly: its bytes
    assert check_format(str(image), "raw").raw
    assert check_format(str(image), "").format == "qcow2"
    with pytest.raises(ConfigError, match="format=vmdk, but the image is qcow2"):
        check_format(str(image), "vmdk")
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(ConfigError, match="format=qcow2, but the image is raw"):
        check_format(str(raw), "qcow2")


def test_format_option():
    assert BlockOptions.parse("a.img,format=raw").format == "raw"
    assert BlockOptions.parse("a.img,format=qcow2").format == "qcow2"
    with pytest.raises(ConfigError, match="format=qcow3: not an image format"):
        BlockOptions.parse("a.img,format=qcow3")


@needs_qemu_img
def test_the_loader_refuses_a_non_raw_image(tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    r = run_vmm("load", "-d", str(image))
    assert_usage_error(r, "is a qcow2 (version 3) image; the loader reads raw images only")


@needs_qemu_img
def test_a_format_that_is_not_the_images_is_refused_in_one_line(tmp_path, guests):
    image = tmp_path / "disk.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    r = run_vmm("run", "--kernel", str(guests / "hello.elf"), "-s", f"3,virtio-blk,{image},format=vdi")
    assert_usage_error(r, "format=vdi, but the image is qcow2 (version 3)")
