"""virtio-blk with a vhost-user back-end: the front-end (vhost_user/) against a real
qemu-storage-daemon, driven from the guest's side by the host-side driver (mock_driver).
The back-end serves the rings itself: doorbells are the transport's eventfds handed over
with SET_VRING_KICK, interrupts the MSI-X vectors' eventfds (SET_VRING_CALL)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess

import pytest
from asyncvmm._native import lib
from conftest import run_vmm
from test_cli import assert_usage_error

from asyncvmm.devices.virtio.spec import Status
from asyncvmm.devices.virtio.vhost_user.backend import Backend
from asyncvmm.devices.virtio.vhost_user.blk import CONFIG_SIZE, VhostUserBlk
from asyncvmm.devices.virtio.vhost_user.qsd import Daemon
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import BLK_SEGMENT, BlkClient, Harness, VirtioDriver

QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU_IMG is None or shutil.which("qemu-storage-daemon") is None,
                                reason="needs qemu-img and qemu-storage-daemon (qemu-utils, qemu-system-common)")

T_IN, T_OUT, T_FLUSH, T_GET_ID = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH, lib.VIRTIO_BLK_T_GET_ID
T_DISCARD, T_WZ = lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES
S_OK = lib.VIRTIO_BLK_S_OK
MiB = 1 << 20
DISK = 64 * MiB


def qemu_img(*args: str) -> str:
    return subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def qcow2(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(DISK))
    return path


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


class Served:
    """qemu-storage-daemon serving `image`, a VhostUserBlk on it in a harness, set up by the driver."""

    def __init__(self, image, fmt="qcow2", readonly=False):
        self.image, self.fmt, self.readonly = str(image), fmt, readonly

    async def __aenter__(self):
        self.daemon = await Daemon.start(self.image, self.fmt, readonly=self.readonly, queues=1)
        try:
            self.backend = await Backend.connect(self.daemon.socket, self.image, CONFIG_SIZE, starting=True)
        except BaseException:
            await self.daemon.stop()
            raise
        self.h = Harness(shared=True)
        try:
            self.dev = self.h.add(VhostUserBlk(self.backend, self.h.mem, queues=1))
            self.drv = VirtioDriver(self.h, self.dev)
            await self.drv.setup()
        except BaseException:
            await self.__aexit__()
            raise
        self.c = BlkClient(self.drv)
        return self

    async def __aexit__(self, *exc):
        self.h.close()
        self.backend.close()
        await self.daemon.stop()


def test_every_request_type_on_a_qcow2_then_qemu_img_check_is_clean(qcow2, tmp_path):
    before = open_fds()

    async def go():
        async with Served(qcow2) as s:
            c = s.c
            assert s.dev.device.read_config(0, 8) == DISK // 512  # capacity, from the back-end's GET_CONFIG
            pattern = bytes(range(256)) * 16 * 4  # 16 KiB
            assert (await c.run(T_OUT, 8, data=pattern))[:2] == (S_OK, 1)
            st, n, data = await c.run(T_IN, 8, in_len=len(pattern))
            assert (st, n, data) == (S_OK, len(pattern) + 1, pattern)
            st, _, data = await c.run(T_IN, 10_000, in_len=4096)  # never written: zeros
            assert (st, data) == (S_OK, bytes(4096))
            assert (await c.run(T_FLUSH))[0] == S_OK
            st, _, ident = await c.run(T_GET_ID, in_len=20)
            assert st == S_OK and ident.rstrip(b"\0")  # the export's id
            assert (await c.run(T_OUT, 2048, data=b"\x5a" * 8192))[0] == S_OK
            if s.drv.has(lib.VIRTIO_BLK_F_WRITE_ZEROES):
                seg = BLK_SEGMENT.pack(2048, 8, 0)
                assert (await c.run(T_WZ, payload=seg))[0] == S_OK
                assert (await c.run(T_IN, 2048, in_len=4096))[2] == bytes(4096)
                assert (await c.run(T_IN, 2056, in_len=4096))[2] == b"\x5a" * 4096
            if s.drv.has(lib.VIRTIO_BLK_F_DISCARD):
                assert (await c.run(T_DISCARD, payload=BLK_SEGMENT.pack(4096, 64, 0)))[0] == S_OK
            assert s.dev.device.stats()["lost"] is None
    asyncio.run(go())
    assert open_fds() == before
    qemu_img("check", str(qcow2))
    raw = tmp_path / "back.raw"
    qemu_img("convert", "-O", "raw", str(qcow2), str(raw))
    with open(raw, "rb") as f:
        f.seek(8 * 512)
        assert f.read(16384) == bytes(range(256)) * 64
        f.seek(2056 * 512)
        assert f.read(4096) == b"\x5a" * 4096


def test_read_only_export(qcow2):
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), str(DISK))

    async def go():
        async with Served(qcow2, readonly=True) as s:
            assert s.drv.has(lib.VIRTIO_BLK_F_RO)
            st, _, _ = await s.c.run(T_OUT, 0, data=b"x" * 512)
            assert st != S_OK
            assert (await s.c.run(T_IN, 0, in_len=512))[0] == S_OK
    asyncio.run(go())


def test_a_driver_reset_stops_the_rings_and_setup_again_works(qcow2):
    async def go():
        async with Served(qcow2) as s:
            assert (await s.c.run(T_OUT, 1, data=b"a" * 512))[0] == S_OK
            s.drv.set_status(0)
            for _ in range(200):  # status reads 0 once GET_VRING_BASE has come back
                if s.drv.status == 0:
                    break
                await asyncio.sleep(0.01)
            assert s.drv.status == 0
            await s.drv.setup()
            c = BlkClient(s.drv)
            assert (await c.run(T_IN, 1, in_len=512))[2] == b"a" * 512
    asyncio.run(go())


def test_a_backend_killed_mid_io_needs_reset_and_nothing_leaks(qcow2):
    before = open_fds()

    async def go():
        async with Served(qcow2) as s:
            for i in range(32):  # in flight while the daemon dies
                s.c.build(T_OUT, i * 128, data=bytes([i]) * 65536)
            s.c.q.kick()
            os.kill(s.daemon.pid, signal.SIGKILL)
            for _ in range(500):
                if s.dev.status & Status.NEEDS_RESET:
                    break
                await asyncio.sleep(0.01)
            assert s.dev.status & Status.NEEDS_RESET
            assert s.drv.interrupts(0) >= 1  # the configuration-change interrupt
            assert s.dev.device.stats()["lost"]
            s.drv.set_status(0)  # the driver resets: nothing to wait for from a dead back-end
            assert s.drv.status == 0
            await s.drv.setup()  # and tries again: with no back-end the device stays broken
            assert s.dev.status & Status.NEEDS_RESET
    asyncio.run(go())
    assert open_fds() == before


def test_a_second_vm_on_the_same_image_is_refused(qcow2):
    async def go():
        first = await Daemon.start(str(qcow2), "qcow2", readonly=False, queues=1)
        try:
            with pytest.raises(ConfigError, match="is in use by another VM"):
                await Daemon.start(str(qcow2), "qcow2", readonly=False, queues=1)
        finally:
            await first.stop()
    asyncio.run(go())


def test_bad_inputs_are_one_line(tmp_path, guests, qcow2):
    kernel = str(guests / "hello.elf")
    r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,vhost-user={tmp_path}/none.sock")
    assert_usage_error(r, "vhost-user=", "No such file")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,vhost-user={plain}")
    assert_usage_error(r, "not a Unix socket")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "dead.sock"))  # bound, nobody listening: refused
    try:
        r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,vhost-user={tmp_path}/dead.sock")
        assert_usage_error(r, "vhost-user back-end", "refused")
    finally:
        s.close()
    r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,vhost-user={tmp_path}/x.sock,ro")
    assert_usage_error(r, "decides that itself")
    r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,{qcow2},format=qcow5")
    assert_usage_error(r, "format=qcow5: not an image format")


def test_a_detected_format_may_not_reach_other_files(tmp_path, guests):
    """A guest of a raw disk could write a qcow2 header naming a host file as its backing
    file: a detected format that names other files needs format= said."""
    base = tmp_path / "secret.raw"
    base.write_bytes(b"host secret".ljust(1 << 20, b"\0"))
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    kernel = str(guests / "vblk.elf")
    r = run_vmm("run", "-m", "64", "--kernel", kernel, "-s", f"3,virtio-blk,{overlay}")
    assert_usage_error(r, f"names {base}: say format=qcow2")
    r = run_vmm("run", "-m", "64", "--no-reboot", "--kernel", kernel, "-s", f"3,virtio-blk,{overlay},format=qcow2")
    assert r.status == 0, r.err
    assert "read: status 0 host secret" in r.out  # said explicitly: the backing file is read


def test_a_masked_msix_vector_holds_the_interrupt_until_unmasked(qcow2):
    """While the driver masks a queue's vector the back-end calls a relay that sets the
    pending bit; unmasking delivers it (PCI 6.8.3.4), and the irqfd is the back-end's again."""
    from asyncvmm.devices.virtio.transport_pci import MSIX_TABLE_OFFSET

    async def until(cond, timeout=5.0):
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.005)

    async def go():
        async with Served(qcow2) as s:
            q = s.c.q
            vec = s.dev.msix.vectors[q.vector]
            relayed = lambda: s.dev.device.stats()["relayed_interrupts"]  # noqa: E731
            ctrl = MSIX_TABLE_OFFSET + 16 * q.vector + 12
            q.set_used_event(q.last_used)  # EVENT_IDX: an interrupt for the next used entry, as Linux asks
            assert (await s.c.run(T_OUT, 0, data=b"m" * 512))[0] == S_OK
            await until(lambda: q.interrupts() > 0)  # the irqfd (the back-end signals after the used entry)
            await asyncio.sleep(0.2)
            q.interrupts()  # and the set-up's once-per-call-fd signal, whichever came second
            s.drv.write(ctrl, 4, 1)  # mask
            await until(lambda: relayed() >= 1)  # libvhost-user signals each new call fd once: the relay now
            vec.c.pending = 0  # (that signal is not the request's)
            q.set_used_event(q.last_used)
            assert (await s.c.run(T_IN, 0, in_len=512))[2] == b"m" * 512
            await until(lambda: vec.pending)
            assert q.interrupts() == 0
            s.drv.write(ctrl, 4, 0)  # unmask: the pending interrupt now
            # (>= 1: the back-end may already have signalled its new call fd, the irqfd, once)
            assert q.interrupts() >= 1 and not vec.pending
            await asyncio.sleep(0.2)
            q.interrupts()
            before = relayed()
            q.set_used_event(q.last_used)
            assert (await s.c.run(T_IN, 0, in_len=512))[0] == S_OK
            await until(lambda: q.interrupts() > 0)
            assert relayed() == before and not vec.pending  # the irqfd again, not the relay
    asyncio.run(go())
