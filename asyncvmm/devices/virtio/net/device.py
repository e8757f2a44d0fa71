"""virtio-net (virtio 1.2, 5.1) on a TAP: features, config, the control queue, wiring.

Frames never reach Python. A TAP device whose queues interrupt through eventfds (MSI-X,
MSI) is served by a thread of its own (thread.py, cext/net_thread.h: vhost-net's model),
which the loop parks while it touches the device. Otherwise (INTx, passt,
ASYNCVMM_NET_THREAD=0), per queue pair, the TAP fd is a reader on the loop (the
device's QueueWorker, ../worker.py) that calls
avmm_net_rx (cext/net.c: frames straight into the guest's RX buffers) and the TX doorbell
one that calls avmm_net_tx (chains written to the TAP as they lie in guest memory).
Flow control is asyncio's: with no RX buffers posted the TAP reader is removed — frames
wait in the TAP's queue (the kernel drops what overflows it, and counts it) — until the
RX doorbell brings buffers; a TAP that takes no more makes the pair wait for writability
(add_writer) with the frame still in the ring.

The control queue (CTRL_VQ) is served here, in Python, through the runtime (a Virtqueue
served by the worker): it carries a few commands at start-up. RX mode and MAC filter commands are acknowledged and recorded — the TAP gives
the guest every frame the host sends it, so filtering would only drop what the host
chose to send —; MQ, GUEST_OFFLOADS and MAC_ADDR_SET take effect.
"""

from __future__ import annotations

import struct

from ...._native import ffi, lib
from ....config import PciSlot, VmConfig
from ....log import get_logger
from ....vstate.memory import GuestMemory
from ...pci.regs import ClassCode
from ...registry import register, slot_name
from ...slots import may_poll, thread_may_poll
from ..device import DeviceError, QueueConfig, VirtioDevice
from ..queue import Chain, RingSetupError, Virtqueue, VqState, check_setup, ring_flags
from ..spec import DeviceId, bits
from ..transport_pci import virtio_pci_function
from ..worker import QueueWorker
from .passt import Passt, check_forwards, check_installed
from .tap import TUN_F_USO4, TUN_F_USO6, NetOptions, Tap, check_is_tap, format_mac, stable_mac
from .thread import ENABLED as THREAD
from .thread import NetThread

log = get_logger(__name__)

QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
# A control command's readable part: class, command, data. The largest is a MAC table;
# 64 KiB holds ten thousand addresses (QEMU keeps 64 and filters no more past that).
CTRL_OUT_MAX = 64 << 10
CTRL_BUDGET = 16  # commands per callback: a guest that keeps the queue full shares the loop
CTRL_IOV_MAX = 64
FRAME_MAX = 1514 + 4  # an Ethernet frame with a VLAN tag, without segmentation offload
GSO_FRAME_MAX = 65535 + 14 + 4  # a 64 KiB IP packet in one frame, with segmentation offload
HDR_LEN = lib.AVMM_NET_HDR_LEN
ETH_ALEN = 6

# Feature bits this build host's <linux/virtio_net.h> (6.1) does not have yet (virtio 1.3).
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56


class NetFeature:
    CSUM = lib.VIRTIO_NET_F_CSUM  # the guest may send frames with a partial checksum
    GUEST_CSUM = lib.VIRTIO_NET_F_GUEST_CSUM  # ... and receive them
    CTRL_GUEST_OFFLOADS = lib.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
    MAC = lib.VIRTIO_NET_F_MAC
    GUEST_TSO4 = lib.VIRTIO_NET_F_GUEST_TSO4
    GUEST_TSO6 = lib.VIRTIO_NET_F_GUEST_TSO6
    GUEST_ECN = lib.VIRTIO_NET_F_GUEST_ECN
    GUEST_UFO = lib.VIRTIO_NET_F_GUEST_UFO
    HOST_TSO4 = lib.VIRTIO_NET_F_HOST_TSO4
    HOST_TSO6 = lib.VIRTIO_NET_F_HOST_TSO6
    HOST_ECN = lib.VIRTIO_NET_F_HOST_ECN
    HOST_UFO = lib.VIRTIO_NET_F_HOST_UFO
    MRG_RXBUF = lib.VIRTIO_NET_F_MRG_RXBUF
    STATUS = lib.VIRTIO_NET_F_STATUS
    CTRL_VQ = lib.VIRTIO_NET_F_CTRL_VQ
    CTRL_RX = lib.VIRTIO_NET_F_CTRL_RX
    CTRL_VLAN = lib.VIRTIO_NET_F_CTRL_VLAN
    CTRL_RX_EXTRA = lib.VIRTIO_NET_F_CTRL_RX_EXTRA
    MQ = lib.VIRTIO_NET_F_MQ
    CTRL_MAC_ADDR = lib.VIRTIO_NET_F_CTRL_MAC_ADDR
    GUEST_USO4 = VIRTIO_NET_F_GUEST_USO4
    GUEST_USO6 = VIRTIO_NET_F_GUEST_USO6
    HOST_USO = VIRTIO_NET_F_HOST_USO


# Guest receive offloads and the TAP flags that let the host hand them over.
GUEST_OFFLOAD_TUN = {
    NetFeature.GUEST_CSUM: lib.TUN_F_CSUM,
    NetFeature.GUEST_TSO4: lib.TUN_F_TSO4,
    NetFeature.GUEST_TSO6: lib.TUN_F_TSO6,
    NetFeature.GUEST_ECN: lib.TUN_F_TSO_ECN,
    NetFeature.GUEST_UFO: lib.TUN_F_UFO,
    NetFeature.GUEST_USO4: TUN_F_USO4,
    NetFeature.GUEST_USO6: TUN_F_USO6,
}
# What a TAP passes between the guest and the host kernel, and a stream (passt) does not:
# its frames carry no vnet header, so every checksum is whole and no frame is a segment batch.
OFFLOAD_FEATURES = (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
                    NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6,
                    NetFeature.HOST_ECN, NetFeature.HOST_UFO, NetFeature.CTRL_GUEST_OFFLOADS)
GSO_FEATURES = (NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_UFO, NetFeature.GUEST_USO4,
                NetFeature.GUEST_USO6)


class Ctrl:
    """Control queue classes and commands (5.1.6.5)."""

    RX = lib.VIRTIO_NET_CTRL_RX
    MAC = lib.VIRTIO_NET_CTRL_MAC
    VLAN = lib.VIRTIO_NET_CTRL_VLAN
    ANNOUNCE = lib.VIRTIO_NET_CTRL_ANNOUNCE
    MQ = lib.VIRTIO_NET_CTRL_MQ
    GUEST_OFFLOADS = lib.VIRTIO_NET_CTRL_GUEST_OFFLOADS
    RX_MODES = {
        lib.VIRTIO_NET_CTRL_RX_PROMISC: "promisc", lib.VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti",
        lib.VIRTIO_NET_CTRL_RX_ALLUNI: "alluni", lib.VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
        lib.VIRTIO_NET_CTRL_RX_NOUNI: "nouni", lib.VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast",
    }
    OK = lib.VIRTIO_NET_OK
    ERR = lib.VIRTIO_NET_ERR


class VirtioNet(VirtioDevice):
    device_id = DeviceId.NET
    pci_class = ClassCode.ETHERNET

    MAX_PAIRS = lib.AVMM_NET_MAX_PAIRS

    def __init__(self, opts: NetOptions, mem: GuestMemory, *, mac: bytes, queues: int, name: str = "virtio-net",
                 poll: bool = False, tap: Tap | Passt | None = None, thread_poll: bool = False,
                 seccomp: str = "off"):
        """`tap`: one opened already (kept by the VM across guest resets; not closed here);
        a Passt in its place when opts.passt says so. `poll`: the loop may busy-poll for
        this device; `thread_poll`: its own thread may (asyncvmm.poll); `seccomp`: the
        mode of its thread's filter (asyncvmm.seccomp)."""
        self.pairs = min(opts.queues or queues, lib.AVMM_NET_MAX_PAIRS)
        super().__init__(2 * self.pairs + 1, QUEUE_SIZE)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.mac0 = self.mac = opts.mac or mac
        self._owns_tap = tap is None
        self.stream = opts.passt is not None
        if tap is None:
            tap = Passt(opts.passt, name) if opts.passt is not None else Tap(opts.tap, self.pairs)
        self.tap = tap
        self._net = lib.avmm_net_new(mem.c_table(), self.pairs, QUEUE_SIZE)
        if self._net == ffi.NULL or (self.stream and lib.avmm_net_set_stream(self._net, 0, tap.fds[0]) < 0):
            lib.avmm_net_free(self._net)
            if self._owns_tap:
                self.tap.close()
            raise DeviceError("cannot allocate the network data path")
        for p, fd in enumerate(self.tap.fds if not self.stream else ()):
            lib.avmm_net_set_tap(self._net, p, fd)
        if isinstance(tap, Passt) and tap.carry is not None:  # where the previous boot's device left the stream
            rx, tx = tap.carry
            lib.avmm_net_stream_carry_in(self._net, 0, rx, len(rx), tx, len(tx))
            tap.carry = None
        self.peer_gone = ""  # a stream's peer (passt) that went: how
        self.config_size = ffi.sizeof("struct virtio_net_config")
        self.link_up = True
        self.active_pairs = 1
        self.rx_mode: dict[str, bool] = {}
        self.mac_filters: tuple[list[bytes], list[bytes]] = ([], [])
        self.vlans: set[int] = set()
        self.counters = {"ctrl_commands": 0, "ctrl_errors": 0}
        self._features = 0
        self.worker = QueueWorker(name, self.needs_reset, poll=poll)
        self.queues: list[Virtqueue] = []  # the active data queues (C's)
        self.ctrl: Virtqueue | None = None
        self._rx_stopped = [False] * self.pairs
        self._state = ffi.new("uint32_t *")
        self._pair = ffi.new("int *")
        self._thread_poll = thread_poll
        self._seccomp = seccomp
        self._thread: NetThread | None = None  # the device's own (thread.py), once started
        self._threaded = False  # this activation is served by it (else it is parked, if it exists)
        self._hold_parked = False  # parked by _park, to be let go by _unpark
        self.worker.on_hold(self._park, self._unpark)

    # -- what the transport asks ---------------------------------------------------------
    def features(self) -> int:
        f = bits(NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.MAC, NetFeature.GUEST_TSO4,
                 NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.HOST_TSO4,
                 NetFeature.HOST_TSO6, NetFeature.HOST_ECN, NetFeature.HOST_UFO, NetFeature.MRG_RXBUF,
                 NetFeature.STATUS, NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_VLAN,
                 NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_MAC_ADDR, NetFeature.CTRL_GUEST_OFFLOADS)
        if self.pairs > 1:
            f |= bits(NetFeature.MQ)
        if self.stream:
            f &= ~bits(*OFFLOAD_FEATURES)
        if self.tap.uso:
            f |= bits(NetFeature.GUEST_USO4, NetFeature.GUEST_USO6, NetFeature.HOST_USO)
        return f

    def _config(self) -> bytes:
        c = ffi.new("struct virtio_net_config *")
        ffi.memmove(c.mac, self.mac, ETH_ALEN)
        c.status = lib.VIRTIO_NET_S_LINK_UP if self.link_up else 0
        c.max_virtqueue_pairs = self.pairs
        return bytes(ffi.buffer(c))

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config()[offset : offset + size], "little")

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        if self._threaded:  # parked while the loop sets the queues up; _start_thread lets it go
            self._thread.park()
            self._threaded = False
        self._features = features
        self.active_pairs = 1
        gso = any(features & bits(f) for f in GSO_FEATURES)
        mrg = features & bits(NetFeature.MRG_RXBUF)
        # passt's frames are as large as the MTU it gives the guest (65520 by default).
        lib.avmm_net_set_flags(self._net, lib.AVMM_NET_MRG_RXBUF if mrg else 0,
                               HDR_LEN + (GSO_FRAME_MAX if gso or self.stream else FRAME_MAX))
        self._set_offloads(features)
        ctrl = 2 * self.pairs
        data = [q for q in queues if q.index < ctrl]
        self.queues = []
        for q in data:
            irq = q.vector.c if q.vector is not None else ffi.NULL
            r = lib.avmm_net_queue_setup(self._net, q.index, q.size, q.desc, q.driver, q.device,
                                         ring_flags(features), irq, q.kick_fd)
            try:
                check_setup(r, q)
            except RingSetupError as e:
                lib.avmm_net_reset(self._net)
                raise DeviceError(str(e)) from None
            self.queues.append(Virtqueue(lib.avmm_net_queue(self._net, q.index), self.mem, q))
        w = self.worker
        w.start()
        for q in queues:
            if q.index == ctrl and features & bits(NetFeature.CTRL_VQ):
                try:
                    self.ctrl = Virtqueue.setup(self.mem, q, features, iov_max=CTRL_IOV_MAX, what="control queue")
                except RingSetupError as e:
                    raise DeviceError(str(e)) from None
        self.tap.set_active_queues(1)
        state = self.take_restored()
        if state is not None:
            self._apply_state(state)
        if self.ctrl is not None:
            w.serve(self.ctrl, self._ctrl_command, budget=CTRL_BUDGET)
        if self._can_thread(data):
            self._start_thread()
            return
        for q in data:
            pair, tx = divmod(q.index, 2)
            if tx:
                w.watch(q.kick_fd, self._tx, pair)
            else:
                w.watch(q.kick_fd, self._rx_kick, pair)
                if not self.peer_gone:
                    w.watch(self.tap.fds[pair], self._rx, pair)
        for q in data:  # doorbells rung before DRIVER_OK
            pair, tx = divmod(q.index, 2)
            (self._tx if tx else self._rx)(pair)

    # -- the device's own thread (thread.py) ------------------------------------------------
    def _can_thread(self, data: list[QueueConfig]) -> bool:
        """A TAP, and every data queue interrupts through an eventfd (a level INTx line or
        an ISR byte is the loop's to lower and read)."""
        return THREAD and not self.stream and all(
            q.vector is None or (q.vector.c.set_line == ffi.NULL and q.vector.c.isr == ffi.NULL) for q in data)

    def _start_thread(self) -> None:
        """Hand the data queues (set up, the thread parked or not yet there) to the thread."""
        if self._thread is None:
            self._thread = NetThread(self._net, self.name, self.pairs, poll=self._thread_poll,
                                     seccomp_mode=self._seccomp)
        else:
            self._thread.unpark()  # it serves every pair once: doorbells rung before DRIVER_OK
        self._threaded = True
        self.worker.watch(self._thread.notify_fd, self._notified)

    def _park(self) -> None:
        """A hold (or an MQ change): parked if it serves; _unpark undoes exactly that park,
        whatever came between (a reset keeps its own park until the next activate)."""
        if self._threaded and not self._hold_parked:
            self._thread.park()
            self._hold_parked = True

    def _unpark(self) -> None:
        if self._hold_parked:
            self._hold_parked = False
            self._thread.unpark()

    def _notified(self) -> None:
        """The thread's word: a ring broke (it serves nothing more until the reset)."""
        if self._thread is not None and self._thread.broken():
            self.worker.broken(self.queues)

    def _set_offloads(self, features: int) -> None:
        flags = 0
        for f, tun in GUEST_OFFLOAD_TUN.items():
            if features & bits(f):
                flags |= tun
        # The kernel hands over segments only with the checksum offload, and ECN only with
        # TSO (the same dependencies the features have, 5.1.3.1, which a driver may ignore).
        if not flags & lib.TUN_F_CSUM:
            flags = 0
        if not flags & (lib.TUN_F_TSO4 | lib.TUN_F_TSO6):
            flags &= ~lib.TUN_F_TSO_ECN
        try:
            self.tap.set_offload(flags)
        except OSError as e:
            raise DeviceError(f"the TAP refused offloads {flags:#x}: {e.strerror}") from None

    # -- the loop's side ------------------------------------------------------------------
    def _rx(self, pair: int) -> None:
        self.worker.woken()
        self._rx_batch(pair)
        self._poll()

    def _rx_batch(self, pair: int) -> None:
        state = self._move(lib.avmm_net_rx, pair)
        if state is not None:
            self._after_rx(pair, state)

    def _move(self, move, pair: int) -> int | None:
        """One avmm_net_rx/tx batch: its state, or None if a ring broke."""
        if move(self._net, pair, self._state) < 0:
            self.worker.broken(self.queues)
            return None
        return self._state[0]

    def _after_rx(self, pair: int, state: int) -> None:
        if state & lib.AVMM_NET_PEER_GONE:
            self._gone(pair)
            return
        if state & lib.AVMM_NET_RX_NO_BUFFERS and not self._rx_stopped[pair]:
            # No buffers: frames wait in the TAP until the guest posts some (the RX doorbell).
            self._rx_stopped[pair] = True
            self.worker.unwatch(self.tap.fds[pair])
        if state & lib.AVMM_NET_BUDGET:  # the rest after the loop's other callbacks
            self.worker.soon((False, pair), self._rx_batch, pair)

    def _rx_kick(self, pair: int) -> None:
        lib.avmm_vq_drain_kick(lib.avmm_net_queue(self._net, 2 * pair))
        if self._rx_stopped[pair] and not self.peer_gone:
            self._rx_stopped[pair] = False
            self.worker.watch(self.tap.fds[pair], self._rx, pair)
        self._rx(pair)

    def _tx(self, pair: int) -> None:
        self.worker.woken()
        self._tx_batch(pair)
        self._poll()

    def _tx_batch(self, pair: int) -> None:
        state = self._move(lib.avmm_net_tx, pair)
        if state is not None:
            self._after_tx(pair, state)

    def _after_tx(self, pair: int, state: int) -> None:
        if state & lib.AVMM_NET_PEER_GONE:
            self._gone(pair)
        elif state & lib.AVMM_NET_TX_BLOCKED:
            self.worker.watch_write(self.tap.fds[pair], self._tx_writable, pair)
        if state & lib.AVMM_NET_BUDGET:
            self.worker.soon((True, pair), self._tx_batch, pair)

    def _poll(self) -> None:
        """Spin briefly for the next frame either way (asyncvmm.poll) while traffic flows."""
        if not self.worker.poll(self._poll_step):
            self.worker.broken(self.queues)

    def _poll_step(self, max_ns: int) -> int:
        n = lib.avmm_net_poll(self._net, self.active_pairs, max_ns, ffi.NULL, self._state, self._pair)
        # A TX the backend refused moves nothing and still says so (wait for POLLOUT): the
        # poll asked the driver for no doorbell, so none would come for that frame.
        if n > 0 or (n == 0 and self._state[0]):
            state, pair = self._state[0], self._pair[0]
            self._after_rx(pair, state)
            self._after_tx(pair, state)
        return n

    def _gone(self, pair: int) -> None:
        """passt went away: the link is down for good (one log line, from the transport's
        NEEDS_RESET, which also brings the driver a config interrupt to read the status).
        The guest's frames are dropped from now on (C); the VMM carries on."""
        if self.peer_gone:
            return
        fd = self.tap.fds[pair]
        self.worker.unwatch(fd)
        self.worker.unwatch_write(fd)
        self._rx_stopped[pair] = True
        # TX frames already in the ring (held back while the socket was full) are dropped
        # now, not at the guest's next doorbell, which a full ring may never bring.
        self.worker.soon((True, pair), self._tx_batch, pair)
        self.link_up = False
        peer = f"passt (pid {self.tap.pid})" if isinstance(self.tap, Passt) else "the peer"
        if lib.avmm_net_stats(self._net, pair).rx_bad_length:  # our doing: passt may well be running
            self.peer_gone = f"the VMM took the link down: {peer} sent a frame length no frame has"
        elif isinstance(self.tap, Passt):
            self.peer_gone = self.tap.why_gone()
            self.tap.on_exit(self._passt_exited)  # its exit status, if it is still to come
        else:
            self.peer_gone = "the peer closed its socket"
        self.needs_reset(f"link down: {self.peer_gone}")

    def _passt_exited(self, why: str) -> None:
        """passt, whose socket closed before it exited, has exited: the real cause."""
        if self.peer_gone != why and not self.peer_gone.startswith("the VMM"):
            self.peer_gone = why
            log.info(f"{self.name}: {why}")

    def _tx_writable(self, pair: int) -> None:
        self.worker.unwatch_write(self.tap.fds[pair])
        self._tx_batch(pair)

    # -- the control queue --------------------------------------------------------------
    def _ctrl_command(self, chain: Chain) -> int:
        """One command (5.1.6.5): class, command, data out; the ack in the last writable byte."""
        if chain.nin >= 1 and 2 <= chain.out_len <= CTRL_OUT_MAX:
            out = chain.read()
            ack = self._command(out[0], out[1], out[2:])
        else:
            self.counters["ctrl_errors"] += 1
            ack = Ctrl.ERR
        if chain.nin < 1:
            return 0
        chain.write(bytes([ack]), chain.in_len - 1)
        return 1

    def _command(self, cls: int, cmd: int, data: bytes) -> int:
        self.counters["ctrl_commands"] += 1
        try:
            ok = self._apply(cls, cmd, data)
        except (OSError, DeviceError):  # the host refused (a TAP ioctl): the guest hears ERR
            ok = False
        if not ok:
            self.counters["ctrl_errors"] += 1
        return Ctrl.OK if ok else Ctrl.ERR

    def _apply(self, cls: int, cmd: int, data: bytes) -> bool:
        ok = False
        if cls == Ctrl.RX and cmd in Ctrl.RX_MODES and len(data) == 1:
            self.rx_mode[Ctrl.RX_MODES[cmd]] = bool(data[0])
            ok = True
        elif cls == Ctrl.MAC and cmd == lib.VIRTIO_NET_CTRL_MAC_ADDR_SET and len(data) == ETH_ALEN:
            self.mac = bytes(data)
            ok = True
        elif cls == Ctrl.MAC and cmd == lib.VIRTIO_NET_CTRL_MAC_TABLE_SET:
            tables = self._mac_tables(data)
            if tables is not None:
                self.mac_filters = tables
                ok = True
        elif cls == Ctrl.VLAN and cmd in (lib.VIRTIO_NET_CTRL_VLAN_ADD, lib.VIRTIO_NET_CTRL_VLAN_DEL) and len(data) == 2:
            vid = struct.unpack("<H", data)[0]
            if vid < 4096:
                (self.vlans.add if cmd == lib.VIRTIO_NET_CTRL_VLAN_ADD else self.vlans.discard)(vid)
                ok = True
        elif cls == Ctrl.MQ and cmd == lib.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and len(data) == 2:
            n = struct.unpack("<H", data)[0]
            if self._features & bits(NetFeature.MQ) and 1 <= n <= self.pairs:
                self.active_pairs = n
                self._park()  # the thread looks at the TAP's queues afresh after
                try:
                    self.tap.set_active_queues(n)
                finally:
                    self._unpark()
                ok = True
        elif cls == Ctrl.GUEST_OFFLOADS and cmd == lib.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET and len(data) == 8:
            wanted = struct.unpack("<Q", data)[0]
            offloadable = sum(1 << f for f in GUEST_OFFLOAD_TUN)
            if self._features & bits(NetFeature.CTRL_GUEST_OFFLOADS) and not wanted & ~(self._features & offloadable):
                self._set_offloads(wanted)
                ok = True
        elif cls == Ctrl.ANNOUNCE and cmd == lib.VIRTIO_NET_CTRL_ANNOUNCE_ACK:
            ok = True
        return ok

    @staticmethod
    def _mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
        """Two struct virtio_net_ctrl_mac: u32 entries, then that many MACs (unicast, multicast)."""
        tables, off = [], 0
        for _ in range(2):
            if off + 4 > len(data):
                return None
            n = struct.unpack_from("<I", data, off)[0]
            off += 4
            if off + n * ETH_ALEN > len(data):
                return None
            tables.append([data[off + i * ETH_ALEN : off + (i + 1) * ETH_ALEN] for i in range(n)])
            off += n * ETH_ALEN
        return (tables[0], tables[1]) if off == len(data) else None

    # -- state -------------------------------------------------------------------------
    def save(self) -> dict:
        """The device's state as plain data: queues, and what the control queue set."""
        return {
            "queues": [vq.state().to_dict() for vq in self.queues],
            "ctrl": self.ctrl.state().to_dict() if self.ctrl is not None else None,
            "mac": self.mac.hex(), "active_pairs": self.active_pairs, "rx_mode": dict(self.rx_mode),
            "vlans": sorted(self.vlans),
        }

    def _apply_state(self, state: dict) -> None:
        """save()'s data onto the queues the driver has set up the same way."""
        by_index = {vq.index: vq for vq in self.queues}
        if self.ctrl is not None:
            by_index[self.ctrl.index] = self.ctrl
        for d in [*state["queues"], *([state["ctrl"]] if state["ctrl"] else [])]:
            s = VqState.from_dict(d)
            if s.index not in by_index:
                raise ValueError(f"{self.name}: queue {s.index} is not active")
            by_index[s.index].restore(s)
        self.mac = bytes.fromhex(state["mac"])
        self.rx_mode = dict(state["rx_mode"])
        self.vlans = set(state["vlans"])
        if state["active_pairs"] != self.active_pairs:
            self.active_pairs = state["active_pairs"]
            self.tap.set_active_queues(self.active_pairs)

    # -- reset, stats, close --------------------------------------------------------------
    def _stop(self) -> None:
        self.worker.stop()
        self._rx_stopped = [False] * self.pairs

    def reset(self) -> None:
        if self._threaded:  # parked until the next activation hands it the new queues
            self._thread.park()
            self._threaded = False
        self._stop()
        if self._net != ffi.NULL:
            lib.avmm_net_reset(self._net)
        self.queues = []
        self.ctrl = None
        self._features = 0
        self.mac = self.mac0

    def stats(self) -> dict:
        if self._net == ffi.NULL:
            return {}
        fields: tuple[str, ...] = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_batches", "tx_batches", "rx_no_buffers", "rx_held",
                  "rx_too_long", "rx_bad_chains", "rx_errors", "tx_bad_chains", "tx_errors", "tx_blocked",
                                    "rx_copied")
        if self.stream:
            fields += ("rx_reads", "tx_partial", "rx_bad_length")
        pairs = []
        for p in range(self.pairs):
            s = lib.avmm_net_stats(self._net, p)
            pairs.append({f: getattr(s, f) for f in fields})
        return {
            "tap": self.tap.name,
            **({"passt": {"pid": self.tap.pid, "link": "up" if self.link_up else "down", "gone": self.peer_gone}}
               if isinstance(self.tap, Passt) else {}),
            "mac": format_mac(self.mac),
            "active_pairs": self.active_pairs,
            "poll_window_ns": self._thread.stats()["poll_ns"] if self._thread else self.worker.window.ns,
            "thread": ({"serving": self._threaded} | self._thread.stats()) if self._thread else {},
            "rx_mode": dict(self.rx_mode),
            "control": dict(self.counters),
            "pairs": pairs,
        }

    def close(self) -> None:
        self.worker.stop(closing=True)
        if self._thread is not None:
            self._thread.stop()  # joined: nothing but the loop touches the device now
            self._thread = None
            self._threaded = False
        if self._net != ffi.NULL and isinstance(self.tap, Passt) and not self._owns_tap:
            # passt stays for the next boot's device: a frame half read or half sent goes on with it.
            rx = ffi.new("uint8_t[]", lib.AVMM_NET_STREAM_CARRY_RX)
            tx = ffi.new("uint8_t[]", lib.AVMM_NET_STREAM_CARRY_TX)
            rx_len, tx_len = ffi.new("uint32_t *"), ffi.new("uint32_t *")
            if lib.avmm_net_stream_carry_out(self._net, 0, rx, rx_len, tx, tx_len) == 0:
                self.tap.carry = (ffi.buffer(rx, rx_len[0])[:], ffi.buffer(tx, tx_len[0])[:])
        if self._net != ffi.NULL:
            lib.avmm_net_free(self._net)
            self._net = ffi.NULL
        if self._owns_tap:
            self.tap.close()


# -- `-s N,virtio-net,TAPNAME[,mac=52:54:..][,queues=N]` -------------------------------------
def _check(slot: PciSlot, cfg: VmConfig) -> None:
    opts = NetOptions.parse(slot.options, slot_name(slot))
    if opts.passt is not None:
        check_installed(f"-s {slot_name(slot)}virtio-net,{slot.options}")
        check_forwards(opts.passt, f"-s {slot_name(slot)}virtio-net,{slot.options}")
    else:
        check_is_tap(opts.tap, f"-s {slot_name(slot)}virtio-net,{slot.options}")


def _build(slot: PciSlot, ctx):
    opts = NetOptions.parse(slot.options, slot_name(slot))
    where = f"{slot.slot}.{slot.function}"
    pairs = min(opts.queues or ctx.config.cpus, VirtioNet.MAX_PAIRS)
    tap: Tap | Passt | None = None
    if ctx.host is not None:  # the TAP (or passt) outlives the boot: a reset reuses it
        key = (slot.slot, slot.function)
        tap = ctx.host.taps.get(key)
        if tap is None and opts.passt is not None:
            tap = ctx.host.taps[key] = Passt(opts.passt, f"virtio-net@{where}")
        elif tap is None:
            tap = ctx.host.taps[key] = Tap(opts.tap, pairs)
    net = VirtioNet(opts, ctx.mem, mac=stable_mac(ctx.config.name, where), queues=ctx.config.cpus,
                    name=f"virtio-net@{where}", poll=may_poll(ctx), tap=tap, thread_poll=thread_may_poll(ctx),
                    seccomp=ctx.config.seccomp)
    return virtio_pci_function(net, ctx)


register("virtio-net", _check, _build)
