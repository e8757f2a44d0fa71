"""KVM's own counters of a VM or a vCPU (KVM_GET_STATS_FD, the binary statistics).

Most of what a guest costs never reaches the VMM: exits KVM serves itself (the LAPIC
timer, interrupt injection, halts, page faults, MSRs) and, on a KVM that emulates guest
code, every instruction it emulated. KVM counts those per vCPU and per VM; the boot
profile (asyncvmm.profile) reads them when the first boot ends.

The file is a header (struct kvm_stats_header), an id string, descriptors (struct
kvm_stats_desc, each followed by its name, name_size bytes) and the data, u64 words at
data_offset + desc.offset. Only single-word counters are read here (cumulative, instant
and peak ones); histograms are left out. Names are KVM's (halt_wait_ns,
insn_emulation...), which differ between KVM versions: the caller takes what is there.
"""

from __future__ import annotations

import os
import struct

from .._native import ffi, lib
from ..errors import KvmError

_SINGLE_TYPES = (lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_TYPE_INSTANT, lib.KVM_STATS_TYPE_PEAK)


class KvmStats:
    """The statistics file of one VM or vCPU fd, opened once, read any number of times."""

    def __init__(self, fd: int, what: str):
        r = lib.avmm_ioctl_val(fd, lib.KVM_GET_STATS_FD, 0)
        if r < 0:
            raise KvmError(f"KVM_GET_STATS_FD on {what} failed: {os.strerror(-r)}")
        self.fd = r
        self.what = what
        try:
            self._layout()
        except BaseException:
            self.close()
            raise

    def _read_at(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise KvmError(f"the KVM statistics of {self.what} end early ({len(data)} of {size} bytes at {offset})")
        return data

    def _layout(self) -> None:
        hsize = ffi.sizeof("struct kvm_stats_header")
        header = ffi.new("struct kvm_stats_header *")
        ffi.memmove(header, self._read_at(hsize, 0), hsize)
        dsize = ffi.sizeof("struct kvm_stats_desc")
        stride = dsize + header.name_size
        table = self._read_at(stride * header.num_desc, header.desc_offset)
        desc = ffi.new("struct kvm_stats_desc *")
        self.offsets: dict[str, int] = {}
        for i in range(header.num_desc):
            at = i * stride
            ffi.memmove(desc, table[at : at + dsize], dsize)
            name = table[at + dsize : at + stride].split(b"\0", 1)[0].decode(errors="replace")
            if desc.size == 1 and (desc.flags & lib.KVM_STATS_TYPE_MASK) in _SINGLE_TYPES:
                self.offsets[name] = header.data_offset + desc.offset
        self._span = (min(self.offsets.values(), default=0), max(self.offsets.values(), default=0) + 8)

    def read(self) -> dict[str, int]:
        """Every single-word counter, by KVM's name."""
        if not self.offsets:
            return {}
        start, end = self._span
        data = self._read_at(end - start, start)
        return {name: struct.unpack_from("<Q", data, off - start)[0] for name, off in self.offsets.items()}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_stats(fd: int, what: str) -> KvmStats | None:
    """KvmStats, or None where this KVM has no binary statistics (before Linux 5.14)."""
    try:
        return KvmStats(fd, what)
    except (KvmError, OSError):
        return None
