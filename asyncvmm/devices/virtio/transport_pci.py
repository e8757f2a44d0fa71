"""virtio over PCI, the modern interface only (virtio 1.2, 4.1), with MSI-X.

One 64-bit memory BAR holds everything, each structure on a page of its own:

    BAR0 + 0x0000  common configuration (struct virtio_pci_common_cfg)
           0x1000  ISR status (read to clear; only INTx would need it)
           0x2000  device-specific configuration
           0x3000  notifications: queue q's doorbell at + 4*q (notify_off_multiplier 4)
           0x4000  MSI-X table: vector 0 for configuration changes, one per queue after it
           0x6000  MSI-X pending-bit array

Doorbells never reach Python: each queue's address is bound to an eventfd with
KVM_IOEVENTFD while the BAR decodes, and the device reads that eventfd on the loop.
(A write KVM did not match — another size — arrives here and is forwarded to it.)

The driver's side of the state machine (2.1, 3.1): reset (status 0) → ACKNOWLEDGE →
DRIVER → features → FEATURES_OK (refused unless VERSION_1 and only offered bits) → queues
→ DRIVER_OK (the device starts). Breaking the rules sets DEVICE_NEEDS_RESET and sends a
configuration-change interrupt; the other devices and the VMM carry on.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass

from ... import platform
from ...irq import IntxLine, IrqRouter
from ...log import get_logger
from ..pci.config_space import Bar, BarKind, ConfigSpace
from ..pci.device import PciDevice
from ..pci.msi import Msi
from ..pci.msix import Msix
from ..pci.regs import CapId, Command, Reg, VendorId
from .device import DeviceError, QueueConfig, VirtioDevice
from .spec import (
    COMMON_CFG_SIZE,
    COMMON_WIDTH,
    ISR_CONFIG,
    MAX_QUEUE_SIZE,
    NO_VECTOR,
    PCI_DEVICE_ID_BASE,
    PCI_REVISION_MODERN,
    Common,
    Feature,
    PciCapType,
    Status,
    bits,
)

log = get_logger(__name__)

BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x6000
REGION = 0x1000
NOTIFY_MULTIPLIER = 4
MAX_QUEUES = REGION // NOTIFY_MULTIPLIER
CONFIG_VECTOR = 0  # the MSI-X vector asyncvmm suggests for configuration changes (the driver picks)
INTX_PIN_A = 1  # Interrupt Pin register: 1 = INTA#

# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
VIRTIO_PCI_CAP = struct.Struct("<BBBBxxII")  # from cap_len on (add_capability writes vndr, next)
VIRTIO_PCI_CAP_LEN = 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20
VIRTIO_PCI_CFG_CAP_LEN = 20

# The transport's features: what every device here has.
TRANSPORT_FEATURES = bits(Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC)


class NotifyBinder:
    """Binds doorbell addresses to eventfds in KVM (KVM_IOEVENTFD), or nowhere (harness)."""

    def __init__(self, vm=None, any_length: bool = False):
        self.vm = vm
        self.length = 0 if any_length else 2  # 2: the 16-bit queue index a driver writes

    def bind(self, efd: int, addr: int) -> None:
        if self.vm is not None:
            self.vm.ioeventfd(efd, addr, self.length)

    def unbind(self, efd: int, addr: int) -> None:
        if self.vm is not None and self.vm.fd >= 0:
            self.vm.ioeventfd(efd, addr, self.length, deassign=True)


@dataclass
class QueueState:
    """One queue's registers in common configuration."""

    size: int
    vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


class VirtioPciDevice(PciDevice):
    """Interrupts: MSI-X (one vector per queue and one for configuration changes), or with
    msi=True (bhyve's -W) one MSI message instead; INTx (pin A, level, the GSI the _PRT
    gives the slot) whenever neither is enabled by the driver. Which one a queue uses is
    decided at DRIVER_OK, from what the driver enabled."""

    def __init__(self, device: VirtioDevice, router: IrqRouter, notify: NotifyBinder, *, msix: bool = True,
                 msi: bool = False):
        if not 1 <= device.num_queues <= MAX_QUEUES:
            raise ValueError(f"{device.name}: {device.num_queues} queues (1..{MAX_QUEUES})")
        if device.queue_max_size > MAX_QUEUE_SIZE or device.queue_max_size & (device.queue_max_size - 1):
            raise ValueError(f"{device.name}: queue size {device.queue_max_size}")
        config = ConfigSpace(
            vendor_id=VendorId.RED_HAT_QUMRANET,
            device_id=PCI_DEVICE_ID_BASE + device.device_id,
            class_code=device.pci_class,
            revision=PCI_REVISION_MODERN,
            subsystem_vendor_id=VendorId.RED_HAT_QUMRANET,
            subsystem_id=PCI_DEVICE_ID_BASE + device.device_id,
            interrupt_pin=INTX_PIN_A,
        )
        super().__init__(config, device.name)
        self.device = device
        self.notify = notify
        self.router = router
        self.bar = Bar(BAR_INDEX, BAR_SIZE, BarKind.MEM64)
        config.add_bar(self.bar)
        self._add_virtio_cap(PciCapType.COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE)
        self._add_virtio_cap(PciCapType.ISR_CFG, ISR_OFFSET, 1)
        if device.config_size:
            self._add_virtio_cap(PciCapType.DEVICE_CFG, DEVICE_OFFSET, device.config_size)
        self._add_virtio_cap(
            PciCapType.NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * device.num_queues,
            extra=struct.pack("<I", NOTIFY_MULTIPLIER),
        )
        # 4.1.4.9: the PCI configuration access capability, a window onto the BARs through
        # configuration space (for drivers that cannot map BARs): bar, offset, length and
        # the data dword are the driver's to write.
        cfg_mask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + b"\xff" * 4
        self.cfg_cap = self._add_virtio_cap(PciCapType.PCI_CFG, 0, 0, extra=bytes(4), writable=cfg_mask)
        self.msix: Msix | None = None
        self.msi: Msi | None = None
        if msi:
            self.msi = Msi(config, router)
        elif msix:
            self.msix = Msix(config, router, device.num_queues + 1, bar=BAR_INDEX,
                             table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET)
        self.intx: IntxLine | None = None  # made at attach: its GSI depends on the slot
        self.kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(device.num_queues)]
        self._bound: list[tuple[int, int]] = []  # (efd, address) bound with KVM
        device.bind(self.set_needs_reset)
        self.counters: Counter[str] = Counter()
        self.config_generation = 0
        self._reset_state()
        self._status_before_reset = 0
        self._closed = False

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, *, extra: bytes = b"",
                        writable: bytes | None = None) -> int:
        cap_len = VIRTIO_PCI_CAP_LEN + len(extra)
        body = VIRTIO_PCI_CAP.pack(cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra
        return self.config.add_capability(CapId.VENDOR, body, writable=writable)

    # -- state -------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.queues = [QueueState(self.device.queue_max_size) for _ in range(self.device.num_queues)]
        self._resetting = False
        self.active = False

    @property
    def offered(self) -> int:
        return TRANSPORT_FEATURES | self.device.features()

    def set_needs_reset(self, why: str) -> None:
        """The device broke down or the driver broke a rule (2.1.2)."""
        self.counters["needs_reset"] += 1
        if self.status & Status.NEEDS_RESET:
            return
        log.guest(f"{self.name} {self._where()}: device needs reset: {why}")
        self.status |= Status.NEEDS_RESET
        if self.status & Status.DRIVER_OK:
            self.config_changed()

    def config_changed(self) -> None:
        """Tell the driver the configuration changed (a config interrupt)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        if self.msix is not None and self.msix.enabled:
            v = self._vector(self.config_vector)
            if v is not None:
                v.trigger()
        elif self.msi is not None and self.msi.enabled:
            self.msi.vector.trigger()
        elif self.intx is not None:
            self.intx.trigger()

    # -- INTx and the ISR ------------------------------------------------------------------
    def attach(self, buses, location) -> None:
        super().attach(buses, location)
        if self.intx is None:
            gsi = platform.pci_intx_gsi(location[1], INTX_PIN_A - 1)
            self.intx = IntxLine(self.router, gsi)
            self.config.put(Reg.INTERRUPT_LINE, 1, gsi)  # what firmware would note for the OS
            if self.msi is not None:
                self.msi.vector.c.isr = self.intx.isr  # one message for everything: the ISR says why
            self._sync_intx_mask()

    @property
    def isr(self) -> int:
        return self.intx.isr[0] if self.intx is not None else 0

    @isr.setter
    def isr(self, value: int) -> None:
        if self.intx is not None:
            self.intx.isr[0] = value
            if not value:
                self.intx.lower()  # the driver read it: INTx goes down

    def _sync_intx_mask(self) -> None:
        """INTx is silent while COMMAND.INTX_DISABLE is set or MSI/MSI-X is enabled."""
        if self.intx is None:
            return
        off = bool(self.config.command & Command.INTX_DISABLE)
        off |= bool(self.msix is not None and self.msix.enabled) or bool(self.msi is not None and self.msi.enabled)
        self.intx.set_masked(off)

    def _where(self) -> str:
        b, s, f = self.location
        return f"{b:02x}:{s:02x}.{f}"

    def _vector(self, index: int):
        if self.msix is None or index == NO_VECTOR:
            return None
        return self.msix.vector(index)

    # -- configuration space -------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if self.msi is not None and self.msi.touches_capability(offset, size):
            self.msi.control_written()  # refresh the pending bit
        data = self.cfg_cap + VIRTIO_PCI_CAP_LEN
        if offset >= data and offset + size <= data + 4:
            self._cfg_window(read=True)
        return super().config_read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        if self.msix is not None and self.msix.touches_capability(offset, size):
            self.msix.control_written()
        if self.msi is not None and self.msi.touches_capability(offset, size):
            self.msi.control_written()
        self._sync_intx_mask()
        data = self.cfg_cap + VIRTIO_PCI_CAP_LEN
        if offset >= data and offset + size <= data + 4:
            self._cfg_window(read=False)

    def _cfg_window(self, *, read: bool) -> None:
        """An access through VIRTIO_PCI_CAP_PCI_CFG's pci_cfg_data (4.1.4.9.1)."""
        c = self.cfg_cap
        bar = self.config.get(c + 4, 1)
        offset = self.config.get(c + 8, 4)
        length = self.config.get(c + 12, 4)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length:
            self.counters["bad_cfg_window"] += 1
            return
        data = c + VIRTIO_PCI_CAP_LEN
        if read:
            self.config.put(data, 4, self.bar_read(BAR_INDEX, offset, length))
        else:
            self.bar_write(BAR_INDEX, offset, length, self.config.get(data, length))

    # -- the BAR -------------------------------------------------------------------------
    def bar_mapped(self, bar: Bar, address: int) -> None:
        for q, efd in enumerate(self.kick_fds):
            addr = address + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q
            self.notify.bind(efd, addr)
            self._bound.append((efd, addr))

    def bar_unmapped(self, bar: Bar, address: int) -> None:
        self._unbind_all()

    def _unbind_all(self) -> None:
        for efd, addr in self._bound:
            self.notify.unbind(efd, addr)
        self._bound.clear()

    def bar_read(self, index: int, offset: int, size: int) -> int:
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON_OFFSET:
            return self._common_read(off, size)
        if region == ISR_OFFSET:
            value, self.isr = self.isr, 0  # reading clears it (4.1.4.5)
            return value if off == 0 else 0
        if region == DEVICE_OFFSET:
            if off + size > self.device.config_size:
                return 0
            return self.device.read_config(off, size)
        if self.msix is not None and MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if self.msix is not None and offset >= MSIX_PBA_OFFSET:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON_OFFSET:
            self._common_write(off, size, value)
        elif region == DEVICE_OFFSET:
            if off + size <= self.device.config_size:
                self.counters["config_writes"] += 1
                self.device.write_config(off, size, value)
        elif region == NOTIFY_OFFSET:
            q = off // NOTIFY_MULTIPLIER
            if q < len(self.kick_fds):
                self.counters["notify_exits"] += 1  # a doorbell KVM did not take
                os.eventfd_write(self.kick_fds[q], 1)
        elif self.msix is not None and MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)
        elif self.msix is not None and offset >= MSIX_PBA_OFFSET:
            self.msix.pba_write(offset - MSIX_PBA_OFFSET, size, value)

    # -- common configuration ------------------------------------------------------------
    def _field(self, off: int, size: int) -> Common | None:
        try:
            field = Common(off)
        except ValueError:
            field = None
        if field is None or COMMON_WIDTH[field] != size:
            self.counters["bad_common_access"] += 1
            return None
        return field

    def _queue(self) -> QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_read(self, off: int, size: int) -> int:
        f = self._field(off, size)
        q = self._queue()
        if f is None:
            return 0
        if f == Common.DEVICE_FEATURE_SELECT:
            return self.device_feature_select
        if f == Common.DEVICE_FEATURE:
            return (self.offered >> (32 * self.device_feature_select)) & 0xFFFF_FFFF if self.device_feature_select < 2 else 0
        if f == Common.DRIVER_FEATURE_SELECT:
            return self.driver_feature_select
        if f == Common.DRIVER_FEATURE:
            return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF if self.driver_feature_select < 2 else 0
        if f == Common.CONFIG_MSIX_VECTOR:
            return self.config_vector
        if f == Common.NUM_QUEUES:
            return self.device.num_queues
        if f == Common.DEVICE_STATUS:
            if self._resetting:
                if not self.device.quiesced():
                    return self._status_before_reset  # 4.1.4.3.2: 0 only once the reset is done
                self._resetting = False
            return self.status
        if f == Common.CONFIG_GENERATION:
            return self.config_generation
        if f == Common.QUEUE_SELECT:
            return self.queue_select
        if q is None:  # 4.1.4.3: a queue_select past num_queues reads queue_size 0
            return 0
        if f == Common.QUEUE_SIZE:
            return q.size
        if f == Common.QUEUE_MSIX_VECTOR:
            return q.vector
        if f == Common.QUEUE_ENABLE:
            return int(q.enabled)
        if f == Common.QUEUE_NOTIFY_OFF:
            return self.queue_select
        addr = {Common.QUEUE_DESC_LO: q.desc, Common.QUEUE_DESC_HI: q.desc, Common.QUEUE_DRIVER_LO: q.driver,
                Common.QUEUE_DRIVER_HI: q.driver, Common.QUEUE_DEVICE_LO: q.device, Common.QUEUE_DEVICE_HI: q.device}[f]
        return addr >> 32 if f in (Common.QUEUE_DESC_HI, Common.QUEUE_DRIVER_HI, Common.QUEUE_DEVICE_HI) else addr & 0xFFFF_FFFF

    def _common_write(self, off: int, size: int, value: int) -> None:
        f = self._field(off, size)
        if f is None:
            return
        if f == Common.DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif f == Common.DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif f == Common.DRIVER_FEATURE:
            if self.status & Status.FEATURES_OK:
                self.set_needs_reset("driver features written after FEATURES_OK")
            elif self.driver_feature_select < 2:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif f == Common.CONFIG_MSIX_VECTOR:
            self.config_vector = value if self._vector(value) is not None else NO_VECTOR
        elif f == Common.DEVICE_STATUS:
            self._write_status(value)
        elif f == Common.QUEUE_SELECT:
            self.queue_select = value
        elif f in (Common.NUM_QUEUES, Common.CONFIG_GENERATION, Common.QUEUE_NOTIFY_OFF, Common.DEVICE_FEATURE):
            self.counters["read_only_writes"] += 1
        else:
            self._queue_write(f, value)

    def _queue_write(self, f: Common, value: int) -> None:
        q = self._queue()
        if q is None:
            self.counters["bad_queue_select"] += 1
            return
        if self.status & Status.DRIVER_OK or (q.enabled and f != Common.QUEUE_MSIX_VECTOR):
            # 4.1.4.3.2: a queue is configured before it is enabled, and before DRIVER_OK.
            self.set_needs_reset(f"queue {self.queue_select} reconfigured while in use")
            return
        if f == Common.QUEUE_SIZE:
            q.size = value
        elif f == Common.QUEUE_MSIX_VECTOR:
            q.vector = value if self._vector(value) is not None else NO_VECTOR
        elif f == Common.QUEUE_ENABLE:
            if value == 1:
                q.enabled = True
        else:
            name = f.name
            attr = {"DESC": "desc", "DRIVER": "driver", "DEVICE": "device"}[name.split("_")[1]]
            old = getattr(q, attr)
            if name.endswith("_HI"):
                setattr(q, attr, (old & 0xFFFF_FFFF) | (value << 32))
            else:
                setattr(q, attr, (old & ~0xFFFF_FFFF) | value)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = Status(self.status)
        new = Status(value & 0xFF)
        if old & ~new & ~Status.NEEDS_RESET:
            # 2.1.2: only a reset clears status bits.
            self.set_needs_reset(f"driver cleared status bits ({old!r} -> {new!r})")
            return
        added = new & ~old
        if added & Status.FEATURES_OK:
            unknown = self.driver_features & ~self.offered
            if unknown or not self.driver_features & bits(Feature.VERSION_1):
                why = f"unoffered features {unknown:#x}" if unknown else "no VERSION_1"
                self.counters["features_refused"] += 1
                log.guest(f"{self.name} {self._where()}: refusing the driver's features: {why}")
                new &= ~Status.FEATURES_OK  # the driver re-reads status and gives up
        self.status = int(new) | (self.status & Status.NEEDS_RESET)
        if added & Status.DRIVER_OK and not self.status & Status.NEEDS_RESET:
            self._activate()
        if added & Status.FAILED:
            self.counters["driver_failed"] += 1

    def _activate(self) -> None:
        if not self.status & Status.FEATURES_OK:
            self.set_needs_reset("DRIVER_OK without FEATURES_OK")
            return
        queues = []
        for i, q in enumerate(self.queues):
            if not q.enabled:
                continue
            if not q.size or q.size & (q.size - 1) or q.size > self.device.queue_max_size:
                self.set_needs_reset(f"queue {i} has size {q.size}")
                return
            queues.append(QueueConfig(i, q.size, q.desc, q.driver, q.device, self._queue_irq(q), self.kick_fds[i]))
        try:
            self.device.activate(self.driver_features, queues)
        except DeviceError as e:
            self.set_needs_reset(str(e))
            return
        self.active = True
        self.counters["activations"] += 1

    def _queue_irq(self, q: QueueState):
        """What a queue raises: its MSI-X vector, the one MSI message, or INTx."""
        if self.msix is not None and self.msix.enabled:
            return self._vector(q.vector)
        if self.msi is not None and self.msi.enabled:
            return self.msi.vector
        return self.intx

    def reset(self) -> None:
        """Device reset (status 0): the device stops and forgets the driver's setup."""
        self.counters["resets"] += 1
        self._status_before_reset = self.status
        self.device.reset()
        self._reset_state()
        self._resetting = True
        self.isr = 0
        for efd in self.kick_fds:  # doorbells rung before the reset mean nothing now
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                pass

    # -- teardown and stats --------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "location": self._where(),
            "status": str(Status(self.status)),
            "features": f"{self.driver_features:#x}",
            "transport": dict(self.counters),
            **self.device.stats(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.device.close()
        self._unbind_all()
        if self.msix is not None:
            self.msix.close()
        if self.msi is not None:
            self.msi.close()
        if self.intx is not None:
            self.intx.close()
        for efd in self.kick_fds:
            os.close(efd)
        self.kick_fds = []

    @property
    def bar_address(self) -> int:
        return self.config.bar_address(self.bar)


def virtio_pci_function(device: VirtioDevice, ctx) -> VirtioPciDevice:
    """A `-s` driver's last step: `device` (just built) behind the virtio-pci transport, with
    the machine's interrupt router and doorbell binder (`ctx`: slots.BuildContext). If the
    transport cannot be made, the device's host resources are released."""
    try:
        return VirtioPciDevice(device, ctx.router, ctx.notify, msi=ctx.config.force_msi)
    except BaseException:
        device.close()
        raise
