"""A small GDB remote-protocol client for tests: what gdb in batch mode cannot do
(Ctrl-C at a chosen moment, malformed packets, leaving mid-packet)."""

from __future__ import annotations

import socket
import time


def checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


class RspClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.no_ack = False

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.send_raw(b"$" + payload + b"#" + checksum(payload))
        if not self.no_ack:
            assert self.read_byte() == b"+"

    def read_byte(self) -> bytes:
        while not self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the stub closed the connection")
            self.buf += chunk
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def reply(self, timeout: float | None = None) -> bytes:
        """The next packet's payload (acked unless in no-ack mode)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while self.read_byte() != b"$":
                pass
            body = b""
            while (b := self.read_byte()) != b"#":
                body += b
            got = self.read_byte() + self.read_byte()
            assert got == checksum(body), (body, got)
            if not self.no_ack:
                self.send_raw(b"+")
            return body
        finally:
            self.sock.settimeout(30.0)

    def ask(self, payload: bytes, timeout: float | None = None) -> bytes:
        self.send(payload)
        return self.reply(timeout)

    def read_memory(self, addr: int, length: int) -> bytes:
        r = self.ask(b"m%x,%x" % (addr, length))
        assert not r.startswith(b"E"), r
        return bytes.fromhex(r.decode())

    def interrupt(self) -> None:
        self.send_raw(b"\x03")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(what)
