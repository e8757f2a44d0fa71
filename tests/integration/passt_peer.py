"""The guest's side of a network, played from the host for passt's tests: Ethernet, IPv4,
UDP and TCP frames built and parsed with struct, a DHCP client (RFC 2131: DISCOVER, OFFER,
REQUEST, ACK) and just enough TCP (RFC 9293) to open a connection either way, move data
and reset it. Frames go through a virtio-net (NetClient: the host-side virtio driver)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from dataclasses import dataclass

from asyncvmm.testing.mock_driver import NetClient

ETH_IP = 0x0800
PROTO_TCP, PROTO_UDP = 6, 17
IP_HDR = struct.Struct("!BBHHHBBH4s4s")
UDP_HDR = struct.Struct("!HHHH")
TCP_HDR = struct.Struct("!HHIIBBHHH")
BOOTP = struct.Struct("!BBBBIHHIIII16s64s128s")
DHCP_MAGIC = b"\x63\x82\x53\x63"
BOOTP_CLIENT, BOOTP_SERVER = 68, 67


class Dhcp:
    DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5
    SUBNET, ROUTER, DNS, REQUESTED_IP, LEASE, MSG_TYPE, SERVER_ID, END = 1, 3, 6, 50, 51, 53, 54, 255


class Tcp:
    FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
    MSS = 2  # option kind


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    hdr = IP_HDR.pack(0x45, 0, IP_HDR.size + len(payload), 0, 0x4000, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def l4_checksum(src: bytes, dst: bytes, proto: int, seg: bytes) -> int:
    return checksum(src + dst + struct.pack("!BBH", 0, proto, len(seg)) + seg)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = UDP_HDR.pack(sport, dport, UDP_HDR.size + len(payload), 0) + payload
    return seg[:6] + struct.pack("!H", l4_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF) + seg[8:]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        options: bytes = b"") -> bytes:
    off = (TCP_HDR.size + len(options)) // 4
    seg = TCP_HDR.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off << 4, flags, 65535, 0, 0) + options + payload
    return seg[:16] + struct.pack("!H", l4_checksum(src, dst, PROTO_TCP, seg)) + seg[18:]


@dataclass
class Packet:
    src_mac: bytes
    src: bytes
    dst: bytes
    proto: int
    payload: bytes  # the IP payload


def parse_ip(frame: bytes) -> Packet | None:
    if len(frame) < 14 + IP_HDR.size or int.from_bytes(frame[12:14], "big") != ETH_IP:
        return None
    vihl, _, total, _, _, _, proto, _, src, dst = IP_HDR.unpack_from(frame, 14)
    ihl = (vihl & 0xF) * 4
    return Packet(frame[6:12], src, dst, proto, frame[14 + ihl : 14 + total])


@dataclass
class Lease:
    address: bytes
    router: bytes
    server: bytes
    server_mac: bytes
    netmask: bytes
    dns: list[bytes]
    seconds: int
    acked: bool

    def __str__(self) -> str:
        a = ipaddress.IPv4Address
        return f"{a(self.address)} via {a(self.router)} (server {a(self.server)}, {self.seconds} s)"


class Guest:
    """One virtio-net's driver as a guest's small IP stack."""

    def __init__(self, client: NetClient, mac: bytes):
        self.c = client
        self.mac = mac
        self.addr = bytes(4)
        self.gw_mac = b"\xff" * 6
        self._backlog: list[Packet] = []

    def send_ip(self, dst: bytes, proto: int, payload: bytes, *, dst_mac: bytes | None = None) -> None:
        frame = (dst_mac or self.gw_mac) + self.mac + ETH_IP.to_bytes(2, "big") + ipv4(self.addr, dst, proto, payload)
        self.c.send(frame)

    async def receive(self, match, timeout: float = 5.0) -> Packet:
        """The first IPv4 packet `match` accepts (others that come meanwhile are kept)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, p in enumerate(self._backlog):
                if match(p):
                    return self._backlog.pop(i)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("no such packet from the network")
            for _, frame in await self.c.receive(1, timeout=left, ethertype=ETH_IP):
                p = parse_ip(frame)
                if p is not None:
                    self._backlog.append(p)

    # -- DHCP --------------------------------------------------------------------------
    def _dhcp(self, xid: int, options: bytes) -> None:
        bootp = BOOTP.pack(1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0, self.mac, b"", b"") + DHCP_MAGIC + options
        self.send_ip(b"\xff" * 4, PROTO_UDP, udp(bytes(4), b"\xff" * 4, BOOTP_CLIENT, BOOTP_SERVER, bootp),
                     dst_mac=b"\xff" * 6)

    async def _dhcp_reply(self, xid: int, want: int) -> tuple[bytes, dict[int, bytes], bytes]:
        def match(p: Packet) -> bool:
            if p.proto != PROTO_UDP or UDP_HDR.unpack_from(p.payload)[1] != BOOTP_CLIENT:
                return False
            return BOOTP.unpack_from(p.payload, UDP_HDR.size)[4] == xid
        p = await self.receive(match)
        bootp = p.payload[UDP_HDR.size :]
        assert bootp[BOOTP.size : BOOTP.size + 4] == DHCP_MAGIC
        opts, i = {}, BOOTP.size + 4
        while i < len(bootp) and bootp[i] != Dhcp.END:
            if bootp[i] == 0:
                i += 1
                continue
            code, n = bootp[i], bootp[i + 1]
            opts[code] = bootp[i + 2 : i + 2 + n]
            i += 2 + n
        assert opts[Dhcp.MSG_TYPE] == bytes([want]), opts[Dhcp.MSG_TYPE]
        yiaddr = bootp[16:20]
        return yiaddr, opts, p.src_mac

    async def dhcp(self) -> Lease:
        """DISCOVER, OFFER, REQUEST, ACK; the lease's address becomes ours."""
        xid = int.from_bytes(os.urandom(4), "big")
        self._dhcp(xid, bytes([Dhcp.MSG_TYPE, 1, Dhcp.DISCOVER, Dhcp.END]))
        offered, opts, server_mac = await self._dhcp_reply(xid, Dhcp.OFFER)
        server = opts[Dhcp.SERVER_ID]
        self._dhcp(xid, bytes([Dhcp.MSG_TYPE, 1, Dhcp.REQUEST, Dhcp.REQUESTED_IP, 4]) + offered
                   + bytes([Dhcp.SERVER_ID, 4]) + server + bytes([Dhcp.END]))
        acked, ack_opts, _ = await self._dhcp_reply(xid, Dhcp.ACK)
        dns = ack_opts.get(Dhcp.DNS, b"")
        lease = Lease(acked, ack_opts[Dhcp.ROUTER][:4], server, server_mac, ack_opts[Dhcp.SUBNET],
                      [dns[i : i + 4] for i in range(0, len(dns), 4)], int.from_bytes(ack_opts[Dhcp.LEASE], "big"),
                      acked == offered)
        self.addr, self.gw_mac = acked, server_mac
        return lease

    # -- TCP ---------------------------------------------------------------------------
    def _tcp_match(self, port: int, peer_port: int | None = None):
        def match(p: Packet) -> bool:
            if p.proto != PROTO_TCP:
                return False
            sport, dport = struct.unpack_from("!HH", p.payload)
            return dport == port and (peer_port is None or sport == peer_port)
        return match

    async def tcp_segment(self, port: int, peer_port: int | None = None, timeout: float = 5.0):
        """The next segment to our `port`: (peer, peer port, seq, ack, flags, data)."""
        p = await self.receive(self._tcp_match(port, peer_port), timeout)
        sport, _, seq, ack, off, flags, _, _, _ = TCP_HDR.unpack_from(p.payload)
        return p.src, sport, seq, ack, flags, p.payload[(off >> 4) * 4 :]


class TcpConn:
    """One TCP connection of the guest's, opened either way."""

    def __init__(self, guest: Guest, peer: bytes, port: int, peer_port: int):
        self.g, self.peer, self.port, self.peer_port = guest, peer, port, peer_port
        self.seq = int.from_bytes(os.urandom(4), "big")
        self.ack = 0

    def _send(self, flags: int, data: bytes = b"", options: bytes = b"") -> None:
        self.g.send_ip(self.peer, PROTO_TCP, tcp(self.g.addr, self.peer, self.port, self.peer_port, self.seq,
                                                   self.ack, flags, data, options))

    @classmethod
    async def connect(cls, guest: Guest, peer: bytes, peer_port: int) -> "TcpConn":
        c = cls(guest, peer, 40000 + int.from_bytes(os.urandom(2), "big") % 20000, peer_port)
        c._send(Tcp.SYN, options=struct.pack("!BBH", Tcp.MSS, 4, 1460))
        _, _, seq, ack, flags, _ = await guest.tcp_segment(c.port, peer_port)
        assert flags & (Tcp.SYN | Tcp.ACK) == Tcp.SYN | Tcp.ACK, f"flags {flags:#x}"
        assert ack == (c.seq + 1) & 0xFFFFFFFF
        c.seq, c.ack = ack, seq + 1
        c._send(Tcp.ACK)
        return c

    @classmethod
    async def accept(cls, guest: Guest, port: int, timeout: float = 5.0) -> "TcpConn":
        peer, peer_port, seq, _, flags, _ = await guest.tcp_segment(port, timeout=timeout)
        assert flags & Tcp.SYN, f"flags {flags:#x}"
        c = cls(guest, peer, port, peer_port)
        c.ack = seq + 1
        c._send(Tcp.SYN | Tcp.ACK, options=struct.pack("!BBH", Tcp.MSS, 4, 1460))
        c.seq += 1
        return c

    def send(self, data: bytes, mss: int = 1400) -> None:
        for i in range(0, len(data), mss):
            self._send(Tcp.PSH | Tcp.ACK, data[i : i + mss])
            self.seq += len(data[i : i + mss])

    async def recv(self, n: int, timeout: float = 5.0) -> bytes:
        """n bytes in order (segments out of order or again are dropped; TCP sends them again)."""
        got = b""
        while len(got) < n:
            _, _, seq, _, flags, data = await self.g.tcp_segment(self.port, self.peer_port, timeout)
            assert not flags & Tcp.RST, "the peer reset the connection"
            if data and seq == self.ack:
                got += data
                self.ack += len(data)
            if data or flags & Tcp.FIN:
                self.ack += 1 if flags & Tcp.FIN else 0
                self._send(Tcp.ACK)
        return got

    def reset(self) -> None:
        self._send(Tcp.RST | Tcp.ACK)
