"""Which pages of guest RAM were written since the last pass: a diff snapshot's pages, and
each pre-copy round of a live migration.

Two writers, two logs, one answer:

* the vCPUs write through KVM: the memory slots carry KVM_MEM_LOG_DIRTY_PAGES and
  KVM_GET_DIRTY_LOG hands over (and clears) a bit per page written since the last call;
* the VMM's data path writes into guest buffers from the host side (a block read, a
  received frame, a console's bytes), which KVM never sees: every device marks the bytes
  it wrote, once they are written, in a bitmap of its own per region
  (`avmm_gmem_mark_iov`, `avmm_chain_mark_written`, cext/virtq.h). After, not at the pop:
  a read completes (the kernel writes the page) after a pass may have taken the bitmap,
  and a mark taken before the write would have sent the page stale for good.
  Used rings are written in place, so every active queue's used ring counts as written.

The answer is the union, a bit per 4 KiB page per region. It may say a page was written
that was not (a failed read is counted whole): a diff is then larger, never wrong.
"""

from __future__ import annotations

import os

from .._native import ffi, lib
from ..devices.virtio.spec import used_ring_bytes
from ..errors import KvmError

PAGE = 4096


class DirtyLog:
    """Dirty-page tracking on a machine's RAM, from `start()` on."""

    def __init__(self, machine):
        self.machine = machine
        self.vm = machine.vm
        self.regions = list(self.vm.mem.regions)
        self._vmm_bits = []  # a bitmap per region, in the C table (cext/virtq.h: dirty)
        self._kvm_bits = []
        self.on = False
        self.device_pages = 0  # pages the last collect() had from the data path's log
        # Per region, every page any pass collected since the last rebase(): the next diff
        # snapshot's pages. A migration's passes take the log too, and must not lose them.
        self._since_base: list[int] = []

    def start(self) -> None:
        """Log from now on (KVM's log starts empty; the VMM's is cleared)."""
        if self.on:
            self.collect()
            return
        table = self.vm.mem.c_table()
        for i, r in enumerate(self.regions):
            words = (r.size // PAGE + 63) // 64
            vmm = ffi.new("uint64_t[]", words)
            self._vmm_bits.append(vmm)
            self._kvm_bits.append(ffi.new("uint64_t[]", words))
            table.r[i].dirty = vmm
            self._set_slot(r, lib.KVM_MEM_LOG_DIRTY_PAGES)
        self._since_base = [0] * len(self.regions)
        self.on = True

    def stop(self) -> None:
        if not self.on:
            return
        table = self.vm.mem.c_table()
        for i, r in enumerate(self.regions):
            table.r[i].dirty = ffi.NULL
            if self.vm.fd is not None and self.vm.fd.fd >= 0:
                self._set_slot(r, 0)
        self._vmm_bits.clear()
        self._kvm_bits.clear()
        self._since_base = []
        self.on = False

    def _set_slot(self, r, flags: int) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": r.slot, "flags": flags, "guest_phys_addr": r.gpa, "memory_size": r.size, "userspace_addr": r.hva})
        rc = lib.avmm_ioctl(self.vm.fd.fd, lib.KVM_SET_USER_MEMORY_REGION, region)
        if rc < 0:
            raise KvmError(f"dirty page logging on slot {r.slot}: KVM_SET_USER_MEMORY_REGION failed: {os.strerror(-rc)}")

    def collect(self, extra: list[tuple[int, int]] | None = None) -> list[bytes]:
        """The pages written since start() or the last collect(), as a bitmap (bytes, a bit
        per page, little-endian words) per region; both logs are cleared. `extra`: guest
        ranges (gpa, length) to count as written (the used rings)."""
        out = []
        self.device_pages = 0
        table = self.vm.mem.c_table()
        for i, r in enumerate(self.regions):
            kvm = self._kvm_bits[i]
            log = ffi.new("struct kvm_dirty_log *")
            log.slot = r.slot
            log.dirty_bitmap = kvm
            rc = lib.avmm_ioctl(self.vm.fd.fd, lib.KVM_GET_DIRTY_LOG, log)
            if rc < 0:
                raise KvmError(f"KVM_GET_DIRTY_LOG on slot {r.slot} failed: {os.strerror(-rc)}")
            nbytes = ffi.sizeof(kvm)
            # Taken word by word atomically: a device thread (virtio-blk's) may mark meanwhile.
            taken = ffi.new("uint64_t[]", nbytes // 8)
            lib.avmm_gmem_take_dirty(table, i, taken, nbytes // 8)
            device = int.from_bytes(ffi.buffer(taken, nbytes), "little")
            self.device_pages += device.bit_count()
            merged = int.from_bytes(ffi.buffer(kvm, nbytes), "little") | device
            for gpa, length in extra or ():
                if length and r.gpa <= gpa < r.end:
                    first, last = (gpa - r.gpa) // PAGE, (min(gpa + length, r.end) - 1 - r.gpa) // PAGE
                    merged |= ((1 << (last - first + 1)) - 1) << first
            out.append(merged.to_bytes(nbytes, "little"))
            self._since_base[i] |= merged
        return out

    def since_base(self) -> list[bytes]:
        """The pages every collect() took since the last rebase(), a bitmap per region (as
        collect's): what a diff over the last snapshot must hold, whoever took the passes."""
        return [bits.to_bytes(ffi.sizeof(self._kvm_bits[i]), "little") for i, bits in enumerate(self._since_base)]

    def rebase(self) -> None:
        """A snapshot was taken: pages collected from here on are the next diff's."""
        self._since_base = [0] * len(self.regions)


def runs(bitmap: bytes, npages: int) -> list[tuple[int, int]]:
    """(first page, count) of each run of set bits."""
    value = int.from_bytes(bitmap, "little")
    out = []
    page = 0
    while value and page < npages:
        low = (value & -value).bit_length() - 1  # the next set bit
        value >>= low
        page += low
        ones = (~value & (value + 1)).bit_length() - 1  # how many set bits follow
        count = min(ones, npages - page)
        out.append((page, count))
        value >>= ones
        page += ones
    return out


def used_rings(machine) -> list[tuple[int, int]]:
    """(gpa, length) of every active virtqueue's used ring (written in place)."""
    out = []
    for _, dev in machine.pci.devices():
        for q in getattr(dev, "queues", []) or []:
            if getattr(q, "enabled", False) and getattr(q, "device", 0):
                out.append((q.device, used_ring_bytes(q.size)))
    return out
