"""The vhost-user protocol, front-end side (QEMU's docs/interop/vhost-user.rst).

Messages are a 12-byte header (request, flags, payload size) and a payload, over a Unix
stream socket; file descriptors travel beside them (SCM_RIGHTS). The back-end answers in
order, so replies are matched to requests first in, first out. Everything runs on the
loop: sends never block (what the socket does not take waits for it to be writable), a
reader callback parses replies, and a lost back-end (EOF, a bad reply) fails every
waiting request and tells the owner once.
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import socket
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum, IntFlag

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log (front-end addresses)
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")  # num_regions, padding
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags
MAX_MEM_REGIONS = 8  # without CONFIGURE_MEM_SLOTS
MAX_PAYLOAD = 4096  # larger replies than any we ask for are a broken back-end
VRING_NOFD = 1 << 8  # u64 payload of SET_VRING_KICK/CALL/ERR: no fd follows
VRING_INDEX_MASK = 0xFF
F_PROTOCOL_FEATURES = 30  # a virtio feature bit vhost-user borrows: protocol features exist


class Request(IntEnum):
    """Front-end to back-end messages."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# The requests the back-end always answers (the others only with NEED_REPLY and REPLY_ACK).
ANSWERED = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
                      Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS})


class Flag(IntFlag):
    VERSION = 0x1  # protocol version 1, in every message
    REPLY = 0x4
    NEED_REPLY = 0x8


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class VhostUserError(Exception):
    """The back-end is gone, or said something the protocol does not allow."""


class Connection:
    """One vhost-user socket, on the running loop."""

    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.loop = asyncio.get_running_loop()
        self._inbuf = bytearray()
        self._outbox: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._waiting: collections.deque[tuple[Request, asyncio.Future]] = collections.deque()
        self.lost: str | None = None  # why the back-end is gone
        self._on_lost: list[Callable[[str], None]] = []
        self.messages = 0
        self.loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def connect(cls, path: str, name: str, timeout: float = 5.0, *, starting: bool = False) -> "Connection":
        """`starting`: the back-end was just started and may have bound its socket but not
        yet listen()ed on it: a refused connection is tried again until `timeout`."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                try:
                    await loop.sock_connect(sock, path)
                    return cls(sock, name)
                except ConnectionRefusedError:
                    sock.close()
                    if not starting:
                        raise
                except BaseException:
                    sock.close()
                    raise
                await asyncio.sleep(0.01)

    def on_lost(self, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call fn(why) when the back-end goes away; returns what unsubscribes it."""
        self._on_lost.append(fn)
        return lambda: self._on_lost.remove(fn) if fn in self._on_lost else None

    # -- sending -----------------------------------------------------------------------
    def send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False) -> asyncio.Future | None:
        """Queue a message; a future for its reply's payload when one comes (ANSWERED, or
        need_reply: the caller negotiated REPLY_ACK)."""
        if self.lost is not None:
            raise VhostUserError(f"{self.name}: the back-end is gone ({self.lost})")
        flags = Flag.VERSION | (Flag.NEED_REPLY if need_reply else 0)
        msg = HEADER.pack(request, flags, len(payload)) + payload
        fut = None
        if request in ANSWERED or need_reply:
            fut = self.loop.create_future()
            self._waiting.append((request, fut))
        self.messages += 1
        self._outbox.append((memoryview(msg), list(fds)))
        if len(self._outbox) == 1:
            self._flush()
        return fut

    async def call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (), *,
                   need_reply: bool = False, timeout: float = 5.0) -> bytes:
        fut = self.send(request, payload, fds, need_reply=need_reply)
        assert fut is not None, request
        async with asyncio.timeout(timeout):
            return await fut

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                n = self.sock.sendmsg([data], anc)
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError as e:
                self._lose(f"send failed: {e.strerror}")
                return
            if n < len(data):
                self._outbox[0] = (data[n:], [])  # the fds went with the first byte
                continue
            self._outbox.popleft()

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self._flush()

    # -- receiving ---------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._lose(f"receive failed: {e.strerror}")
            return
        if not data:
            self._lose("the back-end closed its socket")
            return
        self._inbuf += data
        while len(self._inbuf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._inbuf)
            if size > MAX_PAYLOAD:
                self._lose(f"a reply of {size} bytes")
                return
            if len(self._inbuf) < HEADER.size + size:
                break
            payload = bytes(self._inbuf[HEADER.size : HEADER.size + size])
            del self._inbuf[: HEADER.size + size]
            if not self._waiting or self._waiting[0][0] != request or not flags & Flag.REPLY:
                self._lose(f"an unexpected message {request} (flags {flags:#x})")
                return
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(payload)

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        self._stop_io()
        err = VhostUserError(f"{self.name}: {why}")
        while self._waiting:
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: a request nobody awaits any more is no warning
        for fn in list(self._on_lost):
            fn(why)

    def _stop_io(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        self._outbox.clear()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self._on_lost.clear()  # closing is no loss to report
        self._lose("closed")
        self._stop_io()
        self.sock.close()


def u64(value: int) -> bytes:
    return U64.pack(value)


def parse_u64(payload: bytes, what: str) -> int:
    if len(payload) != U64.size:
        raise VhostUserError(f"{what}: a reply of {len(payload)} bytes, not 8")
    return U64.unpack(payload)[0]


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def vring_fd(index: int, fd: int | None) -> tuple[bytes, list[int]]:
    """SET_VRING_KICK/CALL/ERR: the queue index, and the fd (None: VRING_NOFD)."""
    if fd is None:
        return u64(index | VRING_NOFD), []
    return u64(index), [fd]


def mem_table(regions: Sequence[tuple[int, int, int, int]]) -> bytes:
    """SET_MEM_TABLE's payload for (gpa, size, hva, mmap_offset) regions (fds beside it)."""
    if len(regions) > MAX_MEM_REGIONS:
        raise VhostUserError(f"{len(regions)} memory regions (at most {MAX_MEM_REGIONS})")
    body = b"".join(MEM_REGION.pack(*r) for r in regions)
    return MEM_TABLE_HEAD.pack(len(regions), 0) + body.ljust(MAX_MEM_REGIONS * MEM_REGION.size, b"\0")


def config_request(size: int, offset: int = 0) -> bytes:
    return CONFIG_HEAD.pack(offset, size, 0) + bytes(size)


def parse_config(payload: bytes, size: int) -> bytes:
    if len(payload) != CONFIG_HEAD.size + size:
        raise VhostUserError(f"GET_CONFIG: a reply of {len(payload)} bytes for {size} bytes of configuration")
    return payload[CONFIG_HEAD.size :]


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
