"""The far end of a TAP, inside a network namespace: raw frames through an AF_PACKET socket.

Run as `ip netns exec NS python net_peer.py IFACE`; commands are JSON lines on stdin,
answers JSON lines on stdout:
  {"op": "send", "frames": [HEX, ...], "vnet": [HEX, ...] or null}   -> {"sent": N}
  {"op": "recv", "count": N, "timeout": S, "ethertype": T, "vnet": bool, "data": bool}
      -> {"frames": [[len, sha256, HEX or null, VNET_HEX or null], ...]}
  {"op": "gen", "count": N, "size": BYTES, "seed": S, "dst": MAC, "src": MAC, "tso": 0|MSS}
      -> {"sent": N, "sha256": of every frame sent, in order}: frames made here (0x88B5
      frames, or with tso=MSS IPv4/TCP frames of `size` payload bytes sent as one GSO frame)
  {"op": "drain", "count": N, "timeout": S, "ethertype": T, "vnet": bool}
      -> {"frames": N, "sha256": of the frames received, "bytes": payload total}
  {"op": "quit"}
With "vnet" the socket has PACKET_VNET_HDR: frames carry a struct virtio_net_hdr (10 bytes)
in front, which is how segmentation offload is asked for (send) and seen (recv).
"""

import hashlib
import json
import random
import select
import socket
import struct
import sys
import time

SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>: root may pass rmem_max/wmem_max
VNET = 10


def open_socket(iface: str, vnet: bool) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if vnet:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # root: past rmem_max
    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
    s.bind((iface, 0))
    s.setblocking(False)
    return s


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_frame(dst: bytes, src: bytes, payload: bytes, seq: int) -> bytes:
    """Ethernet + IPv4 + TCP, checksums left partial (the pseudo-header sum), as a stack
    hands a segment to a device that does checksum offload."""
    saddr, daddr = bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2])
    tcp_len = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 0, 0x4000, 64, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - csum(ip)) + ip[12:]
    pseudo = csum(saddr + daddr + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    return dst + src + b"\x08\x00" + ip + tcp + payload


def received(s: socket.socket, cmd: dict, default_timeout: float):
    """(vnet header, frame) of frames arriving on `s` until cmd["count"] or the timeout;
    our own sends and frames of another cmd["ethertype"] are skipped."""
    want, deadline = cmd["count"], time.monotonic() + cmd.get("timeout", default_timeout)
    ethertype, n = cmd.get("ethertype"), 0
    while n < want:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            return
        try:
            data, addr = s.recvfrom(1 << 17)
        except BlockingIOError:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue  # our own sends, seen on the way out
        head, frame = (data[:VNET], data[VNET:]) if cmd.get("vnet") else (b"", data)
        if ethertype is not None and int.from_bytes(frame[12:14], "big") != ethertype:
            continue
        n += 1
        yield head, frame


def main(iface: str) -> None:
    plain, vnet = open_socket(iface, False), open_socket(iface, True)
    print(json.dumps({"ready": iface}), flush=True)  # bound: from now on no frame is missed
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "send":
            heads = cmd.get("vnet")
            s = vnet if heads else plain
            n = 0
            for i, f in enumerate(cmd["frames"]):
                data = (bytes.fromhex(heads[i]) if heads else b"") + bytes.fromhex(f)
                while True:
                    try:
                        s.send(data)
                        break
                    except BlockingIOError:
                        select.select([], [s], [], 1)
                n += 1
            print(json.dumps({"sent": n}), flush=True)
        elif op == "recv":
            out = [[len(frame), hashlib.sha256(frame).hexdigest(), frame.hex() if cmd.get("data") else None,
                    head.hex() if head else None]
                   for head, frame in received(vnet if cmd.get("vnet") else plain, cmd, 5)]
            print(json.dumps({"frames": out}), flush=True)
        elif op == "gen":
            rng = random.Random(cmd["seed"])
            dst, src = bytes.fromhex(cmd["dst"]), bytes.fromhex(cmd["src"])
            h, mss = hashlib.sha256(), cmd.get("tso", 0)
            s = vnet if mss else plain
            for i in range(cmd["count"]):
                body = rng.randbytes(cmd["size"])
                if mss:
                    frame = tcp_frame(dst, src, body, i * cmd["size"])
                    # virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset
                    head = struct.pack("<BBHHHH", 1, 1, 54, mss, 34, 16)
                    h.update(body)
                else:
                    frame, head = dst + src + b"\x88\xb5" + body, b""
                    h.update(frame)
                while True:
                    try:
                        s.send(head + frame)
                        break
                    except BlockingIOError:
                        select.select([], [s], [], 1)
            print(json.dumps({"sent": cmd["count"], "sha256": h.hexdigest()}), flush=True)
        elif op == "drain":
            h, n, total = hashlib.sha256(), 0, 0
            for _, frame in received(vnet if cmd.get("vnet") else plain, cmd, 10):
                if cmd["ethertype"] == 0x0800:
                    h.update(frame[54:])  # TCP payload (no options)
                    total += len(frame) - 54
                else:
                    h.update(frame)
                    total += len(frame)
                n += 1
            print(json.dumps({"frames": n, "sha256": h.hexdigest(), "bytes": total}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
