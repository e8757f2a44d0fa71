"""Setting up a vCPU before its first KVM_RUN: CPUID, MSRs, the boot register state."""

from __future__ import annotations

from dataclasses import fields

from ..errors import KvmError
from .kvm import VcpuFd
from .registers import Msr

# IA32_MISC_ENABLE bit 0: fast string operations (rep movs/stos), on at reset on real CPUs.
MISC_ENABLE_FAST_STRING = 1 << 0

# What the firmware would leave in these MSRs at the kernel's entry.
BOOT_MSRS = {
    Msr.IA32_SYSENTER_CS: 0,
    Msr.IA32_SYSENTER_ESP: 0,
    Msr.IA32_SYSENTER_EIP: 0,
    Msr.STAR: 0,
    Msr.CSTAR: 0,
    Msr.KERNEL_GS_BASE: 0,
    Msr.SYSCALL_MASK: 0,
    Msr.LSTAR: 0,
    Msr.IA32_TSC: 0,
    Msr.IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
}


def set_boot_msrs(vcpu: VcpuFd, supported: set[int]) -> list[int]:
    """Set the boot MSRs this KVM lists in KVM_GET_MSR_INDEX_LIST; returns those set.

    An MSR the host does not list is left alone (QEMU's `-cpu host` aborts on one here);
    KVM_SET_MSRS stops at the first MSR it refuses, so the count it returns is checked.
    """
    wanted = {int(k): v for k, v in BOOT_MSRS.items() if int(k) in supported}
    if not wanted:
        return []
    done = vcpu.set_msrs(wanted)
    if done != len(wanted):
        refused = list(wanted)[done]
        raise KvmError(f"KVM refused MSR {refused:#x} on vCPU {vcpu.idx} although it lists it")
    return list(wanted)


def apply_boot_state(vcpu: VcpuFd, state) -> None:
    """Load a BootCpuState (asyncvmm.boot.cpu_state) into the vCPU's registers."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg = getattr(state, name)
        dst = getattr(sregs, name)
        for f in fields(seg):
            setattr(dst, f.name, getattr(seg, f.name))
    for name in ("gdt", "idt"):
        table = getattr(state, name)
        getattr(sregs, name).base = table.base
        getattr(sregs, name).limit = table.limit
    sregs.cr0 = state.cr0
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.efer = state.efer
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rip = state.rip
    regs.rsp = state.rsp
    regs.rsi = state.rsi
    regs.rbx = state.rbx
    regs.rflags = state.rflags
    vcpu.set_regs(regs)
