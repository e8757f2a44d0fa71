"""The Python fuzz targets: what a guest or a file can feed the VMM's Python code.

Each target takes the fuzzer's bytes, turns them into a sequence of operations (a guest's
port and MMIO accesses, an image file, a control request) and asserts the VMM's
invariants: no exception but the documented ones (BootError for an image, an error answer
for a request: a guest's access never raises), every read fits its access size, a
device's interrupt line is what its state says. tools/fuzz runs them under atheris
(coverage-guided); tests/fuzz/test_fuzz.py runs each briefly.

The device models are built as the machine builds them (machine.py _build_devices), on a
Bus of their own, minus KVM: the UART, i8042 and RTC through ByteRegisters at their
ports, the PCI root through 0xCF8/0xCFC and ECAM, virtio-pci's BAR on the MMIO bus.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import struct
import tempfile
import zlib
from collections.abc import Callable

from asyncvmm import platform
from asyncvmm.boot import linux, loader, unpack
from asyncvmm.bus import Bus, ByteRegisters
from asyncvmm.control import protocol
from asyncvmm.control.server import ControlServer
from asyncvmm.devices.legacy import fw_cfg, pflash
from asyncvmm.devices.legacy.acpi_pm import AcpiPm
from asyncvmm.devices.legacy.i8042 import I8042
from asyncvmm.devices.legacy.i8254 import I8254
from asyncvmm.devices.legacy.rtc import Rtc
from asyncvmm.devices.legacy.uart16550 import Uart16550
from asyncvmm.devices.pci.device import PciBuses
from asyncvmm.devices.pci.root import PciRoot, install
from asyncvmm.devices.virtio.device import DeviceError, QueueConfig, VirtioDevice
from asyncvmm.devices.virtio.net.device import CTRL_IOV_MAX, GUEST_OFFLOAD_TUN, VirtioNet
from asyncvmm.devices.virtio.net.tap import NetOptions
from asyncvmm.devices.virtio.queue import RingBroken, Virtqueue
from asyncvmm.devices.virtio.spec import Feature, bits
from asyncvmm.devices.virtio.transport_pci import NotifyBinder, VirtioPciDevice
from asyncvmm.errors import BootError, GuestMemoryError
from asyncvmm.gdb import packets
from asyncvmm.irq import IrqRouter
from asyncvmm.loader import bls, grub, grub_script, partitions
from asyncvmm.loader.errors import LoaderError
from asyncvmm.snapshot import file as snapfile
from asyncvmm.vstate.memory import GuestMemory

SIZES = (1, 2, 4)


class Input:
    """The fuzzer's bytes as a stream of small numbers; zeros once it runs out."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() | self.u8() << 8

    def u32(self) -> int:
        return self.u16() | self.u16() << 16

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def size(self) -> int:
        return SIZES[self.u8() % 3]


def _check_read(value: int, size: int) -> None:
    assert isinstance(value, int) and 0 <= value < 1 << (8 * size), (value, size)


def _port_ops(bus: Bus, inp: Input, base: int, span: int, extra: Callable[[int], None] | None = None,
              max_ops: int = 512) -> None:
    """Reads and writes of 1, 2, 4 bytes at ports base..base+span (a little beyond too)."""
    for _ in range(max_ops):
        if not inp.more():
            return
        op = inp.u8()
        if op < 0x60:
            size = inp.size()
            _check_read(bus.access(base + inp.u8() % (span + 2), size, False), size)
        elif op < 0xE0:
            size = inp.size()
            port = base + inp.u8() % (span + 2)
            bus.access(port, size, True, inp.u32() & ((1 << (8 * size)) - 1))
        elif extra is not None:
            extra(op)


# ---- legacy devices -------------------------------------------------------------------------


def fuzz_uart(data: bytes) -> None:
    """The 16550 at COM1: register accesses, host input, breaks, the C fast path's view."""
    line = [False]
    sent = bytearray()
    uart = Uart16550(lambda level: line.__setitem__(0, level), sent.extend)
    bus = Bus("pio")
    bus.register(platform.COM1_PORT, 8, ByteRegisters(uart), "com1")
    inp = Input(data)

    def extra(op: int) -> None:
        k = op % 5
        if k == 0:
            room = uart.rx_room()
            assert room >= 0
            taken = uart.receive(inp.take(inp.u8() % 40))
            assert 0 <= taken
        elif k == 1:
            uart.send_break()
        elif k == 2:
            uart.tx_batch(inp.take(inp.u8() % 40))
        elif k == 3:
            thr, lsr = uart.fast_path()
            assert isinstance(thr, bool) and (lsr is None or 0 <= lsr < 256)
        else:
            assert 1 <= uart.divisor <= 0xFFFF or uart.divisor == 0

    _port_ops(bus, inp, platform.COM1_PORT, 8, extra)
    assert line[0] == uart.irq_level, "the interrupt line disagrees with the model's state"
    assert all(v >= 0 for v in uart.counters.values())


def fuzz_rtc(data: bytes) -> None:
    """The MC146818 RTC and CMOS at ports 0x70/0x71, its clock moved by the input."""
    now = [1.7e9]
    inp = Input(data)
    rtc = Rtc(clock=lambda: now[0], mem_below_4g=inp.u32() << 8, mem_above_4g=inp.u32() << 12)
    bus = Bus("pio")
    bus.register(platform.RTC_PORT, 2, ByteRegisters(rtc, offset_base=platform.RTC_PORT), "rtc")

    def extra(op: int) -> None:
        # The host's clock moves on, by up to about 9 years (across century and leap days).
        now[0] += inp.u32() * (1 if op & 1 else 67)

    _port_ops(bus, inp, platform.RTC_PORT, 2, extra)
    rtc.now()


def fuzz_i8042(data: bytes) -> None:
    """The i8042 at 0x60/0x64 (reset through the output port or pulse command)."""
    resets = [0]
    kbc = I8042(reset=lambda: resets.__setitem__(0, resets[0] + 1))
    bus = Bus("pio")
    bus.register(platform.I8042_DATA_PORT, 1, ByteRegisters(kbc, offset_base=platform.I8042_DATA_PORT), "i8042")
    bus.register(platform.I8042_CMD_PORT, 1, ByteRegisters(kbc, offset_base=platform.I8042_CMD_PORT), "i8042")
    inp = Input(data)
    for _ in range(512):
        if not inp.more():
            break
        op = inp.u8()
        port = platform.I8042_DATA_PORT if op & 1 else platform.I8042_CMD_PORT
        if op & 2:
            _check_read(bus.access(port, 1, False), 1)
        else:
            bus.access(port, 1, True, inp.u8())
    assert resets[0] == kbc.resets


def fuzz_pit(data: bytes) -> None:
    """The i8254 PIT at 0x40-0x43 and port 0x61, its clock moved by the input."""
    now = [10**12]
    changed = [0]
    pit = I8254(clock=lambda: now[0], changed=lambda: changed.__setitem__(0, changed[0] + 1))
    bus = Bus("pio")
    bus.register(platform.PIT_PORT, 4, ByteRegisters(pit, offset_base=platform.PIT_PORT), "pit")
    bus.register(platform.SPEAKER_PORT, 1, ByteRegisters(pit, offset_base=platform.SPEAKER_PORT), "port61")
    inp = Input(data)

    def extra(op: int) -> None:
        k = op % 4
        ch = inp.u8() % 3
        if k == 0:
            now[0] += inp.u32() * (1 + (op & 0x10) * 1000)
        elif k == 1:
            edge = pit.next_edge(ch)
            assert edge is None or edge >= now[0] - 1, (edge, now[0])
        elif k == 2:
            assert isinstance(pit.output(ch), bool)
        else:
            pit.mode(ch)
            assert 0 <= pit.reload(ch) <= 0x10000

    _port_ops(bus, inp, platform.PIT_PORT, 4, extra)
    _port_ops(bus, inp, platform.SPEAKER_PORT, 1, extra)


def fuzz_acpi_pm(data: bytes) -> None:
    """The ACPI PM block (ports 0x600..): PM1 event/control, the PM timer, SMI_EN."""
    sci = [False]
    stops = {"off": 0}
    pm = AcpiPm(
        sci=lambda level: sci.__setitem__(0, level),
        power_off=lambda: stops.__setitem__("off", stops["off"] + 1),
    )
    bus = Bus("pio")
    bus.register(platform.ACPI_PM_PORT, platform.ACPI_PM_SIZE, pm, "acpi-pm")
    inp = Input(data)

    def extra(op: int) -> None:
        listening = pm.press_power_button()
        assert listening == pm.listening

    _port_ops(bus, inp, platform.ACPI_PM_PORT, platform.ACPI_PM_SIZE, extra)
    assert stops["off"] == pm.counters["power_offs"]
    assert pm.read(0x30, 4) & 0x20  # SMI_EN's APMC_EN: never cleared


# ---- PCI, MSI/MSI-X, virtio-pci ---------------------------------------------------------------


class _Null(VirtioDevice):
    """A virtio device with two queues and 8 bytes of config: the transport's generic part
    (status, features, queues, vectors, reset) is what is fuzzed. `activate` refuses a queue
    as a device would (DeviceError: the transport sets NEEDS_RESET)."""

    device_id = 4  # an entropy source's ID: any ID does
    name = "fuzz-null"
    config_size = 8

    def __init__(self) -> None:
        super().__init__(2, 256)
        self.active: list[QueueConfig] = []

    def features(self) -> int:
        return 1 << 5

    def read_config(self, offset: int, size: int) -> int:
        return (0x0123456789ABCDEF >> (8 * offset)) & ((1 << (8 * size)) - 1) if offset < 8 else 0

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        for q in queues:
            if q.desc & 15:
                raise DeviceError(f"queue {q.index}: descriptor table not aligned")
        self.active = queues

    def reset(self) -> None:
        self.active = []


class _PciMachine:
    """A PCI root with the host bridge and a virtio-pci device in slot 1 (MSI-X, or one MSI
    with `msi`), no KVM: vectors are eventfds nobody binds."""

    mem = None

    def __init__(self, msi: bool):
        if _PciMachine.mem is None:
            _PciMachine.mem = GuestMemory(8 << 20)
        self.router = IrqRouter(None)
        self.buses = PciBuses(Bus("mmio"), Bus("pio"))
        self.root = PciRoot(self.buses)
        install(self.root, self.buses.pio, self.buses.mmio)
        self.dev = VirtioPciDevice(_Null(), self.router, NotifyBinder(None), msix=not msi, msi=msi)
        self.root.add(1, 0, self.dev)
        self.root.assign_bars(platform.pci_mmio64_window(platform.ram_top(_PciMachine.mem.regions)))

    def bar(self) -> int:
        return self.dev.config.bar_address(self.dev.bar)

    def close(self) -> None:
        self.dev.close()
        self.router.close()


def _mmio(m: _PciMachine, inp: Input, addr: int) -> None:
    size = SIZES[inp.u8() % 3] if inp.u8() & 7 else 8
    if inp.u8() & 1:
        _check_read(m.buses.mmio.access(addr, size, False), size)
    else:
        m.buses.mmio.access(addr, size, True, inp.u32() | inp.u32() << 32 & ((1 << (8 * size)) - 1))


def _pci_run(data: bytes, pick: Callable[[_PciMachine, Input, int], None]) -> None:
    inp = Input(data)
    m = _PciMachine(msi=bool(inp.u8() & 1))
    try:
        for _ in range(400):
            if not inp.more():
                break
            pick(m, inp, inp.u8())
        # Whatever the driver did, a reset brings the device back (as a guest reboot does).
        m.dev.config_write(4, 2, 0)
    finally:
        m.close()


def _config_op(m: _PciMachine, inp: Input, op: int) -> None:
    """0xCF8/0xCFC (any device, any offset) or ECAM (slot 0 or 1, any offset)."""
    pio = m.buses.pio
    if op & 1:
        slot, func, reg = inp.u8() & 3, inp.u8() & 1, inp.u8() & 0xFC
        pio.access(platform.PCI_CONFIG_ADDRESS_PORT, 4, True, 0x8000_0000 | slot << 11 | func << 8 | reg)
        off = inp.u8() & 3
        size = SIZES[inp.u8() % 3]
        if op & 2:
            _check_read(pio.access(platform.PCI_CONFIG_ADDRESS_PORT + 4 + off, size, False), size)
        else:
            pio.access(platform.PCI_CONFIG_ADDRESS_PORT + 4 + off, size, True, inp.u32() & ((1 << (8 * size)) - 1))
    else:
        addr = platform.PCI_ECAM_START + ((inp.u8() & 1) << 15) + (inp.u16() & 0xFFF)
        _mmio(m, inp, addr)


def fuzz_pci_config(data: bytes) -> None:
    """PCI configuration space: the header, BARs (sizing, moving), the capability list,
    MSI/MSI-X capabilities, virtio's PCI capabilities and the config-access window."""

    def pick(m: _PciMachine, inp: Input, op: int) -> None:
        if op < 0xF0:
            _config_op(m, inp, op)
        else:  # and touch the BAR wherever it is now
            _mmio(m, inp, m.bar() + (inp.u16() & 0x7FFF))

    _pci_run(data, pick)


def fuzz_msix(data: bytes) -> None:
    """The MSI-X table and PBA (and the MSI capability with one MSI), with the capability's
    enable and mask-all bits and the command register flipping between accesses."""

    def pick(m: _PciMachine, inp: Input, op: int) -> None:
        k = op % 4
        if k == 0:  # the MSI-X / MSI capability's control word, or the command register
            cap = m.dev.msix.cap if m.dev.msix is not None else m.dev.msi.cap
            off = (cap + 2) if op & 4 else 4
            m.dev.config_write(off, 2, inp.u16())
        elif k == 1:  # the table
            _mmio(m, inp, m.bar() + 0x4000 + (inp.u16() & 0x3F))
        elif k == 2:  # the PBA
            _mmio(m, inp, m.bar() + 0x6000 + (inp.u8() & 0xF))
        else:  # the capability bytes themselves
            cap = m.dev.msix.cap if m.dev.msix is not None else m.dev.msi.cap
            size = SIZES[inp.u8() % 3]
            off = cap + inp.u8() % 24
            if op & 8:
                _check_read(m.dev.config_read(off, size), size)
            else:
                m.dev.config_write(off, size, inp.u32() & ((1 << (8 * size)) - 1))

    _pci_run(data, pick)


def fuzz_virtio_pci(data: bytes) -> None:
    """virtio-pci's registers: common configuration (status machine, features, queue
    select/size/addresses/enable/vector), ISR, device config, notify, with the memory
    decode bit on and the driver's status bytes from the input."""

    def pick(m: _PciMachine, inp: Input, op: int) -> None:
        k = op % 8
        if k == 0:
            m.dev.config_write(4, 2, 0x6)  # memory decode and bus mastering on
        elif k <= 4:  # common configuration: the most of the traffic
            _mmio(m, inp, m.bar() + (inp.u8() % 0x40))
        elif k == 5:
            _mmio(m, inp, m.bar() + 0x1000 + (inp.u8() & 3))
        elif k == 6:
            _mmio(m, inp, m.bar() + 0x2000 + (inp.u8() & 0xF))
        else:
            _mmio(m, inp, m.bar() + 0x3000 + (inp.u8() & 0xF))
        status = m.dev.config_read(4, 2)
        _check_read(status, 2)

    _pci_run(data, pick)


# ---- boot images --------------------------------------------------------------------------------

_boot_mem: GuestMemory | None = None


def _memory() -> GuestMemory:
    global _boot_mem
    if _boot_mem is None:
        _boot_mem = GuestMemory(32 << 20)
    return _boot_mem


def fuzz_boot(data: bytes) -> None:
    """The kernel loaders (ELF with a PVH note, vmlinux, bzImage) on any file: a BootError
    or a loaded kernel, nothing else. The first byte picks an initrd size and whether the
    bzImage's payload is unpacked by the VMM (as --decompress vmm)."""
    if not data:
        return
    flags, image = data[0], data[1:]
    initrd = bytes(flags & 0x30) if flags & 1 else None
    try:
        prepared = loader.prepare(image, "vmm" if flags & 2 else "kernel", emulating=True)
        boot = loader.load(_memory(), image, initrd, "console=ttyS0", prepared=prepared)
    except BootError:
        return
    assert boot.state is not None


def fuzz_bzimage(data: bytes) -> None:
    """bzImage header parsing alone (setup_sects, protocol version, payload fields)."""
    try:
        info = linux.bzimage_info(data)
    except BootError:
        return
    start = info.payload_file_offset
    assert 0 <= start
    linux.runtime_range(info)


def fuzz_unpack(data: bytes) -> None:
    """The payload unpacker, each decompressor (the first byte picks it) on small inputs:
    an UnpackError or an ELF, never more output than the trailer announces. The trailer is
    capped at 1 MiB here so a run stays fast (unpack.py bounds it at MAX_VMLINUX)."""
    if len(data) < 2:
        return
    kinds = [c for c in linux.Compression if c is not linux.Compression.NONE]
    kind = kinds[data[0] % len(kinds)]
    payload = bytearray(data[1:])
    if len(payload) >= 4:
        size = struct.unpack_from("<I", payload, len(payload) - 4)[0] % (1 << 20)
        struct.pack_into("<I", payload, len(payload) - 4, size)
    try:
        out = unpack.unpack_payload(bytes(payload), kind)
    except unpack.UnpackError:
        return
    assert out[:4] == b"\x7fELF"


# ---- the control protocol -----------------------------------------------------------------------


class _Vm:
    """What ControlServer asks of a VM, answered at once: the protocol is what is fuzzed.
    Each method checks that the arguments the server decoded are of the kind it promises."""

    def state_info(self) -> dict:
        return {"name": "fuzz", "state": "running"}

    async def regs(self, vcpu: int) -> dict:
        assert isinstance(vcpu, int)
        if not 0 <= vcpu < 2:
            raise ValueError(f"no vCPU {vcpu}")
        return {"rip": 0}

    def stats(self) -> dict:
        return {"vcpus": []}

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    async def sysrq(self, key: str) -> None:
        assert isinstance(key, str)
        if len(key) != 1:
            raise ValueError("sysrq needs one character")

    async def destroy(self, timeout: float, force: bool) -> str:
        assert isinstance(timeout, float) and isinstance(force, bool)
        if math.isnan(timeout) or timeout < 0:
            raise ValueError(f"timeout {timeout}")
        return "hard"


_loop: asyncio.AbstractEventLoop | None = None


def fuzz_control(data: bytes) -> None:
    """A control request line, any bytes: the answer is one JSON object with `ok`, encoded
    within MAX_LINE, and no request reaches the catch-all ("internal error")."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    server = ControlServer.__new__(ControlServer)
    server.vm = _Vm()
    answer = _loop.run_until_complete(server._answer(data[: protocol.MAX_LINE]))
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
    assert "internal error" not in str(answer.get("error", "")), answer
    line = protocol.encode(answer)
    assert json.loads(line) == json.loads(json.dumps(answer)) and line.endswith(b"\n")


# ---- what landed with the gdb stub and the disk boot loader --------------------------------------


def fuzz_gdb_packets(data: bytes) -> None:
    """The gdb remote protocol's framing (a client's byte stream, fed in pieces): events
    only, a payload never kept past the reader's limit, unescape total."""
    reader = packets.PacketReader(limit=256)
    inp = Input(data)
    while inp.more():
        for ev in reader.feed(inp.take(1 + inp.u8() % 64)):
            assert isinstance(ev, packets.Event)
            payload = getattr(ev, "payload", b"") or b""
            assert len(payload) <= 256, len(payload)
            packets.unescape(payload)


def fuzz_boot_menu(data: bytes) -> None:
    """The boot-menu readers on any text: GRUB's script language, grubenv, BLS entries;
    and an MBR/GPT partition table on any disk image. A LoaderError or a result."""
    if not data:
        return
    kind, rest = data[0] % 4, data[1:]
    text = rest.decode("utf-8", "replace")
    try:
        if kind == 0:
            grub_script.parse(text, "fuzz.cfg")
        elif kind == 1:
            grub.parse_grubenv(rest)
        elif kind == 2:
            bls.parse_entry(text)
        else:
            image = rest + bytes(max(0, 34 * 512 - len(rest)))  # room for a GPT's header and entries
            fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)  # read_table preads its file's fd
            os.write(fd, image)
            with os.fdopen(fd, "rb") as f:
                partitions.read_table(f, len(image))
    except LoaderError:
        pass


# ---- virtio-net's control queue ---------------------------------------------------------------

# Its ring, small and low in RAM: queue size 8, descriptors (raw from the input), the avail
# ring (raw), the used ring; the command buffers anywhere from CTRL_DATA on.
CTRL_QSIZE, CTRL_DESC, CTRL_AVAIL, CTRL_USED, CTRL_DATA = 8, 0x1000, 0x1100, 0x1200, 0x4000


class _TapStandIn:
    """What VirtioNet asks of its TAP outside the data path, recorded: the control queue's
    MQ and GUEST_OFFLOADS commands end here (a real TAP would take the same ioctls). The
    data path's fds are a socketpair nobody reads (the control queue never touches them)."""

    def __init__(self, pairs: int):
        self.name = "fuzz-tap"
        self.uso = False
        self.offload = -1
        self._pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fds = [self._pair[0].fileno()] * pairs
        self.offloads: list[int] = []
        self.active: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def set_active_queues(self, n: int) -> None:
        self.active.append(n)

    def close(self) -> None:
        pass


_net_mem: GuestMemory | None = None
_net_tap: _TapStandIn | None = None


def fuzz_net_ctrl(data: bytes) -> None:
    """The control queue as VirtioNet serves it: chains the driver built (any descriptors,
    any avail ring, any command bytes) popped and handed to the device's command handler as
    its QueueWorker does, under any subset of the device's features."""
    global _net_mem, _net_tap
    if _net_mem is None:
        _net_mem, _net_tap = GuestMemory(2 << 20), _TapStandIn(2)
    mem, tap = _net_mem, _net_tap
    assert tap is not None
    inp = Input(data)
    pairs = 2
    dev = VirtioNet(NetOptions("fuzz-tap", queues=pairs), mem, mac=bytes.fromhex("525400123456"), queues=pairs,
                    tap=tap)  # type: ignore[arg-type]
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    tap.offloads.clear()
    tap.active.clear()
    try:
        offered = dev.features() | bits(Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC)
        dev._features = features = offered & (inp.u32() | inp.u32() << 32)  # as activate() records them
        mem.write(CTRL_DESC, inp.take(16 * CTRL_QSIZE).ljust(16 * CTRL_QSIZE, b"\0"))
        mem.write(CTRL_AVAIL, inp.take(6 + 2 * CTRL_QSIZE).ljust(6 + 2 * CTRL_QSIZE, b"\0"))
        mem.write(CTRL_USED, bytes(6 + 8 * CTRL_QSIZE))
        mem.write(CTRL_DATA, inp.rest()[: 0x4000].ljust(0x4000, b"\0"))
        q = QueueConfig(2 * pairs, CTRL_QSIZE, CTRL_DESC, CTRL_AVAIL, CTRL_USED, None, efd)
        vq = Virtqueue.setup(mem, q, features, iov_max=CTRL_IOV_MAX, what="control queue")
        pushed = 0
        try:
            for _ in range(4 * CTRL_QSIZE):
                chain = vq.pop()
                if chain is None:
                    break
                written = 0
                if chain.error is None:
                    written = dev._ctrl_command(chain)
                    assert written in (0, 1) and written <= chain.in_len
                vq.push(chain, written)
                pushed += 1
        except RingBroken:
            pass
        vq.publish()
        if vq.broken is None:
            assert struct.unpack("<H", mem.read(CTRL_USED + 2, 2))[0] == pushed & 0xFFFF
        # What the commands may leave: a MAC, pairs the device has, VLAN IDs, whole MACs in
        # the filters, offloads only of negotiated features.
        assert len(dev.mac) == 6 and 1 <= dev.active_pairs <= pairs
        assert all(0 <= v < 4096 for v in dev.vlans)
        assert all(len(m) == 6 for table in dev.mac_filters for m in table)
        assert all(1 <= n <= pairs for n in tap.active)
        allowed = sum(t for f, t in GUEST_OFFLOAD_TUN.items() if features & bits(f))
        assert all(not flags & ~allowed for flags in tap.offloads), (tap.offloads, allowed)
        assert dev.counters["ctrl_errors"] <= dev.counters["ctrl_commands"] + pushed
    finally:
        dev.close()
        os.close(efd)


# ---- fw_cfg ---------------------------------------------------------------------------------


class _FakeRam:
    """Guest RAM as fw_cfg reaches it: two small regions with a hole between them. Any range
    not inside one region raises GuestMemoryError (as GuestMemory does), counted."""

    REGIONS = ((0x0, 0x8000), (0x10000, 0x8000))  # (gpa, size)

    def __init__(self) -> None:
        self.ram = [bytearray(size) for _, size in self.REGIONS]
        self.outside = 0

    def _find(self, gpa: int, length: int) -> tuple[int, int]:
        for i, (base, size) in enumerate(self.REGIONS):
            if length >= 0 and base <= gpa and gpa + length <= base + size:
                return i, gpa - base
        self.outside += 1
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(length >= 0 and base <= gpa and gpa + length <= base + size for base, size in self.REGIONS)

    def read(self, gpa: int, length: int) -> bytes:
        i, off = self._find(gpa, length)
        return bytes(self.ram[i][off : off + length])

    def write(self, gpa: int, data: bytes) -> None:
        i, off = self._find(gpa, len(data))
        self.ram[i][off : off + len(data)] = data

    def image(self) -> list[bytes]:
        return [bytes(r) for r in self.ram]


def _gpa(inp: Input) -> int:
    """Mostly in or near RAM (descriptors are worth finding), sometimes anywhere in 64 bits."""
    k = inp.u8()
    if k < 0xC0:
        base, size = _FakeRam.REGIONS[k & 1]
        return base + (inp.u16() % (size + 0x40))
    if k < 0xF0:
        return inp.u32()
    return inp.u32() << 32 | inp.u32()


def _be32(value: int) -> int:
    """The value whose little-endian write puts `value` big-endian on the wire (a guest's cpu_to_be32)."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def fuzz_fw_cfg(data: bytes) -> None:
    """fw_cfg as a firmware drives it: selector writes, data reads, the DMA address's two
    big-endian halves (0x514, 0x518), descriptors placed anywhere (outside RAM, straddling
    the hole, overlapping their own buffer), any access at any port. Every DMA is checked
    against what the interface says: ERROR iff the descriptor asks to WRITE or READs into a
    buffer outside RAM; a READ copies the item's next bytes (zeros past its end); nothing
    else in RAM changes; a descriptor outside RAM changes nothing."""
    inp = Input(data)
    mem = _FakeRam()
    fw = fw_cfg.FwCfg(mem)
    fw.add(fw_cfg.Key.NB_CPUS, struct.pack("<H", 2))
    fw.add(fw_cfg.Key.RAM_SIZE, struct.pack("<Q", 0x10000))
    fw.add_file("etc/boot-order", b"/pci@i0cf8/ide@1,1/drive@0/disk@0\n")
    fw.add_file("etc/e820", bytes(range(40)))
    bus = Bus("pio")
    bus.register(fw_cfg.FW_CFG_PORT, fw_cfg.FW_CFG_PORTS, fw.control_port(), "fw-cfg")
    bus.register(fw_cfg.FW_CFG_DMA_PORT, fw_cfg.FW_CFG_DMA_PORTS, fw.dma_port(), "fw-cfg-dma")
    run_dma = fw.dma

    def checked_dma(address: int) -> None:
        before = mem.image()
        key, offset = fw.selected, fw.offset
        outside, errors = mem.outside, fw.counters["dma_errors"]
        run_dma(address)
        after = mem.image()
        if not mem.contains(address, fw_cfg.DMA_ACCESS.size):
            assert after == before, "a descriptor outside RAM changed RAM"
            assert fw.counters["dma_errors"] == errors + 1
            return
        control, length, buffer = fw_cfg.DMA_ACCESS.unpack(_read_flat(before, address, fw_cfg.DMA_ACCESS.size))
        if control & fw_cfg.DmaControl.SELECT:
            key, offset = control >> 16, 0
        bad = bool(control & fw_cfg.DmaControl.WRITE) or bool(
            control & fw_cfg.DmaControl.READ and not mem.contains(buffer, length))
        assert mem.read(address, 4) == struct.pack(">I", fw_cfg.DmaControl.ERROR if bad else 0)
        assert fw.counters["dma_errors"] == errors + bad
        assert mem.outside - outside == 0, "the device touched memory outside RAM after checking the descriptor"
        expect = [bytearray(r) for r in before]
        _write_flat(expect, address, struct.pack(">I", fw_cfg.DmaControl.ERROR if bad else 0))
        if control & fw_cfg.DmaControl.READ and not bad:
            item = fw.items.get(key, b"")
            _write_flat(expect, buffer, item[offset : offset + length].ljust(length, b"\0"))
            _write_flat(expect, address, struct.pack(">I", 0))  # the control word is written last
        assert after == [bytes(r) for r in expect], "RAM changed beyond the control word and the buffer"

    fw.dma = checked_dma  # type: ignore[method-assign]

    for _ in range(256):
        if not inp.more():
            break
        op = inp.u8() % 8
        if op == 0:
            bus.access(fw_cfg.FW_CFG_PORT, 2, True, inp.u16())
        elif op == 1:
            size = inp.size()
            _check_read(bus.access(fw_cfg.FW_CFG_PORT + 1, size, False), size)
        elif op == 2:
            bus.access(fw_cfg.FW_CFG_DMA_PORT, 4, True, _be32(inp.u32()))
        elif op == 3:
            bus.access(fw_cfg.FW_CFG_DMA_PORT + 4, 4, True, _be32(inp.u32()))
        elif op == 4:  # a descriptor written by the guest, then its address (high, low)
            at = _gpa(inp)
            sel = inp.u16()
            desc = fw_cfg.DMA_ACCESS.pack(sel << 16 | inp.u8() & 0x1F, inp.u32() if inp.u8() > 0xF0 else inp.u8(),
                                          _gpa(inp))
            if mem.contains(at, len(desc)):
                mem.write(at, desc)
            bus.access(fw_cfg.FW_CFG_DMA_PORT, 4, True, _be32(at >> 32))
            bus.access(fw_cfg.FW_CFG_DMA_PORT + 4, 4, True, _be32(at & 0xFFFFFFFF))
        elif op == 5:
            size = inp.size()
            port = fw_cfg.FW_CFG_PORT + inp.u8() % 12
            if inp.u8() & 1:
                bus.access(port, size, True, inp.u32() & ((1 << (8 * size)) - 1))
            else:
                _check_read(bus.access(port, size, False), size)
        elif op == 6:
            sig = bytes(bus.access(fw_cfg.FW_CFG_DMA_PORT + i, 1, False) for i in range(8))
            assert sig == fw_cfg.DMA_SIGNATURE
        else:
            assert 0 <= fw.selected <= 0xFFFF and fw.offset >= 0
    assert fw.dma_high <= 0xFFFFFFFF


def _read_flat(image: list[bytes], gpa: int, length: int) -> bytes:
    for (base, _), r in zip(_FakeRam.REGIONS, image):
        if base <= gpa and gpa + length <= base + len(r):
            return r[gpa - base : gpa - base + length]
    raise AssertionError(f"{gpa:#x}+{length:#x} is not in RAM")


def _write_flat(image: list[bytearray], gpa: int, data: bytes) -> None:
    for (base, _), r in zip(_FakeRam.REGIONS, image):
        if base <= gpa and gpa + len(data) <= base + len(r):
            r[gpa - base : gpa - base + len(data)] = data
            return
    raise AssertionError(f"{gpa:#x}+{len(data):#x} is not in RAM")


# ---- snapshot files -------------------------------------------------------------------------

_snap_dir: tempfile.TemporaryDirectory | None = None


def _fix_crcs(buf: bytearray) -> None:
    """Make the state part's and the header's CRC-32s right, as a writer would (else nearly
    every mutation stops at a checksum and the parsers behind it are never reached)."""
    if len(buf) < snapfile.HEADER.size:
        return
    nparts = snapfile.HEADER.unpack_from(buf)[2]
    end = snapfile.HEADER.size + nparts * snapfile.PART.size
    if nparts > 16 or len(buf) < end + 4:
        return
    for i in range(nparts):
        at = snapfile.HEADER.size + i * snapfile.PART.size
        kind, _, offset, length, _ = snapfile.PART.unpack_from(buf, at)
        if kind == snapfile.KIND_STATE and offset + length <= len(buf):
            struct.pack_into("<I", buf, at + 24, zlib.crc32(buf[offset : offset + length]))
    struct.pack_into("<I", buf, end, zlib.crc32(buf[:end]))


def fuzz_snapshot(data: bytes) -> None:
    """The snapshot reader (snapshot/file.py read: header, part table, CRCs, the state's
    JSON, a diff's chain of bases) on any file: a SnapshotError (one line) or a Snapshot
    whose parts lie inside the file, never another exception. The first byte's low bit
    asks for the CRCs to be made right first. Files are in a private temporary directory
    (a diff's base path is the fuzzer's: relative ones stay in it)."""
    global _snap_dir
    if _snap_dir is None:
        _snap_dir = tempfile.TemporaryDirectory(prefix="asyncvmm-fuzz-snap-", dir="/dev/shm" if os.path.isdir(
            "/dev/shm") else None)
    buf = bytearray(data[1:])
    if data[:1] and data[0] & 1:
        _fix_crcs(buf)
    path = os.path.join(_snap_dir.name, "snap")
    with open(path, "wb") as f:
        f.write(buf)
    try:
        snap = snapfile.read(path)
    except snapfile.SnapshotError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return
    assert isinstance(snap.state, dict)
    for s in [snap, *snap.diffs()]:
        assert 0 <= s.memory.offset and s.memory.offset % snapfile.PAGE == 0
        assert s.memory.offset + s.memory.length <= os.path.getsize(s.path)


# ---- the OVMF variables flash --------------------------------------------------------------

PFLASH_SIZE = 4 * pflash.BLOCK_SIZE


def fuzz_pflash(data: bytes) -> None:
    """The CFI flash over a file, as a guest drives it: any byte, word or dword written
    anywhere (commands, data, confirms in any order), reads in every mode. Checked against
    a shadow of the file: only a write in program mode changes it (those bytes, when the
    flash is writable), only a confirm in erase mode erases (its whole block); nothing else
    ever changes the file; the memory slot is mapped exactly in read-array mode; every read
    fits its size and, in read-array mode, is the file's bytes."""
    inp = Input(data)
    writable = bool(inp.u8() & 1)
    fd = os.memfd_create("fuzz-pflash", os.MFD_CLOEXEC)  # the flash owns it: close() closes it
    shadow = bytearray(bytes(range(256)) * (PFLASH_SIZE // 256))
    os.pwrite(fd, shadow, 0)
    mapped = [True]

    def slot(on: bool) -> None:
        assert on != mapped[0], "the slot was mapped (or removed) twice"
        mapped[0] = on

    flash = pflash.PFlash(fd, PFLASH_SIZE, writable, slot)
    try:
        for _ in range(256):
            if not inp.more():
                break
            op, size = inp.u8(), inp.size()
            offset = inp.u16() % PFLASH_SIZE
            if op & 1:
                value = inp.u32() & ((1 << (8 * size)) - 1)
                mode = flash.mode
                flash.write(offset, size, value)
                if mode is pflash.Mode.PROGRAM and writable and offset + size <= PFLASH_SIZE:
                    shadow[offset : offset + size] = value.to_bytes(size, "little")
                elif mode is pflash.Mode.ERASE and value & 0xFF == pflash.Command.ERASE_CONFIRM and writable:
                    start = offset - offset % pflash.BLOCK_SIZE
                    shadow[start : start + pflash.BLOCK_SIZE] = b"\xff" * pflash.BLOCK_SIZE
                assert os.pread(fd, PFLASH_SIZE, 0) == shadow, "the file changed beyond a program or an erase"
            else:
                value = flash.read(offset, size)
                _check_read(value, size)
                if flash.mode is pflash.Mode.ARRAY:
                    want = bytes(shadow[offset : offset + size]).ljust(size, b"\xff")
                    assert value == int.from_bytes(want, "little")
            assert mapped[0] == (flash.mode is pflash.Mode.ARRAY), (flash.mode, mapped[0])
    finally:
        flash.close()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "uart": fuzz_uart,
    "rtc": fuzz_rtc,
    "i8042": fuzz_i8042,
    "pit": fuzz_pit,
    "acpi_pm": fuzz_acpi_pm,
    "pci_config": fuzz_pci_config,
    "msix": fuzz_msix,
    "virtio_pci": fuzz_virtio_pci,
    "boot": fuzz_boot,
    "bzimage": fuzz_bzimage,
    "unpack": fuzz_unpack,
    "control": fuzz_control,
    "gdb_packets": fuzz_gdb_packets,
    "boot_menu": fuzz_boot_menu,
    "net_ctrl": fuzz_net_ctrl,
    "fw_cfg": fuzz_fw_cfg,
    "snapshot": fuzz_snapshot,
    "pflash": fuzz_pflash,
}

