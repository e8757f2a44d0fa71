"""PCI and virtio-blk with a real vCPU: the `vblk` test guest drives the device itself.

vblk (tests/guests/vblk.c) enumerates bus 0 through ports 0xCF8/0xCFC, moves the device's
64-bit BAR into the 32-bit window (it runs with paging off), sets virtio up, and does a
read, a write, a FLUSH and a read past the end, each waiting for its MSI-X interrupt.
So these tests cover what the host-side harness cannot: KVM's ioeventfd and irqfd with a
guest writing the doorbell, GSI routes for the vector the guest programmed, BARs the guest
moved, MMIO exits to the transport.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, needs_kvm, run_vmm, vcpu_threads, warm_up_process
from conftest import open_fds as fds

from asyncvmm import VM, VmConfig
from asyncvmm.api import VmState
from asyncvmm.config import parse_slot
from asyncvmm.errors import ConfigError
from asyncvmm.loop import run as run_loop

pytestmark = needs_kvm

SECTOR0 = b"sector zero says hi".ljust(512, b".")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "vblk.img"
    path.write_bytes(SECTOR0 + bytes(1 << 20))
    return path


def test_a_guest_reads_and_writes_through_virtio_blk(guests, image):
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "--no-reboot",
                "-s", f"3,virtio-blk,{image}")
    assert r.status == 0, r.err
    assert "pci 00:03.0 1af4:1042" in r.out
    assert "bar0 size 0x8000" in r.out
    assert f"capacity {(512 + (1 << 20)) // 512} sectors" in r.out
    assert "read: status 0 sector zero says" in r.out
    assert "write: status 0" in r.out and "flush: status 0" in r.out
    assert "past end: status 1" in r.out  # VIRTIO_BLK_S_IOERR
    assert "irq: msix" in r.out and "interrupts 4 isr 0x0 empty 4" in r.out  # MSI-X: the ISR is not used
    assert image.read_bytes()[512:528] == b"written by vblk\n"


def test_the_disks_own_thread_under_every_filter(guests, image):
    """--seccomp=kill: virtio-blk's thread (cext/blk_thread.c) runs under the loop's filter,
    which it inherits, and its own (IOTHREAD) on top; the guest's I/O all gets through."""
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "--no-reboot", "--seccomp=kill",
                "-s", f"3,virtio-blk,{image}")
    assert r.status == 0, r.err
    assert "read: status 0 sector zero says" in r.out and "write: status 0" in r.out and "flush: status 0" in r.out
    assert image.read_bytes()[512:528] == b"written by vblk\n"


@pytest.mark.parametrize("mode,flags,expect", [
    ("1", [], "irq: intx gsi 19"),  # slot 3, INTA: GSI 16 + 3 (the DSDT's _PRT)
    ("2", ["-W"], "irq: msi"),
])
def test_intx_and_msi_with_a_real_vcpu(guests, image, mode, flags, expect):
    """INTx: a level GSI through a resample irqfd, the handler reading the ISR; MSI: -W."""
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "--cmdline", f"irq={mode}", "--no-reboot",
                *flags, "-s", f"3,virtio-blk,{image}")
    assert r.status == 0, r.err
    assert expect in r.out
    assert "read: status 0 sector zero says" in r.out and "past end: status 1" in r.out
    m = re.search(r"interrupts (\d+) isr (0x\d+) empty (\d+)", r.out)
    assert m and m.group(2) == "0x1", r.out  # the handler saw the ISR's queue bit
    # One interrupt per request; on INTx, kvm_pvm's in-kernel IOAPIC delivers a level line
    # once more after the EOI even though the line went down when the ISR was read (the
    # extra one finds the ISR empty, as a shared line's other users would).
    assert int(m.group(1)) - int(m.group(3)) == 4, r.out


def test_doorbells_and_interrupts_bypass_the_loop(guests, image):
    """The guest's notify writes go to the ioeventfd (no MMIO exit reaches the transport)
    and its interrupts come through the MSI route it programmed."""
    async def main():
        await warm_up_process(guests, "vblk-warmup")
        before_fds, before_threads = fds(), vcpu_threads()
        cfg = VmConfig(name="vblk-stats", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       slots=[parse_slot(f"3,virtio-blk,{image}")])
        async with VM(cfg) as vm:
            await vm.console.expect(rb"vblk done\n", timeout=30)
            s = vm.stats()["pci"]["virtio-blk@3.0"]
            assert s["transport"].get("notify_exits", 0) == 0
            assert s["transport"]["activations"] == 1
            assert s["requests"]["reads"] == 1 and s["requests"]["writes"] == 1 and s["requests"]["flushes"] == 1
            assert s["requests"]["out_of_range"] == 1
            assert s["queues"][0]["interrupts"] == 4
            assert s["location"] == "00:03.0"
            assert vm.machine.irq.commits >= 1  # the guest's vector (KVM had the default table already)
            assert any(kind == "msi" for _, kind, _ in vm.machine.irq.routes())
        assert fds() == before_fds and vcpu_threads() == before_threads  # eventfds, io_uring, image: gone
    run_loop(main())


def test_an_image_in_use_is_refused_at_start(guests, image):
    first = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "vblk.elf"),
         "--cmdline", "stay=1", "-s", f"3,virtio-blk,{image}", "holder"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        out = b""
        while b"vblk done" not in out and time.monotonic() < deadline:
            out += first.stdout.read1(4096)
        assert b"vblk done" in out
        r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "-s", f"4,virtio-blk,{image}", "second")
        assert r.status == 2
        assert "in use by another VM" in r.err and "Traceback" not in r.err
        ro = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "-s", f"4,virtio-blk,{image},ro", "third")
        assert ro.status == 2 and "in use by another VM" in ro.err
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
        first.stderr.close()


@pytest.mark.skipif(not os.path.exists("/dev/net/tun") or os.geteuid() != 0, reason="needs /dev/net/tun and root")
def test_a_tap_outlives_guest_resets(guests):
    """A reset builds the machine anew, but not the TAP: a user may have bridged it or moved
    it into a namespace. It goes when the VM does (asyncvmm created it)."""
    tap = f"avr{os.getpid() % 100000}"
    ifindex = f"/sys/class/net/{tap}/ifindex"

    async def main():
        cfg = VmConfig(name="tap-resets", memory=64 << 20, kernel=str(guests / "hello.elf"),
                       slots=[parse_slot(f"3,virtio-net,{tap}")])
        async with VM(cfg) as vm:
            first = open(ifindex).read()
            deadline = time.monotonic() + 30
            while vm.boots < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert vm.boots >= 3, "the guest did not reset twice"
            assert open(ifindex).read() == first
    run_loop(main())
    assert not os.path.exists(ifindex)


QEMU_IMG = shutil.which("qemu-img")
needs_qsd = pytest.mark.skipif(QEMU_IMG is None or shutil.which("qemu-storage-daemon") is None,
                               reason="needs qemu-img and qemu-storage-daemon")


@needs_qsd
@pytest.mark.parametrize("mode,flags,expect", [("0", [], "irq: msix"), ("1", [], "irq: intx"), ("2", ["-W"], "irq: msi"),
                                               ("0", ["--seccomp", "kill"], "irq: msix")])
def test_a_guest_on_a_qcow2_disk_through_qemu_storage_daemon(guests, image, tmp_path, mode, flags, expect):
    """The same guest on a qcow2 image: qemu-storage-daemon serves the rings (vhost-user),
    MSI-X straight through the irqfd, INTx and MSI relayed by the front-end; the daemon
    stops with the VM and the image checks clean."""
    disk = tmp_path / "vblk.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(image), str(disk)], check=True)
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "--cmdline", f"irq={mode}", "--no-reboot",
                *flags, "-s", f"3,virtio-blk,{disk}")
    assert r.status == 0, r.err
    assert expect in r.out
    assert f"capacity {(512 + (1 << 20)) // 512} sectors" in r.out
    assert "read: status 0 sector zero says" in r.out
    assert "write: status 0" in r.out and "flush: status 0" in r.out
    assert "past end: status 1" in r.out
    assert re.search(r"disk .*vblk.qcow2: qcow2 served by qemu-storage-daemon \(pid \d+\)", r.err), r.err
    assert re.search(r"disk .*vblk.qcow2: qemu-storage-daemon \(pid \d+\) stopped", r.err), r.err
    subprocess.run([QEMU_IMG, "check", "-q", str(disk)], check=True)
    back = tmp_path / "back.raw"
    subprocess.run([QEMU_IMG, "convert", "-q", "-O", "raw", str(disk), str(back)], check=True)
    assert back.read_bytes()[512:528] == b"written by vblk\n"


@needs_qsd
def test_the_vhost_user_data_path_bypasses_the_vmm_and_nothing_outlives_the_vm(guests, image, tmp_path):
    """Through the API: the guest's doorbells go to the back-end (no MMIO exit, no relayed
    interrupt with MSI-X), `stats` says which back-end; after the VM no fd, thread or
    qemu-storage-daemon is left."""
    disk = tmp_path / "vblk.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(image), str(disk)], check=True)

    def daemons() -> int:
        return subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{disk}"], capture_output=True).stdout.count(b"\n")

    async def main():
        await warm_up_process(guests, "vhost-warmup")
        before_fds, before_threads = fds(), vcpu_threads()
        cfg = VmConfig(name="vhost-stats", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       slots=[parse_slot(f"3,virtio-blk,{disk}")])
        async with VM(cfg) as vm:
            await vm.console.expect(rb"vblk done\n", timeout=30)
            assert daemons() == 1
            s = vm.stats()["pci"]["virtio-blk@3.0"]
            assert s["transport"].get("notify_exits", 0) == 0 and s["transport"]["activations"] == 1
            assert s["vhost_user"] == str(disk) and s["lost"] is None
            assert s["relayed_interrupts"] == 0  # MSI-X: the back-end wrote the irqfd itself
            # The back-end writes guest RAM unseen (no dirty log, no hold): no copy of it.
            with pytest.raises(ConfigError, match="vhost-user back-end writes guest RAM.*cannot be snapshotted"):
                await vm.snapshot(str(tmp_path / "x.snap"))
            with pytest.raises(ConfigError, match="vhost-user back-end writes guest RAM.*cannot be migrated"):
                await vm.migrate(f"unix:{tmp_path}/nobody.sock")
            assert vm.state is VmState.RUNNING and not (tmp_path / "x.snap").exists()
        assert fds() == before_fds and vcpu_threads() == before_threads
        assert daemons() == 0
    run_loop(main())


@needs_qsd
def test_a_qcow2_in_use_is_refused_at_start_and_its_daemon_dies_with_the_vmm(guests, image, tmp_path):
    """qemu-storage-daemon's image lock: a second VM on the image gets one line, status 2;
    a VMM killed with SIGKILL takes its daemon with it (PR_SET_PDEATHSIG)."""
    import glob  # noqa: PLC0415

    disk = tmp_path / "held.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(image), str(disk)], check=True)
    dirs_before = set(glob.glob("/tmp/asyncvmm-qsd-*"))
    first = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "vblk.elf"),
         "--cmdline", "stay=1", "-s", f"3,virtio-blk,{disk}", "qcow2-holder"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )

    def daemons() -> int:
        return subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{disk}"], capture_output=True).stdout.count(b"\n")

    try:
        deadline = time.monotonic() + 20
        out = b""
        while b"vblk done" not in out and time.monotonic() < deadline:
            out += first.stdout.read1(4096)
        assert b"vblk done" in out
        r = run_vmm("run", "-m", "64", "--kernel", str(guests / "vblk.elf"), "-s", f"4,virtio-blk,{disk}", "second")
        assert r.status == 2, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "is in use by another VM" in lines[0] and "lock" in lines[0], r.err
        assert daemons() == 1  # the second VM's daemon is gone, the first's serves on
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
        first.stderr.close()
    deadline = time.monotonic() + 10
    while daemons() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemons() == 0
    assert set(glob.glob("/tmp/asyncvmm-qsd-*")) <= dirs_before  # the socket's directory went at connection
