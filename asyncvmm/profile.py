"""`asyncvmm run --profile-boot`: where the wall time of a boot went.

Marks (time.monotonic(), all taken by the VMM):

    created       the VM started: control socket, images read (and a bzImage unpacked)
    images        the images are in memory
    built         the machine is built: KVM VM, RAM, the kernel loaded, vCPUs, devices
    started       the vCPU threads run
    kernel entry  the first RIP sample of vCPU 0 in the upper half of the address space,
                  where a kernel proper runs (the decompressor and the PVH entry run at
                  physical addresses): the profile always samples, every 10 ms unless
                  --profile-rip asks for another period, so this is that precise. Without
                  samples, the time the guest kernel's clock read 0 is estimated from the
                  console instead (each line's printk timestamp against the wall time it
                  arrived; the smallest difference).
    init          the console line "Run /init as init process" (any init path), or
                  "Trying to run ... as init"
    stopped       the VM ended

Exits by kind come from the C core's per-vCPU counters (count, and time out of KVM_RUN
serving them); RIP samples, when asked for, from its sampling timer (machine.enable_sampling),
named with the kernel's symbols (boot/symbols.py). The profile covers the first boot.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

from .boot.symbols import Symbols

PRINTK_TIME = re.compile(rb"^\[\s*(\d+)\.(\d{6})\]")
INIT_LINE = re.compile(rb"Run (\S+) as init process|Trying to run (\S+) as init|Trying to run init: (\S+)")
PANIC_LINE = re.compile(rb"Kernel panic - not syncing: (.*)")
KERNEL_SPACE = 0xFFFF_8000_0000_0000  # x86-64: the kernel's half of the address space
SAMPLE_CAPACITY = 1 << 19  # RIP samples kept per vCPU (4 MiB each)
# KVM's per-vCPU counters (vstate/kvm_stats.py) the report lists, as (label, KVM's name).
KVM_EXIT_KINDS = (
    ("port I/O", "io_exits"), ("MMIO", "mmio_exits"), ("halt", "halt_exits"), ("host interrupt", "irq_exits"),
    ("signal", "signal_exits"), ("interrupt window", "irq_window_exits"), ("request", "request_irq_exits"),
    ("hypercall", "hypercalls"),
)
KVM_FAULT_KINDS = (
    ("fixed", "pf_fixed"), ("emulated", "pf_emulate"), ("the guest's", "pf_guest"), ("spurious", "pf_spurious"),
    ("TLB flushes", "tlb_flush"), ("invlpg", "invlpg"),
)
DEFAULT_SAMPLE_PERIOD_NS = 10_000_000  # sampling for the kernel entry mark alone
TOP_SYMBOLS = 25
MAX_LINE = 4096  # a console "line" longer than this is cut (a guest printing no newline)


@dataclass
class ConsoleMarks:
    """What the profile watches for on the console, with the wall time it arrived."""

    first_output: float = 0.0
    clock_zero: float | None = None  # wall time - printk time, at its smallest
    init: float | None = None
    init_line: str = ""
    panic: str = ""
    lines: int = 0
    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes, now: float) -> None:
        if not self.first_output:
            self.first_output = now
        buf = self._partial
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    del buf[:-MAX_LINE]
                return
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            self._line(line, now)

    def _line(self, line: bytes, now: float) -> None:
        self.lines += 1
        m = PRINTK_TIME.match(line)
        if m:
            stamp = int(m.group(1)) + int(m.group(2)) / 1e6
            if stamp > 0:  # lines from before the clock started all read 0
                zero = now - stamp
                if self.clock_zero is None or zero < self.clock_zero:
                    self.clock_zero = zero
        if self.init is None:
            m = INIT_LINE.search(line)
            if m:
                self.init = now
                self.init_line = line.decode(errors="replace").strip()
        if not self.panic:
            m = PANIC_LINE.search(line)
            if m:
                self.panic = m.group(1).decode(errors="replace").strip()


@dataclass
class BootProfile:
    sample_period_ns: int = DEFAULT_SAMPLE_PERIOD_NS  # 0: no RIP sampling
    show_rips: bool = False  # --profile-rip: list the hottest functions
    created: float = field(default_factory=time.monotonic)
    images: float = 0.0
    built: float = 0.0
    started: float = 0.0
    stopped: float = 0.0
    unpack_note: str = ""
    boot_path: str = ""
    stop_message: str = ""
    console: ConsoleMarks = field(default_factory=ConsoleMarks)
    stats: dict = field(default_factory=dict)
    samples: list[list[int]] = field(default_factory=list)
    symbols: Symbols | None = None
    done: bool = False
    kvm_vm: dict = field(default_factory=dict)  # KVM's own counters at the end (vstate/kvm_stats.py)
    kvm_vcpus: list[dict] = field(default_factory=list)
    _kvm_files: list = field(default_factory=list)

    # -- collecting ---------------------------------------------------------------------
    def watch(self, machine) -> None:
        """Follow `machine` (built, not yet running): its console, and RIP sampling."""
        self.built = machine.timeline.built
        self.boot_path = machine.boot.path if machine.boot else ""
        machine.console_observer = lambda data: self.console.feed(data, time.monotonic())
        if self.sample_period_ns:
            machine.enable_sampling(self.sample_period_ns, SAMPLE_CAPACITY)
        self._kvm_files = machine.kvm_stats_files()

    def finish(self, machine, stop) -> None:
        """The first boot ended: keep what the report needs before the machine is closed."""
        if self.done:
            return
        self.done = True
        self.started = machine.timeline.started
        self.stopped = machine.timeline.stopped or time.monotonic()
        self.stop_message = stop.message
        self.stats = machine.stats()
        if self.sample_period_ns:
            self.samples = [machine.rip_samples(i, SAMPLE_CAPACITY) for i in range(machine.config.cpus)]
        if self._kvm_files:
            self.kvm_vm = self._kvm_files[0].read()
            self.kvm_vcpus = [f.read() for f in self._kvm_files[1:]]
        self.release()
        machine.console_observer = None

    def kvm_vcpu_counters(self) -> list[dict]:
        """KVM's counters of each vCPU now, while the first boot runs ([] without them, or
        once it ended). Read from the files watch() opened before the vCPUs ran: opening one
        later (KVM_GET_STATS_FD) waits for that vCPU's KVM_RUN to return."""
        return [f.read() for f in self._kvm_files[1:]]

    def release(self) -> None:
        """Close KVM's statistics files (finish() has read them, or the boot failed)."""
        for f in self._kvm_files:
            f.close()
        self._kvm_files = []

    # -- the report ---------------------------------------------------------------------
    def phases(self) -> list[tuple[str, float, str]]:
        """(phase, seconds, what ends it) in order; phases not reached are left out."""
        out = []
        images = self.images or self.built
        out.append(("VMM set-up", (self.started or self.built) - self.created,
                    f"images {images - self.created:.3f} s"
                    + (f" ({self.unpack_note})" if self.unpack_note else "")
                    + f", machine {self.built - images:.3f} s, threads {max(self.started - self.built, 0):.3f} s"))
        if not self.started:
            return out
        c = self.console
        kernel_start = None
        first_high = (self.stats.get("vcpus") or [{}])[0].get("first_high_rip_ns", 0)
        if first_high:
            kernel_start = first_high / 1e9
            out.append(("entry to kernel", kernel_start - self.started,
                        "vCPUs started -> the first RIP sample in the kernel's half of the address space "
                        f"(every {self.sample_period_ns / 1e6:g} ms)"))
        elif c.clock_zero is not None and c.clock_zero >= self.started - 1.0:
            kernel_start = max(c.clock_zero, self.started)
            out.append(("entry to kernel", kernel_start - self.started,
                        "vCPUs started -> the kernel's clock started (from its printk timestamps)"))
        elif c.first_output:
            kernel_start = c.first_output
            out.append(("entry to kernel", kernel_start - self.started,
                        "vCPUs started -> the first console output (no printk timestamps)"))
        if c.init is not None:
            since = kernel_start or self.started
            out.append(("kernel to init", c.init - since, f'-> "{c.init_line}"'))
            out.append(("after init", self.stopped - c.init, f"-> {self.stop_message}"))
        else:
            since = kernel_start or self.started
            out.append(("kernel (init not reached)", self.stopped - since, f"-> {self.stop_message}"))
        return out

    def report(self) -> str:
        lines = ["boot profile (wall time):"]
        for name, seconds, what in self.phases():
            lines.append(f"  {name:<26} {seconds:9.3f} s   {what}")
        total = (self.stopped or time.monotonic()) - self.created
        lines.append(f"  {'total':<26} {total:9.3f} s")
        if self.boot_path:
            lines.append(f"  boot: {self.boot_path}")
        if self.console.panic:
            lines.append(f"  kernel panic: {self.console.panic}")
        lines += self._exit_lines()
        lines += self._kvm_lines()
        lines += self._sample_lines()
        return "\n".join(lines)

    def _exit_lines(self) -> list[str]:
        vcpus = self.stats.get("vcpus") or []
        if not vcpus:
            return []
        counts: Counter[str] = Counter()
        times: Counter[str] = Counter()
        fast = fast_ns = kicks = in_run = waiting = 0
        for v in vcpus:
            counts.update(v.get("exits", {}))
            times.update(v.get("ns_exits", {}))
            fast += v.get("fast_io", 0)
            fast_ns += v.get("ns_fast_io", 0)
            kicks += v.get("kicks", 0)
            in_run += v.get("ns_in_run", 0)
            waiting += v.get("ns_waiting", 0)
        lines = [f"exits ({len(vcpus)} vCPU{'s' if len(vcpus) > 1 else ''}): count, and time out of KVM_RUN serving them"]
        for kind in sorted(set(counts) | set(times), key=lambda k: -times.get(k, 0)):
            if kind == "INTR" and not counts.get(kind):
                extra = f" ({kicks} kicks and RIP samples)"
                n = kicks
            else:
                extra = f" (of which {fast} served in C, {fast_ns / 1e9:.3f} s)" if kind == "IO" and fast else ""
                n = counts.get(kind, 0)
            lines.append(f"  {kind:<16} {n:>10}  {times.get(kind, 0) / 1e9:9.3f} s{extra}")
        lines.append(f"  in KVM_RUN: {in_run / 1e9:.3f} s (guest code, KVM's emulator, in-kernel exits); "
                     f"waiting for the loop: {waiting / 1e9:.3f} s")
        ports = self.stats.get("ports") or {}
        if ports:
            lines.append("  accesses by device: " + ", ".join(f"{k} {v}" for k, v in sorted(ports.items(), key=lambda kv: -kv[1])))
        quirks = (self.stats.get("quirks") or {}).get("applied") or {}
        if quirks:
            lines.append("  quirks applied: " + ", ".join(f"{k} {v}" for k, v in quirks.items()))
        pit = self.stats.get("pit")
        if pit:
            lines.append(f"  VMM PIT: {pit['irqs']} IRQ0s raised, {pit['deferred']} deferred by the rate bound")
        return lines

    def _kvm_lines(self) -> list[str]:
        """KVM's own counters, summed over the vCPUs: the exits it served itself, the
        instructions it emulated, interrupts injected, halts (KVM_STATS_FD names)."""
        if not self.kvm_vcpus:
            return []
        k: Counter[str] = Counter()
        for v in self.kvm_vcpus:
            k.update(v)
        in_run = sum(v.get("ns_in_run", 0) for v in self.stats.get("vcpus") or []) / 1e9
        halted = (k["halt_wait_ns"] + k["halt_poll_success_ns"] + k["halt_poll_fail_ns"]) / 1e9

        def listed(pairs: tuple[tuple[str, str], ...]) -> str:
            return ", ".join(f"{label} {k[key]}" for label, key in pairs if k.get(key))

        lines = ["KVM's own counters (exits it served in the kernel never reach the VMM), all vCPUs:"]
        lines.append(f"  exits {k['exits']}: " + listed(KVM_EXIT_KINDS))
        if k.get("insn_emulation"):
            busy = max(in_run - halted, 0.0)
            lines.append(f"  instructions emulated {k['insn_emulation']} ({k['insn_emulation_fail']} failed)"
                         + (f": {busy * 1e9 / k['insn_emulation']:.0f} ns each over the {busy:.1f} s in KVM_RUN not halted"
                            if busy else ""))
        injected = listed((("interrupts", "irq_injections"), ("NMIs", "nmi_injections")))
        if injected:
            rate = f" ({k['irq_injections'] / in_run:.0f}/s in KVM_RUN)" if in_run else ""
            lines.append(f"  injected: {injected}{rate}")
        if k.get("halt_exits"):
            lines.append(f"  halted {halted:.3f} s ({k['halt_wait_ns'] / 1e9:.3f} s asleep, "
                         f"{(k['halt_poll_success_ns'] + k['halt_poll_fail_ns']) / 1e9:.3f} s polling); wake-ups {k['halt_wakeup']}")
        faults = listed(KVM_FAULT_KINDS)
        if faults:
            lines.append(f"  page faults {k['pf_taken']}: {faults}")
        return lines

    def _sample_lines(self) -> list[str]:
        if not self.sample_period_ns or not self.show_rips:
            return []
        total = sum(len(s) for s in self.samples)
        period_ms = self.sample_period_ns / 1e6
        if not total:
            return [f"RIP samples: none (every {period_ms:g} ms asked)"]
        source = self.symbols.source if self.symbols else "no symbols found: raw addresses (give --symbols)"
        lines = [f"RIP samples: {total} (every {period_ms:g} ms, all vCPUs), named from {source}; the hottest:"]
        by_name: Counter[str] = Counter()
        for rips in self.samples:
            for rip in rips:
                by_name[self.name(rip)] += 1
        for name, n in by_name.most_common(TOP_SYMBOLS):
            lines.append(f"  {100 * n / total:5.1f}%  {n:>8}  {name}")
        first = next((i for i, rip in enumerate(self.samples[0]) if rip >= KERNEL_SPACE), None) if self.samples else None
        if first is not None and first:
            lines.append(f"  vCPU 0 ran below the kernel's map (decompressor, early boot) for its first "
                         f"{first} samples: about {first * period_ms / 1e3:.2f} s")
        return lines

    def name(self, rip: int) -> str:
        if self.symbols is not None:
            hit = self.symbols.lookup(rip)
            if hit is not None and (rip >= KERNEL_SPACE) == (self.symbols.addresses[0] >= KERNEL_SPACE):
                return hit[0]
        if rip < KERNEL_SPACE:
            return "[low addresses: the decompressor, early boot or user space]"
        return f"{rip:#x}"
