"""virtio-net (virtio 1.2, 5.1) on a TAP: features, config, the control queue, wiring.

Frames never reach Python: per queue pair, the TAP fd is a reader on the loop that calls
avmm_net_rx (cext/net.c: frames straight into the guest's RX buffers) and the TX doorbell
one that calls avmm_net_tx (chains written to the TAP as they lie in guest memory).
Flow control is asyncio's: with no RX buffers posted the TAP reader is removed — frames
wait in the TAP's queue (the kernel drops what overflows it, and counts it) — until the
RX doorbell brings buffers; a TAP that takes no more makes the pair wait for writability
(add_writer) with the frame still in the ring.

The control queue (CTRL_VQ) is served here, in Python: it carries a few commands at
start-up. RX mode and MAC filter commands are acknowledged and recorded — the TAP gives
the guest every frame the host sends it, so filtering would only drop what the host
chose to send —; MQ, GUEST_OFFLOADS and MAC_ADDR_SET take effect.
"""

from __future__ import annotations

import asyncio
import struct
import time

from ...._native import ffi, lib
from ....vstate.memory import GuestMemory
from ....poll import POLL_MAX_NS, POLL_SLICE_NS, PollWindow
from ...pci.regs import ClassCode
from ..device import DeviceError, QueueConfig, VirtioDevice
from ..spec import DeviceId, Feature, VqError, bits
from .tap import TUN_F_USO4, TUN_F_USO6, NetOptions, Tap, format_mac

QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
# A control command's readable part: class, command, data. The largest is a MAC table;
# 64 KiB holds ten thousand addresses (QEMU keeps 64 and filters no more past that).
CTRL_OUT_MAX = 64 << 10
CTRL_BUDGET = 16  # commands per callback: a guest that keeps the queue full shares the loop
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
                 poll: bool = False, tap: Tap | None = None):
        """`tap`: one opened already (kept by the VM across guest resets; not closed here)."""
        self.pairs = min(opts.queues or queues, lib.AVMM_NET_MAX_PAIRS)
        super().__init__(2 * self.pairs + 1, QUEUE_SIZE)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.mac0 = self.mac = opts.mac or mac
        self._owns_tap = tap is None
        self.tap = Tap(opts.tap, self.pairs) if tap is None else tap
        self._net = lib.avmm_net_new(mem.c_table(), self.pairs, QUEUE_SIZE)
        if self._net == ffi.NULL:
            if self._owns_tap:
                self.tap.close()
            raise DeviceError("cannot allocate the network data path")
        for p, fd in enumerate(self.tap.fds):
            lib.avmm_net_set_tap(self._net, p, fd)
        self.config_size = ffi.sizeof("struct virtio_net_config")
        self.link_up = True
        self.active_pairs = 1
        self.rx_mode: dict[str, bool] = {}
        self.mac_filters: tuple[list[bytes], list[bytes]] = ([], [])
        self.vlans: set[int] = set()
        self.counters = {"ctrl_commands": 0, "ctrl_errors": 0}
        self._features = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self._rx_stopped = [False] * self.pairs
        self._again: dict[tuple[bool, int], asyncio.Handle] = {}  # (tx, pair): a batch to continue
        self._ctrl_vq = ffi.new("struct avmm_vq *")
        self._ctrl_iov = ffi.new("struct iovec[]", 64)
        self._ctrl_fd = -1
        self._ctrl_resume: asyncio.Handle | None = None
        self.window = PollWindow(POLL_MAX_NS if poll else 0)
        self._state = ffi.new("uint32_t *")
        self._pair = ffi.new("int *")

    # -- what the transport asks ---------------------------------------------------------
    def features(self) -> int:
        f = bits(NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.MAC, NetFeature.GUEST_TSO4,
                 NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.HOST_TSO4,
                 NetFeature.HOST_TSO6, NetFeature.HOST_ECN, NetFeature.HOST_UFO, NetFeature.MRG_RXBUF,
                 NetFeature.STATUS, NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_VLAN,
                 NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_MAC_ADDR, NetFeature.CTRL_GUEST_OFFLOADS)
        if self.pairs > 1:
            f |= bits(NetFeature.MQ)
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
        self._features = features
        self.active_pairs = 1
        vq_flags = (lib.AVMM_VQ_EVENT_IDX if features & bits(Feature.RING_EVENT_IDX) else 0) | (
            lib.AVMM_VQ_INDIRECT if features & bits(Feature.RING_INDIRECT_DESC) else 0
        )
        gso = any(features & bits(f) for f in GSO_FEATURES)
        mrg = features & bits(NetFeature.MRG_RXBUF)
        lib.avmm_net_set_flags(self._net, lib.AVMM_NET_MRG_RXBUF if mrg else 0,
                               HDR_LEN + (GSO_FRAME_MAX if gso else FRAME_MAX))
        self._set_offloads(features)
        ctrl = 2 * self.pairs
        data = [q for q in queues if q.index < ctrl]
        for q in data:
            irq = q.vector.c if q.vector is not None else ffi.NULL
            r = lib.avmm_net_queue_setup(self._net, q.index, q.size, q.desc, q.driver, q.device, vq_flags, irq,
                                         q.kick_fd)
            if r < 0:
                lib.avmm_net_reset(self._net)
                raise DeviceError(f"queue {q.index}: its rings are {'not aligned' if r == -22 else 'not in guest RAM'}")
        self._loop = loop = asyncio.get_running_loop()
        for q in queues:
            if q.index == ctrl and features & bits(NetFeature.CTRL_VQ):
                irq = q.vector.c if q.vector is not None else ffi.NULL
                r = lib.avmm_vq_setup(self._ctrl_vq, self.mem.c_table(), q.size, q.desc, q.driver, q.device,
                                      vq_flags, irq, q.kick_fd)
                if r < 0:
                    raise DeviceError(f"control queue: its rings are {'not aligned' if r == -22 else 'not in guest RAM'}")
                self._ctrl_fd = q.kick_fd
                self._add_reader(q.kick_fd, self._ctrl)
        self.tap.set_active_queues(1)
        for q in data:
            pair, tx = divmod(q.index, 2)
            if tx:
                self._add_reader(q.kick_fd, self._tx, pair)
            else:
                self._add_reader(q.kick_fd, self._rx_kick, pair)
                self._add_reader(self.tap.fds[pair], self._rx, pair)
        for q in data:  # doorbells rung before DRIVER_OK
            pair, tx = divmod(q.index, 2)
            (self._tx if tx else self._rx)(pair)

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
    def _add_reader(self, fd: int, cb, *args) -> None:
        self._loop.add_reader(fd, cb, *args)
        self._readers.add(fd)

    def _remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._loop.remove_reader(fd)
            self._readers.discard(fd)

    def _rx(self, pair: int) -> None:
        self.window.woken(time.monotonic_ns())
        self._rx_batch(pair)
        self._poll()

    def _rx_batch(self, pair: int) -> None:
        state = self._move(lib.avmm_net_rx, pair)
        if state is not None:
            self._after_rx(pair, state)

    def _move(self, move, pair: int) -> int | None:
        """One avmm_net_rx/tx batch: its state, or None if a ring broke."""
        if move(self._net, pair, self._state) < 0:
            self._broken()
            return None
        return self._state[0]

    def _continue_soon(self, tx: bool, pair: int) -> None:
        """A batch stopped at its budget: the rest after the loop's other callbacks."""
        if (tx, pair) not in self._again:
            self._again[tx, pair] = self._loop.call_soon(self._continue, tx, pair)

    def _continue(self, tx: bool, pair: int) -> None:
        del self._again[tx, pair]
        (self._tx_batch if tx else self._rx_batch)(pair)

    def _after_rx(self, pair: int, state: int) -> None:
        if state & lib.AVMM_NET_RX_NO_BUFFERS and not self._rx_stopped[pair]:
            # No buffers: frames wait in the TAP until the guest posts some (the RX doorbell).
            self._rx_stopped[pair] = True
            self._remove_reader(self.tap.fds[pair])
        if state & lib.AVMM_NET_BUDGET:
            self._continue_soon(False, pair)

    def _rx_kick(self, pair: int) -> None:
        vq = lib.avmm_net_queue(self._net, 2 * pair)
        lib.avmm_vq_drain_kick(vq)
        if self._rx_stopped[pair]:
            self._rx_stopped[pair] = False
            self._add_reader(self.tap.fds[pair], self._rx, pair)
        self._rx(pair)

    def _tx(self, pair: int) -> None:
        self.window.woken(time.monotonic_ns())
        self._tx_batch(pair)
        self._poll()

    def _tx_batch(self, pair: int) -> None:
        state = self._move(lib.avmm_net_tx, pair)
        if state is not None:
            self._after_tx(pair, state)

    def _after_tx(self, pair: int, state: int) -> None:
        fd = self.tap.fds[pair]
        if state & lib.AVMM_NET_TX_BLOCKED and fd not in self._writers:
            self._loop.add_writer(fd, self._tx_writable, pair)
            self._writers.add(fd)
        if state & lib.AVMM_NET_BUDGET:
            self._continue_soon(True, pair)

    def _poll(self) -> None:
        """Spin briefly for the next frame either way (asyncvmm.poll) while traffic flows."""
        w = self.window
        deadline = time.monotonic_ns() + POLL_SLICE_NS
        while w.ns and time.monotonic_ns() < deadline and self._readers:
            n = lib.avmm_net_poll(self._net, self.active_pairs, w.ns, self._state, self._pair)
            if n < 0:
                self._broken()
                return
            if n == 0:
                break
            state, pair = self._state[0], self._pair[0]
            self._after_rx(pair, state)
            self._after_tx(pair, state)
        w.gave_up()

    def _tx_writable(self, pair: int) -> None:
        fd = self.tap.fds[pair]
        self._loop.remove_writer(fd)
        self._writers.discard(fd)
        self._tx_batch(pair)

    def _broken(self) -> None:
        broken = [qi for qi in range(2 * self.pairs) if lib.avmm_net_queue(self._net, qi).broken]
        self._stop()
        for qi in broken:
            vq = lib.avmm_net_queue(self._net, qi)
            self.needs_reset(f"queue {qi}: the driver broke the ring ({VqError(vq.last_error).name.lower()})")

    # -- the control queue --------------------------------------------------------------
    def _ctrl(self) -> None:
        vq = self._ctrl_vq
        lib.avmm_vq_drain_kick(vq)
        mem_table = self.mem.c_table()
        for _ in range(CTRL_BUDGET):
            chain = ffi.new("struct avmm_chain *", {"iov": self._ctrl_iov, "iov_cap": 64})
            r = lib.avmm_vq_pop(vq, mem_table, chain)
            if r < 0:
                self._stop()
                self.needs_reset(f"control queue: the driver broke the ring ({VqError(vq.last_error).name.lower()})")
                return
            if r == 0:
                if lib.avmm_vq_enable_notify(vq):
                    continue
                break
            ack = Ctrl.ERR
            if (not chain.err and chain.nin >= 1 and 2 <= chain.out_len <= CTRL_OUT_MAX
                    and chain.last_in != ffi.NULL):
                out = b"".join(bytes(ffi.buffer(self._ctrl_iov[i].iov_base, self._ctrl_iov[i].iov_len))
                               for i in range(chain.nout))
                ack = self._command(out[0], out[1], out[2:])
            else:
                self.counters["ctrl_errors"] += 1
            if chain.last_in != ffi.NULL:
                chain.last_in[0] = ack
            lib.avmm_vq_push(vq, chain.head, 1 if chain.last_in != ffi.NULL else 0)
        else:  # the budget is spent: the rest after the loop's other callbacks
            if self._ctrl_resume is None:
                self._ctrl_resume = self._loop.call_soon(self._ctrl_again)
        lib.avmm_vq_publish(vq)

    def _ctrl_again(self) -> None:
        self._ctrl_resume = None
        self._ctrl()

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
                self.tap.set_active_queues(n)
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

    # -- reset, stats, close --------------------------------------------------------------
    def _stop(self) -> None:
        if self._loop is not None:
            for fd in list(self._readers):
                self._remove_reader(fd)
            for fd in list(self._writers):
                self._loop.remove_writer(fd)
            self._writers.clear()
        for handle in [*self._again.values(), self._ctrl_resume]:
            if handle is not None:
                handle.cancel()
        self._again.clear()
        self._ctrl_resume = None
        self._rx_stopped = [False] * self.pairs

    def reset(self) -> None:
        self._stop()
        if self._net != ffi.NULL:
            lib.avmm_net_reset(self._net)
        self._ctrl_vq = ffi.new("struct avmm_vq *")
        self._features = 0
        self.mac = self.mac0

    def stats(self) -> dict:
        if self._net == ffi.NULL:
            return {}
        fields = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_batches", "tx_batches", "rx_no_buffers", "rx_held",
                  "rx_too_long", "rx_bad_chains", "rx_errors", "tx_bad_chains", "tx_errors", "tx_blocked")
        pairs = []
        for p in range(self.pairs):
            s = lib.avmm_net_stats(self._net, p)
            pairs.append({f: getattr(s, f) for f in fields})
        return {
            "tap": self.tap.name,
            "mac": format_mac(self.mac),
            "active_pairs": self.active_pairs,
            "poll_window_ns": self.window.ns,
            "rx_mode": dict(self.rx_mode),
            "control": dict(self.counters),
            "pairs": pairs,
        }

    def close(self) -> None:
        self._stop()
        if self._net != ffi.NULL:
            lib.avmm_net_free(self._net)
            self._net = ffi.NULL
        if self._owns_tap:
            self.tap.close()
