"""KVM's side of a machine's state: each vCPU's registers and the VM's irqchip, PIT and
clock, saved as the kernel's own structs (their bytes, base64 in the snapshot's state part).

Keeping KVM's structs whole, as Firecracker does, means nothing of them is re-typed here and
nothing is lost; the price is that a snapshot is for a host with the same <linux/kvm.h>
layouts (x86-64 Linux: they are ABI and do not change).

Saved per vCPU, and restored in this order (the order QEMU and Firecracker use, for the
reasons given at each step): see `restore_vcpu`.
"""

from __future__ import annotations

import base64
import errno
import os

from .._native import ffi, lib
from ..errors import KvmError

# What a vCPU's state is made of: name -> (struct, get, set)
VCPU_PARTS = {
    "regs": ("struct kvm_regs", lib.KVM_GET_REGS, lib.KVM_SET_REGS),
    "sregs": ("struct kvm_sregs", lib.KVM_GET_SREGS, lib.KVM_SET_SREGS),
    "fpu": ("struct kvm_fpu", lib.KVM_GET_FPU, lib.KVM_SET_FPU),
    "xsave": ("struct kvm_xsave", lib.KVM_GET_XSAVE, lib.KVM_SET_XSAVE),
    "xcrs": ("struct kvm_xcrs", lib.KVM_GET_XCRS, lib.KVM_SET_XCRS),
    "lapic": ("struct kvm_lapic_state", lib.KVM_GET_LAPIC, lib.KVM_SET_LAPIC),
    "debugregs": ("struct kvm_debugregs", lib.KVM_GET_DEBUGREGS, lib.KVM_SET_DEBUGREGS),
    "mp_state": ("struct kvm_mp_state", lib.KVM_GET_MP_STATE, lib.KVM_SET_MP_STATE),
    "events": ("struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS, lib.KVM_SET_VCPU_EVENTS),
}
# Parts a KVM may not have (its capability); the others every x86 KVM with an irqchip has.
OPTIONAL = {"xsave", "xcrs"}
# The order of KVM_SET_*: the general registers and the FPU first; the special registers
# (APIC base, EFER, CR4.OSXSAVE) before the LAPIC, whose mode depends on the APIC base; the
# LAPIC before the MSRs (a TSC deadline is ignored unless the LAPIC is in TSC-deadline
# mode); the MP state and the pending events last (an event is checked against the mode).
RESTORE_ORDER = ("regs", "fpu", "xsave", "xcrs", "sregs", "lapic", "msrs", "debugregs", "mp_state", "events")

IRQCHIPS = {"pic_master": lib.KVM_IRQCHIP_PIC_MASTER, "pic_slave": lib.KVM_IRQCHIP_PIC_SLAVE,
            "ioapic": lib.KVM_IRQCHIP_IOAPIC}


def _b64(obj) -> str:
    return base64.b64encode(bytes(ffi.buffer(obj))).decode()


def _from_b64(ctype: str, text: str, what: str):
    obj = ffi.new(f"{ctype} *")
    raw = base64.b64decode(text)
    size = ffi.sizeof(ctype)
    if len(raw) != size:
        raise KvmError(f"{what}: {len(raw)} bytes saved, this host's {ctype} has {size}")
    ffi.memmove(obj, raw, size)
    return obj


def _ioctl(fd: int, request: int, obj, what: str) -> None:
    r = lib.avmm_ioctl(fd, request, obj)
    if r < 0:
        raise KvmError(f"{what} failed: {os.strerror(-r)}")


def savable_msrs(vcpu_fd: int, listed: set[int]) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS gives on this vCPU (it stops
    at the first it refuses: each is tried once, alone)."""
    out = []
    buf = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
    for index in sorted(listed):
        buf.nmsrs = 1
        buf.entries[0].index = index
        if lib.avmm_ioctl(vcpu_fd, lib.KVM_GET_MSRS, buf) == 1:
            out.append(index)
    return out


def save_vcpu(vcpu, msr_indices: list[int]) -> dict:
    """vCPU `vcpu` (a VcpuFd, not running guest code) as plain data."""
    out: dict = {}
    for name, (ctype, get, _) in VCPU_PARTS.items():
        obj = ffi.new(f"{ctype} *")
        r = lib.avmm_ioctl(vcpu.fd, get, obj)
        if r < 0:
            if name in OPTIONAL and r in (-errno.EINVAL, -errno.ENOTTY, -errno.EOPNOTSUPP):
                continue
            raise KvmError(f"saving vCPU {vcpu.idx}: {name} failed: {os.strerror(-r)}")
        out[name] = _b64(obj)
    msrs = vcpu.get_msrs(msr_indices)
    if len(msrs) != len(msr_indices):
        missing = msr_indices[len(msrs)]
        raise KvmError(f"saving vCPU {vcpu.idx}: KVM_GET_MSRS refused MSR {missing:#x}")
    out["msrs"] = {f"{k:#x}": v for k, v in msrs.items()}
    return out


def restore_vcpu(vcpu, state: dict) -> None:
    """save_vcpu's data onto a fresh vCPU (created, CPUID set, not yet run)."""
    for name in RESTORE_ORDER:
        if name not in state:
            continue
        if name == "msrs":
            msrs = {int(k, 16): v for k, v in state["msrs"].items()}
            done = vcpu.set_msrs(msrs)
            if done != len(msrs):
                raise KvmError(f"restoring vCPU {vcpu.idx}: KVM refused MSR {list(msrs)[done]:#x}")
            continue
        if name == "fpu" and "xsave" in state:
            continue  # XSAVE holds the FPU and more
        ctype, _, put = VCPU_PARTS[name]
        obj = _from_b64(ctype, state[name], f"vCPU {vcpu.idx} {name}")
        if name == "events":  # KVM_GET_VCPU_EVENTS does not flag these, and SET skips what is not flagged
            obj.flags |= lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        _ioctl(vcpu.fd, put, obj, f"restoring vCPU {vcpu.idx}: {name}")


def save_vm(vm_fd: int, *, kernel_pit: bool) -> dict:
    """The VM's in-kernel devices: the PICs and IOAPIC, the PIT (if KVM's), the KVM clock."""
    out: dict = {"irqchip": {}}
    for name, chip in IRQCHIPS.items():
        obj = ffi.new("struct kvm_irqchip *")
        obj.chip_id = chip
        _ioctl(vm_fd, lib.KVM_GET_IRQCHIP, obj, f"saving the {name}")
        out["irqchip"][name] = _b64(obj)
    if kernel_pit:
        obj = ffi.new("struct kvm_pit_state2 *")
        _ioctl(vm_fd, lib.KVM_GET_PIT2, obj, "saving the PIT")
        out["pit2"] = _b64(obj)
    clock = ffi.new("struct kvm_clock_data *")
    _ioctl(vm_fd, lib.KVM_GET_CLOCK, clock, "saving the KVM clock")
    out["clock"] = int(clock.clock)
    return out


def restore_vm(vm_fd: int, state: dict) -> None:
    for name, chip in IRQCHIPS.items():
        obj = _from_b64("struct kvm_irqchip", state["irqchip"][name], name)
        obj.chip_id = chip
        _ioctl(vm_fd, lib.KVM_SET_IRQCHIP, obj, f"restoring the {name}")
    if "pit2" in state:
        _ioctl(vm_fd, lib.KVM_SET_PIT2, _from_b64("struct kvm_pit_state2", state["pit2"], "PIT"), "restoring the PIT")
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock = state["clock"]
    _ioctl(vm_fd, lib.KVM_SET_CLOCK, clock, "restoring the KVM clock")
