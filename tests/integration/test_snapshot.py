"""Snapshots on a real KVM: a guest snapshotted by `asyncvmm ctl snapshot` (or bhyvectl's
--suspend, or the API) goes on in a NEW process (`asyncvmm run --restore`) from where it was.

Each VMM is `asyncvmm run` in a subprocess with a private ASYNCVMM_RUN_DIR; COM1 is its
stdout, collected as it comes.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm, run_vmm

from asyncvmm import VM, VmConfig
from asyncvmm.config import parse_slot
from asyncvmm.loop import run as run_loop
from asyncvmm.snapshot import file as snapfile

pytestmark = needs_kvm

EXIT_HOST = 4


@pytest.fixture
def run_dir():
    path = Path(tempfile.mkdtemp(prefix="avmm-snap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Vmm:
    """`asyncvmm run ARGS...` in a subprocess, its COM1 (stdout) and stderr collected."""

    def __init__(self, run_dir: Path, *args: str, stdin=subprocess.DEVNULL):
        self.env = {**os.environ, "ASYNCVMM_RUN_DIR": str(run_dir)}
        self.out = bytearray()
        self.err = bytearray()
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncvmm", "run", *args], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=self.env)
        self._threads = [threading.Thread(target=self._collect, args=(p, b), daemon=True)
                         for p, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _collect(self, pipe, into: bytearray) -> None:
        while data := os.read(pipe.fileno(), 65536):
            with self._lock:
                into += data

    def output(self) -> bytes:
        with self._lock:
            return bytes(self.out)

    def wait_for(self, pattern: bytes, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"{pattern!r} not seen; out {self.output()[-300:]!r} err {bytes(self.err)[-600:]!r}")

    def ctl(self, *args: str, timeout: float = 60):
        return run_vmm("ctl", *args, env=self.env, timeout=timeout)

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def end(self, timeout: float = 30) -> int:
        try:
            status = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self._threads:
                t.join(5)
            if self.proc.stdin:
                self.proc.stdin.close()
        return status


def ticks(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick (\d+)\n", out)]


def test_counter_goes_on_in_a_new_process(guests, run_dir, tmp_path):
    snap = tmp_path / "counter.snap"
    a = Vmm(run_dir, "-m", "64", "--kernel", str(guests / "counter.elf"), "--cmdline", "delay=2000", "snap-a")
    a.wait_for(rb"tick 20\n")
    r = a.ctl("snapshot", "snap-a", str(snap), "--stop")
    assert r.status == 0, r.err
    assert re.match(r"VM snap-a: snapshot .*: 64 MiB of RAM, \d+ pages written .* the VM is stopped", r.out)
    assert a.end() == EXIT_HOST
    before = ticks(a.output())
    assert before == list(range(len(before)))
    # Sparse: the counter guest touches a few pages of its 64 MiB.
    assert os.stat(snap).st_blocks * 512 < 1 << 20 and os.stat(snap).st_size > 64 << 20

    b = Vmm(run_dir, "--restore", str(snap), "snap-b")
    b.wait_for(rb"tick %d\n" % (before[-1] + 20))
    after = ticks(b.output())
    # It counts on from its last number, not from 0 (a line cut by the snapshot ends here).
    assert after[0] in (before[-1] + 1, before[-1] + 2) and after == list(range(after[0], after[0] + len(after)))
    assert b.ctl("destroy", "snap-b", "--force").status == 0
    b.end()


def test_tinysh_keeps_a_line_typed_before_the_snapshot(guests, run_dir, tmp_path):
    snap = tmp_path / "tinysh.snap"
    a = Vmm(run_dir, "-m", "64", "--kernel", str(guests / "tinysh.elf"), "sh-a", stdin=subprocess.PIPE)
    a.wait_for(rb"# ")
    a.send(b"add 40000 2")  # half a command: the rest is typed into the restored guest
    a.wait_for(rb"add 40000 2")
    assert a.ctl("--vm=sh-a", "--suspend=" + str(snap)).status == 0  # bhyvectl's spelling
    assert a.end() == EXIT_HOST

    b = Vmm(run_dir, "--restore", str(snap), "sh-b", stdin=subprocess.PIPE)
    time.sleep(0.2)
    b.send(b"345\n")
    b.wait_for(rb"\n# ")
    assert b.output().startswith(b"345\n42345\n"), b.output()  # "add 40000 2" + "345": the line was kept
    b.send(b"exit\n")
    b.wait_for(rb"bye")
    assert b.ctl("destroy", "sh-b", "--force").status in (0, 1, 2)  # it may be restarting: gone either way
    b.end()


def test_vblk_io_in_progress_finishes_after_restore(guests, run_dir, tmp_path):
    """The guest's four requests in sequence: snapshotted (in this process, through the API,
    the moment its first is done) with the rest to do, and restored in a new process."""
    image = tmp_path / "vblk.img"
    image.write_bytes(b"vblk test image\n".ljust(512, b"\0") + bytes(1 << 20))
    snap = str(tmp_path / "vblk.snap")

    async def main():
        cfg = VmConfig(name="blk-a", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       no_reboot=True, slots=[parse_slot(f"3,virtio-blk,{image}")])
        async with VM(cfg, control_socket=False) as vm:
            await vm.console.expect(rb"read: ", timeout=30)
            info = await vm.snapshot(snap, stop=True)
            return bytes(vm.console.transcript), info

    before, info = run_loop(main())
    assert b"past end" not in before, "the I/O ended before the snapshot"
    b = Vmm(run_dir, "--restore", snap, "blk-b")
    b.wait_for(rb"vblk done", timeout=30)
    both = before + b.output()
    for line in (b"read: status 0 vblk test image", b"flush: status 0", b"past end: status 1",
                 b"interrupts 4 "):
        assert both.count(line) == 1, both
    assert re.search(rb"write: status\s*0", both)  # the line may be cut by the snapshot
    assert image.read_bytes()[512:528] == b"written by vblk\n"
    assert b.ctl("destroy", "blk-b", "--force").status == 0
    b.end()


def test_two_vcpus_restored_mid_bring_up(guests, run_dir, tmp_path):
    """The smp guest snapshotted as it starts (its AP waiting for INIT/SIPI in the in-kernel
    LAPIC), restored in a new process: the BSP brings the AP up there, once."""
    snap = str(tmp_path / "smp.snap")

    async def main():
        cfg = VmConfig(name="smp-a", memory=64 << 20, cpus=2, kernel=str(guests / "smp.elf"),
                       cmdline="cpus=2 stay=1", no_reboot=True)
        async with VM(cfg, control_socket=False) as vm:
            await vm.snapshot(snap, stop=True)
            return bytes(vm.console.transcript)

    before = run_loop(main())
    assert b"smp:" not in before, before
    state = snapfile.read(snap).state
    assert len(state["vcpus"]) == 2
    b = Vmm(run_dir, "--restore", snap, "smp-b")
    b.wait_for(rb"smp: 2 cpus up\n", timeout=30)
    both = before + b.output()
    assert both.count(b"ap 1 up\n") == 1 and both.count(b"smp: 2 cpus up\n") == 1, both
    assert '"vcpus": 2' in b.ctl("state", "smp-b", "--json").out
    assert b.ctl("destroy", "smp-b", "--force").status == 0
    b.end()


def test_api_snapshot_and_a_vm_from_it(guests, tmp_path):
    snap = str(tmp_path / "api.snap")

    async def main():
        cfg = VmConfig(name="snap-api", memory=64 << 20, kernel=str(guests / "counter.elf"), cmdline="delay=2000")
        async with VM(cfg) as vm:
            await vm.console.expect(rb"tick 5\n")
            info = await vm.snapshot(snap)
            assert vm.state == "paused"
            assert info["ram_bytes"] == 64 << 20 and info["pages_written"] < 100
            last = ticks(bytes(vm.console.transcript))[-1]
            await vm.resume()  # the source goes on too
            await vm.console.expect(rb"tick %d\n" % (last + 3))
        assert snapfile.verify_memory(snapfile.read(snap))
        t0 = time.monotonic()
        async with VM.from_snapshot(snap, name="snap-api-2") as vm2:
            m = await vm2.console.expect(rb"tick (\d+)\n")
            assert int(m.group(1)) in (last + 1, last + 2)
            assert time.monotonic() - t0 < 5

    run_loop(main())


# -- bad input: one line, status 2, nothing started ----------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(guests, tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "good.snap"
    image = path.parent / "disk.img"
    image.write_bytes(bytes(1 << 20))

    async def main():
        cfg = VmConfig(name=f"snap-good-{os.getpid()}", memory=64 << 20, kernel=str(guests / "counter.elf"),
                       cmdline="delay=2000", slots=[parse_slot(f"3,virtio-blk,{image}")])
        async with VM(cfg) as vm:
            await vm.console.expect(rb"tick 2\n")
            await vm.snapshot(str(path), stop=True)

    run_loop(main())
    return path, image


def restore_fails(snap, *extra, run_dir) -> str:
    r = run_vmm("run", "--restore", str(snap), *extra, env={**os.environ, "ASYNCVMM_RUN_DIR": str(run_dir)})
    assert r.status == 2, (r.status, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert not list(run_dir.iterdir())  # nothing started: no control socket
    return lines[0]


def test_bad_snapshots_are_one_line_and_status_2(good_snapshot, run_dir, tmp_path):
    good, image = good_snapshot
    data = good.read_bytes()

    def variant(name: str, content: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(content)
        return p

    assert "truncated" in restore_fails(variant("trunc.snap", data[: len(data) - 8192]), run_dir=run_dir)
    assert "truncated" in restore_fails(variant("short.snap", data[:6000]), run_dir=run_dir)
    assert "not an asyncvmm snapshot" in restore_fails(variant("empty.snap", b""), run_dir=run_dir)
    # Another version, with the header's checksum made right: the version is what is said.
    head = bytearray(data[:4096])
    struct.pack_into("<I", head, 8, 99)
    nparts = struct.unpack_from("<I", head, 12)[0]
    end = snapfile.HEADER.size + nparts * snapfile.PART.size
    struct.pack_into("<I", head, end, zlib.crc32(bytes(head[:end])))
    assert "format version 99" in restore_fails(variant("v99.snap", bytes(head) + data[4096:]), run_dir=run_dir)
    # A flipped byte in the state part.
    flipped = bytearray(data)
    flipped[4096 + 40] ^= 0x20
    assert "checksum does not match" in restore_fails(variant("flip.snap", bytes(flipped)), run_dir=run_dir)
    # Devices other than the snapshot's.
    msg = restore_fails(good, "-s", f"4,virtio-blk,{image}", run_dir=run_dir)
    assert "the snapshot's machine has -s 3:0,virtio-blk" in msg
    assert "No such file" in restore_fails(tmp_path / "missing.snap", run_dir=run_dir)


def test_a_disk_changed_since_the_snapshot_is_refused(good_snapshot, run_dir, tmp_path):
    good, image = good_snapshot
    copy = tmp_path / "g.snap"
    shutil.copy(good, copy)
    saved = image.read_bytes()
    st = os.stat(image)
    try:
        with open(image, "ab") as f:
            f.write(bytes(4096))
        assert "its size changed since the snapshot" in restore_fails(copy, run_dir=run_dir)
        image.write_bytes(saved)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert "modified after the snapshot" in restore_fails(copy, run_dir=run_dir)
    finally:
        image.write_bytes(saved)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- diff snapshots --------------------------------------------------------------------------
def memory_of(snap_path: str) -> bytes:
    """Guest RAM as a restore would see it: the root's pages, each diff's over them."""
    from asyncvmm.vstate.memory import GuestMemory

    snap = snapfile.read(snap_path)
    root = snap.root()
    fd = root.open_memory()
    try:
        mem = GuestMemory(snap.memory.length, backing=(fd, root.memory.offset))
    finally:
        os.close(fd)
    try:
        for d in snap.diffs():
            d.apply_diff(mem)
        return b"".join(mem.read(r.gpa, r.size) for r in mem.regions)
    finally:
        mem.close()


def test_diff_snapshots_over_their_base(guests, run_dir, tmp_path):
    """A full snapshot before the vblk guest's I/O, a diff after it (the device wrote a
    read's data into guest RAM: the data path's dirty log; the guest wrote its own pages:
    KVM's), and a full one at the same moment: base + diff is that memory exactly. Then the
    counter restored from a chain of two diffs, in a new process, counts on."""
    image = tmp_path / "vblk.img"
    image.write_bytes(b"diff test image\n".ljust(512, b"\0") + bytes(1 << 20))
    base, diff, full = (str(tmp_path / n) for n in ("base.snap", "diff.snap", "full.snap"))

    async def blk():
        cfg = VmConfig(name="diff-blk", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       no_reboot=True, slots=[parse_slot(f"3,virtio-blk,{image}")])
        async with VM(cfg, control_socket=False) as vm:
            await vm.snapshot(base)
            assert b"read:" not in vm.console.transcript
            await vm.resume()
            await vm.console.expect(rb"vblk done\n", timeout=30)
            d = await vm.snapshot(diff, diff=True)
            f = await vm.snapshot(full)
            return d, f

    d, f = run_loop(blk())
    assert 0 < d["pages_written"] < f["pages_written"] + 64
    assert d["device_pages"] >= 1  # the read's buffer, written by the data path
    assert os.stat(diff).st_blocks < os.stat(full).st_blocks
    assert memory_of(diff) == memory_of(full)
    with open(base, "r+b") as f:
        f.write(b"X")  # a damaged base: the diff is refused
    with pytest.raises(snapfile.SnapshotError, match="base.snap is not an asyncvmm snapshot"):
        snapfile.read(diff)

    counter = [str(tmp_path / n) for n in ("c0.snap", "c1.snap", "c2.snap")]

    async def count():
        cfg = VmConfig(name="diff-counter", memory=64 << 20, kernel=str(guests / "counter.elf"), cmdline="delay=2000")
        async with VM(cfg, control_socket=False) as vm:
            for i, path in enumerate(counter):
                await vm.console.expect(rb"tick %d\n" % (10 * (i + 1)))
                info = await vm.snapshot(path, diff=i > 0, stop=i == 2)
                if i < 2:
                    await vm.resume()
            return ticks(bytes(vm.console.transcript))[-1], info

    last, info = run_loop(count())
    assert info["pages_written"] < 16  # the counter's few pages, not its 64 MiB
    b = Vmm(run_dir, "--restore", counter[2], "diff-b")
    m = b.wait_for(rb"tick (\d+)\n")
    assert int(m.group(1)) in (last + 1, last + 2)
    assert b.ctl("destroy", "diff-b", "--force").status == 0
    b.end()


def _a_peer_that_takes_a_page_and_goes(path: str) -> threading.Thread:
    """A migration destination that accepts the machine, reads a page and vanishes."""
    import socket

    from asyncvmm.snapshot import migrate as mig

    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def peer():
        with server:
            conn, _ = server.accept()
            with conn:
                f = conn.makefile("rwb")
                kind, length = mig.FRAME.unpack(f.read(mig.FRAME.size))
                assert kind == b"CONF"
                f.read(length)
                f.write(mig.FRAME.pack(b"OKAY", 0))
                f.flush()
                f.read(mig.FRAME.size + mig.PAGES.size + 4096)

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    return t


def test_a_failed_migration_between_a_snapshot_and_its_diff_loses_no_page(guests, tmp_path):
    """A migration's passes take the same dirty log as the diff snapshots: the pages the
    device wrote after the base (the vblk guest's read) and before a migration that failed
    must still be in the diff taken after it — base + diff is the memory of a full snapshot
    taken at the same moment. (The diff had lost them: the migration's start cleared the log.)"""
    from asyncvmm.snapshot.migrate import MigrationError

    image = tmp_path / "vblk.img"
    image.write_bytes(b"diff test image\n".ljust(512, b"\0") + bytes(1 << 20))
    base, diff, full = (str(tmp_path / n) for n in ("base.snap", "diff.snap", "full.snap"))
    peer = _a_peer_that_takes_a_page_and_goes(str(tmp_path / "peer.sock"))

    async def go():
        cfg = VmConfig(name="diff-mig", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       no_reboot=True, slots=[parse_slot(f"3,virtio-blk,{image}")])
        async with VM(cfg, control_socket=False) as vm:
            await vm.snapshot(base)
            await vm.resume()
            await vm.console.expect(rb"vblk done\n", timeout=30)
            with pytest.raises(MigrationError, match="the VM goes on here"):
                await vm.migrate(f"unix:{tmp_path}/peer.sock")
            await vm.snapshot(diff, diff=True)
            await vm.snapshot(full)

    run_loop(go())
    peer.join(10)
    assert memory_of(diff) == memory_of(full)


# -- live migration ----------------------------------------------------------------------------
def test_counter_migrates_between_two_processes(guests, run_dir):
    address = f"unix:{run_dir}/migrate.sock"
    a = Vmm(run_dir, "-m", "64", "--kernel", str(guests / "counter.elf"), "--cmdline", "delay=2000", "mig-a")
    b = Vmm(run_dir, "--incoming", address, "mig-b")
    a.wait_for(rb"tick 20\n")
    deadline = time.monotonic() + 10
    while b"waiting for a migration" not in bytes(b.err) and time.monotonic() < deadline:
        time.sleep(0.01)
    r = a.ctl("migrate", "mig-a", address)
    assert r.status == 0, r.err
    m = re.match(r"VM mig-a: migrated to unix:.* in (\d+) rounds \((\d+) pages\); downtime ([\d.]+) ms", r.out)
    assert m, r.out
    assert float(m.group(3)) < 5000
    assert a.end() == EXIT_HOST  # the source ends once the destination runs
    assert b"migrated to unix:" in bytes(a.err)
    last = ticks(a.output())[-1]
    first = b.wait_for(rb"tick (\d+)\n")
    assert int(first.group(1)) in (last + 1, last + 2)
    b.wait_for(rb"tick %d\n" % (last + 20))
    assert b.ctl("destroy", "mig-b", "--force").status == 0
    b.end()


def test_a_migration_whose_peer_disappears_leaves_the_source_running(guests, run_dir):
    """A destination that accepts the machine, takes some pages and vanishes: the source
    reports it and goes on counting."""
    path = str(run_dir / "peer.sock")
    t = _a_peer_that_takes_a_page_and_goes(path)
    a = Vmm(run_dir, "-m", "64", "--kernel", str(guests / "counter.elf"), "--cmdline", "delay=2000", "gone-a")
    a.wait_for(rb"tick 5\n")
    r = a.ctl("migrate", "gone-a", f"unix:{path}")
    t.join(10)
    assert r.status != 0 and "the VM goes on here" in r.err, (r.status, r.err)
    assert len(r.err.strip().splitlines()) == 1
    n = ticks(a.output())[-1]
    a.wait_for(rb"tick %d\n" % (n + 10))  # still running
    state = a.ctl("state", "gone-a")
    assert state.status == 0 and "running" in state.out
    # A destination that is not there at all.
    r = a.ctl("migrate", "gone-a", f"unix:{run_dir}/nobody.sock")
    assert r.status != 0 and "cannot reach" in r.err
    assert a.ctl("destroy", "gone-a", "--force").status == 0
    a.end()
