"""Seed inputs for the Python fuzz targets (targets.py), written to tests/fuzz/corpus/TARGET.
Run `.venv/bin/python tests/fuzz/py_seeds.py` after `tools/setup` (it reads the test guests
in build/guests); the files are committed. Device targets start from a few register
sequences a driver would write; the image targets from real test kernels; the control
target from every command.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_boot_linux import bzimage  # noqa: E402
from test_boot_pvh import build_elf  # noqa: E402
from test_unpack import PACK, vmlinux  # noqa: E402

from asyncvmm.boot.linux import Compression  # noqa: E402


def w(port_off: int, value: int, size: int = 1) -> bytes:
    """A write op of _port_ops: op byte 0x60, size index, offset, u32 value."""
    return bytes([0x60, {1: 0, 2: 1, 4: 2}[size], port_off]) + struct.pack("<I", value)


def r(port_off: int, size: int = 1) -> bytes:
    return bytes([0x00, {1: 0, 2: 1, 4: 2}[size], port_off])


def seeds() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    # UART: 8N1 at 115200 with FIFOs and every interrupt, then traffic, loopback, a break.
    init = w(3, 0x80) + w(0, 1) + w(1, 0) + w(3, 0x03) + w(2, 0xC7) + w(1, 0x0F) + w(4, 0x0B)
    out["uart"] = {
        "init": init + w(0, 0x41) + r(5) + r(2) + bytes([0xE0, 5]) + b"hello" + r(0) + r(5) + r(6),
        "loop": init + w(4, 0x1B) + w(0, 0x55) + r(0) + r(5) + bytes([0xE1]) + r(5) + r(0) + r(2),
    }
    # RTC: read the time, set it with SET, binary mode, the alarm, then the CMOS memory bytes.
    rtc = b"\x00" * 8
    for reg in (0x0A, 0x0B, 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x34, 0x35, 0x5B):
        rtc += w(0, reg) + r(1)
    rtc += w(0, 0x0B) + w(1, 0x86) + w(0, 0x00) + w(1, 59) + w(0, 0x0B) + w(1, 0x06) + bytes([0xE1]) + b"\x10\0\0\0"
    out["rtc"] = {"time": rtc}
    # i8042: read the command byte, write it, the output port, and the pulse reset.
    out["i8042"] = {"cmds": bytes([0, 0x20, 3, 0, 0x60, 1, 0x45, 0, 0xD0, 3, 0, 0xD1, 1, 0xFE, 0, 0xFE])}
    # PIT: channel 0 mode 2 lo/hi, channel 2 mode 0 with the gate on port 0x61, latch, read-back.
    pit = w(3, 0x34) + w(0, 0x9C) + w(0, 0x2E) + bytes([0xE0]) + b"\x00\x40\x42\x0f\x00"
    pit += w(3, 0xB0) + w(2, 0xFF) + w(2, 0xFF) + w(3, 0x00) + r(0) + r(0) + w(3, 0xE2) + r(0) + r(2)
    pit += bytes([0xE1, 0, 0xE2, 2, 0xE3, 1])
    out["pit"] = {"modes": pit + w(0, 0x01, 1), "speaker": pit + b"\x60\x00\x00\x03\x00\x00\x00" + r(0)}
    # ACPI PM: enable the power button event and SCI, press it, clear status, then S5.
    pm = w(2, 0x0100, 2) + w(4, 0x0001, 2) + bytes([0xE0]) + r(0, 2) + w(0, 0x0100, 2) + r(0, 2)
    # then the PM timer (read, a write it ignores) and ICH9's SMI_EN (SeaBIOS's SMM probe).
    timer = r(8, 4) + w(8, 0x0E) + r(10, 2) + r(0x30, 4) + w(0x30, 0x21, 4) + r(0x30, 4)
    out["acpi_pm"] = {"s5": pm + w(4, 0x3C01, 2), "timer": pm + timer}
    # PCI: the driver's probe through 0xCF8 then ECAM: IDs, BAR sizing, capabilities.
    cfg = b"\x00"
    for slot in (0, 1):
        for reg in (0x00, 0x04, 0x08, 0x10, 0x14, 0x2C, 0x34):
            cfg += bytes([0x03, slot, 0, reg, 0, 2])
    cfg += bytes([0x01, 1, 0, 0x10, 0, 2]) + b"\xff\xff\xff\xff" + bytes([0x03, 1, 0, 0x10, 0, 2])
    cfg += bytes([0x01, 1, 0, 0x04, 0, 1]) + struct.pack("<I", 6)
    out["pci_config"] = {"probe": cfg, "msi": b"\x01" + cfg[1:]}
    # MSI-X: enable, program vector 0 and 1, unmask, read the PBA; the same with MSI.
    mx = b"\x00" + bytes([0x00]) + struct.pack("<H", 6)  # command: memory + master
    mx += bytes([0x04]) + struct.pack("<H", 0x8000)  # MSI-X enable
    for off, val in ((0x0, 0xFEE00000), (0x8, 0x41), (0xC, 0), (0x10, 0xFEE00000), (0x18, 0x42), (0x1C, 0)):
        mx += bytes([0x01]) + struct.pack("<H", off) + bytes([1, 1, 0]) + struct.pack("<II", val, 0)
    mx += bytes([0x02, 0, 1, 1, 1])
    out["msix"] = {"enable": mx, "msi": b"\x01" + mx[1:]}
    # virtio-pci: reset, ACK, DRIVER, features, FEATURES_OK, queue 0 set-up, DRIVER_OK.
    def common(off: int, size: int, value: int) -> bytes:
        sz = {1: (1, 0), 2: (1, 1), 4: (1, 2), 8: (0, 0)}[size]
        return bytes([0x01, off, sz[0] or 8, sz[1], 0]) + struct.pack("<II", value & 0xFFFFFFFF, value >> 32)

    v = b"\x00" + b"\x00"  # MSI-X machine, memory decode on
    v += common(0x14, 1, 0) + common(0x14, 1, 1) + common(0x14, 1, 3)
    v += common(0x08, 4, 1) + common(0x0C, 4, 1 << 0) + common(0x08, 4, 0) + common(0x0C, 4, 1 << 5)
    v += common(0x14, 1, 0x0B) + common(0x16, 2, 0) + common(0x18, 2, 8)
    v += common(0x20, 8, 0x10000) + common(0x28, 8, 0x11000) + common(0x30, 8, 0x12000)
    v += common(0x1A, 2, 1) + common(0x1C, 2, 1) + common(0x14, 1, 0x0F) + bytes([0x05, 0, 1, 1, 1])
    out["virtio_pci"] = {"bringup": v}
    # Boot images: the test guests (PVH ELFs), the synthetic bzImage, and bzImages whose
    # payload is a small vmlinux in each format the unpacker knows (with --decompress vmm).
    g = ROOT / "build" / "guests"
    out["boot"] = {
        "hello-pvh": b"\x00" + (g / "hello-pvh.elf").read_bytes(),
        "hello": b"\x01" + (g / "hello.elf").read_bytes(),
        "bzimage64": b"\x11" + (g / "bzimage64.bin").read_bytes(),
        "vmlinux": b"\x00" + build_elf(notes=(("Linux", 0x100, b"\0" * 4),)),
    }
    small = vmlinux(0x400)
    for kind, pack in PACK.items():
        out["boot"][f"bz-{kind.value}"] = b"\x02" + bzimage(payload=pack(small), pm_size=0x1000)
    out["bzimage"] = {"bzimage64": (g / "bzimage64.bin").read_bytes()[:2048], "gz": bzimage()[:4096]}
    kinds = [c for c in Compression if c is not Compression.NONE]
    out["unpack"] = {kind.value: bytes([kinds.index(kind)]) + PACK[kind](small) for kind in kinds if kind in PACK}
    out["control"] = {
        c: (json.dumps(req) + "\n").encode()
        for c, req in {
            "state": {"cmd": "state"},
            "regs": {"cmd": "regs", "vcpu": 1},
            "stats": {"cmd": "stats"},
            "pause": {"cmd": "pause"},
            "resume": {"cmd": "resume"},
            "sysrq": {"cmd": "sysrq", "key": "h"},
            "destroy": {"cmd": "destroy", "timeout": 2.5, "force": False},
        }.items()
    }
    out["net_ctrl"] = net_ctrl_seeds()
    out["fw_cfg"] = fw_cfg_seeds()
    out["snapshot"] = snapshot_seeds()
    out["pflash"] = pflash_seeds()
    return out


# pflash (targets.fuzz_pflash): u8 writable; then ops: u8 (bit 0: write), u8 size (0: a
# byte), u16 offset, and a write's u32 value. OVMF's sequences (QemuFlash.c) on byte 0x10.
def _pf_write(offset: int, value: int) -> bytes:
    return bytes([1, 0]) + struct.pack("<HI", offset, value)


def _pf_read(offset: int, size: int = 0) -> bytes:
    return bytes([0, size]) + struct.pack("<H", offset)


def pflash_seeds() -> dict[str, bytes]:
    detect = _pf_read(0x10) + _pf_write(0x10, 0x50) + _pf_read(0x10) + _pf_write(0x10, 0x70) + _pf_read(0x10)
    detect += _pf_write(0x10, 0x10) + _pf_write(0x10, 0x10) + _pf_read(0x10) + _pf_write(0x10, 0xFF)
    program = b"".join(_pf_write(0x2000 + i, 0x10) + _pf_write(0x2000 + i, b) for i, b in enumerate(b"VARS"))
    program += _pf_write(0x2000, 0xFF) + _pf_read(0x2000, 2)
    erase = _pf_write(0x1000, 0x20) + _pf_write(0x1000, 0xD0) + _pf_read(0x1000) + _pf_write(0x1000, 0xFF)
    query = _pf_write(0, 0x98) + _pf_read(0x10, 2) + _pf_write(0, 0x90) + _pf_read(0) + _pf_write(0, 0xE8)
    query += _pf_read(0) + _pf_write(0, 0x50) + _pf_read(0x2C)
    return {"detect": b"\x01" + detect, "program": b"\x01" + program, "erase": b"\x01" + erase,
            "read-only": b"\x00" + program + erase, "query": b"\x01" + query}


# fw_cfg (targets.fuzz_fw_cfg): ops 0 select, 1 data read, 2/3 DMA address high/low, 4 a
# descriptor placed at an address then its address written; fw_cfg.rst's item keys.
FW_SIGNATURE, FW_ID, FW_FILE_DIR, FW_FILE_FIRST = 0x00, 0x01, 0x19, 0x20
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 1, 2, 4, 8, 16


def _fw_gpa(region: int, off: int) -> bytes:
    return bytes([region]) + struct.pack("<H", off)


def _fw_far(gpa: int) -> bytes:
    return b"\xf0" + struct.pack("<II", gpa >> 32, gpa & 0xFFFFFFFF)


def _fw_dma(at: bytes, key: int, control: int, length: int, buffer: bytes) -> bytes:
    size = bytes([0]) + bytes([length]) if length < 0x100 else b"\xff" + struct.pack("<I", length)
    return bytes([4]) + at + struct.pack("<H", key) + bytes([control]) + size + buffer


def fw_cfg_seeds() -> dict[str, bytes]:
    legacy = bytes([0]) + struct.pack("<H", FW_SIGNATURE) + bytes([1, 0]) * 4
    legacy += bytes([0]) + struct.pack("<H", FW_ID) + bytes([1, 2]) + bytes([6])
    files = _fw_dma(_fw_gpa(0, 0x100), FW_FILE_DIR, DMA_SELECT | DMA_READ, 4, _fw_gpa(0, 0x1000))
    files += _fw_dma(_fw_gpa(0, 0x100), 0, DMA_READ, 64, _fw_gpa(0, 0x1004))
    files += _fw_dma(_fw_gpa(1, 0x200), FW_FILE_FIRST, DMA_SELECT | DMA_SKIP, 8, _fw_gpa(0, 0))
    files += _fw_dma(_fw_gpa(1, 0x200), 0, DMA_READ, 32, _fw_gpa(1, 0x300))
    bad = _fw_dma(_fw_gpa(0, 0x100), FW_FILE_DIR, DMA_SELECT | DMA_WRITE, 4, _fw_gpa(0, 0x1000))
    bad += _fw_dma(_fw_gpa(0, 0x100), FW_ID, DMA_SELECT | DMA_READ, 0x10, _fw_gpa(0, 0x7FF8))  # into the hole
    bad += _fw_dma(_fw_gpa(0, 0x100), FW_ID, DMA_READ, 0xFFFFFFFF, _fw_gpa(1, 0))  # longer than RAM
    bad += _fw_dma(_fw_far(0xFFFFFFFF_FFFFFFF8), FW_ID, DMA_READ, 4, _fw_gpa(0, 0))  # descriptor wraps
    bad += _fw_dma(_fw_gpa(0, 0x7FF8), FW_ID, DMA_READ, 4, _fw_gpa(0, 0))  # descriptor straddles the hole
    overlap = _fw_dma(_fw_gpa(0, 0x400), FW_FILE_DIR, DMA_SELECT | DMA_READ, 16, _fw_gpa(0, 0x400))
    overlap += _fw_dma(_fw_gpa(1, 0x400), FW_SIGNATURE, DMA_SELECT | DMA_READ, 8, _fw_gpa(1, 0x404))
    return {"legacy": legacy, "files": files, "bad": bad, "overlap": overlap,
            "halves": bytes([2]) + struct.pack("<I", 0) + bytes([3]) + struct.pack("<I", 0x100) + bytes([7])}


def snapshot_seeds() -> dict[str, bytes]:
    """Files the project's writer makes (snapshot/file.py write, over one page of RAM), then
    damaged copies. The first byte is the target's: bit 0 makes the CRCs right."""
    import asyncio
    import mmap
    import tempfile

    from asyncvmm._native import ffi

    from asyncvmm.snapshot import file as snapfile

    def written(state: dict, page: bytes, diff=None) -> bytes:
        m = mmap.mmap(-1, snapfile.PAGE)
        m[: len(page)] = page
        hva = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/snap"
            view = memoryview(m)
            asyncio.run(snapfile.write(path, state, [(view, hva)], diff))
            view.release()
            data = Path(path).read_bytes()
        m.close()
        return data

    state = {"config": {"memory": snapfile.PAGE, "vcpus": 1}, "devices": {}}
    full = written(state, b"\x90" * 64)
    diff = written({**state, "base": {"path": "snap", "state_crc": 0}}, b"\x90" * 64, [[(0, 1)]])
    zero = written(state, b"")
    state_at = snapfile.PAGE
    return {
        "full": b"\x00" + full,
        "full-fix": b"\x01" + full,
        "zero-page": b"\x00" + zero,
        "diff-of-itself": b"\x01" + diff,
        "header-only": b"\x00" + full[:state_at],
        "bad-json": b"\x01" + full[:state_at] + b"{\"config\":[" + full[state_at + 11 :],
        "empty": b"",
    }


# virtio-net's control queue (targets.fuzz_net_ctrl): <linux/virtio_net.h> classes and commands.
CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ, CTRL_GUEST_OFFLOADS = range(6)
NEXT, WRITE, INDIRECT = 1, 2, 4
CTRL_QSIZE, CTRL_DATA = 8, 0x4000  # as targets.py


def _ctrl_input(commands: list[bytes], ack: bool = True, indirect: bool = False) -> bytes:
    """Every feature; one chain per command (out: class, command, data; in: the ack byte)."""
    desc = bytearray(16 * CTRL_QSIZE)
    data = bytearray(0x100 * len(commands) + 0x100)
    for i, cmd in enumerate(commands):
        out_addr, ack_addr = CTRL_DATA + 0x100 * i, CTRL_DATA + 0x100 * i + 0xC0
        data[0x100 * i : 0x100 * i + len(cmd)] = cmd
        if indirect:  # head i*2 points at a table of two in the data area
            table = CTRL_DATA + 0x100 * len(commands)
            data[0x100 * len(commands) : 0x100 * len(commands) + 32] = (
                struct.pack("<QIHH", out_addr, len(cmd), NEXT, 1) + struct.pack("<QIHH", ack_addr, 1, WRITE, 0))
            desc[32 * i : 32 * i + 16] = struct.pack("<QIHH", table, 32, INDIRECT, 0)
            continue
        desc[32 * i : 32 * i + 16] = struct.pack("<QIHH", out_addr, len(cmd), NEXT if ack else 0, 2 * i + 1)
        desc[32 * i + 16 : 32 * i + 32] = struct.pack("<QIHH", ack_addr, 1, WRITE, 0)
    heads = [2 * i for i in range(len(commands))] + [0] * (CTRL_QSIZE - len(commands))
    avail = struct.pack("<HH", 0, len(commands)) + struct.pack(f"<{CTRL_QSIZE}H", *heads) + struct.pack("<H", 0)
    return b"\xff" * 8 + bytes(desc) + avail + bytes(data)


def net_ctrl_seeds() -> dict[str, bytes]:
    mac = bytes.fromhex("525400abcdef")
    return {
        "rx-and-mac": _ctrl_input([
            bytes([CTRL_RX, 0, 1]), bytes([CTRL_RX, 1, 0]), bytes([CTRL_MAC, 1]) + mac,
            bytes([CTRL_MAC, 0]) + struct.pack("<I", 1) + mac + struct.pack("<I", 2) + mac + mac]),
        "vlan-mq-offloads": _ctrl_input([
            bytes([CTRL_VLAN, 0]) + struct.pack("<H", 100), bytes([CTRL_VLAN, 1]) + struct.pack("<H", 100),
            bytes([CTRL_MQ, 0]) + struct.pack("<H", 2), bytes([CTRL_GUEST_OFFLOADS, 0]) + struct.pack("<Q", 1 << 1 | 1 << 7)]),
        "announce-and-bad": _ctrl_input([bytes([CTRL_ANNOUNCE, 0]), bytes([9, 9, 9]), bytes([CTRL_MQ, 0, 0, 0])]),
        "no-ack-buffer": _ctrl_input([bytes([CTRL_RX, 0, 1])], ack=False),
        "indirect": _ctrl_input([bytes([CTRL_MAC, 1]) + mac], indirect=True),
    }


def main() -> None:
    for target, files in seeds().items():
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
