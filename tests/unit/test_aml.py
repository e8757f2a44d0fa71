"""The AML encoder: the grammar's edge cases, read back by ACPICA's disassembler."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from asyncvmm.boot import acpi, aml

needs_iasl = pytest.mark.skipif(not shutil.which("iasl"), reason="iasl missing (tools/setup installs acpica-tools)")


@pytest.mark.parametrize(
    "body, encoded",
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # 63 in one byte, the most it holds
        (63, b"\x41\x04"),  # 65 = 0x41: two bytes, low nibble 1, then 0x04
        (0xFFD, b"\x4f\xff"),  # 4095 still fits in 12 bits
        (0xFFE, b"\x81\x00\x01"),  # 4097: three bytes
        (0xFFFFC, b"\x8f\xff\xff"),
        (0xFFFFD, b"\xc1\x00\x00\x01"),  # four bytes
    ],
)
def test_pkg_length_counts_its_own_bytes(body, encoded):
    assert aml.pkg_length(body) == encoded


def test_pkg_length_limit():
    with pytest.raises(ValueError, match="PkgLength"):
        aml.pkg_length(1 << 28)


def test_integers_take_the_shortest_form():
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(2) == b"\x0a\x02"
    assert aml.integer(0x100) == b"\x0b\x00\x01"
    assert aml.integer(0x1_0000) == b"\x0c\x00\x00\x01\x00"
    assert aml.integer(1 << 32) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.integer(bad)


def test_names():
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.COM1") == b"\\\x2f\x03_SB_PCI0COM1"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("toolong", "1ABC", "a", "\\_SB..X", "AB-C"):
        with pytest.raises(ValueError):
            aml.name_string(bad)


def test_eisa_ids():
    assert aml.eisa_id("PNP0A03") == aml.integer(0x030AD041)  # the value every PC firmware uses
    assert aml.eisa_id("PNP0501") == aml.integer(0x0105D041)
    for bad in ("pnp0a03", "PNP0A0", "PNP0A0G"):
        with pytest.raises(ValueError):
            aml.eisa_id(bad)


def test_data_refuses_what_aml_cannot_hold():
    with pytest.raises(TypeError):
        aml.package(True)
    with pytest.raises(ValueError):
        aml.string("a\0b")
    with pytest.raises(ValueError):
        aml.package(*range(256))
    with pytest.raises(ValueError):
        aml.irq_no_flags(16)
    with pytest.raises(ValueError):
        aml.word_io(10, 9)


@needs_iasl
def test_iasl_reads_every_construct_back(tmp_path):
    terms = aml.scope(
        "\\_SB",
        aml.device(
            "DEV0",
            aml.name("INTS", aml.package(0, 1, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1)),
            aml.name("STR0", "hello"),
            aml.name("BUF1", aml.buffer(bytes(range(60)))),  # one-byte PkgLength
            aml.name("BUF2", aml.buffer(bytes(4000))),  # two bytes
            aml.name("BUF3", aml.buffer(bytes(70000))),  # three bytes
            aml.name("NEST", aml.package(aml.package(1, "x"), aml.package())),
        ),
        aml.device("DEV0.SUB0", aml.name("_UID", 7)),  # a dual name path
    ) + aml.scope("\\_SB.DEV0.SUB0", aml.name("^^TOP0", 3))  # a multi name path, parent prefixes
    (tmp_path / "t.dat").write_bytes(acpi.sdt(b"DSDT", 2, terms))
    r = subprocess.run(["iasl", "-d", "t.dat"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    asl = (tmp_path / "t.dsl").read_text()
    ints = re.search(r"Name \(INTS, Package \(0x09\)\s*\{([^}]*)\}", asl).group(1)
    assert [x.strip() for x in ints.split(",")] == [
        "Zero", "One", "0xFF", "0x0100", "0xFFFF", "0x00010000", "0xFFFFFFFF", "0x0000000100000000", "0xFFFFFFFFFFFFFFFF",
    ]
    assert 'Name (STR0, "hello")' in asl
    for name, size in (("BUF1", "0x3C"), ("BUF2", "0x0FA0"), ("BUF3", "0x00011170")):  # 60, 4000, 70000
        assert f"Name ({name}, Buffer ({size})" in asl, name
    assert re.search(r"Name \(NEST, Package \(0x02\)\s*\{\s*Package \(0x02\)\s*\{\s*One,\s*\"x\"\s*\},\s*"
                     r"Package \(0x00\) \{\}", asl)
    assert "Device (DEV0.SUB0)" in asl and "Name (_UID, 0x07)" in asl
    assert "Scope (\\_SB.DEV0.SUB0)" in asl and "Name (^^TOP0, 0x03)" in asl
