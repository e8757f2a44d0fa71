"""Workarounds for a KVM that emulates guest kernel code instead of running it.

On some hosts (nested clouds with kvm_pvm) KVM provides the whole API but executes guest
kernel code in its instruction emulator (~650 ns an instruction), which lacks some
instructions and some of KVM's paravirtual services. asyncvmm detects such a KVM at start
(asyncvmm.vstate.probe) and only then applies what is here, and says so in its log; on
hardware KVM none of it is active. `--no-quirks` turns them all off.

Each quirk is named (the name is what `stats` counts and the log says), with why it
exists and what it does instead:

  int3-as-#BP   The emulator cannot execute int3 (0xCC) and stops with an emulation
                failure. A CPU would raise #BP, a trap whose saved RIP is the next
                instruction: inject exactly that (KVM_SET_VCPU_EVENTS, RIP past the 0xCC).
                Linux runs int3 in its self test and in live text patching.

  fwait         The emulator cannot execute fwait (0x9B); Linux runs one in fpu__drop each
                time a kernel thread exits. With no unmasked x87 exception pending a CPU
                does nothing: skip it (RIP+1). With one pending (FSW.ES) it raises #MF:
                inject that, RIP unchanged (a fault).

  fpu-control   The emulator lacks most x87/SSE control instructions (fldcw, fnclex,
                ldmxcsr, stmxcsr, emms...), which firmware runs before any C code (OVMF's
                SEC: `finit; fldcw; ldmxcsr`). They move a control or status word between
                memory and the FPU, no arithmetic: asyncvmm/fpu_control.py executes them
                as the CPU would (its table lists them), through KVM_GET/SET_FPU.

  xsaveerptr    CPUID 0x80000008 EBX bit 2 set. Without it Linux works around an old AMD
                FXSAVE leak with `fnclex; emms; fild` on every return to user mode, which
                the emulator cannot run. The bit says the CPU does not leak.

  kvm-pv-hypercalls
                KVM's paravirtual features that work through a hypercall are hidden
                (CPUID 0x40000001 EAX: PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD,
                HC_MAP_GPA_RANGE, MIGRATION_CONTROL; boot/cpuid.py lists them). This KVM
                never returns from a vmcall: a guest that saw PV_SEND_IPI would hang on its
                first multi-CPU IPI, one with PV_UNHALT in its first contended spinlock.
                Hidden, Linux uses the APIC and native spinlocks. kvm-clock, async page
                faults, steal time and PV EOI are MSR-based and stay.

  vmm-pit       No in-kernel PIT. KVM's fires IRQ0 at the guest's HZ (100-1000 Hz) and on
                an emulating KVM every timer interrupt costs thousands of emulated
                instructions: at 250 Hz half the guest's time went to them and a Linux boot
                stalled. Instead the pure i8254 model (devices/legacy/i8254.py) serves ports
                0x40-0x43 and 0x61 (channel 2's gate and output, which Linux uses to
                calibrate) on the loop, and BoundedRatePit raises IRQ0 through an irqfd at
                most every PIT_MIN_IRQ_INTERVAL_NS. Ticks in between are dropped, so the
                guest's jiffies lag wall time until it switches to kvm-clock, which is
                KVM's and exact. Left alone, Linux with a MADT would then tick through
                KVM's LAPIC timer (TSC-deadline) at its HZ and this PIT would raise no
                IRQ0 at all: linux-cmdline's lapic=notscdeadline noapictimer keep the
                PIT Linux's tick (docs/EMULATING-KVM.md has the figures).

  linux-cmdline Kernel parameters appended to a Linux guest's command line (a bzImage, or
                an ELF vmlinux: boot/linux.py is_linux), never to other guests; the user
                types an ordinary command line and the log says what was added. A
                parameter the user already gave is left as the user gave it.
                  clearcpuid=N,...  KVM_SET_CPUID2 is not fully honoured here: leaf 7 EBX
                      and leaf 1 ECX come back with the host's bits, so Linux would use
                      SMAP (clac/stac), popcnt, SSE4, AVX... that the emulator cannot
                      execute. The kernel's own clearcpuid= hides them (Linux 6.1 reads
                      only the first 127 characters of its value, and only numbers).
                  noxsave            the FPU's XSAVE init (xrstor, xgetbv) fails in the emulator.
                  mitigations=off    mitigation sequences (verw for MDS/TSA...) fail in it.
                  nopti              page table isolation: a CR3 switch on every kernel
                                     entry, each one emulated.
                  cryptomgr.notests  the crypto self tests: two boots stalled in them for
                                     over 300 s.
                  lapic=notscdeadline noapictimer
                                     the tick through vmm-pit's bounded PIT, not KVM's LAPIC
                                     timer: a tick is ~3,900 emulated instructions, and the
                                     stock kernel's 250 Hz LAPIC tick took 38% of its boot.
                                     Linux 6.1 keeps the PIT only with both (apic_needs_pit);
                                     with several CPUs it broadcasts the PIT's events to the
                                     others by IPI. Either one typed by the user: neither added.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from dataclasses import dataclass, field

from .boot import cpuid
from .devices.legacy.i8254 import I8254
from .vstate.kvm import VcpuFd

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3  # #BP, breakpoint exception
MF_VECTOR = 16  # #MF, x87 floating-point error
FSW_ES = 1 << 7  # x87 status word: error summary, an unmasked exception is pending
# CPUID 0x80000008 EBX bit 2: XSAVEERPTR (FXSAVE/XSAVE always save the error pointers).
XSAVEERPTR = (0x8000_0008, "ebx", 2)

# vmm-pit: the shortest time between two IRQ0s raised by BoundedRatePit.
PIT_MIN_IRQ_INTERVAL_NS = 20_000_000


class LinuxWord(enum.IntEnum):
    """Words of Linux's CPU feature bitmap (arch/x86/include/asm/cpufeatures.h): a
    feature's number, as clearcpuid= takes it, is word * 32 + bit."""

    CPUID_1_EDX = 0
    CPUID_8000_0001_EDX = 1
    CPUID_1_ECX = 4
    CPUID_8000_0001_ECX = 6
    CPUID_7_0_EBX = 9
    CPUID_7_ECX = 16


W = LinuxWord
# What clearcpuid= hides, as (name, word, bit): the features the baseline CPU template
# hides that KVM_SET_CPUID2 does not hide here (measured; KVM-HERE.md).
LINUX_CLEARCPUID: tuple[tuple[str, LinuxWord, int], ...] = (
    ("rdtscp", W.CPUID_8000_0001_EDX, 27),
    ("pclmulqdq", W.CPUID_1_ECX, 1),
    ("ssse3", W.CPUID_1_ECX, 9),
    ("cx16", W.CPUID_1_ECX, 13),
    ("pcid", W.CPUID_1_ECX, 17),
    ("sse4_1", W.CPUID_1_ECX, 19),
    ("sse4_2", W.CPUID_1_ECX, 20),
    ("popcnt", W.CPUID_1_ECX, 23),
    ("aes", W.CPUID_1_ECX, 25),
    ("xsave", W.CPUID_1_ECX, 26),
    ("avx", W.CPUID_1_ECX, 28),
    ("f16c", W.CPUID_1_ECX, 29),
    ("3dnowprefetch", W.CPUID_8000_0001_ECX, 8),
    ("fsgsbase", W.CPUID_7_0_EBX, 0),
    ("avx2", W.CPUID_7_0_EBX, 5),
    ("smep", W.CPUID_7_0_EBX, 7),
    ("invpcid", W.CPUID_7_0_EBX, 10),
    ("avx512f", W.CPUID_7_0_EBX, 16),
    ("rdseed", W.CPUID_7_0_EBX, 18),
    ("smap", W.CPUID_7_0_EBX, 20),
    ("clflushopt", W.CPUID_7_0_EBX, 23),
    ("clwb", W.CPUID_7_0_EBX, 24),
    ("sha_ni", W.CPUID_7_0_EBX, 29),
    ("umip", W.CPUID_7_ECX, 2),
    ("gfni", W.CPUID_7_ECX, 8),
    ("vaes", W.CPUID_7_ECX, 9),
    ("vpclmulqdq", W.CPUID_7_ECX, 10),
    ("rdpid", W.CPUID_7_ECX, 22),
)
CLEARCPUID_MAX = 127  # Linux 6.1: cmdline_find_option(..., "clearcpuid", arg[128], ...)


def clearcpuid_value() -> str:
    return ",".join(str(word * 32 + bit) for _, word, bit in LINUX_CLEARCPUID)


# The tick: the vmm-pit quirk's PIT instead of KVM's LAPIC timer. One choice, so a user who
# names either parameter gets neither (noapictimer alone leaves Linux without any tick).
LINUX_TICK = ("lapic=notscdeadline", "noapictimer")


def linux_parameters() -> list[str]:
    """The parameters the linux-cmdline quirk appends, in order."""
    return [f"clearcpuid={clearcpuid_value()}", "noxsave", "mitigations=off", "nopti", "cryptomgr.notests", *LINUX_TICK]


assert len(clearcpuid_value()) <= CLEARCPUID_MAX, "Linux 6.1 would cut the clearcpuid= list"


def _split(cmdline: str) -> tuple[str, str, str]:
    """The kernel's part of a command line, the ` -- ` separator if any, init's part."""
    kernel_part, sep, init_part = cmdline.partition(" -- ")
    if not sep and kernel_part.startswith("-- "):
        kernel_part, sep, init_part = "", "-- ", kernel_part[3:]
    return kernel_part, sep, init_part


def parameter_names(cmdline: str) -> set[str]:
    """The names of the kernel parameters on a command line (`a=1 b` -> {"a", "b"})."""
    return {word.split("=", 1)[0] for word in _split(cmdline)[0].split()}


def append_parameters(cmdline: str, params: list[str]) -> tuple[str, list[str]]:
    """`cmdline` with those of `params` whose name it lacks added before any ` -- `
    (what follows that goes to init); returns it and what was added."""
    kernel_part, sep, init_part = _split(cmdline)
    given = parameter_names(cmdline)
    added = [p for p in params if p.split("=", 1)[0] not in given]
    if not added:
        return cmdline, []
    head = " ".join(w for w in (kernel_part.strip(), *added) if w)
    if sep:
        return f"{head} -- {init_part}", added
    return head, added


@dataclass
class Quirks:
    """The quirks of one VM: on or off, why, and what each did (applied: name -> count)."""

    enabled: bool
    reason: str = ""
    applied: dict[str, int] = field(default_factory=dict)
    hidden_pv_features: list[str] = field(default_factory=list)  # what kvm-pv-hypercalls hid
    rom: tuple[int, bytes] | None = None  # with -l bootrom: (base, image), for fpu-control's operands

    def _count(self, name: str, n: int = 1) -> None:
        self.applied[name] = self.applied.get(name, 0) + n

    def in_effect(self) -> list[str]:
        """The quirks on for this VM, by the names the README and the log use (those that
        act on an event, int3-as-#BP and fwait, are armed; `applied` counts their uses)."""
        if not self.enabled:
            return []
        on = ["int3-as-#BP", "fwait", "fpu-control", "xsaveerptr", "vmm-pit"]
        if self.hidden_pv_features:
            on.append("kvm-pv-hypercalls")
        if "linux-cmdline" in self.applied:
            on.append("linux-cmdline")
        return on

    # -- what the machine asks ---------------------------------------------------------
    @property
    def vmm_pit(self) -> bool:
        """The vmm-pit quirk: no in-kernel PIT, BoundedRatePit instead."""
        return self.enabled

    def adjust_cpuid(self, entries: list[dict]) -> list[dict]:
        """The CPUID an emulating KVM's guests need (xsaveerptr, kvm-pv-hypercalls)."""
        if not self.enabled:
            return entries
        leaf, reg, bit = XSAVEERPTR
        for e in entries:
            if e["function"] == leaf:
                e[reg] |= 1 << bit
        self.hidden_pv_features = [f.name for f in cpuid.KVM_HYPERCALL_FEATURES if cpuid.feature_enabled(entries, f)]
        return cpuid.hide(entries, cpuid.KVM_HYPERCALL_FEATURES)

    def linux_cmdline(self, cmdline: str) -> tuple[str, list[str]]:
        """A Linux guest's command line with the linux-cmdline parameters; and those added."""
        if not self.enabled:
            return cmdline, []
        params = linux_parameters()
        if parameter_names(cmdline) & parameter_names(" ".join(LINUX_TICK)):
            params = [p for p in params if p not in LINUX_TICK]  # the user chose the tick
        new, added = append_parameters(cmdline, params)
        if added:
            self._count("linux-cmdline", len(added))
        return new, added

    def on_emulation_failure(self, vcpu: VcpuFd, insn: bytes, ram=None) -> bool:
        """Serve an emulation failure the CPU would have handled; True if served.
        `ram`: the guest's GuestMemory (fpu-control's memory operands)."""
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
        if ram is not None:
            from . import fpu_control  # noqa: PLC0415 (firmware's; a plain boot never needs it)

            served = fpu_control.execute(vcpu, insn, fpu_control.RamAndRom(ram, self.rom))
            if served is not None:
                name, fault = served
                if fault is not None:
                    self._inject(vcpu, fault.vector, fault.error_code)
                    self._count(f"fpu-control {name} #{fault.vector.name}")
                else:
                    self._count(f"fpu-control {name}")
                return True
        return False

    @staticmethod
    def _skip(vcpu: VcpuFd, length: int) -> None:
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)

    @staticmethod
    def _inject(vcpu: VcpuFd, vector: int, error_code: int | None = None) -> None:
        events = vcpu.get_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        vcpu.set_events(events)


class BoundedRatePit:
    """The vmm-pit quirk: the i8254 model on the loop, raising IRQ0 through an irqfd at
    most every `min_interval_ns`.

    Life cycle (all on the loop's thread): created at build time with the VM's irqfd
    registration; `attach(loop)` when the vCPUs start (a timer is armed only from then
    on); `close()` cancels the timer and closes the eventfd. After every guest write the
    model calls back, and the timer is re-armed for OUT0's next rising edge, or later if
    the last IRQ0 was less than `min_interval_ns` ago.
    """

    def __init__(self, vm, gsi: int, min_interval_ns: int = PIT_MIN_IRQ_INTERVAL_NS, clock=time.monotonic_ns):
        self.min_interval_ns = min_interval_ns
        self._clock = clock
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            vm.irqfd(self.efd, gsi)
        except BaseException:
            os.close(self.efd)
            raise
        self.model = I8254(clock, changed=self._rearm)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_irq = -min_interval_ns
        # Edges after this are not delivered yet: the last IRQ0. Never the time of a
        # write: a count of a few clocks (Linux's min_delta is 15, 12.6 us) may already
        # have run out when the callback looks, and its edge must not be lost.
        self._since = clock()
        self.irqs = 0  # IRQ0 edges raised
        self.deferred = 0  # times an edge came sooner than min_interval_ns and waited

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._rearm()

    def detach(self) -> None:
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is None or self.efd < 0:
            return
        now = self._clock()
        # The first edge not delivered yet: one that passed while the loop was busy (or
        # before attach) is delivered at once; several such are one edge.
        edge = self.model.next_edge(0, self._since)
        if edge is None:
            return
        due = max(edge, self._last_irq + self.min_interval_ns)
        if due > edge:
            self.deferred += 1
        self._timer = self._loop.call_later(max(due - now, 0) / 1e9, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.efd < 0:
            return
        os.eventfd_write(self.efd, 1)  # an edge on IRQ0 (the irqfd pulses the line)
        self._last_irq = self._since = self._clock()
        self.irqs += 1
        self._rearm()

    def stats(self) -> dict:
        return {"irqs": self.irqs, "deferred": self.deferred, **self.model.counters}

    def close(self) -> None:
        self.detach()
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
