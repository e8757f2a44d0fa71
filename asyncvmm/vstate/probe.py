"""Tell a hardware-virtualizing KVM from an instruction-emulating one.

Some hosts (nested clouds with kvm_pvm, for one) provide the whole KVM API but run guest
kernel code in KVM's instruction emulator, which stops on instructions it lacks. The probe
asks the KVM itself: a throwaway one-page VM in real mode executes `popcnt eax, eax; hlt`.
Hardware runs it and halts; an emulating KVM fails with KVM_EXIT_INTERNAL_ERROR. It costs
one VM creation (a few milliseconds), once per process.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

from .._native import ffi, lib
from ..errors import KvmError
from .kvm import Kvm, VmFd
from .memory import GuestMemory

# popcnt eax, eax ; hlt
PROBE_CODE = bytes.fromhex("f30fb8c0") + b"\xf4"


@dataclass(frozen=True)
class KvmKind:
    """What the probe found: does KVM run guest kernel code in its instruction emulator, and why it says so."""

    emulating: bool
    detail: str


_result: KvmKind | None = None
_thread: threading.Thread | None = None
_spare: tuple[Kvm, VmFd, GuestMemory | None] | None = None  # a VM made ready in the thread (start(spare_vm=True))


def start(*, spare_vm: bool = False, memory: int = 0) -> None:
    """Begin the probe in a thread, early in start-up. Its cost is mostly waiting in the
    kernel, not CPU: setting a memory slot and destroying the VM wait for RCU grace
    periods (1-2 ms on an idle host, 10-70 ms on a busy one; ~3.5 ms of CPU). In a
    thread that wait overlaps the imports and the image loading; probe() takes the answer.
    `spare_vm`: then also create the VM the process is about to run, with its in-kernel
    irqchip (KVM_CREATE_IRQCHIP waits in the kernel too: ~5 ms here), for
    take_spare_vm(); the one caller that asks is the CLI, whose process builds one VM.
    `memory`: with `spare_vm`, also map that many bytes of plain guest RAM (anonymous,
    not wired, not shared) into it: setting a memory slot waits ~5-7 ms for an RCU grace
    period, whatever its size, which the imports then overlap as well."""
    global _thread
    if _result is None and _thread is None:
        _thread = threading.Thread(target=_probe_in_thread, args=(spare_vm, memory), name="kvm-probe", daemon=True)
        _thread.start()


def _probe_in_thread(spare_vm: bool, memory: int) -> None:
    global _result, _spare
    try:
        _result = _probe(None)
        if spare_vm:
            _spare = _ready_vm(memory)
    except Exception:  # noqa: BLE001 — probe() asks again and reports it; no spare: Vm makes its own
        pass


def _ready_vm(memory: int) -> tuple[Kvm, VmFd, GuestMemory | None]:
    kvm = Kvm()
    vm = None
    mem = None
    try:
        vm = VmFd(kvm)
        vm.create_irqchip()
        if memory:
            mem = GuestMemory(memory)
            for r in mem.regions:
                vm.set_memory_region(r.slot, r.gpa, r.size, r.hva)
    except BaseException:
        if vm is not None:
            vm.close()
        if mem is not None:
            mem.close()
        kvm.close()
        raise
    return kvm, vm, mem


def take_spare_vm() -> tuple[Kvm, VmFd, GuestMemory | None] | None:
    """The VM start(spare_vm=True) made ready — a KVM fd, a new VM with its in-kernel
    irqchip and, if start() was given `memory`, its guest RAM in its memory slots; the
    caller now owns all three — once; None when there is none."""
    global _spare
    if _thread is not None:
        _thread.join()
    spare, _spare = _spare, None
    return spare


def probe(kvm: Kvm | None = None) -> KvmKind:
    """What kind of KVM this is (asked once per process)."""
    global _result
    if _thread is not None:
        _thread.join()
    if _result is None:
        _result = _probe(kvm)
    return _result


def _probe(kvm: Kvm | None) -> KvmKind:
    own = kvm is None
    if own:
        kvm = Kvm()
    vm = VmFd(kvm)
    page = mmap.mmap(-1, 4096)
    vcpu = None
    run = ffi.NULL
    try:
        page.write(PROBE_CODE)
        vm.set_memory_region(0, 0, 4096, int(ffi.cast("uintptr_t", ffi.from_buffer(page))))
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip = 0
        regs.rflags = 0x2
        vcpu.set_regs(regs)
        run = lib.avmm_map_run(vcpu.fd, kvm.vcpu_mmap_size)
        if run == ffi.NULL:
            raise KvmError("cannot map the probe vCPU's kvm_run")
        reason = lib.avmm_run_once(vcpu.fd, run)
    finally:
        if run != ffi.NULL:
            lib.avmm_unmap(run, kvm.vcpu_mmap_size)
        if vcpu is not None:
            vcpu.close()
        vm.close()
        page.close()
        if own:
            kvm.close()
    if reason == lib.KVM_EXIT_HLT:
        return KvmKind(False, "hardware virtualization")
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        module = "kvm_pvm" if os.path.isdir("/sys/module/kvm_pvm") else "an emulating KVM"
        return KvmKind(True, f"{module}: guest kernel code runs in KVM's instruction emulator")
    return KvmKind(False, f"probe ended with exit {reason}; assuming hardware virtualization")
