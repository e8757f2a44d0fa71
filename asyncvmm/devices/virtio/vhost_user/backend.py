"""A connected vhost-user back-end, negotiated once: what a device needs before the guest
looks (features, queues, configuration space), and what outlives a guest reset (the
connection; qemu-storage-daemon when asyncvmm started it, qsd.py).

    backend = await Backend.connect(socket_path, "disk.qcow2", CONFIG_SIZE)
    backend.features, backend.queues, backend.config

Owned by the VM's HostResources, closed when the VM ends.
"""

from __future__ import annotations

from typing import Any

from ...virtio.spec import Feature, bits
from .protocol import (
    F_PROTOCOL_FEATURES,
    Connection,
    ProtocolFeature,
    Request,
    VhostUserError,
    config_request,
    parse_config,
    parse_u64,
    u64,
)

# What the front-end speaks: REPLY_ACK (errors reported), CONFIG (the device's
# configuration space from the back-end), MQ (GET_QUEUE_NUM).
WANTED_PROTOCOL = bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ)
# The transport's features (transport_pci.TRANSPORT_FEATURES): the back-end must have them.
NEEDED = {Feature.VERSION_1: "VERSION_1", Feature.RING_EVENT_IDX: "RING_EVENT_IDX",
          Feature.RING_INDIRECT_DESC: "RING_INDIRECT_DESC"}


class Backend:
    def __init__(self, conn: Connection, what: str):
        self.conn = conn
        self.what = what  # for messages: the socket, or the image qsd serves
        self.features = 0  # the back-end's virtio features
        self.protocol = 0  # the protocol features both sides speak
        self.queues = 1
        self.config = b""
        self.process: Any = None  # qsd.Daemon when asyncvmm started the back-end

    @classmethod
    async def connect(cls, path: str, what: str, config_size: int, timeout: float = 5.0, *,
                      starting: bool = False) -> "Backend":
        """Connect and negotiate; VhostUserError/OSError/TimeoutError if the back-end cannot.
        `starting`: a back-end just started (Connection.connect)."""
        conn = await Connection.connect(path, what, timeout, starting=starting)
        b = cls(conn, what)
        try:
            await b._negotiate(config_size, timeout)
        except BaseException:
            conn.close()
            raise
        return b

    async def _negotiate(self, config_size: int, timeout: float) -> None:
        c = self.conn
        self.features = parse_u64(await c.call(Request.GET_FEATURES, timeout=timeout), "GET_FEATURES")
        missing = [name for bit, name in NEEDED.items() if not self.features >> bit & 1]
        if missing:
            raise VhostUserError(f"{self.what}: the back-end lacks {', '.join(missing)}")
        if not self.features >> F_PROTOCOL_FEATURES & 1:
            raise VhostUserError(f"{self.what}: the back-end has no protocol features (it cannot give the configuration space)")
        offered = parse_u64(await c.call(Request.GET_PROTOCOL_FEATURES, timeout=timeout), "GET_PROTOCOL_FEATURES")
        self.protocol = offered & WANTED_PROTOCOL
        if not self.protocol >> ProtocolFeature.CONFIG & 1:
            raise VhostUserError(f"{self.what}: the back-end does not give its configuration space (CONFIG)")
        c.send(Request.SET_PROTOCOL_FEATURES, u64(self.protocol))
        if self.protocol >> ProtocolFeature.MQ & 1:
            self.queues = parse_u64(await c.call(Request.GET_QUEUE_NUM, timeout=timeout), "GET_QUEUE_NUM")
        await self.ack(Request.SET_OWNER, timeout=timeout)
        self.config = parse_config(await c.call(Request.GET_CONFIG, config_request(config_size), timeout=timeout),
                                   config_size)

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol >> ProtocolFeature.REPLY_ACK & 1)

    async def ack(self, request: Request, payload: bytes = b"", fds=(), timeout: float = 5.0) -> None:
        """Send and, with REPLY_ACK, wait for the back-end's verdict."""
        if not self.reply_ack:
            self.conn.send(request, payload, fds)
            return
        status = parse_u64(await self.conn.call(request, payload, fds, need_reply=True, timeout=timeout), request.name)
        if status:
            raise VhostUserError(f"{self.what}: the back-end refused {request.name} ({status})")

    def close(self) -> None:
        self.conn.close()
