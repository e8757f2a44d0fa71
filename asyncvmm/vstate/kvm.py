"""The KVM objects: the /dev/kvm system fd, a VM fd, vCPU fds.

Each ioctl is wrapped once here: build the struct with cffi (layouts from <linux/kvm.h>),
call through `avmm_ioctl`, turn -errno into `KvmError` naming what failed. Callers above
this module never see errno or ioctl numbers.
"""

from __future__ import annotations

import errno
import os

from .._abi import ABI_VERSION as NATIVE_ABI
from .._native import ffi, lib
from ..errors import ConfigError, KvmError

KVM_DEVICE = "/dev/kvm"

if lib.AVMM_ABI_VERSION != NATIVE_ABI:
    raise ImportError(
        f"asyncvmm._native is built for ABI {lib.AVMM_ABI_VERSION}, this code needs {NATIVE_ABI}: "
        "rebuild it (pip install -e . or tools/setup)"
    )


def _check(r: int, what: str) -> int:
    if r < 0:
        raise KvmError(f"{what} failed: {os.strerror(-r)}")
    return r


class Kvm:
    """The system fd: capabilities and what this host's KVM supports."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd)") from None
        except PermissionError:
            raise ConfigError(f"no permission to open {path}: run as root or join the group that owns it") from None
        except OSError as e:
            raise ConfigError(f"cannot open {path}: {e.strerror}") from None
        version = lib.avmm_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0)
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path} speaks KVM API {version}, asyncvmm needs {lib.KVM_API_VERSION}")
        self.vcpu_mmap_size = _check(lib.avmm_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")
        self._cpuid: list[dict[str, int]] | None = None
        self._msrs: set[int] | None = None

    def check_extension(self, cap: int) -> int:
        r = lib.avmm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[dict]:
        """KVM_GET_SUPPORTED_CPUID as a list of entries (function, index, flags, eax..edx)."""
        if self._cpuid is None:
            n = 128
            while True:
                buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
                r = lib.avmm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
                if r == -errno.E2BIG:
                    n *= 2
                    continue
                _check(r, "KVM_GET_SUPPORTED_CPUID")
                break
            self._cpuid = [
                {k: getattr(e, k) for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
                for e in buf.entries[0 : buf.nent]
            ]
        return [dict(e) for e in self._cpuid]

    def msr_index_list(self) -> set[int]:
        """The MSRs this KVM lets a VMM save and restore (KVM_GET_MSR_INDEX_LIST)."""
        if self._msrs is None:
            n = 256
            while True:
                buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
                r = lib.avmm_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
                if r == -errno.E2BIG:
                    n = buf.nmsrs if buf.nmsrs > n else n * 2
                    continue
                _check(r, "KVM_GET_MSR_INDEX_LIST")
                break
            self._msrs = set(buf.indices[0 : buf.nmsrs])
        return set(self._msrs)

    def create_vm(self) -> int:
        # KVM_CREATE_VM registers an MMU notifier, which takes every lock of this process's
        # address space and gives up with EINTR when any signal arrives meanwhile (a timer,
        # SIGCHLD, another VM's vCPU kick): the VM was not made, so ask again.
        while True:
            r = lib.avmm_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0)
            if r != -errno.EINTR:
                return _check(r, "KVM_CREATE_VM")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A VM: memory slots, the in-kernel irqchip and PIT, irqfds and ioeventfds."""

    # Addresses KVM needs for its own use on Intel (TSS for real mode, EPT identity map):
    # just below 0xFF000000, where QEMU puts them, so a firmware image of up to 16 MiB at
    # the top of 4 GiB (-l bootrom) never overlaps them.
    TSS_ADDR = 0xFEFF_D000
    IDENTITY_MAP_ADDR = 0xFEFF_C000

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        self.fd = kvm.create_vm()

    def set_memory_region(self, slot: int, gpa: int, size: int, hva: int, *, readonly: bool = False) -> None:
        """Map [gpa, gpa+size) to host `hva`; `readonly`: guest writes exit as MMIO (a ROM)."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": lib.KVM_MEM_READONLY if readonly else 0, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": hva},
        )
        _check(lib.avmm_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region), f"KVM_SET_USER_MEMORY_REGION slot {slot}")

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and LAPICs (and the addresses KVM needs on Intel)."""
        _check(lib.avmm_ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, self.TSS_ADDR), "KVM_SET_TSS_ADDR")
        addr = ffi.new("uint64_t *", self.IDENTITY_MAP_ADDR)
        _check(lib.avmm_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr), "KVM_SET_IDENTITY_MAP_ADDR")
        _check(lib.avmm_ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def create_pit(self) -> None:
        """The in-kernel i8254 PIT, with a dummy speaker port (0x61)."""
        pit = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        _check(lib.avmm_ioctl(self.fd, lib.KVM_CREATE_PIT2, pit), "KVM_CREATE_PIT2")

    def irqfd(self, efd: int, gsi: int, *, deassign: bool = False) -> None:
        """Raise `gsi` (an edge: level 1 then 0) each time `efd` is written."""
        req = ffi.new("struct kvm_irqfd *", {"fd": efd, "gsi": gsi, "flags": 1 if deassign else 0})
        _check(lib.avmm_ioctl(self.fd, lib.KVM_IRQFD, req), f"KVM_IRQFD gsi {gsi}")

    def ioeventfd(self, efd: int, addr: int, length: int, *, pio: bool = False, deassign: bool = False) -> None:
        """Signal `efd` on guest writes to [addr, addr+length) instead of exiting to us.

        length 0 matches a write of any size (MMIO only, KVM_CAP_IOEVENTFD_ANY_LENGTH).
        """
        flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        req = ffi.new("struct kvm_ioeventfd *", {"addr": addr, "len": length, "fd": efd, "flags": flags})
        what = "unbinding" if deassign else "binding"
        _check(lib.avmm_ioctl(self.fd, lib.KVM_IOEVENTFD, req), f"KVM_IOEVENTFD {what} {addr:#x}+{length}")

    def irq_line(self, irq: int, level: bool) -> None:
        req = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        _check(lib.avmm_ioctl(self.fd, lib.KVM_IRQ_LINE, req), f"KVM_IRQ_LINE {irq}")

    def create_vcpu(self, idx: int, vcpu_id: int | None = None) -> "VcpuFd":
        """vCPU `idx` (ours), with KVM's vCPU ID `vcpu_id` (its initial APIC ID; default idx)."""
        vcpu_id = idx if vcpu_id is None else vcpu_id
        fd = _check(lib.avmm_ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id), f"KVM_CREATE_VCPU {vcpu_id}")
        return VcpuFd(fd, idx)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """One vCPU's fd: register state. Its thread (in the C core) does KVM_RUN."""

    def __init__(self, fd: int, idx: int):
        self.fd = fd
        self.idx = idx

    def _get(self, ctype: str, request: int, what: str):
        obj = ffi.new(ctype)
        _check(lib.avmm_ioctl(self.fd, request, obj), f"{what} on vCPU {self.idx}")
        return obj

    def _set(self, obj, request: int, what: str) -> None:
        _check(lib.avmm_ioctl(self.fd, request, obj), f"{what} on vCPU {self.idx}")

    def get_regs(self):
        return self._get("struct kvm_regs *", lib.KVM_GET_REGS, "KVM_GET_REGS")

    def set_regs(self, regs) -> None:
        self._set(regs, lib.KVM_SET_REGS, "KVM_SET_REGS")

    def get_sregs(self):
        return self._get("struct kvm_sregs *", lib.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, sregs) -> None:
        self._set(sregs, lib.KVM_SET_SREGS, "KVM_SET_SREGS")

    def get_fpu(self):
        return self._get("struct kvm_fpu *", lib.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, fpu) -> None:
        self._set(fpu, lib.KVM_SET_FPU, "KVM_SET_FPU")

    def get_xsave(self) -> bytearray:
        """KVM_GET_XSAVE: the XSAVE area (standard format: FXSAVE's 512 bytes, the header)."""
        obj = self._get("struct kvm_xsave *", lib.KVM_GET_XSAVE, "KVM_GET_XSAVE")
        return bytearray(ffi.buffer(obj))

    def set_xsave(self, area: bytes | bytearray) -> None:
        obj = ffi.new("struct kvm_xsave *")
        ffi.buffer(obj)[: len(area)] = area
        self._set(obj, lib.KVM_SET_XSAVE, "KVM_SET_XSAVE")

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: `control` is KVM_GUESTDBG_* flags; `debugreg` DR0-DR7
        (DR4/DR5 unused) when KVM_GUESTDBG_USE_HW_BP is in it."""
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, value in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = value
        self._set(dbg, lib.KVM_SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")

    def get_events(self):
        return self._get("struct kvm_vcpu_events *", lib.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")

    def set_events(self, events) -> None:
        self._set(events, lib.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self):
        return self._get("struct kvm_debugregs *", lib.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs) -> None:
        self._set(debugregs, lib.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS")

    def nmi(self) -> None:
        """Queue an NMI (KVM_NMI), delivered at the vCPU's next KVM_RUN."""
        _check(lib.avmm_ioctl_val(self.fd, lib.KVM_NMI, 0), f"KVM_NMI on vCPU {self.idx}")

    def set_cpuid(self, entries: list[dict]) -> None:
        n = len(entries)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        for i, e in enumerate(entries):
            for k, v in e.items():
                setattr(buf.entries[i], k, v)
        self._set(buf, lib.KVM_SET_CPUID2, "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[dict]:
        n = 256
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        self._set(buf, lib.KVM_GET_CPUID2, "KVM_GET_CPUID2")
        return [
            {k: getattr(e, k) for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
            for e in buf.entries[0 : buf.nent]
        ]

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Set MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        n = len(msrs)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        return _check(lib.avmm_ioctl(self.fd, lib.KVM_SET_MSRS, buf), f"KVM_SET_MSRS on vCPU {self.idx}")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        n = len(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        got = _check(lib.avmm_ioctl(self.fd, lib.KVM_GET_MSRS, buf), f"KVM_GET_MSRS on vCPU {self.idx}")
        return {buf.entries[i].index: buf.entries[i].data for i in range(got)}

    def translate(self, linear: int) -> int | None:
        """The guest physical address of a guest linear address, or None if unmapped."""
        t = ffi.new("struct kvm_translation *", {"linear_address": linear})
        if lib.avmm_ioctl(self.fd, lib.KVM_TRANSLATE, t) < 0 or not t.valid:
            return None
        return t.physical_address

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
