"""Firmware images: what -l bootrom accepts and where it maps them."""

import pytest

from asyncvmm.boot.bootrom import FOUR_GIB, Firmware, has_ovmf_footer, jumps_at_reset_vector, parse_bootrom
from asyncvmm.config import VmConfig, serial_config
from asyncvmm.errors import ConfigError

KiB = 1 << 10


def image(size: int, vector: bytes) -> bytes:
    return bytes(size - 16) + vector.ljust(16, b"\0")


@pytest.mark.parametrize("vector, ok", [
    (b"\xea\x5b\xe0\x00\xf0", True),  # SeaBIOS: ljmp $0xf000, $0xe05b
    (b"\x90\x90\xe9\x5b\xff", True),  # OVMF's older vector: nop; nop; jmp rel16
    (b"\xeb\xfe", True),
    (b"\x90" * 16, False),
    (b"\0" * 16, False),
    (b"\x0f\x20\xc0", False),  # mov eax, cr0: newer OVMF, told by its footer instead
])
def test_reset_vector(vector, ok):
    assert jumps_at_reset_vector(image(64 * KiB, vector)) is ok


def test_ovmf_footer():
    data = bytearray(image(64 * KiB, b"\x0f\x20\xc0"))
    assert not has_ovmf_footer(bytes(data))
    data[-48:-32] = bytes.fromhex("de82b596b21ff745baeaa366c55a082d")
    assert has_ovmf_footer(bytes(data))


def test_mapped_with_its_last_byte_below_4g(tmp_path):
    rom = tmp_path / "rom.bin"
    rom.write_bytes(image(128 * KiB, b"\xea"))
    fw = Firmware.load(str(rom))
    assert (fw.base, fw.uefi, fw.vars) == (FOUR_GIB - 128 * KiB, False, b"")


def test_sizes(tmp_path):
    for size in (60 * KiB, 64 * KiB + 1, 17 << 20):
        rom = tmp_path / "rom.bin"
        rom.write_bytes(image(size, b"\xea"))
        with pytest.raises(ConfigError, match="is not a firmware image's size"):
            Firmware.load(str(rom))


def test_the_l_option():
    assert parse_bootrom("a.fd,b.fd") == ("a.fd", "b.fd")
    assert parse_bootrom("bios.bin") == ("bios.bin", "")
    cfg = VmConfig(kernel="")
    serial_config(["bootrom,/x/bios.bin", "com1,stdio", "debugcon,/tmp/d.log"], cfg)
    assert (cfg.bootrom, cfg.bootvars, cfg.console, cfg.debugcon) == ("/x/bios.bin", "", "stdio", "/tmp/d.log")
    with pytest.raises(ConfigError, match="bootrom is given twice"):
        serial_config(["bootrom,a", "bootrom,b"], VmConfig(kernel=""))
    with pytest.raises(ConfigError, match="no kernel given"):
        VmConfig(kernel="").validate()
