"""Which way a kernel enters the guest (boot/loader.py), Linux detection, and the vmlinux
64-bit entry with boot_params (linux.load_vmlinux)."""

import gzip
import struct

import pytest
from test_boot_linux import bzimage
from test_boot_pvh import XEN_ENTRY_NOTE, build_elf

from asyncvmm.boot import cpu_state, layout, loader
from asyncvmm.boot.linux import get_field, is_linux, load_vmlinux, synthetic_setup_header
from asyncvmm.errors import BootError

LINUX_NOTE = ("Linux", 0x100, b"\0" * 4)
GUEST_OS_NOTE = ("Xen", 6, b"linux\0")
CODE = b"\xf4" * 0x1000


def vmlinux(notes=(LINUX_NOTE,)):
    # ELF entry = phys_startup_64, a physical address, as an x86-64 vmlinux has it.
    return build_elf(segments=((0x1000000, CODE, 0x3000),), notes=notes, e_entry=0x1000000)


def packed(elf):
    return bzimage(payload=gzip.compress(elf, mtime=0), pm_size=0x4000)


def never(cmdline):
    raise AssertionError("the linux-cmdline quirk ran for a guest that is not Linux")


def add_quiet(cmdline):
    return cmdline + " quiet", ["quiet"]


# -- is_linux -------------------------------------------------------------------------------


def test_linux_is_told_apart_from_test_guests():
    assert is_linux(packed(vmlinux()))  # a bzImage with a kernel payload
    assert not is_linux(bzimage(payload=b""))  # a freestanding program in bzImage form
    assert is_linux(vmlinux())  # Linux's own ELF notes
    assert is_linux(vmlinux(notes=(XEN_ENTRY_NOTE, GUEST_OS_NOTE)))  # Xen's GUEST_OS "linux"
    assert not is_linux(build_elf())  # a PVH guest: only the Xen entry note
    assert not is_linux(b"#!/bin/sh\n")


# -- prepare: who decompresses --------------------------------------------------------------


def test_auto_unpacks_only_on_an_emulating_kvm():
    image = packed(vmlinux())
    assert loader.prepare(image, "auto", emulating=False).unpacked is None
    got = loader.prepare(image, "auto", emulating=True)
    assert got.unpacked.vmlinux == vmlinux() and "unpacked by the VMM (gzip" in got.note
    assert loader.prepare(image, "vmm", emulating=False).unpacked is not None
    assert loader.prepare(image, "kernel", emulating=True).unpacked is None
    assert loader.prepare(vmlinux(), "vmm", emulating=True) == loader.Prepared()  # not a bzImage


def test_a_payload_python_cannot_unpack():
    image = bzimage(payload=b"\x89LZO\x00\r\n\x1a\n" + bytes(32) + struct.pack("<I", 1 << 20))
    note = loader.prepare(image, "auto", emulating=True)
    assert note.unpacked is None and "the kernel decompresses itself" in note.note
    with pytest.raises(BootError, match="--decompress vmm: .*lzo"):
        loader.prepare(image, "vmm", emulating=True)


# -- load -----------------------------------------------------------------------------------


def test_unpacked_payload_with_a_pvh_note_enters_through_pvh(mem):
    image = packed(vmlinux(notes=(LINUX_NOTE, XEN_ENTRY_NOTE)))
    boot = loader.load(mem, image, None, "console=ttyS0", prepared=loader.prepare(image, "vmm", True),
                       linux_cmdline=add_quiet)
    assert "entered through the vmlinux's PVH entry" in boot.path
    assert boot.state.cs == cpu_state.CODE32_SEGMENT and boot.state.rip == 0x1000040
    assert boot.linux and boot.appended == ["quiet"] and boot.cmdline == "console=ttyS0 quiet"
    assert mem.read(layout.CMDLINE_START, 20) == b"console=ttyS0 quiet\0"
    assert mem.read(0x1000000, len(CODE)) == CODE


def test_unpacked_payload_without_a_pvh_note_enters_startup_64(mem):
    image = packed(vmlinux())
    boot = loader.load(mem, image, b"RDSK" * 64, "root=/dev/vda",
                       prepared=loader.prepare(image, "vmm", True))
    assert "64-bit ELF entry with boot_params" in boot.path
    s = boot.state
    assert s.cs == cpu_state.CODE64_SEGMENT and s.rip == 0x1000000 and s.rsi == layout.ZERO_PAGE_START
    zp = mem.read(layout.ZERO_PAGE_START, 4096)
    assert zp[0x1F1:0x26C] != bytes(0x26C - 0x1F1)  # the bzImage's setup header, copied
    assert zp[0x202:0x206] == b"HdrS" and get_field(zp, "version") == 0x020F
    assert get_field(zp, "cmd_line_ptr") == layout.CMDLINE_START
    addr, size = get_field(zp, "ramdisk_image"), get_field(zp, "ramdisk_size")
    assert size == 256 and addr >= 0x1003000 and mem.read(addr, 4) == b"RDSK"


def test_bzimage_left_to_its_decompressor(mem):
    image = packed(vmlinux())
    boot = loader.load(mem, image, None, "x", prepared=loader.Prepared(note="why not"))
    assert "the kernel decompresses itself (why not)" in boot.path
    assert boot.state.rip == layout.KERNEL_START + 0x200


def test_pvh_test_guests_get_no_linux_parameters(mem):
    boot = loader.load(mem, build_elf(), None, "hello", linux_cmdline=never)
    assert boot.path == "through its PVH entry" and not boot.linux and boot.cmdline == "hello"
    loader.load(mem, bzimage(payload=b""), None, "hello", linux_cmdline=never)


def test_bare_vmlinux_without_pvh_gets_a_synthetic_header(mem):
    boot = loader.load(mem, vmlinux(), None, "console=ttyS0", linux_cmdline=add_quiet)
    assert "a vmlinux without a PVH note" in boot.path and boot.cmdline == "console=ttyS0 quiet"
    zp = mem.read(layout.ZERO_PAGE_START, 4096)
    assert get_field(zp, "boot_flag") == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert get_field(zp, "type_of_loader") == 0xFF and get_field(zp, "cmdline_size") == 2047


def test_an_elf_that_is_neither(mem):
    with pytest.raises(BootError, match="no PVH entry note .* not a Linux vmlinux"):
        loader.load(mem, build_elf(notes=()), None, "")


# -- load_vmlinux checks --------------------------------------------------------------------


def test_vmlinux_must_fit_in_ram(mem):
    big = build_elf(segments=((0x3F00000, CODE, 0x200000),), notes=(LINUX_NOTE,), e_entry=0x3F00000)
    with pytest.raises(BootError, match="needs at least 65 MiB"):
        load_vmlinux(mem, big, "")


def test_vmlinux_32_bit_refused(mem):
    elf32 = build_elf(segments=((0x1000000, CODE, 0x1000),), notes=(LINUX_NOTE,), bits=32, e_entry=0x1000000)
    with pytest.raises(BootError, match="not an x86-64 vmlinux"):
        load_vmlinux(mem, elf32, "")


def test_vmlinux_entry_must_be_in_a_segment(mem):
    with pytest.raises(BootError, match="entry .* is in none of its segments"):
        load_vmlinux(mem, build_elf(segments=((0x1000000, CODE, 0x1000),), e_entry=0x5000000), "")


def test_vmlinux_virtual_entry_is_translated(mem):
    elf = build_elf(segments=((0x1000000, CODE, 0x1000),), e_entry=0xFFFFFFFF81000010)
    assert load_vmlinux(mem, elf, "").rip == 0x1000010


def test_vmlinux_cmdline_limit(mem):
    with pytest.raises(BootError, match="at most 2047"):
        load_vmlinux(mem, vmlinux(), "x" * 3000)


def test_synthetic_header_parses_as_a_64_bit_kernel():
    from asyncvmm.boot.linux import bzimage_info

    info = bzimage_info(synthetic_setup_header())
    assert info.version == 0x020F and info.header_end == 0x26C and info.cmdline_size == 2047
    assert info.xloadflags & 1


def test_unpacking_runs_off_the_loop(tmp_path, monkeypatch):
    """read_images unpacks in a worker thread, and the loop goes on meanwhile."""
    import asyncio
    import os
    import threading

    from asyncvmm.config import VmConfig
    from asyncvmm.machine import read_images

    elf = build_elf(segments=((0x1000000, os.urandom(1 << 20) * 2, 2 << 20),), notes=(LINUX_NOTE,))
    payload = gzip.compress(elf, compresslevel=1, mtime=0)
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(payload=payload, pm_size=len(payload) + 0x1000))
    cfg = VmConfig(kernel=str(path), decompress="vmm")
    threads = []
    from asyncvmm.boot import unpack as unpack_mod
    real = unpack_mod.unpack_bzimage

    def unpack(image):
        threads.append(threading.current_thread())
        return real(image)

    monkeypatch.setattr(unpack_mod, "unpack_bzimage", unpack)  # loader imports it when it unpacks

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        images = await read_images(cfg)
        ticker.cancel()
        return images, ticks

    images, ticks = asyncio.run(main())
    assert images.prepared.unpacked.vmlinux == elf
    assert threads and threads[0] is not threading.main_thread()
    assert ticks >= 1


def test_small_images_are_read_on_the_loop_and_large_ones_in_a_thread(tmp_path, monkeypatch):
    """A few MiB of kernel and initrd cost less to read than a worker thread's start (and
    its shutdown when the loop closes): they are read on the loop; larger ones, and
    anything not a regular file, in the thread."""
    import asyncio

    from asyncvmm.boot import setup
    from asyncvmm.config import VmConfig

    hops = []
    real = asyncio.to_thread

    async def to_thread(fn, *args):
        hops.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(setup.asyncio, "to_thread", to_thread)
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(build_elf(segments=((0x100000, b"\xf4" * 4096, 4096),), notes=(XEN_ENTRY_NOTE,)))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 4096)
    images = asyncio.run(setup.read_images(VmConfig(kernel=str(kernel), initrd=str(initrd))))
    assert hops == [] and images.kernel == kernel.read_bytes() and images.initrd == b"x" * 4096
    initrd.write_bytes(b"x" * (setup.INLINE_READ_MAX + 1))
    images = asyncio.run(setup.read_images(VmConfig(kernel=str(kernel), initrd=str(initrd))))
    assert hops == ["_read_file", "_read_file"] and len(images.initrd) == setup.INLINE_READ_MAX + 1
