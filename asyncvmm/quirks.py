"""Workarounds for a KVM that emulates guest kernel code instead of running it.

On some hosts (nested clouds with kvm_pvm) KVM provides the whole API but executes guest
kernel code in its instruction emulator, which lacks some instructions. asyncvmm detects
such a KVM at start (asyncvmm.vstate.probe) and only then applies what is here; on
hardware KVM none of it is active. `--no-quirks` turns them all off.

Each quirk is named, with why it exists and what it does instead:

  int3-as-#BP   The emulator cannot execute int3 (0xCC) and stops with an emulation
                failure. A CPU would raise #BP, a trap whose saved RIP is the next
                instruction: inject exactly that (KVM_SET_VCPU_EVENTS, RIP past the 0xCC).
                Linux runs int3 in its self test and in live text patching.

  fwait         The emulator cannot execute fwait (0x9B); Linux runs one in fpu__drop each
                time a kernel thread exits. With no unmasked x87 exception pending a CPU
                does nothing: skip it (RIP+1). With one pending (FSW.ES) it raises #MF:
                inject that, RIP unchanged (a fault).

  xsaveerptr    CPUID 0x80000008 EBX bit 2 set. Without it Linux works around an old AMD
                FXSAVE leak with `fnclex; emms; fild` on every return to user mode, which
                the emulator cannot run. The bit says the CPU does not leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .vstate.kvm import VcpuFd

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3  # #BP, breakpoint exception
MF_VECTOR = 16  # #MF, x87 floating-point error
FSW_ES = 1 << 7  # x87 status word: error summary, an unmasked exception is pending
# CPUID 0x80000008 EBX bit 2: XSAVEERPTR (FXSAVE/XSAVE always save the error pointers).
XSAVEERPTR = (0x8000_0008, "ebx", 2)


@dataclass
class Quirks:
    enabled: bool
    reason: str = ""
    applied: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str) -> None:
        self.applied[name] = self.applied.get(name, 0) + 1

    def adjust_cpuid(self, entries: list[dict]) -> list[dict]:
        """The CPUID bits an emulating KVM's guests need (xsaveerptr)."""
        if not self.enabled:
            return entries
        leaf, reg, bit = XSAVEERPTR
        for e in entries:
            if e["function"] == leaf:
                e[reg] |= 1 << bit
        return entries

    def on_emulation_failure(self, vcpu: VcpuFd, insn: bytes) -> bool:
        """Serve an emulation failure the CPU would have handled; True if served."""
        if not self.enabled or not insn:
            return False
        if insn[0] == INT3:
            self._skip(vcpu, 1)
            self._inject(vcpu, BP_VECTOR)  # a trap: the saved RIP is past the int3
            self._count("int3-as-#BP")
            return True
        if insn[0] == FWAIT:
            if vcpu.get_fpu().fsw & FSW_ES:
                self._inject(vcpu, MF_VECTOR)  # a fault: the saved RIP is the fwait
                self._count("fwait-#MF")
            else:
                self._skip(vcpu, 1)
                self._count("fwait")
            return True
        return False

    @staticmethod
    def _skip(vcpu: VcpuFd, length: int) -> None:
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)

    @staticmethod
    def _inject(vcpu: VcpuFd, vector: int) -> None:
        events = vcpu.get_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        vcpu.set_events(events)
