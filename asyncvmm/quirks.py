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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .vstate.kvm import VcpuFd

INT3 = 0xCC
BP_VECTOR = 3  # #BP, breakpoint exception


@dataclass
class Quirks:
    enabled: bool
    reason: str = ""
    applied: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str) -> None:
        self.applied[name] = self.applied.get(name, 0) + 1

    def on_emulation_failure(self, vcpu: VcpuFd, insn: bytes) -> bool:
        """Serve an emulation failure the CPU would have handled; True if served."""
        if not self.enabled or not insn:
            return False
        if insn[0] == INT3:
            regs = vcpu.get_regs()
            regs.rip += 1
            vcpu.set_regs(regs)
            events = vcpu.get_events()
            events.exception.injected = 1
            events.exception.nr = BP_VECTOR
            events.exception.has_error_code = 0
            events.exception.error_code = 0
            vcpu.set_events(events)
            self._count("int3-as-#BP")
            return True
        return False
