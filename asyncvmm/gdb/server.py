"""The gdb server on the loop: bhyve's `-g PORT` / `-G [w][ADDRESS:]PORT`.

One listening socket for the VM's life (bound before anything starts, so a port in use
is a configuration error); one client at a time — a second is refused while one is
connected. Each boot of the VM (a guest reset builds a new Machine) gets a Target, and a
connected client follows it. A client that goes away without detaching — mid-packet,
mid-step — is detached for it: breakpoints removed, the guest left running.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from ..errors import ConfigError
from ..log import get_logger
from .options import GdbOptions
from .packets import Kind, PacketReader, frame
from .stub import E_BAD_PACKET, Session, error
from .target import Target

log = get_logger("asyncvmm.gdb")

WRITE_BUFFER_LIMIT = 1 << 20  # a client that does not read its replies is dropped


class GdbServer:
    def __init__(self, options: GdbOptions):
        self.options = options
        self.target: Target | None = None
        self.connection: "_Connection | None" = None
        self._server: asyncio.AbstractServer | None = None
        self._boots = 0
        self.vm_kill: Callable[[], None] | None = None  # set by the VM: stop it (gdb's `k`)

    async def start(self) -> None:
        """Bind and listen (ConfigError when the address cannot be had)."""
        o = self.options
        try:
            infos = socket.getaddrinfo(o.address, o.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise ConfigError(f"-G {o.address}:{o.port}: {o.address} is not an IP address") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(1)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"gdb port {o.address}:{o.port}: {why}") from None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        waits = "; the guest waits for a client before its first instruction" if o.wait else ""
        log.info(f"gdb: listening on {o.address}:{o.port}{waits}")

    def attach(self, machine) -> None:
        """A new boot: its Target (holding every vCPU first if -G w asked, on the first boot)."""
        self._boots += 1
        self.target = Target(machine, wait=self.options.wait and self._boots == 1)
        machine.vcpus.debugger = self.target
        conn = self.connection
        if conn is not None:
            if conn.session is not None:
                conn.session.retarget(self.target)
            else:  # it connected while the machine was being built
                conn.start_session(self.target)

    def vm_ended(self, exit_code: int) -> None:
        """The VM is gone: a client waiting for a stop hears that the process exited."""
        conn = self.connection
        if conn is not None and conn.session is not None:
            if conn.session.waiting:
                conn.send(b"W%02x" % (exit_code & 0xFF))
            conn.close()

    async def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: GdbServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.reader = PacketReader()
        self._last = b""
        self._early = bytearray()  # what a client sent before the first boot's Target existed

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if self.server.connection is not None:
            log.info(f"gdb: refused {peer}: a client is already connected (one at a time)")
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connection = self
        if self.server.target is None:
            # The socket listens before the machine is built (a busy port is a
            # configuration error); a client this early is served from attach().
            log.info(f"gdb: client {peer} connected; it is served once the machine is built")
            return
        log.info(f"gdb: client {peer} connected; the guest is stopped")
        self.start_session(self.server.target)

    def start_session(self, target: Target) -> None:
        self.session = Session(target, self.send, self._kill)
        early, self._early = bytes(self._early), bytearray()
        if early:
            self.data_received(early)

    def _kill(self) -> None:
        log.info("gdb: kill: stopping the VM")
        if self.server.vm_kill is not None:
            self.server.vm_kill()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            if self.transport is not None and not self.transport.is_closing():
                self._early += data
                if len(self._early) > WRITE_BUFFER_LIMIT:
                    log.info("gdb: the client sent too much before the machine was built: disconnecting it")
                    self.close()
            return
        for event in self.reader.feed(data):
            s = self.session
            if event.kind is Kind.PACKET:
                if not s.no_ack:
                    self._write(b"+")
                reply = s.handle(event.payload)
                if reply is not None:
                    self.send(reply)
                if s.detached:
                    self.close()
                    return
            elif event.kind is Kind.BAD_CHECKSUM:
                if not s.no_ack:
                    self._write(b"-")  # the client sends it again
            elif event.kind is Kind.TOO_LONG:
                if not s.no_ack:
                    self._write(b"+")
                self.send(error(E_BAD_PACKET))
            elif event.kind is Kind.INTERRUPT:
                s.interrupt()
            elif event.kind is Kind.NAK and self._last and not s.no_ack:
                self._write(self._last)

    def send(self, payload: bytes) -> None:
        self._last = frame(payload)
        self._write(self._last)

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if t.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            log.info("gdb: the client does not read its replies: disconnecting it")
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.server.connection is self:
            self.server.connection = None
        if self.session is None:
            return
        s, self.session = self.session, None
        if not s.detached:
            log.info("gdb: the client went away: detaching (breakpoints removed, the guest runs on)")
        s.target.detach()
        self.transport = None
