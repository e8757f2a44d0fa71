"""virtio-console (virtio 1.2, 5.3), as bhyve spells it: `-s N,virtio-console,NAME=PATH[,...]`.

Each port is a Unix socket the VMM listens on (one client at a time). The device offers
VIRTIO_CONSOLE_F_MULTIPORT: the ports are announced on the control queues with their
names (PORT_NAME), and the first is announced as the console port (CONSOLE_PORT), so a
Linux guest with `console=hvc0` writes its log there and reads its input from it.

Queues (5.3.2): port 0's receiveq 0 and transmitq 1, the control receiveq 2 (device to
driver) and transmitq 3 (driver to device), port p's receiveq 2+2p and transmitq 3+2p.

The control conversation (5.3.6.2, as Linux's driver has it):

    driver: DEVICE_READY 1     device: PORT_ADD p, for each port
    driver: PORT_READY p 1     device: CONSOLE_PORT p 1 (the first port), PORT_NAME p "NAME",
                                       PORT_OPEN p 1 (the VMM holds every port open)
    driver: PORT_OPEN p 0|1    (a guest process opened or closed the port: recorded)

Data goes through the loop in Python, a batch per callback (a console is low-rate; the
requests of virtio-blk and virtio-net never come here). Guest output is never held up: a
port's output waits in a bounded backlog until its client reads it — kept from before a
client connects, sent when one does — and when the backlog is full its oldest bytes go
(counted as dropped). Linux's console driver spins until its output buffer is used, so a
client that does not read must not stop the guest. Input is flow-controlled: a client's
socket is read only while the port's input buffer has room, and the buffer is emptied
into the receive buffers the guest posts; with none posted the input waits.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from dataclasses import asdict, dataclass, field

from ..._native import lib
from ...config import PciSlot, VmConfig
from ...console import SocketConsole, socket_path_problem
from ...errors import ConfigError
from ...vstate.memory import GuestMemory
from ..pci.regs import ClassCode
from ..registry import register, slot_name
from .device import DeviceError, QueueConfig, VirtioDevice
from .queue import Chain, RingSetupError, Virtqueue, VqState
from .spec import DeviceId, bits
from .transport_pci import virtio_pci_function
from .worker import QueueWorker

QUEUE_SIZE = 64
MAX_PORTS = 16  # as bhyve's
OUTPUT_BACKLOG = SocketConsole.BACKLOG  # a port's output kept for its client (the oldest bytes go first)
INPUT_MAX = 64 << 10  # a port's input read from its client and not yet in the guest
CONTROL = struct.Struct("<IHH")  # struct virtio_console_control: id, event, value
CONFIG = struct.Struct("<HHII")  # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
CONTROL_RX, CONTROL_TX = 2, 3


class ConsoleFeature:
    SIZE = lib.VIRTIO_CONSOLE_F_SIZE  # cols/rows in config (not offered)
    MULTIPORT = lib.VIRTIO_CONSOLE_F_MULTIPORT  # several ports, the control queues
    EMERG_WRITE = lib.VIRTIO_CONSOLE_F_EMERG_WRITE  # emerg_wr in config (not offered)


class Event:
    """struct virtio_console_control's `event` (5.3.6.2)."""

    DEVICE_READY = lib.VIRTIO_CONSOLE_DEVICE_READY  # driver: ready (value 1) or failed (0)
    PORT_ADD = lib.VIRTIO_CONSOLE_PORT_ADD  # device: a port exists
    PORT_REMOVE = lib.VIRTIO_CONSOLE_PORT_REMOVE  # device: a port is gone
    PORT_READY = lib.VIRTIO_CONSOLE_PORT_READY  # driver: the port is set up (1) or failed (0)
    CONSOLE_PORT = lib.VIRTIO_CONSOLE_CONSOLE_PORT  # device: the port is a console (hvc)
    RESIZE = lib.VIRTIO_CONSOLE_RESIZE  # device: the console's size changed
    PORT_OPEN = lib.VIRTIO_CONSOLE_PORT_OPEN  # either side: opened (1) or closed (0)
    PORT_NAME = lib.VIRTIO_CONSOLE_PORT_NAME  # device: the port's name follows the header


def rx_queue(port: int) -> int:
    return 0 if port == 0 else 2 + 2 * port


def tx_queue(port: int) -> int:
    return rx_queue(port) + 1


# -- `-s N,virtio-console,NAME=PATH[,NAME=PATH...]` ------------------------------------------
@dataclass(frozen=True)
class ConsoleOptions:
    ports: tuple[tuple[str, str], ...]  # (name, socket path), the first is the console

    @classmethod
    def parse(cls, text: str, where: str) -> "ConsoleOptions":
        use = f"-s {where}virtio-console,{text}"
        ports: list[tuple[str, str]] = []
        for opt in text.split(",") if text else []:
            name, sep, path = opt.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"{use}: each port is NAME=PATH (a Unix socket to listen on), not {opt!r}")
            if any(name == n for n, _ in ports):
                raise ConfigError(f"{use}: port name {name!r} is given twice")
            if any(path == p for _, p in ports):
                raise ConfigError(f"{use}: socket {path} is given to two ports")
            ports.append((name, path))
        if not ports:
            raise ConfigError(f"{use}: name at least one port: NAME=PATH")
        if len(ports) > MAX_PORTS:
            raise ConfigError(f"{use}: {len(ports)} ports, at most {MAX_PORTS}")
        return cls(tuple(ports))

    def check_paths(self, where: str) -> None:
        """Each socket can be listened on: its directory exists, nothing live is there."""
        for name, path in self.ports:
            why = socket_path_problem(path)
            if why:
                raise ConfigError(f"-s {where}virtio-console: port {name}: socket {path} {why}")


class PortSocket:
    """One port's host side: a Unix socket the VMM listens on, one client at a time — the
    serial ports' SocketConsole (console.py), whose bounded backlog keeps what the guest
    wrote until a client takes it, with the port's input kept here for the guest.

    `output(data)` sends or keeps guest output; `take_input(n)` hands over what the client
    sent, at most INPUT_MAX bytes ahead of the guest: beyond that the client's socket is not
    read (SocketConsole's flow control) until the guest takes some. `on_input()` is called
    when input arrives. `start` adds the listener to the loop.
    """

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path
        self._input = bytearray()
        self._on_input = lambda: None
        self._started = False
        try:
            self._socket = SocketConsole(path)
        except ConfigError:
            raise ConfigError(f"virtio-console port {name}: cannot listen on {path}") from None
        self._bytes_in = 0

    @property
    def counters(self) -> dict[str, int]:
        return {**self._socket.counters, "bytes_in": self._bytes_in}

    @property
    def connected(self) -> bool:
        return self._socket.connected

    def start(self, loop: asyncio.AbstractEventLoop, on_input) -> None:
        self._on_input = on_input
        if not self._started:
            self._started = True
            self._socket.attach(loop, self._feed)

    def _feed(self, data: bytes) -> int:
        n = min(len(data), INPUT_MAX - len(self._input))
        if n:
            self._input += data[:n]
            self._bytes_in += n
            self._on_input()
        return n

    def output(self, data: bytes, dropped: int = 0) -> None:
        """Guest output; `dropped`: bytes of it the device could not keep (counted)."""
        self._socket.counters["dropped"] += dropped
        self._socket.write(data)

    def has_input(self) -> bool:
        return bool(self._input)

    def take_input(self, n: int) -> bytes:
        data = bytes(self._input[:n])
        del self._input[:n]
        self._socket.resume_input()
        return data

    def close(self) -> None:
        self._socket.close()


@dataclass
class PortState:
    """A port's guest side: what the driver said about it."""

    ready: bool = False  # the driver answered PORT_READY 1
    guest_open: bool = False  # a guest process has it open (PORT_OPEN from the driver)


@dataclass
class ConsoleState:
    queues: list[dict] = field(default_factory=list)  # VqState.to_dict() of each active queue
    ports: list[dict] = field(default_factory=list)  # PortState as dicts
    device_ready: bool = False
    control: list[str] = field(default_factory=list)  # control messages not yet delivered (hex)


class VirtioConsole(VirtioDevice):
    device_id = DeviceId.CONSOLE
    pci_class = ClassCode.COMMUNICATION_OTHER

    def __init__(self, opts: ConsoleOptions, mem: GuestMemory, *, name: str = "virtio-console"):
        nports = len(opts.ports)
        super().__init__(2 * (nports + 1), QUEUE_SIZE)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.config_size = CONFIG.size
        self.worker = QueueWorker(name, self.needs_reset)
        self.sockets: list[PortSocket] = []
        try:
            for pname, path in opts.ports:
                self.sockets.append(PortSocket(pname, path))
        except BaseException:
            self.close()
            raise
        self.ports = [PortState() for _ in opts.ports]
        self.vqs: dict[int, Virtqueue] = {}
        self.device_ready = False
        self._control: deque[bytes] = deque()
        self.counters = {"control_in": 0, "control_out": 0, "control_errors": 0}

    # -- what the transport asks ---------------------------------------------------------
    def features(self) -> int:
        return bits(ConsoleFeature.MULTIPORT)

    def read_config(self, offset: int, size: int) -> int:
        data = CONFIG.pack(0, 0, len(self.sockets), 0)
        return int.from_bytes(data[offset : offset + size], "little")

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        if not features & bits(ConsoleFeature.MULTIPORT):
            # Without MULTIPORT only port 0 exists (it is the console without being told).
            queues = [q for q in queues if q.index < 2]
        try:
            self.vqs = {q.index: Virtqueue.setup(self.mem, q, features) for q in queues}
        except RingSetupError as e:
            self.vqs = {}
            raise DeviceError(str(e)) from None
        state = self.take_restored()
        if state is not None:
            self._apply_state(state)
        w = self.worker
        w.start()
        loop = w.loop
        for p, sock in enumerate(self.sockets):
            sock.start(loop, lambda p=p: self._input_arrived(p))
        for qi, vq in self.vqs.items():
            if qi == CONTROL_RX:
                w.serve(vq, self._control_to_driver)
            elif qi == CONTROL_TX:
                w.serve(vq, self._control_from_driver)
            else:
                port = 0 if qi < 2 else (qi - 2) // 2
                handler = self._tx_handler(port) if qi % 2 else self._rx_handler(port)
                w.serve(vq, handler)

    def _tx_handler(self, port: int):
        return lambda chain: self._port_tx(port, chain)

    def _rx_handler(self, port: int):
        return lambda chain: self._port_rx(port, chain)

    # -- data ----------------------------------------------------------------------------
    def _port_tx(self, port: int, chain: Chain) -> int:
        """The guest wrote on the port: to its socket (or its backlog)."""
        if port < len(self.sockets):
            sock = self.sockets[port]
            data = chain.read(OUTPUT_BACKLOG)  # more than the backlog holds would be dropped anyway
            sock.output(data, dropped=chain.out_len - len(data))
        return 0

    def _port_rx(self, port: int, chain: Chain) -> int | None:
        """A receive buffer: fill it from the port's input, or keep it until input comes."""
        sock = self.sockets[port]
        if not sock.has_input():
            return None
        return chain.write(sock.take_input(chain.in_len))

    def _input_arrived(self, port: int) -> None:
        vq = self.vqs.get(rx_queue(port))
        if vq is not None:
            self.worker.resume(vq)

    # -- control -------------------------------------------------------------------------
    def _send(self, port: int, event: int, value: int = 0, extra: bytes = b"") -> None:
        self._control.append(CONTROL.pack(port, event, value) + extra)
        vq = self.vqs.get(CONTROL_RX)
        if vq is not None:
            self.worker.resume(vq)

    def _control_to_driver(self, chain: Chain) -> int | None:
        if not self._control:
            return None
        msg = self._control.popleft()
        if chain.in_len < len(msg):
            self.counters["control_errors"] += 1  # a buffer too small for the message: lost
        self.counters["control_out"] += 1
        return chain.write(msg)

    def _control_from_driver(self, chain: Chain) -> int:
        data = chain.read(CONTROL.size)
        if len(data) < CONTROL.size:
            self.counters["control_errors"] += 1
            return 0
        port, event, value = CONTROL.unpack(data)
        self.counters["control_in"] += 1
        if event == Event.DEVICE_READY:
            self.device_ready = bool(value)
            if value:
                for p in range(len(self.sockets)):
                    self._send(p, Event.PORT_ADD)
        elif event == Event.PORT_READY and port < len(self.ports):
            self.ports[port].ready = bool(value)
            if value:
                if port == 0:
                    self._send(port, Event.CONSOLE_PORT, 1)
                self._send(port, Event.PORT_NAME, 0, self.sockets[port].name.encode())
                self._send(port, Event.PORT_OPEN, 1)  # the VMM keeps the host side open
        elif event == Event.PORT_OPEN and port < len(self.ports):
            self.ports[port].guest_open = bool(value)
        else:
            self.counters["control_errors"] += 1
        return 0

    # -- life cycle, state, stats ----------------------------------------------------------
    def reset(self) -> None:
        self.worker.stop(closing=True)
        self.vqs = {}
        self.ports = [PortState() for _ in self.sockets]
        self.device_ready = False
        self._control.clear()

    def save(self) -> dict:
        return asdict(ConsoleState([vq.state().to_dict() for vq in self.vqs.values()],
                                   [asdict(p) for p in self.ports], self.device_ready,
                                   [m.hex() for m in self._control]))

    def _apply_state(self, state: dict) -> None:
        s = ConsoleState(**state)
        for d in s.queues:
            q = VqState.from_dict(d)
            if q.index not in self.vqs:
                raise ValueError(f"{self.name}: queue {q.index} is not active")
            self.vqs[q.index].restore(q)
        if len(s.ports) != len(self.ports):
            raise ValueError(f"{self.name}: state of {len(s.ports)} ports, this device has {len(self.ports)}")
        self.ports = [PortState(**p) for p in s.ports]
        self.device_ready = s.device_ready
        self._control = deque(bytes.fromhex(m) for m in s.control)

    def stats(self) -> dict:
        return {
            "control": {**self.counters, **self.worker.counters},
            "ports": {sock.name: {"path": sock.path, "connected": sock.connected, **asdict(self.ports[p]),
                                  **sock.counters} for p, sock in enumerate(self.sockets)},
            "queues": [vq.stats() for vq in self.vqs.values()],
        }

    def close(self) -> None:
        self.worker.stop()
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def _check(slot: PciSlot, cfg: VmConfig) -> None:
    ConsoleOptions.parse(slot.options, slot_name(slot)).check_paths(slot_name(slot))


def _build(slot: PciSlot, ctx):
    con = VirtioConsole(ConsoleOptions.parse(slot.options, slot_name(slot)), ctx.mem,
                        name=f"virtio-console@{slot.slot}.{slot.function}")
    return virtio_pci_function(con, ctx)


register("virtio-console", _check, _build)
