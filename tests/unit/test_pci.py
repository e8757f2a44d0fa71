"""PCI: configuration space, the root's config mechanisms, BARs, MSI-X, the virtio-pci
registers — through the buses, as a guest reaches them, with no guest CPU."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from asyncvmm._native import lib

from asyncvmm import platform
from asyncvmm.bus import Bus
from asyncvmm.devices.pci.config_space import Bar, BarKind, ConfigSpace
from asyncvmm.devices.pci.device import PciBuses, PciDevice
from asyncvmm.devices.pci.regs import CapId, Command, MsixCap, MsixFlags, Reg
from asyncvmm.devices.pci.regs import Status as PciStatus
from asyncvmm.devices.pci.root import PciRoot, install
from asyncvmm.devices.virtio import transport_pci as tp
from asyncvmm.devices.virtio.block.device import VirtioBlk
from asyncvmm.devices.virtio.block.image import BlockOptions
from asyncvmm.devices.virtio.spec import NO_VECTOR, Common, Feature, PciCapType, Status, bits
from asyncvmm.irq import IrqRouter, MsiMessage
from asyncvmm.testing.mock_driver import Harness, VirtioDriver

CF8, CFC = platform.PCI_CONFIG_ADDRESS_PORT, platform.PCI_CONFIG_ADDRESS_PORT + 4


def cf8(bus, slot, fn, reg):
    return 1 << 31 | bus << 16 | slot << 11 | fn << 8 | reg


class Plain(PciDevice):
    def __init__(self, bars=(), name="plain"):
        cs = ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)
        for b in bars:
            cs.add_bar(b)
        super().__init__(cs, name)
        self.accesses = []

    def bar_read(self, index, offset, size):
        self.accesses.append(("r", index, offset, size))
        return 0xAB

    def bar_write(self, index, offset, size, value):
        self.accesses.append(("w", index, offset, size, value))


@pytest.fixture
def root():
    buses = PciBuses(Bus("mmio"), Bus("pio"))
    r = PciRoot(buses)
    install(r, buses.pio, buses.mmio)
    return r


def pio_cfg_read(root, bus, slot, fn, reg, size=4):
    root.buses.pio.access(CF8, 4, True, cf8(bus, slot, fn, reg & ~3))
    return root.buses.pio.access(CFC + (reg & 3), size, False)


def test_host_bridge_through_both_mechanisms(root):
    assert pio_cfg_read(root, 0, 0, 0, 0) == 0x29C0_8086  # the Q35 MCH (devices/pci/q35.py)
    assert pio_cfg_read(root, 0, 0, 0, 8) >> 8 == 0x060000
    ecam = platform.PCI_ECAM_START
    assert root.buses.mmio.access(ecam, 4, False) == 0x29C0_8086
    assert root.buses.mmio.access(ecam + Reg.VENDOR_ID, 2, False) == 0x8086
    assert root.buses.pio.access(CF8, 4, False) == cf8(0, 0, 0, 8)  # the last address written


def test_absent_functions_read_all_ones(root):
    assert pio_cfg_read(root, 0, 5, 0, 0) == 0xFFFF_FFFF
    assert pio_cfg_read(root, 1, 0, 0, 0) == 0xFFFF_FFFF  # only bus 0
    root.buses.pio.access(CF8, 4, True, 0)  # enable bit clear: no config cycle
    assert root.buses.pio.access(CFC, 4, False) == 0xFFFF_FFFF
    assert root.buses.mmio.access(platform.PCI_ECAM_START + (3 << 20), 4, False) == 0xFFFF_FFFF


def test_multifunction_devices(root):
    root.add(4, 0, Plain())
    root.add(4, 2, Plain(name="second"))
    assert pio_cfg_read(root, 0, 4, 0, Reg.HEADER_TYPE, 1) & 0x80
    assert pio_cfg_read(root, 0, 4, 2, 0) == 0x5678_1234
    root.add(6, 1, Plain(name="orphan"))  # no function 0: invisible, as on real hardware
    assert pio_cfg_read(root, 0, 6, 1, 0) == 0xFFFF_FFFF
    with pytest.raises(ValueError, match="taken"):
        root.add(4, 0, Plain())


def test_bar_sizing_moving_and_decoding(root):
    dev = Plain([Bar(0, 0x1000, BarKind.MEM32), Bar(2, 0x4000, BarKind.MEM64), Bar(4, 0x20, BarKind.IO)])
    root.add(3, 0, dev)
    root.assign_bars(platform.pci_mmio64_window(1 << 30))
    b0 = dev.config.bar_address(dev.config.bars[0])
    b2 = dev.config.bar_address(dev.config.bars[2])
    assert platform.PCI_MMIO32_START <= b0 < platform.PCI_MMIO32_START + platform.PCI_MMIO32_SIZE and b0 % 0x1000 == 0
    assert b2 >= 1 << 32 and b2 % 0x4000 == 0
    mmio = root.buses.mmio
    assert mmio.access(b0 + 8, 4, False) == 0xAB
    # Sizing, as an OS does it: decode off, all ones, read back, restore.
    w = lambda reg, size, v: root.config_write(0, 3, 0, reg, size, v)
    r = lambda reg, size=4: root.config_read(0, 3, 0, reg, size)
    cmd = r(Reg.COMMAND, 2)
    w(Reg.COMMAND, 2, cmd & ~(Command.MEMORY | Command.IO))
    assert mmio.access(b0 + 8, 4, False) == 0xFFFF_FFFF  # decode off: nobody answers
    for reg, expect in ((0x10, 0xFFFF_F000), (0x18, 0xFFFF_C004), (0x1C, 0xFFFF_FFFF), (0x20, 0xFFFF_FFE1)):
        w(reg, 4, 0xFFFF_FFFF)
        assert r(reg) == expect, hex(reg)
    # Move BAR0 and turn decoding back on: the window follows.
    w(0x10, 4, 0xD000_0000)
    w(0x18, 4, b2 & 0xFFFF_FFFF)
    w(0x1C, 4, b2 >> 32)
    w(0x20, 4, 0x2000)
    w(Reg.COMMAND, 2, cmd)
    assert mmio.access(0xD000_0008, 4, False) == 0xAB
    assert mmio.access(b0 + 8, 4, False) == 0xFFFF_FFFF
    assert root.buses.pio.access(0x2004, 1, False) == 0xAB
    assert ("r", 0, 8, 4) in dev.accesses and ("r", 4, 4, 1) in dev.accesses


def test_bar_over_another_device_is_not_decoded(root):
    a, b = Plain([Bar(0, 0x1000, BarKind.MEM32)], "a"), Plain([Bar(0, 0x1000, BarKind.MEM32)], "b")
    root.add(1, 0, a)
    root.add(2, 0, b)
    root.assign_bars(platform.pci_mmio64_window(1 << 30))
    a_addr = a.config.bar_address(a.config.bars[0])
    root.config_write(0, 2, 0, 0x10, 4, a_addr)  # the guest puts b on top of a
    assert b.conflicts == 1
    root.buses.mmio.access(a_addr, 4, False)
    assert a.accesses and not b.accesses


def test_config_space_masks():
    cs = ConfigSpace(vendor_id=1, device_id=2, class_code=3)
    cs.write(Reg.VENDOR_ID, 4, 0xFFFF_FFFF)  # read-only
    assert cs.read(0, 4) == 0x0002_0001
    cs.put(Reg.STATUS, 2, PciStatus.REC_MASTER_ABORT | PciStatus.CAP_LIST)
    cs.write(Reg.STATUS, 2, PciStatus.REC_MASTER_ABORT)  # RW1C
    assert cs.read(Reg.STATUS, 2) == PciStatus.CAP_LIST
    cs.write(Reg.COMMAND, 2, 0xFFFF)
    assert cs.read(Reg.COMMAND, 2) == int(Command.IO | Command.MEMORY | Command.MASTER | Command.PARITY
                                         | Command.SERR | Command.INTX_DISABLE)
    assert cs.read(1, 2) == 0xFFFF  # misaligned: all ones
    assert cs.read(4096, 4) == 0xFFFF_FFFF


# -- virtio-pci ------------------------------------------------------------------------------
@pytest.fixture
def virtio(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    h = Harness()
    dev = h.add(VirtioBlk(BlockOptions(str(img)), h.mem, queues=2))
    yield h, dev, VirtioDriver(h, dev)
    h.close()


def capabilities(drv):
    """[(offset, id, bytes)] walking the list from 0x34, as a driver does."""
    out, off = [], drv.pci_read(Reg.CAPABILITY_LIST, 1)
    while off:
        cap_id, nxt = drv.pci_read(off, 1), drv.pci_read(off + 1, 1)
        length = drv.pci_read(off + 2, 1) if cap_id == CapId.VENDOR else MsixCap.SIZEOF
        out.append((off, cap_id, bytes(drv.pci_read(off + i, 1) for i in range(length))))
        off = nxt
    return out


def test_identity_and_capability_list(virtio):
    h, dev, drv = virtio
    assert drv.pci_read(0, 4) == 0x1042_1AF4  # virtio vendor, 0x1040 + VIRTIO_ID_BLOCK
    assert drv.pci_read(Reg.REVISION_ID, 1) == 1  # modern only
    assert drv.pci_read(8, 4) >> 8 == 0x018000
    assert drv.pci_read(Reg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert drv.pci_read(Reg.STATUS, 2) & PciStatus.CAP_LIST
    assert drv.pci_read(Reg.INTERRUPT_PIN, 1) == 1  # INTA#
    assert drv.pci_read(Reg.INTERRUPT_LINE, 1) == platform.pci_intx_gsi(dev.location[1], 0)
    caps = capabilities(drv)
    virtio_caps = {}
    for off, cap_id, raw in caps:
        assert off % 4 == 0 and off >= 0x40
        if cap_id == CapId.VENDOR:
            cap_len, cfg_type, bar, _id, offset, length = struct.unpack_from("<BBBBxxII", raw, 2)
            assert cap_len == len(raw)
            virtio_caps[cfg_type] = (bar, offset, length, raw)
    assert virtio_caps[PciCapType.COMMON_CFG][:3] == (0, tp.COMMON_OFFSET, 0x38)
    assert virtio_caps[PciCapType.ISR_CFG][:3] == (0, tp.ISR_OFFSET, 1)
    assert virtio_caps[PciCapType.DEVICE_CFG][:2] == (0, tp.DEVICE_OFFSET)
    bar, offset, length, raw = virtio_caps[PciCapType.NOTIFY_CFG]
    assert (bar, offset, length) == (0, tp.NOTIFY_OFFSET, 8) and struct.unpack_from("<I", raw, 16)[0] == 4
    assert PciCapType.PCI_CFG in virtio_caps
    msix = [raw for _, cap_id, raw in caps if cap_id == CapId.MSIX]
    assert len(msix) == 1
    flags, table, pba = struct.unpack_from("<HII", msix[0], 2)
    assert (flags & MsixFlags.QSIZE, table, pba) == (2, tp.MSIX_TABLE_OFFSET, tp.MSIX_PBA_OFFSET)  # 3 vectors, BIR 0


def test_feature_negotiation_refusals(virtio):
    h, dev, drv = virtio
    drv.set_status(0)
    drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    offered = drv.device_features()
    assert offered & bits(Feature.VERSION_1)

    def try_features(f):
        drv.set_status(0)
        drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        for sel in (0, 1):
            drv.common_write(Common.DRIVER_FEATURE_SELECT, 4, sel)
            drv.common_write(Common.DRIVER_FEATURE, 4, (f >> 32 * sel) & 0xFFFF_FFFF)
        drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return bool(drv.status & Status.FEATURES_OK)

    assert not try_features(offered & ~bits(Feature.VERSION_1))  # a legacy driver
    assert not try_features(offered | bits(Feature.RING_PACKED))  # something not offered
    assert try_features(offered)
    drv.common_write(Common.DRIVER_FEATURE, 4, 0)  # after FEATURES_OK
    assert drv.status & Status.NEEDS_RESET


def test_status_bits_only_clear_by_reset(virtio):
    h, dev, drv = virtio
    asyncio.run(drv.setup())
    drv.set_status(Status.ACKNOWLEDGE)
    assert drv.status & Status.NEEDS_RESET
    drv.set_status(0)
    assert drv.status == 0


def test_queue_registers(virtio):
    h, dev, drv = virtio
    drv.set_status(0)
    assert drv.common_read(Common.NUM_QUEUES, 2) == 2
    drv.common_write(Common.QUEUE_SELECT, 2, 7)
    assert drv.common_read(Common.QUEUE_SIZE, 2) == 0  # no such queue
    drv.common_write(Common.QUEUE_SELECT, 2, 1)
    assert drv.common_read(Common.QUEUE_SIZE, 2) == 256
    assert drv.common_read(Common.QUEUE_NOTIFY_OFF, 2) == 1
    drv.common_write(Common.QUEUE_MSIX_VECTOR, 2, 99)  # no such vector: reads back NO_VECTOR
    assert drv.common_read(Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    drv.common_write(Common.QUEUE_MSIX_VECTOR, 2, 2)
    assert drv.common_read(Common.QUEUE_MSIX_VECTOR, 2) == 2
    drv.common_write(Common.QUEUE_DESC_LO, 4, 0x1234_5000)
    drv.common_write(Common.QUEUE_DESC_HI, 4, 0x1)
    assert (drv.common_read(Common.QUEUE_DESC_LO, 4), drv.common_read(Common.QUEUE_DESC_HI, 4)) == (0x1234_5000, 1)
    assert drv.common_read(Common.QUEUE_DESC_LO, 2) == 0  # wrong width: refused
    assert dev.counters["bad_common_access"] == 1
    drv.set_status(0)
    assert drv.common_read(Common.QUEUE_DESC_LO, 4) == 0  # reset forgets the queue


def test_activation_with_rings_outside_ram_needs_reset(virtio):
    h, dev, drv = virtio
    drv.set_status(0)
    drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    for sel in (0, 1):
        drv.common_write(Common.DRIVER_FEATURE_SELECT, 4, sel)
        drv.common_write(Common.DRIVER_FEATURE, 4, (dev.offered >> 32 * sel) & 0xFFFF_FFFF)
    drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    drv.common_write(Common.QUEUE_SELECT, 2, 0)
    drv.common_write(Common.QUEUE_DESC_LO, 4, 0)
    drv.common_write(Common.QUEUE_DESC_HI, 4, 0x100)  # 1 TiB: no RAM there
    drv.common_write(Common.QUEUE_ENABLE, 2, 1)

    async def go():
        drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
    asyncio.run(go())
    assert drv.status & Status.NEEDS_RESET


def test_a_doorbell_kvm_did_not_take_reaches_the_queue(virtio):
    h, dev, drv = virtio
    drv.write(tp.NOTIFY_OFFSET + 4, 4, 1)  # a 32-bit write: not what the ioeventfd matches
    assert os.eventfd_read(dev.kick_fds[1]) == 1


def test_pci_cfg_window(virtio):
    h, dev, drv = virtio
    c = dev.cfg_cap
    drv.pci_write(c + 4, 1, 0)  # BAR 0
    drv.pci_write(c + 8, 4, tp.COMMON_OFFSET + Common.NUM_QUEUES)
    drv.pci_write(c + 12, 4, 2)
    assert drv.pci_read(c + 16, 2) == 2


def test_msix_masking_pending_and_function_mask(virtio):
    h, dev, drv = virtio
    msix = dev.msix
    cap = msix.cap
    v = msix.vectors[1]
    drv.pci_write(cap + MsixCap.FLAGS, 2, MsixFlags.ENABLE)
    entry = tp.MSIX_TABLE_OFFSET + 16
    drv.write(entry, 4, 0xFEE0_0000)
    drv.write(entry + 8, 4, 0x41)
    assert v.masked  # entries start masked
    v.trigger()
    assert v.pending and drv.read(tp.MSIX_PBA_OFFSET, 8) == 0b10
    assert drv.interrupts(1) == 0
    drv.write(entry + 12, 4, 0)  # unmask: the pending interrupt is delivered
    assert drv.interrupts(1) == 1 and not v.pending and drv.read(tp.MSIX_PBA_OFFSET, 8) == 0
    assert v.message == MsiMessage(0xFEE0_0000, 0x41)
    drv.pci_write(cap + MsixCap.FLAGS, 2, MsixFlags.ENABLE | MsixFlags.MASKALL)  # function mask
    v.trigger()
    assert drv.interrupts(1) == 0 and v.pending
    drv.pci_write(cap + MsixCap.FLAGS, 2, MsixFlags.ENABLE)
    assert drv.interrupts(1) == 1
    assert drv.read(entry + 1, 4) == 0xFFFF_FFFF  # misaligned table access
    drv.write(tp.MSIX_PBA_OFFSET, 8, 0xFF)  # the PBA is read-only
    assert drv.read(tp.MSIX_PBA_OFFSET, 8) == 0


def test_gsi_routing_table():
    r = IrqRouter(None)
    try:
        a, b = r.allocate(), r.allocate()
        assert (a.gsi, b.gsi) == (platform.FIRST_MSI_GSI, platform.FIRST_MSI_GSI + 1)
        b.route(MsiMessage(0xFEE0_1000, 0x33))
        table = r.routes()
        assert (platform.COM1_IRQ, "irqchip", (lib.KVM_IRQCHIP_IOAPIC, platform.COM1_IRQ)) in table
        assert (platform.COM1_IRQ, "irqchip", (lib.KVM_IRQCHIP_PIC_MASTER, platform.COM1_IRQ)) in table
        assert (17, "irqchip", (lib.KVM_IRQCHIP_IOAPIC, 17)) in table
        assert [e for e in table if e[1] == "msi"] == [(b.gsi, "msi", (0xFEE0_1000, 0x33))]
        a.close()
        assert r.allocate().gsi == platform.FIRST_MSI_GSI  # freed GSIs are reused
    finally:
        r.close()


def test_intx_when_the_driver_enables_no_msix(virtio):
    """A driver that does not enable MSI-X gets INTx, and the ISR says why (4.1.4.5)."""
    h, dev, drv = virtio

    async def go():
        from asyncvmm.testing.mock_driver import BlkClient

        await drv.setup(msix=False)
        assert not dev.intx.c.masked
        st, _, _ = await BlkClient(drv).run(lib.VIRTIO_BLK_T_IN, 0, in_len=512)
        assert st == 0
        assert os.eventfd_read(dev.intx.efd) >= 1
        assert drv.read(tp.ISR_OFFSET, 1) == 1  # a queue interrupt ...
        assert drv.read(tp.ISR_OFFSET, 1) == 0  # ... and reading cleared it
        dev.config_changed()
        assert drv.read(tp.ISR_OFFSET, 1) == 2 and os.eventfd_read(dev.intx.efd) == 1
        drv.pci_write(Reg.COMMAND, 2, drv.pci_read(Reg.COMMAND, 2) | Command.INTX_DISABLE)
        assert dev.intx.c.masked
    asyncio.run(go())


def test_msix_enabled_silences_intx(virtio):
    h, dev, drv = virtio
    asyncio.run(drv.setup())
    assert dev.intx.c.masked


def test_msi_instead_of_msix(tmp_path):
    """-W: one MSI message, no MSI-X capability; every queue raises it, the ISR says why."""
    from asyncvmm.devices.pci.msi import ADDRESS_LO, DATA, FLAGS_ENABLE, MASK
    from asyncvmm.testing.mock_driver import BlkClient

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with Harness() as h:
        blk = VirtioBlk(BlockOptions(str(img)), h.mem, queues=1)
        dev = tp.VirtioPciDevice(blk, h.router, h.notify, msi=True)
        h.root.add(5, 0, dev)
        h.devices.append(dev)
        h.root.assign_bars(platform.pci_mmio64_window(platform.ram_top(h.mem.regions)))
        drv = VirtioDriver(h, dev)
        assert dev.msix is None and [c for _, c, _ in capabilities(drv)].count(CapId.MSI) == 1
        cap = dev.msi.cap
        drv.pci_write(cap + ADDRESS_LO, 4, 0xFEE0_0000)
        drv.pci_write(cap + DATA, 2, 0x45)
        drv.pci_write(cap + 2, 2, FLAGS_ENABLE)
        assert dev.msi.vector.message == MsiMessage(0xFEE0_0000, 0x45) and not dev.msi.vector.masked

        async def go():
            await drv.setup(msix=False)
            assert dev.intx.c.masked  # MSI is on: INTx stays quiet
            st, _, _ = await BlkClient(drv).run(lib.VIRTIO_BLK_T_IN, 0, in_len=512)
            assert st == 0 and os.eventfd_read(dev.msi.vector.efd) >= 1
            assert drv.read(tp.ISR_OFFSET, 1) == 1
            drv.pci_write(cap + MASK, 4, 1)  # per-vector mask: held as pending
            dev.config_changed()
            assert dev.msi.vector.pending and drv.pci_read(cap + MASK + 4, 4) == 1
            drv.pci_write(cap + MASK, 4, 0)
            assert os.eventfd_read(dev.msi.vector.efd) == 1
        asyncio.run(go())


def test_status_reads_0_only_once_the_device_has_drained():
    """4.1.4.3.2: after a reset (status 0) the driver reads status until it is 0; a device
    with I/O still in flight into guest memory must not say 0 before it is done."""
    from asyncvmm.devices.virtio.device import VirtioDevice

    class Draining(VirtioDevice):
        device_id, name, pci_class = 2, "draining", 0xFF0000
        inflight = 0

        def activate(self, features, queues):
            self.inflight = 3

        def quiesced(self):
            return self.inflight == 0

    with Harness() as h:
        dev = h.add(Draining(1, 8))
        drv = VirtioDriver(h, dev)
        asyncio.run(drv.setup())
        drv.set_status(0)
        assert drv.status != 0  # still draining
        dev.device.inflight = 0
        assert drv.status == 0
