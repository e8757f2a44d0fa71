"""Interrupt wiring: the VM's GSI routing table and the MSI vectors devices raise.

KVM delivers an interrupt for a GSI (global system interrupt number) through its routing
table. KVM_SET_GSI_ROUTING replaces that table whole, so this module owns it: GSIs 0-15 go
to the PICs and the IOAPIC and 16-23 to the IOAPIC, as KVM's default table has them, and
every MSI vector gets a GSI of its own from FIRST_MSI_GSI on, routed to the address/data
pair the guest programmed (x86 MSI: the address selects the LAPIC, the data the vector).

A vector is raised by writing its eventfd, which KVM_IRQFD binds to the vector's GSI: the
data path (C) raises interrupts with no exit and no Python. The C side sees a vector as a
`struct avmm_irq` (cext/virtq.h) holding that eventfd and the mask bit; a masked vector
records a pending interrupt instead, and `unmask` delivers it.

Without a VM (`IrqRouter(None)`: the test harness) the same vectors exist with their
eventfds and nothing is registered with KVM: whoever plays the guest reads the eventfds.

Thread ownership: the loop's thread (vectors are configured from guest MMIO writes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ._native import ffi, lib
from .errors import KvmError
from .platform import FIRST_MSI_GSI, IOAPIC_PINS
from .vstate.kvm import VmFd

PIC_PINS = 16  # GSIs 0-15 also reach the two 8259s (8 pins each)
MAX_ROUTES = 4096  # KVM_MAX_IRQ_ROUTES in the kernel (not in the UAPI headers)


@dataclass(frozen=True)
class MsiMessage:
    """What a device writes to raise an MSI: `data` at `address` (SDM vol. 3, 11.11)."""

    address: int
    data: int


class MsiVector:
    """One MSI(-X) vector: a GSI, its eventfd, its route, its mask."""

    def __init__(self, router: "IrqRouter", gsi: int):
        self.router = router
        self.gsi = gsi
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.c = ffi.new("struct avmm_irq *", {"efd": self.efd, "masked": 1})
        self.message: MsiMessage | None = None
        self._watchers: list[Callable[[bool], None]] = []

    @property
    def masked(self) -> bool:
        return bool(self.c.masked)

    @property
    def pending(self) -> bool:
        return bool(self.c.pending)

    def route(self, message: MsiMessage | None) -> None:
        """Point the vector at `message` (None: nowhere). Committed to KVM at once."""
        if message != self.message:
            self.message = message
            self.router.commit()

    def watch_mask(self, fn: Callable[[bool], None]) -> Callable[[], None]:
        """Call fn(masked) when the mask changes (a vhost-user back-end that holds the
        eventfd must be given another while the vector is masked); returns the unwatch."""
        self._watchers.append(fn)
        return lambda: self._watchers.remove(fn) if fn in self._watchers else None

    def mask(self) -> None:
        was = self.c.masked
        self.c.masked = 1
        if not was:
            for fn in list(self._watchers):
                fn(True)

    def unmask(self) -> None:
        """Unmask; an interrupt raised while masked is delivered now (PCI 3.0, 6.8.3.4)."""
        was = self.c.masked
        self.c.masked = 0
        if was:
            for fn in list(self._watchers):
                fn(False)
        if self.c.pending:
            self.c.pending = 0
            self.trigger()

    def trigger(self) -> None:
        """Raise the vector from Python (a config change); the data path does this in C."""
        lib.avmm_irq_raise(self.c)

    def close(self) -> None:
        if self.efd >= 0:
            self.router.release(self)
            os.close(self.efd)
            self.efd = -1
            self.c.efd = -1


class IntxLine:
    """A PCI INTx pin — level-triggered, shared — on the GSI the DSDT's _PRT gives its slot.

    The line follows the virtio ISR, as on real hardware: up while the device has cause
    (the ISR is not 0), down when the driver reads the ISR. The C data path raises it
    through the function handed to it in the struct avmm_irq (avmm_kvm_irq_line:
    KVM_IRQ_LINE, level 1, once); the transport's ISR read takes it down. Masked
    (COMMAND.INTX_DISABLE, or MSI/MSI-X in use) it stays down, keeping a pending interrupt.
    Without a VM (the harness) a raise writes the eventfd instead.
    """

    def __init__(self, router: "IrqRouter", gsi: int):
        self.router = router
        self.gsi = gsi
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.isr = ffi.new("uint8_t *")
        vm = router.vm
        # The data path asserts the line through what is handed to it here: KVM_IRQ_LINE on the VM.
        set_line = ffi.addressof(lib, "avmm_kvm_irq_line") if vm is not None else ffi.NULL
        self.c = ffi.new("struct avmm_irq *", {"efd": self.efd, "masked": 0, "isr": self.isr, "set_line": set_line,
                                               "line_fd": vm.fd if vm is not None else -1, "gsi": gsi})

    def trigger(self) -> None:
        """Raise it from Python (a configuration change); the data path does it in C."""
        lib.avmm_irq_raise(self.c)

    def lower(self) -> None:
        if self.c.asserted:
            self.c.asserted = 0
            if self.router.vm is not None and self.router.vm.fd >= 0:
                self.router.vm.irq_line(self.gsi, False)

    def set_masked(self, masked: bool) -> None:
        if masked == bool(self.c.masked):
            return
        self.c.masked = int(masked)
        if masked:
            if self.c.asserted:
                self.c.pending = 1
            self.lower()
        elif self.c.pending or self.isr[0]:
            self.c.pending = 0
            self.trigger()

    def close(self) -> None:
        if self.efd >= 0:
            self.lower()
            os.close(self.efd)
            self.efd = -1
            self.c.efd = -1
            self.c.set_line = ffi.NULL
            self.c.line_fd = -1


class IrqRouter:
    """The VM's GSI routing table and its MSI vectors."""

    def __init__(self, vm: VmFd | None):
        self.vm = vm
        self.vectors: dict[int, MsiVector] = {}
        self._free: list[int] = []
        self._next_gsi = FIRST_MSI_GSI
        self.commits = 0
        self._closing = False
        # KVM_CREATE_IRQCHIP gave the VM this very table (KVM's default routing: GSIs 0-15 to
        # the PICs and the IOAPIC, 16-23 to the IOAPIC), so committing it again changes
        # nothing; a routing update waits for an SRCU grace period (~5 ms of start-up here).
        self._committed = self.routes() if vm is not None else None

    def allocate(self) -> MsiVector:
        gsi = self._free.pop() if self._free else self._next_gsi
        if gsi == self._next_gsi:
            if gsi >= MAX_ROUTES:
                raise KvmError(f"out of MSI routes: KVM has {MAX_ROUTES} GSIs")
            self._next_gsi += 1
        v = MsiVector(self, gsi)
        self.vectors[gsi] = v
        if self.vm is not None:
            self.vm.irqfd(v.efd, gsi)
        return v

    def release(self, v: MsiVector) -> None:
        if self.vectors.pop(v.gsi, None) is None:
            return
        if self.vm is not None and self.vm.fd >= 0:
            self.vm.irqfd(v.efd, v.gsi, deassign=True)
        self._free.append(v.gsi)
        if v.message is not None:
            v.message = None
            if not self._closing:
                self.commit()

    def routes(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """The table: (gsi, "irqchip", (chip, pin)) or (gsi, "msi", (address, data))."""
        table: list[tuple[int, str, tuple[int, ...]]] = []
        for gsi in range(IOAPIC_PINS):
            table.append((gsi, "irqchip", (lib.KVM_IRQCHIP_IOAPIC, gsi)))
            if gsi < PIC_PINS:
                chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
                table.append((gsi, "irqchip", (chip, gsi % 8)))
        for gsi, v in sorted(self.vectors.items()):
            if v.message is not None:
                table.append((gsi, "msi", (v.message.address, v.message.data)))
        return table

    def commit(self) -> None:
        """KVM_SET_GSI_ROUTING with the whole table, unless KVM has that table already."""
        if self.vm is None:
            self.commits += 1
            return
        table = self.routes()
        if table == self._committed:
            return
        self.commits += 1
        buf = ffi.new("struct kvm_irq_routing *", {"nr": len(table), "entries": len(table)})
        for i, (gsi, kind, args) in enumerate(table):
            e = buf.entries[i]
            e.gsi = gsi
            if kind == "irqchip":
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = args
            else:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                address, data = args
                e.u.msi.address_lo = address & 0xFFFF_FFFF
                e.u.msi.address_hi = address >> 32
                e.u.msi.data = data
        r = lib.avmm_ioctl(self.vm.fd, lib.KVM_SET_GSI_ROUTING, buf)
        if r < 0:
            raise KvmError(f"KVM_SET_GSI_ROUTING ({len(table)} routes) failed: {os.strerror(-r)}")
        self._committed = table

    def close(self) -> None:
        self._closing = True
        for v in list(self.vectors.values()):
            v.close()
