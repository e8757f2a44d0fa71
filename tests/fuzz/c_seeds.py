"""Seed inputs for the C fuzz targets (tests/fuzz/c): well-formed rings and requests that
the fuzzer then bends. Run `python tests/fuzz/c_seeds.py` to rewrite tests/fuzz/corpus/fuzz_*;
the files are committed, so this only runs when the input format changes.

Every input: u16 L, L control bytes (set-up and ops, see each target's source), guest RAM.
The rings of queue size 8 sit low in RAM so the seeds stay small: descriptors at 0x000,
avail at 0x100, used at 0x200; buffers from 0x400 on.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEXT, WRITE, INDIRECT = 1, 2, 4
EVENT_IDX, INDIRECT_F = 1, 2  # enum avmm_vq_flags
DESC, AVAIL, USED = 0x000, 0x100, 0x200


class Ram:
    def __init__(self, size: int = 0x1000):
        self.b = bytearray(size)

    def put(self, addr: int, data: bytes) -> None:
        if addr + len(data) > len(self.b):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr : addr + len(data)] = data

    def desc(self, table: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, table: int, first: int, bufs: list[tuple[int, int, bool]]) -> None:
        """Descriptors first.. of one chain: (addr, len, device-writable)."""
        for k, (addr, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(table, first + k, addr, length, (WRITE if w else 0) | (0 if last else NEXT), first + k + 1)

    def avail(self, heads: list[int], qsize: int = 8, used_event: int = 0) -> None:
        self.put(AVAIL, struct.pack("<HH", 0, len(heads)))
        for k, h in enumerate(heads):
            self.put(AVAIL + 4 + 2 * k, struct.pack("<H", h))
        self.put(AVAIL + 4 + 2 * qsize, struct.pack("<H", used_event))


def pack(ctl: bytes, ram: Ram) -> bytes:
    return struct.pack("<H", len(ctl)) + ctl + bytes(ram.b)


def rings(flags: int, log2: int = 3) -> bytes:
    """A queue set-up's bytes: log2(size), flags, desc, avail, used."""
    return bytes([log2, flags]) + struct.pack("<HHH", DESC, AVAIL, USED)


def virtq_seeds() -> dict[str, bytes]:
    out = {}
    for flags in (0, EVENT_IDX, INDIRECT_F, EVENT_IDX | INDIRECT_F):
        ram = Ram()
        ram.chain(DESC, 0, [(0x400, 16, False), (0x500, 512, True), (0x700, 1, True)])
        ram.chain(DESC, 3, [(0x800, 64, False)])
        heads = [0, 3]
        if flags & INDIRECT_F:
            ram.desc(DESC, 4, 0x900, 48, INDIRECT)
            ram.chain(0x900, 0, [(0xA00, 16, False), (0x20000, 4096, True), (0xB00, 1, True)])
            heads.append(4)
        ram.avail(heads, used_event=1)
        # size 8, flags, rings, iov capacity 16, isr; ops: pop pop pop push push publish
        # enable_notify disable_notify pending, a driver write of avail idx, pop, unpop 1
        ctl = rings(flags) + struct.pack("<H", 16) + b"\x01"
        ctl += bytes([0, 0, 0, 0, 0, 0]) + bytes([1]) + struct.pack("<I", 529) + bytes([1]) + struct.pack("<I", 0)
        ctl += bytes([2, 3, 5, 8, 4, 7]) + struct.pack("<HH", AVAIL + 2, 4) + bytes([0, 6, 1, 0, 10, 1, 2, 9])
        out[f"seed-flags{flags}"] = pack(ctl, ram)
    return out


def blk_seeds() -> dict[str, bytes]:
    IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
    out = {}
    reqs = {
        "read": [(IN, 2, [(0x600, 1024, True)])],
        "write": [(OUT, 4, [(0x600, 512, False)])],
        "flush": [(FLUSH, 0, [])],
        "getid": [(GET_ID, 0, [(0x600, 20, True)])],
        "discard": [(DISCARD, 0, [(0x600, 16, False)])],
        "wzeroes": [(WRITE_ZEROES, 0, [(0x600, 16, False)])],
        "unknown": [(99, 0, [])],
        "mixed": [(OUT, 8, [(0x600, 512, False)]), (IN, 8, [(0x800, 512, True)]), (FLUSH, 0, [])],
    }
    for name, rs in reqs.items():
        for flags in (0, EVENT_IDX | INDIRECT_F):
            ram = Ram()
            heads, d = [], 0
            for k, (typ, sector, data) in enumerate(rs):
                hdr = 0x400 + 0x20 * k
                ram.put(hdr, struct.pack("<IIQ", typ, 0, sector))
                ram.put(0x600, struct.pack("<QII", 3, 2, 0))  # a discard/write-zeroes segment
                bufs = [(hdr, 16, False), *data, (0x580 + k, 1, True)]
                ram.chain(DESC, d, bufs)
                heads.append(d)
                d += len(bufs)
            ram.avail(heads)
            # mode, seg_max, max discard/wz sectors, engine entries; setup q0, kick, complete, kick
            ctl = bytes([0x00, 126, 64, 64, 32]) + bytes([0]) + rings(flags) + bytes([1, 3, 1, 3, 8])
            out[f"seed-{name}-{flags}"] = pack(ctl, ram)
            # the same read-only, on a direct (aligned) disk, with a reset in flight
            ctl = bytes([0x05, 126, 64, 64, 4]) + bytes([0]) + rings(flags) + bytes([1, 6, 3, 0]) + rings(flags)[:]
            ctl += bytes([1, 3])
            out[f"seed-{name}-{flags}-ro"] = pack(ctl, ram)
    return out


RXD, RXA, RXU = 0x1000, 0x1100, 0x1200  # virtio-net's queue 0 (RX) in the net seeds


def net_rx_buffers(ram: Ram, lengths: list[int]) -> None:
    """RX buffers at 0x20000 (one device-writable descriptor each, 0x400 apart), all offered."""
    for k, length in enumerate(lengths):
        ram.desc(RXD, k, 0x20000 + 0x400 * k, length, WRITE)
    ram.put(RXA, struct.pack("<HH", 0, len(lengths)) + struct.pack(f"<{len(lengths)}H", *range(len(lengths))))


def net_seeds() -> dict[str, bytes]:
    out = {}
    for mrg in (0, 1):
        for flags in (0, EVENT_IDX):
            ram = Ram(0x1400)
            # TX (queue 1) at DESC/AVAIL/USED: a header then a 60-byte frame, twice
            ram.put(0x400, bytes(12))
            ram.chain(DESC, 0, [(0x400, 12, False), (0x440, 60, False)])
            ram.chain(DESC, 2, [(0x400, 72, False)])
            ram.avail([0, 2])
            # RX: four 1526-byte-ish buffers (small ones, so mergeable buffers are used)
            net_rx_buffers(ram, [0x400 if mrg else 1526] + [0x400] * 3)
            ctl = bytes([mrg]) + struct.pack("<H", 1514)
            ctl += bytes([0x1C]) + rings(flags)  # op 0 (0x1C % 7) on queue 1 (0x1C >> 4 & 1): TX
            ctl += bytes([0x00, 3, flags]) + struct.pack("<HHH", RXD, RXA, RXU)  # op 0 on queue 0 (RX)
            ctl += bytes([3, 4])  # tx, drain
            ctl += bytes([1]) + struct.pack("<HH", 1400, 7) + bytes([2])  # a frame, rx
            ctl += bytes([1]) + struct.pack("<HH", 60, 1) + bytes([1]) + struct.pack("<HH", 3000, 2) + bytes([2, 6, 0])
            out[f"seed-mrg{mrg}-flags{flags}"] = pack(ctl, ram)
    return out


def net_stream_seeds() -> dict[str, bytes]:
    """The passt path: the same rings as net_seeds; the peer sends framed and cut bytes."""
    out = {}
    for mrg in (0, 1):
        for flags in (0, EVENT_IDX):
            ram = Ram(0x1400)
            ram.put(0x400, bytes(12))
            ram.chain(DESC, 0, [(0x400, 12, False), (0x440, 60, False)])  # a header, a 60-byte frame
            ram.chain(DESC, 2, [(0x400, 20, False)])  # an 8-byte frame: passt would refuse it, dropped
            ram.avail([0, 2])
            net_rx_buffers(ram, [0x400] * 4)
            ctl = bytes([mrg])
            ctl += bytes([0x10]) + rings(flags)  # op 0 on queue 1: TX
            ctl += bytes([0x00, 3, flags]) + struct.pack("<HHH", RXD, RXA, RXU)  # op 0 on queue 0: RX
            ctl += bytes([4, 5])  # tx, the peer reads
            ctl += bytes([2]) + struct.pack("<H", 60) + bytes([3])  # a framed 60-byte frame, rx
            ctl += bytes([1, 5]) + struct.pack(">I", 100) + b"ab"  # a length and a cut frame
            ctl += bytes([3, 7, 0])  # rx (it waits), a reset that carries the bytes over
            ctl += bytes([1, 63]) + bytes(64) + bytes([3, 7, 2, 4])  # the rest, rx, the peer goes, tx
            out[f"seed-mrg{mrg}-flags{flags}"] = pack(ctl, ram)
    return out


# fuzz_exit (c/fuzz_exit.c): ops, not RAM. <linux/kvm.h> exit reasons and the union's layouts.
KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_SYSTEM_EVENT = 2, 6, 24
EXIT_PICK = {"io": 0, "mmio": 1, "internal": 2, "fail_entry": 3, "system_event": 4, "debug": 5, "shutdown": 6}
PIO_PAGE = 4096  # KVM_PIO_PAGE_OFFSET * page size: where KVM puts port I/O data


def exit_seeds() -> dict[str, bytes]:
    def arm(slot: int, thr: int, lsr: int, flags: int = 3, shadow: int = 0x60) -> bytes:
        return bytes([slot << 2 | 0]) + struct.pack("<HHBB", thr, lsr, flags, shadow)

    def drain(slot: int, cap: int) -> bytes:
        return bytes([slot << 2 | 1]) + struct.pack("<H", cap - 1)

    def poke(at: int, data: bytes) -> bytes:
        return bytes([2]) + struct.pack("<H", at) + data.ljust(64, b"\0")

    def io(out: bool, size: int, port: int, count: int, offset: int = PIO_PAGE) -> bytes:
        return bytes([3, EXIT_PICK["io"]]) + struct.pack("<BBHIQ", int(out), size, port, count, offset).ljust(32, b"\0")

    def mmio(addr: int, data: bytes, length: int, write: bool) -> bytes:
        return bytes([3, EXIT_PICK["mmio"]]) + struct.pack("<Q8sIB", addr, data, length, int(write)).ljust(32, b"\0")

    def other(kind: str, words: bytes) -> bytes:
        return bytes([3, EXIT_PICK[kind]]) + words.ljust(32, b"\0")

    com1 = arm(0, 0x3F8, 0x3FD)
    return {
        "seed-uart-fast-path": com1 + poke(PIO_PAGE, b"hello\n") + io(True, 1, 0x3F8, 1) + io(False, 1, 0x3FD, 1)
        + io(True, 1, 0x3F8, 6) + drain(0, 64),
        "seed-uart-string-io": com1 + arm(1, 0x2F8, 0x2FD, 1) + poke(PIO_PAGE, b"x" * 60) + io(True, 1, 0x2F8, 60)
        + io(True, 1, 0x3F8, 4000) + drain(1, 16) + drain(0, 4096),
        "seed-pio-to-the-loop": io(True, 2, 0xCF8, 1) + io(False, 4, 0xCFC, 1) + io(True, 1, 0x70, 3)
        + io(False, 4, 0x510, 1024),
        "seed-mmio": mmio(0xFEBF_0000, b"\x01\x02\x03\x04\0\0\0\0", 4, True) + mmio(0xFEE0_0000, bytes(8), 8, False)
        + mmio(0xE000_0000, bytes(8), 1, True),
        "seed-stops": other("internal", struct.pack("<II", 1, 3) + struct.pack("<QQQ", 1, 0x90C3, 0))
        + other("fail_entry", struct.pack("<QI", 0x80000021, 0)) + other("system_event", struct.pack("<I", 2))
        + other("debug", struct.pack("<IIQQQ", 3, 0, 0x100000, 0xFFFF0FF0, 0x400)) + other("shutdown", b"")
        + bytes([0x83, 0]),  # KVM_RUN failed
    }


def main() -> None:
    for target, seeds in (("fuzz_virtq", virtq_seeds()), ("fuzz_blk", blk_seeds()), ("fuzz_net", net_seeds()),
                          ("fuzz_net_stream", net_stream_seeds()),
                          ("fuzz_exit", exit_seeds())):
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {d}", file=sys.stderr)


if __name__ == "__main__":
    main()
