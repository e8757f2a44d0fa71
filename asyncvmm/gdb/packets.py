"""RSP framing (the GDB manual, "Overview" of the remote protocol).

A packet is `$payload#xx`, xx the payload's byte sum modulo 256 in two hex digits; the
receiver answers `+` (good) or `-` (resend) until both sides agree to no-ack mode
(QStartNoAckMode). A lone 0x03 byte outside a packet is an interrupt (Ctrl-C). In
binary payloads (X, and what we send) `}` escapes the next byte, XORed with 0x20.

PacketReader is a pure parser: bytes in, events out; no sockets, so tests feed it any
bytes a client might send.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

START = ord("$")
END = ord("#")
ESCAPE = ord("}")
ESCAPE_XOR = 0x20
INTERRUPT = 0x03
ACK = ord("+")
NAK = ord("-")

# What qSupported offers as PacketSize: the largest payload we accept (and gdb sends).
PACKET_SIZE = 0x4000


class Kind(enum.Enum):
    PACKET = "packet"  # a payload whose checksum was right
    BAD_CHECKSUM = "bad checksum"  # answer `-` (the client resends)
    TOO_LONG = "too long"  # a payload over PACKET_SIZE: dropped, answered with an error
    INTERRUPT = "interrupt"  # Ctrl-C
    ACK = "ack"
    NAK = "nak"


@dataclass(frozen=True)
class Event:
    kind: Kind
    payload: bytes = b""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """`$payload#xx`, escaping the bytes that cannot appear raw in a payload."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


def escape(data: bytes) -> bytes:
    if not any(b in data for b in b"$#}*"):
        return data
    out = bytearray()
    for b in data:
        if b in b"$#}*":
            out += bytes((ESCAPE, b ^ ESCAPE_XOR))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """A binary payload's bytes (X packets); a trailing lone `}` is dropped."""
    if ESCAPE not in data:
        return data
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == ESCAPE:
            if i + 1 < len(data):
                out.append(data[i + 1] ^ ESCAPE_XOR)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class _State(enum.Enum):
    IDLE = 0  # between packets: acks, Ctrl-C, `$`; other bytes are noise and skipped
    BODY = 1
    SUM1 = 2
    SUM2 = 3


class PacketReader:
    """Turns the client's byte stream into Events; feed() as bytes arrive.

    A payload longer than `limit` is not kept: its bytes are counted and skipped to the
    `#`, and it comes out as TOO_LONG (the stub answers with an error), so a client
    cannot make us buffer without bound.
    """

    def __init__(self, limit: int = PACKET_SIZE):
        self.limit = limit
        self._state = _State.IDLE
        self._body = bytearray()
        self._length = 0
        self._sum_text = bytearray()

    @property
    def mid_packet(self) -> bool:
        return self._state is not _State.IDLE

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            st = self._state
            if st is _State.IDLE:
                if b == START:
                    self._state = _State.BODY
                    self._body.clear()
                    self._length = 0
                elif b == INTERRUPT:
                    events.append(Event(Kind.INTERRUPT))
                elif b == ACK:
                    events.append(Event(Kind.ACK))
                elif b == NAK:
                    events.append(Event(Kind.NAK))
            elif st is _State.BODY:
                if b == END:
                    self._state = _State.SUM1
                    self._sum_text.clear()
                elif b == START:  # a new packet: the client gave up on the last one
                    self._body.clear()
                    self._length = 0
                else:
                    self._length += 1
                    if self._length <= self.limit:
                        self._body.append(b)
            else:
                self._sum_text.append(b)
                if st is _State.SUM1:
                    self._state = _State.SUM2
                    continue
                self._state = _State.IDLE
                events.append(self._finish())
        return events

    def _finish(self) -> Event:
        body = bytes(self._body)
        self._body.clear()
        if self._length > self.limit:
            return Event(Kind.TOO_LONG)
        try:
            want = int(self._sum_text.decode("ascii"), 16)
        except (UnicodeDecodeError, ValueError):
            return Event(Kind.BAD_CHECKSUM)
        if want != checksum(body):
            return Event(Kind.BAD_CHECKSUM)
        return Event(Kind.PACKET, body)
