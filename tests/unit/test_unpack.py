"""Unpacking a bzImage's payload in the VMM: every format the kernel's build makes, with
its 4-byte size trailer, and the ways a payload can be wrong."""

import bz2
import gzip
import lzma
import os
import struct

import lz4.block
import pytest
import zstandard
from test_boot_linux import bzimage
from test_boot_pvh import build_elf

from asyncvmm.boot.elf import parse_elf
from asyncvmm.boot.linux import Compression
from asyncvmm.boot.unpack import LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC, UnpackError, unpack_bzimage, unpack_payload

SMALL_KERNEL = "/var/cache/asyncvmm/kernels/latest"


def vmlinux(size=0x3000):
    code = bytes(range(256)) * (size // 256)
    return build_elf(segments=((0x1000000, code, len(code) + 0x1000),), notes=(("Linux", 0x100, b"\0" * 4),))


def trailer(data):
    return struct.pack("<I", len(data))


def lz4_legacy(data):
    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[i : i + LZ4_LEGACY_BLOCK], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out + trailer(data)


# What scripts/Makefile.lib does for each: compress, then append the size (gzip has ISIZE).
PACK = {
    Compression.GZIP: lambda d: gzip.compress(d, mtime=0),
    Compression.BZIP2: lambda d: bz2.compress(d) + trailer(d),
    Compression.LZMA: lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE) + trailer(d),
    Compression.XZ: lambda d: lzma.compress(
        d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
        filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}],
    ) + trailer(d),
    Compression.LZ4: lz4_legacy,
    Compression.ZSTD: lambda d: zstandard.ZstdCompressor(level=19, write_content_size=False).compress(d) + trailer(d),
}


@pytest.mark.parametrize("kind", list(PACK), ids=lambda k: k.value)
def test_every_format_the_kernel_build_makes(kind):
    elf = vmlinux()
    image = bzimage(payload=PACK[kind](elf), pm_size=0x10000)
    out = unpack_bzimage(image)
    assert out.vmlinux == elf and out.compression is kind
    assert out.compressed_size == len(PACK[kind](elf))
    assert f"{kind.value}, " in out.describe()


def test_lz4_with_several_legacy_blocks():
    data = os.urandom(1 << 16) * 150  # 9.4 MiB: two 8 MiB legacy blocks
    elf = b"\x7fELF" + data
    assert unpack_payload(lz4_legacy(elf), Compression.LZ4) == elf


def test_lzo_is_left_to_the_kernel():
    with pytest.raises(UnpackError, match="lzo-compressed, which Python cannot decompress"):
        unpack_payload(b"\x89LZO\x00\r\n\x1a\n" + bytes(16) + trailer(b"x" * 100), Compression.LZO)


def test_a_corrupt_payload():
    packed = bytearray(PACK[Compression.XZ](vmlinux()))
    packed[40:48] = b"\xff" * 8
    with pytest.raises(UnpackError, match=r"\(xz\) is corrupt"):
        unpack_payload(bytes(packed), Compression.XZ)


def test_the_trailer_must_match():
    elf = vmlinux()
    packed = bz2.compress(elf) + struct.pack("<I", len(elf) + 1)
    with pytest.raises(UnpackError, match="decompressed to .* but its trailer says"):
        unpack_payload(packed, Compression.BZIP2)


def test_a_payload_cannot_decompress_past_its_trailer():
    bomb = b"\x7fELF" + bytes(4 << 20)
    packed = lzma.compress(bomb, format=lzma.FORMAT_XZ) + struct.pack("<I", 4096)
    with pytest.raises(UnpackError, match="more than the 4096 bytes"):
        unpack_payload(packed, Compression.XZ)


def test_an_absurd_size_is_refused():
    with pytest.raises(UnpackError, match="announces a .*-byte kernel"):
        unpack_payload(b"\x1f\x8b" + bytes(10) + struct.pack("<I", 0), Compression.GZIP)


def test_the_result_must_be_an_elf():
    with pytest.raises(UnpackError, match="did not decompress to an ELF"):
        unpack_payload(PACK[Compression.GZIP](b"not a kernel" * 100), Compression.GZIP)


def test_no_payload():
    with pytest.raises(UnpackError, match="has no payload"):
        unpack_bzimage(bzimage(payload=b""))


@pytest.mark.skipif(not os.path.exists(f"{SMALL_KERNEL}/bzImage"), reason="the small kernel is not built")
def test_the_small_kernels_payload_is_its_vmlinux():
    with open(f"{SMALL_KERNEL}/bzImage", "rb") as f:
        out = unpack_bzimage(f.read())
    with open(f"{SMALL_KERNEL}/vmlinux", "rb") as f:
        full = f.read()
    # The payload is the stripped vmlinux: the same segments, byte for byte.
    a, b = parse_elf(out.vmlinux), parse_elf(full)
    assert a.e_entry == b.e_entry
    assert [(s.p_paddr, s.p_memsz) for s in a.load_segments()] == [(s.p_paddr, s.p_memsz) for s in b.load_segments()]
    for sa, sb in zip(a.load_segments(), b.load_segments()):
        assert a.segment_data(sa) == b.segment_data(sb)
