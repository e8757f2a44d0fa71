"""A small AML encoder: the terms this machine's DSDT is made of (ACPI 6.5, chapter 20,
"ACPI Machine Language Specification"; resource descriptors from 6.4).

Each function returns the encoded bytes of one term, so a DSDT reads like its ASL:

    scope("\\_SB", device("PCI0", name("_HID", eisa_id("PNP0A08")), ...))

Only data objects are encoded (Name, Scope, Device, Package, Buffer, integers, strings,
resource templates): this machine's namespace has no methods, so no AML is ever run for
it. Names are checked against the grammar; a value that does not fit raises ValueError.
"""

from __future__ import annotations

import enum
import re
import struct


class Op(enum.IntEnum):
    """One-byte opcodes and prefixes (ACPI 6.5, 20.3 "AML Byte Stream Byte Values")."""

    ZERO = 0x00
    ONE = 0x01
    NAME = 0x08
    BYTE_PREFIX = 0x0A
    WORD_PREFIX = 0x0B
    DWORD_PREFIX = 0x0C
    STRING_PREFIX = 0x0D
    QWORD_PREFIX = 0x0E
    SCOPE = 0x10
    BUFFER = 0x11
    PACKAGE = 0x12
    DUAL_NAME_PREFIX = 0x2E
    MULTI_NAME_PREFIX = 0x2F
    EXT_PREFIX = 0x5B
    ROOT_CHAR = 0x5C  # "\"
    PARENT_PREFIX = 0x5E  # "^"
    ONES = 0xFF


class ExtOp(enum.IntEnum):
    """Opcodes after EXT_PREFIX (0x5B)."""

    DEVICE = 0x82


NULL_NAME = b"\x00"
_PACKAGE = bytes([Op.PACKAGE])
_SEGMENT = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


# -- the grammar's building blocks ----------------------------------------------------
def pkg_length(body: int) -> bytes:
    """The PkgLength of a package whose contents after it are `body` bytes long.

    The encoded length counts its own bytes: one byte holds up to 63; otherwise the
    lead byte says how many follow (bits 7:6) and holds the low nibble.
    """
    if body + 1 < 0x40:
        return bytes([body + 1])
    for extra in (1, 2, 3):
        total = body + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"an AML package of {body} bytes is longer than PkgLength can say (256 MiB)")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not _SEGMENT.match(seg):
        raise ValueError(f"{seg!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _, not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: `\\_SB.PCI0`, `^^FOO`, `_HID`, ..."""
    out = bytearray()
    rest = path
    if rest.startswith("\\"):
        out.append(Op.ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            out.append(Op.PARENT_PREFIX)
            rest = rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        out += NULL_NAME
    elif len(segs) == 1:
        out += segs[0]
    elif len(segs) == 2:
        out.append(Op.DUAL_NAME_PREFIX)
        out += b"".join(segs)
    else:
        if len(segs) > 255:
            raise ValueError(f"{path!r} has more than 255 name segments")
        out += bytes([Op.MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)
    return bytes(out)


_INTEGER_FORMS = tuple((int(prefix), 1 << (8 * size), size) for prefix, size in (
    (Op.BYTE_PREFIX, 1), (Op.WORD_PREFIX, 2), (Op.DWORD_PREFIX, 4), (Op.QWORD_PREFIX, 8)))
_ZERO, _ONE = bytes([Op.ZERO]), bytes([Op.ONE])


def integer(value: int) -> bytes:
    """The shortest encoding of an integer constant (ZeroOp, OneOp or a prefixed one)."""
    if value < 0 or value >> 64:
        raise ValueError(f"{value} is not a 64-bit unsigned AML integer")
    if value <= 1:
        return _ONE if value else _ZERO
    for prefix, limit, size in _INTEGER_FORMS:  # (a DSDT has thousands: this is its hot path)
        if value < limit:
            return bytes((prefix,)) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([Op.STRING_PREFIX]) + raw + b"\x00"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0A08"): three letters of 5 bits and four hex digits, as a DWORD whose
    bytes in memory read big-endian (the form _HID and _CID take)."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise ValueError(f"{text!r} is not an EISA ID (three capitals and four hex digits)")
    vendor = (ord(text[0]) - 0x40) << 10 | (ord(text[1]) - 0x40) << 5 | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    return integer(int.from_bytes(struct.pack(">HH", vendor, product), "little"))


def _data(value) -> bytes:
    """A package element or Name value: an int, a str, or an already encoded term."""
    if type(value) is int:
        return integer(value)
    if isinstance(value, bool):
        raise TypeError("AML has no booleans: use 0 or 1")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"cannot encode {type(value).__name__} as AML data")


# -- named objects and containers ------------------------------------------------------
def name(path: str, value) -> bytes:
    """Name (path, value)."""
    return bytes([Op.NAME]) + name_string(path) + _data(value)


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([Op.SCOPE]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([Op.EXT_PREFIX, ExtOp.DEVICE]) + pkg_length(len(body)) + body


def package(*elements) -> bytes:
    if len(elements) > 255:
        raise ValueError(f"a Package holds at most 255 elements, not {len(elements)} (VarPackage is not encoded)")
    body = bytes((len(elements),)) + b"".join([_data(e) for e in elements])
    return _PACKAGE + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + bytes(data)
    return bytes([Op.BUFFER]) + pkg_length(len(body)) + body


# -- resource descriptors (ACPI 6.5, 6.4 "Resource Data Types for ACPI") ---------------
class SmallTag(enum.IntEnum):
    """Small resource item names (bits 6:3 of the tag byte; bits 2:0 are the length)."""

    IRQ = 0x04
    IO = 0x08
    END_TAG = 0x0F


class LargeTag(enum.IntEnum):
    """Large resource item names (tag byte 0x80 | name)."""

    MEMORY32_FIXED = 0x86
    DWORD_ADDRESS_SPACE = 0x87
    WORD_ADDRESS_SPACE = 0x88
    QWORD_ADDRESS_SPACE = 0x8A


class ResourceType(enum.IntEnum):
    """Address space descriptors' resource type."""

    MEMORY = 0
    IO = 1
    BUS_NUMBER = 2


class AddressFlags(enum.IntFlag):
    """Address space descriptors' general flags."""

    CONSUMER = 1 << 0  # clear: the device produces (decodes for its children) this range
    SUBTRACTIVE_DECODE = 1 << 1  # _DEC
    MIN_FIXED = 1 << 2  # _MIF
    MAX_FIXED = 1 << 3  # _MAF


class MemoryFlags(enum.IntFlag):
    """Memory ranges' type-specific flags."""

    READ_WRITE = 1 << 0  # _RW
    CACHEABLE = 1 << 1  # _MEM = 1; 0 is non-cacheable
    # _MEM = 2 (write combining) and 3 (prefetchable) are not used here


IO_ENTIRE_RANGE = 0b11  # I/O ranges' _RNG: both ISA and non-ISA ranges
IO_DECODE16 = 1 << 0  # IO descriptor information: decodes 16 address bits
_WINDOW = AddressFlags.MIN_FIXED | AddressFlags.MAX_FIXED  # a fixed range the bridge produces


def _small(tag: SmallTag, payload: bytes) -> bytes:
    assert len(payload) <= 7
    return bytes([tag << 3 | len(payload)]) + payload


def _large(tag: LargeTag, payload: bytes) -> bytes:
    return struct.pack("<BH", tag, len(payload)) + payload


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO (Decode16, minimum, maximum, alignment, length)."""
    return _small(SmallTag.IO, struct.pack("<BHHBB", IO_DECODE16, minimum, maximum, alignment, length))


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: ISA interrupts, edge-triggered, active high."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"IRQ {irq} is not an ISA interrupt (0-15)")
        mask |= 1 << irq
    return _small(SmallTag.IRQ, struct.pack("<H", mask))


def memory32_fixed(base: int, length: int, writeable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length)."""
    return _large(LargeTag.MEMORY32_FIXED, struct.pack("<BII", int(writeable), base, length))


def _address(tag: LargeTag, fmt: str, rtype: ResourceType, type_flags: int, minimum: int, maximum: int) -> bytes:
    if maximum < minimum:
        raise ValueError(f"address range {minimum:#x}-{maximum:#x} ends before it starts")
    length = maximum - minimum + 1
    fields = struct.pack("<" + fmt * 5, 0, minimum, maximum, 0, length)  # granularity, translation 0
    return _large(tag, struct.pack("<BBB", rtype, _WINDOW, type_flags) + fields)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)."""
    return _address(LargeTag.WORD_ADDRESS_SPACE, "H", ResourceType.BUS_NUMBER, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address(LargeTag.WORD_ADDRESS_SPACE, "H", ResourceType.IO, IO_ENTIRE_RANGE, minimum, maximum)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, [Non]Cacheable, ReadWrite, ...)."""
    flags = MemoryFlags.READ_WRITE | (MemoryFlags.CACHEABLE if cacheable else 0)
    return _address(LargeTag.DWORD_ADDRESS_SPACE, "I", ResourceType.MEMORY, flags, minimum, maximum)


def qword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, [Non]Cacheable, ReadWrite, ...)."""
    flags = MemoryFlags.READ_WRITE | (MemoryFlags.CACHEABLE if cacheable else 0)
    return _address(LargeTag.QWORD_ADDRESS_SPACE, "Q", ResourceType.MEMORY, flags, minimum, maximum)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of descriptors closed by an End Tag (whose
    checksum byte 0 means "treat as correct")."""
    return buffer(b"".join(descriptors) + _small(SmallTag.END_TAG, b"\x00"))
