"""A block backend (Python coroutines) under a real vCPU: the `vblk` test guest drives a
virtio-blk whose disk is tools/examples/cow_disk.py's copy-on-write overlay, through the
embedding API (VmConfig.block_backends)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

from conftest import ROOT, needs_kvm, vcpu_threads, warm_up_process
from conftest import open_fds as fds

from asyncvmm import VM, PciSlot, VmConfig
from asyncvmm.loop import run as run_loop

pytestmark = needs_kvm
SECTOR0 = b"sector zero says hi".ljust(512, b".")


def cow_disk_class():
    spec = importlib.util.spec_from_file_location("cow_disk", ROOT / "tools" / "examples" / "cow_disk.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cow_disk"] = mod
    spec.loader.exec_module(mod)
    return mod.CowDisk


def test_a_guest_reads_and_writes_a_cow_disk_served_by_coroutines(guests, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(SECTOR0 + bytes(1 << 20))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    disk = cow_disk_class()(str(base))

    async def main():
        cfg = VmConfig(name="vblk-cow", memory=64 << 20, kernel=str(guests / "vblk.elf"), cmdline="stay=1",
                       block_backends={"cow": disk}, slots=[PciSlot(0, 3, 0, "virtio-blk-backend", "cow")])
        await warm_up_process(guests, "cow-warmup")
        before_fds, before_threads = fds(), vcpu_threads()
        async with VM(cfg) as vm:
            await vm.console.expect(rb"vblk done\n", timeout=30)
            out = bytes(vm.console.transcript).decode(errors="replace")
            s = vm.stats()["pci"]["virtio-blk@3.0"]
        assert fds() == before_fds and vcpu_threads() == before_threads
        return out, s

    try:
        out, s = run_loop(main())
        assert f"capacity {(512 + (1 << 20)) // 512} sectors" in out
        assert "read: status 0 sector zero says" in out, out
        assert "write: status 0" in out and "flush: status 0" in out
        assert "past end: status 1" in out  # refused in C: the backend never saw it
        assert "interrupts 4 isr 0x0 empty 4" in out, out  # one interrupt per request, MSI-X
        assert s["backend"]["type"] == "CowDisk" and s["backend"]["errors"] == 0
        assert s["requests"]["reads"] == 1 and s["requests"]["writes"] == 1 and s["requests"]["out_of_range"] == 1
        assert disk.counts["read"] == 1 and disk.counts["write"] == 1
        assert bytes(disk.overlay[0][512:528]) == b"written by vblk\n"
    finally:
        disk.close()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest  # the base is only read
