"""Unpack a bzImage's payload — the compressed vmlinux — in the VMM.

A bzImage carries the kernel proper as a compressed ELF (boot.rst: payload_offset and
payload_length, protocol 2.08+) behind a decompressor of its own. On hardware that
decompressor takes tens of milliseconds; on an instruction-emulating KVM it takes 20 to
90 seconds, so asyncvmm can unpack the payload itself and enter the vmlinux directly.

The kernel's build (scripts/Makefile.lib, arch/x86/boot/compressed/Makefile) compresses
vmlinux.bin (the stripped vmlinux, with the relocations appended when the kernel is
relocatable) with one of gzip, bzip2, lzma, xz (with the x86 BCJ filter), lzo, lz4 (the
legacy frame format of `lz4 -l`) or zstd, and appends the uncompressed size as 4 bytes,
little-endian (for gzip these are the format's own ISIZE). mkpiggy reads the size from
there, and so does this module: the output must have exactly that length.

Decompressors are Python's (zlib, bz2, lzma) and the PyPI packages lz4 and zstandard;
Python has no LZO, so an LZO payload raises UnpackError and the kernel decompresses
itself. Every decompressor is bounded by the announced size, so a hostile image cannot
make the VMM allocate more than MAX_VMLINUX.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import time
import zlib
from dataclasses import dataclass

from ..errors import BootError
from .elf import is_elf
from .linux import BzImageInfo, Compression, bzimage_info

MAX_VMLINUX = 1 << 30  # no kernel is this large: a bigger announced size is an error
LZ4_LEGACY_MAGIC = 0x184C2102  # lz4 -l: the magic, then blocks of (le32 size, block)
LZ4_LEGACY_BLOCK = 8 << 20  # each legacy block decompresses to at most 8 MiB
SIZE_TRAILER = struct.Struct("<I")


class UnpackError(BootError):
    """The payload cannot be unpacked here (format, corruption): the message says why."""


@dataclass(frozen=True)
class Unpacked:
    vmlinux: bytes  # the kernel proper: an ELF (vmlinux.bin, plus relocations if any)
    compression: Compression
    compressed_size: int
    seconds: float  # wall time the decompression took

    def describe(self) -> str:
        return (
            f"{self.compression.value}, {self.compressed_size / 1e6:.1f} MB -> {len(self.vmlinux) / 1e6:.1f} MB "
            f"in {self.seconds:.2f} s"
        )


def unpack_bzimage(image: bytes | memoryview, info: BzImageInfo | None = None) -> Unpacked:
    """The bzImage's vmlinux, decompressed; UnpackError if that cannot be done here."""
    info = info or bzimage_info(image)
    if not info.payload_length:
        raise UnpackError(f"bzImage (boot protocol {info.version_str}) has no payload_offset/payload_length")
    if info.compression is None:
        raise UnpackError("bzImage payload is in a format this VMM does not recognise")
    start = info.payload_file_offset
    payload = memoryview(image)[start : start + info.payload_length]
    t0 = time.monotonic()
    vmlinux = unpack_payload(payload, info.compression)
    return Unpacked(vmlinux, info.compression, len(payload), time.monotonic() - t0)


def unpack_payload(payload: bytes | memoryview, compression: Compression) -> bytes:
    """Decompress a bzImage payload (with its 4-byte size trailer) into the vmlinux ELF."""
    if compression is Compression.NONE:
        return bytes(payload)
    if len(payload) < 8:
        raise UnpackError(f"bzImage payload is {len(payload)} bytes: too short for {compression.value} data")
    (size,) = SIZE_TRAILER.unpack_from(payload, len(payload) - SIZE_TRAILER.size)
    if not 0 < size <= MAX_VMLINUX:
        raise UnpackError(f"bzImage payload announces a {size}-byte kernel (its last 4 bytes): not a kernel")
    data = payload[: len(payload) - SIZE_TRAILER.size] if compression is not Compression.GZIP else payload
    decode = _DECODERS.get(compression)
    if decode is None:
        raise UnpackError(f"bzImage payload is {compression.value}-compressed, which Python cannot decompress")
    try:
        out = decode(data, size)
    except UnpackError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, MemoryError, lzma.LZMAError, zlib.error) as e:
        raise UnpackError(f"bzImage payload ({compression.value}) is corrupt: {e}") from None
    except Exception as e:  # the packages' own error types (lz4's LZ4BlockError, ZstdError)
        raise UnpackError(f"bzImage payload ({compression.value}) is corrupt: {type(e).__name__}: {e}") from None
    if len(out) != size:
        raise UnpackError(
            f"bzImage payload ({compression.value}) decompressed to {len(out)} bytes, but its trailer says {size}"
        )
    if not is_elf(out):
        raise UnpackError(f"bzImage payload ({compression.value}) did not decompress to an ELF vmlinux")
    return out


def _bounded(decompressor, data, size: int) -> bytes:
    """Run a zlib/bz2/lzma-style decompressor with at most size + 1 bytes of output."""
    out = decompressor.decompress(bytes(data), size + 1)
    if len(out) > size:
        raise UnpackError(f"bzImage payload decompresses to more than the {size} bytes its trailer says")
    return out


def _gzip(data, size: int) -> bytes:
    # The gzip ISIZE (the last 4 bytes) is the size modulo 2**32: it is the trailer.
    return _bounded(zlib.decompressobj(16 + zlib.MAX_WBITS), data, size)


def _bzip2(data, size: int) -> bytes:
    return _bounded(bz2.BZ2Decompressor(), data, size)


def _lzma(data, size: int) -> bytes:
    return _bounded(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, size)


def _xz(data, size: int) -> bytes:
    return _bounded(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, size)


def _lz4(data, size: int) -> bytes:
    import lz4.block  # noqa: PLC0415 (only an lz4 kernel needs it)

    view = memoryview(data)
    if len(view) < 4 or SIZE_TRAILER.unpack_from(view, 0)[0] != LZ4_LEGACY_MAGIC:
        raise UnpackError("bzImage payload (lz4) does not start with the lz4 legacy frame magic")
    pos, out, total = 4, [], 0
    while pos < len(view) and total < size:
        if pos + 4 > len(view):
            raise UnpackError(f"bzImage payload (lz4) is truncated at offset {pos}")
        (block,) = SIZE_TRAILER.unpack_from(view, pos)
        pos += 4
        if block == LZ4_LEGACY_MAGIC:  # another legacy frame follows (concatenated)
            continue
        if block > len(view) - pos:
            raise UnpackError(f"bzImage payload (lz4): a {block}-byte block at offset {pos} runs past its end")
        chunk = lz4.block.decompress(view[pos : pos + block], uncompressed_size=min(LZ4_LEGACY_BLOCK, size - total))
        pos += block
        out.append(chunk)
        total += len(chunk)
    return b"".join(out)


def _zstd(data, size: int) -> bytes:
    import zstandard  # noqa: PLC0415 (only a zstd kernel needs it)

    return zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)


_DECODERS = {
    Compression.GZIP: _gzip,
    Compression.BZIP2: _bzip2,
    Compression.LZMA: _lzma,
    Compression.XZ: _xz,
    Compression.LZ4: _lz4,
    Compression.ZSTD: _zstd,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m asyncvmm.boot.unpack BZIMAGE VMLINUX`: write the unpacked kernel."""
    import sys  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m asyncvmm.boot.unpack BZIMAGE VMLINUX", file=sys.stderr)
        return 2
    try:
        with open(args[0], "rb") as f:
            image = f.read()
        result = unpack_bzimage(image)
    except (OSError, BootError) as e:
        print(f"unpack: {args[0]}: {e}", file=sys.stderr)
        return 1
    with open(args[1], "wb") as f:
        f.write(result.vmlinux)
    print(f"unpack: {args[0]}: {result.describe()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
