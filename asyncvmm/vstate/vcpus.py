"""The vCPUs of one boot: their threads in the C core, and the exits they post to the loop.

    v = Vcpus(vm, config, boot_state, pio, mmio, request_stop)   # KVM vCPUs, CPUID, MSRs
    v.attach(loop, before_batch)   # the loop serves posted exits from now on
    v.start()                      # the threads run KVM_RUN
    v.stop(); v.detach(loop)       # threads joined, reader removed
    v.close()                      # vCPU fds and the C state freed (idempotent)

Threads: one pthread per vCPU runs KVM_RUN in C, without the GIL (cext/vcpu_loop.c). An
exit C cannot serve is posted: the notify eventfd wakes the loop, which serves it here —
port and MMIO accesses through the buses, anything else decoded into a `Stop` — and
completes it. The C state also holds the UART fast path's console buffer (its eventfd is
`console_efd`); the legacy port devices arm and drain it through `uart_fast_set` and
`console_drain`.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import poll, seccomp
from .._native import ffi, lib
from ..boot import cpuid
from ..bus import Bus, UnclaimedAccess
from ..config import VmConfig
from ..disasm import disassemble
from ..errors import KvmError
from ..poll import PollWindow
from . import registers
from .kvm import VcpuFd
from .vcpu import apply_boot_state, set_boot_msrs
from .vm import Vm

AVMM_EXIT_IO, AVMM_EXIT_MMIO = lib.AVMM_EXIT_IO, lib.AVMM_EXIT_MMIO
AVMM_ACTION_RESUME, AVMM_ACTION_QUIT = lib.AVMM_ACTION_RESUME, lib.AVMM_ACTION_QUIT

GP_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
SEGMENT_FIELDS = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
VCPU_STATES = {
    lib.AVMM_VCPU_IDLE: "idle", lib.AVMM_VCPU_RUNNING: "running", lib.AVMM_VCPU_WAITING: "in an exit",
    lib.AVMM_VCPU_PAUSED: "paused", lib.AVMM_VCPU_DONE: "stopped",
}


class StopReason(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    ERROR = "error"
    HOST = "host"  # stopped from the host side: signal, console escape, API


@dataclass
class Stop:
    """Why the VM stopped, said as the CLI and the API report it, and the vCPU it came from."""

    reason: StopReason
    message: str
    vcpu: int | None = None


def _exit_names() -> dict[int, str]:
    return {getattr(lib, n): n[len("KVM_EXIT_") :] for n in dir(lib) if n.startswith("KVM_EXIT_")}


EXIT_NAMES = _exit_names()


class Vcpus:
    """The KVM vCPUs, their C threads, and serving what they post. See the module docstring."""

    def __init__(self, vm: Vm, config: VmConfig, boot_state, pio: Bus, mmio: Bus,
                 request_stop: Callable[[Stop], None]):
        self.vm = vm
        self.count = config.cpus
        self.pins = dict(config.pins)
        self.pio = pio
        self.mmio = mmio
        self.request_stop = request_stop
        self.fds: list[VcpuFd] = []
        self.cvm = ffi.NULL
        self.notify_efd = -1
        self.console_efd = -1  # the UART fast path's bytes are waiting (vcpu_loop.c)
        self.paused = False
        self.stopping: Callable[[], bool] = lambda: False
        self.exit_poll = PollWindow(poll.POLL_MAX_NS if config.poll else 0)
        self.loop_wakeups = 0  # times the loop was woken for exits
        self.exit_batches = 0  # collections of posted exits (a wake-up, or a poll that hit)
        self.exits_served = 0
        self._before_batch: Callable[[], None] = lambda: None
        self.debugger = None  # gdb.target.Target, with -g/-G: sees the debug exits first
        self._ids = ffi.new("int[]", max(config.cpus, 1))
        try:
            self._create(config, boot_state)
        except BaseException:
            self.close()
            raise

    def _create(self, cfg: VmConfig, boot_state) -> None:
        vm = self.vm
        self.notify_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.console_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.cvm = lib.avmm_vm_new(cfg.cpus, self.notify_efd, self.console_efd)
        if self.cvm == ffi.NULL:
            raise KvmError("cannot allocate the vCPU threads' state")
        lib.avmm_vm_set_seccomp(self.cvm, seccomp.action(cfg.seccomp))  # each vCPU thread's filter
        quirks = vm.quirks
        entries = quirks.adjust_cpuid(cpuid.apply_template(vm.kvm.supported_cpuid(), vm.cpu_template))
        if cfg.xapic:
            entries = cpuid.hide(entries, (cpuid.X2APIC,))
        if quirks.hidden_pv_features:
            from ..log import get_logger  # noqa: PLC0415

            get_logger("asyncvmm.quirks").info(f"quirks: kvm-pv-hypercalls: hidden from the guest: {', '.join(quirks.hidden_pv_features)}")
        msrs = vm.kvm.msr_index_list()
        topology = cfg.cpu_topology
        for i in range(cfg.cpus):
            # KVM's vCPU ID is the initial APIC ID: the one the MADT and CPUID give.
            vcpu = vm.fd.create_vcpu(i, topology.apic_id(i))
            self.fds.append(vcpu)
            r = lib.avmm_vcpu_attach(self.cvm, i, vcpu.fd, vm.kvm.vcpu_mmap_size)
            if r < 0:
                raise KvmError(f"cannot map kvm_run of vCPU {i}: {os.strerror(-r)}")
            vcpu.set_cpuid(cpuid.for_vcpu(entries, topology, i))
            set_boot_msrs(vcpu, msrs)
        # The boot processor starts at the kernel's entry; the others wait for INIT/SIPI
        # from it, in the in-kernel LAPIC.
        if boot_state is not None:  # None: a firmware boot, from the reset vector (boot/bootrom.py), or a snapshot's registers
            apply_boot_state(self.fds[0], boot_state)

    @property
    def alive(self) -> bool:
        """The C state exists (not closed)."""
        return self.cvm != ffi.NULL

    # -- running -----------------------------------------------------------------------
    def attach(self, loop, before_batch: Callable[[], None], stopping: Callable[[], bool]) -> None:
        """Serve posted exits on `loop`; `before_batch` runs before each batch (console
        bytes the fast path took come before what the exits do); `stopping` says the VM
        is ending (exits are then completed with QUIT)."""
        self._before_batch = before_batch
        self.stopping = stopping
        loop.add_reader(self.notify_efd, self._on_exits)

    def detach(self, loop) -> None:
        if self.notify_efd >= 0:
            loop.remove_reader(self.notify_efd)

    def start(self) -> None:
        for i in range(self.count):
            r = lib.avmm_vcpu_start(self.cvm, i, self.pins.get(i, -1))
            if r < 0:
                raise KvmError(f"cannot start the thread of vCPU {i}: {os.strerror(-r)}")

    def stop(self) -> None:
        """End every vCPU thread (waiting ones are told to quit) and join them."""
        if self.cvm != ffi.NULL:
            lib.avmm_vm_stop(self.cvm)

    def pause(self) -> None:
        """Stop every vCPU from running guest code; returns once none does."""
        if not self.paused:
            lib.avmm_vm_pause(self.cvm)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            lib.avmm_vm_resume(self.cvm)
            self.paused = False

    # -- the UART fast path's C side (armed and drained by the legacy port devices) ------
    FAST_UART_SLOTS = lib.AVMM_UART_FAST_SLOTS

    def uart_fast_set(self, slot: int, thr_port: int, lsr_port: int, flags: int, lsr: int) -> None:
        if self.cvm != ffi.NULL and lib.avmm_uart_fast_set(self.cvm, slot, thr_port, lsr_port, flags, lsr) < 0:
            raise ValueError(f"UART fast path slot {slot}: there are {self.FAST_UART_SLOTS}")

    def pm_timer_set(self, port: int) -> None:
        """Answer reads of the ACPI PM timer at [port, port+4) in the vCPU threads (C);
        0: leave them to the loop's model."""
        if self.cvm != ffi.NULL:
            lib.avmm_pm_timer_set(self.cvm, port)

    def console_ack(self) -> None:
        """Reset the console eventfd, before draining every slot."""
        if self.cvm != ffi.NULL:
            lib.avmm_console_ack(self.cvm)

    def console_pending(self) -> bool:
        """Whether the fast path signalled bytes since the last console_ack (no syscall)."""
        return self.cvm != ffi.NULL and lib.avmm_console_pending(self.cvm) != 0

    def console_drain(self, slot: int, buf, cap: int) -> int:
        """Move up to `cap` bytes slot's fast path took from THR into `buf`; how many."""
        if self.cvm == ffi.NULL:
            return 0
        return lib.avmm_console_drain(self.cvm, slot, buf, cap)

    # -- serving exits -----------------------------------------------------------------
    def _on_exits(self) -> None:
        """Serve posted exits; keep serving (busy-polling, asyncvmm.poll) while they come
        fast, so an exit-heavy guest pays no thread wake-up per exit."""
        cvm, ids, ncpus = self.cvm, self._ids, self.count
        n = lib.avmm_vm_collect(cvm, ids, ncpus, 0)
        if not n:
            return
        # Whether to poll, given the window, is decided in C per poll (its hits and misses,
        # where the vCPUs run: cext/vcpu_loop.c, struct spin_policy).
        poll_ns = self.exit_poll.max_ns
        deadline = time.monotonic_ns() + poll.POLL_SLICE_NS
        self.loop_wakeups += 1
        while True:
            # Bytes the fast path took from THR come before whatever these exits do; the
            # exits collected are served whatever the console does.
            try:
                self._before_batch()
            except Exception as exc:
                self.request_stop(Stop(StopReason.ERROR, f"internal error writing console output: {exc!r}"))
            self.exit_batches += 1
            self.exits_served += n
            for k in range(n):
                self._serve_exit(ids[k])
            if self.stopping():
                return
            # Past the deadline, exits still posted wake the loop again through the eventfd.
            n = lib.avmm_vm_collect(cvm, ids, ncpus, poll_ns) if poll_ns and time.monotonic_ns() < deadline else 0
            if not n:
                return

    def serve_posted(self, i: int) -> None:
        """Serve vCPU i's posted exit now (a debugger settling its held vCPUs)."""
        self._serve_exit(i)

    def _serve_exit(self, i: int) -> None:
        try:
            self._serve_exit_unguarded(i)
        except UnclaimedAccess as exc:  # -e: the first access nothing emulates stops the VM
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: {exc}, at RIP {self.rip(i):#x} (-e)", i))
            lib.avmm_vcpu_complete(self.cvm, i, AVMM_ACTION_QUIT)
        except Exception as exc:  # a bug in a device model: stop the VM, never hang a vCPU
            where = f"{type(exc).__name__}: {exc}"
            self.request_stop(Stop(StopReason.ERROR, f"vCPU {i}: internal error serving an exit: {where}", i))
            lib.avmm_vcpu_complete(self.cvm, i, AVMM_ACTION_QUIT)

    def _serve_exit_unguarded(self, i: int) -> None:
        e = lib.avmm_vcpu_exit(self.cvm, i)
        kind = e.kind
        if kind == AVMM_EXIT_IO or kind == AVMM_EXIT_MMIO:
            bus = self.pio if kind == AVMM_EXIT_IO else self.mmio
            if e.count == 1:
                if e.is_write:
                    bus.access(e.addr, e.size, True, e.value)
                else:
                    e.value = bus.access(e.addr, e.size, False)
            else:  # string I/O: `count` accesses at one port
                bus.dispatch(e.addr, e.size, bool(e.is_write), ffi.buffer(e.data, e.size * e.count), e.count)
            resume = True
        else:
            resume = self._on_stop_exit(i, e)
        if self.stopping():
            resume = False
        lib.avmm_vcpu_complete(self.cvm, i, AVMM_ACTION_RESUME if resume else AVMM_ACTION_QUIT)

    def _on_stop_exit(self, i: int, e) -> bool:
        """A vCPU stopped on something other than I/O: serve it (True: resume it), or
        stop the VM."""
        stop = self.decode_stop(i, e)
        if stop is None:
            return True
        self.request_stop(stop)
        return False

    def decode_stop(self, i: int, e) -> Stop | None:
        """What a non-I/O exit of vCPU i means: a Stop, or None when a quirk served it."""
        reason = e.kvm_reason
        vcpu = self.fds[i]
        if reason == lib.KVM_EXIT_DEBUG and e.kind == lib.AVMM_EXIT_STOP and self.debugger is not None:
            self.debugger.on_debug_exit(i, e.info[0], e.info[1], e.info[2])
            return None
        if e.kind == lib.AVMM_EXIT_ERROR:
            return Stop(StopReason.ERROR, f"vCPU {i}: KVM_RUN failed: {os.strerror(e.err)}", i)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return Stop(StopReason.TRIPLE_FAULT, f"vCPU {i}: triple fault at RIP {self.rip(i):#x}", i)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            suberror = e.info[0] & 0xFFFF_FFFF
            if suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
                insn, rip, bits = self._failed_instruction(vcpu, e)
                if insn[:1] == b"\xcc" and self.debugger is not None and self.debugger.on_int3(i):
                    return None  # one of gdb's breakpoints
                if self.vm.quirks.on_emulation_failure(vcpu, insn, self.vm.mem):
                    return None
                text, length = disassemble(insn, rip, bits)
                hexbytes = insn[: length or len(insn)].hex(" ") if insn else "unreadable"
                return Stop(StopReason.ERROR, f"vCPU {i}: emulation failure at RIP {rip:#x}: {hexbytes} ({text})", i)
            names = {
                lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
                lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
            }
            what = names.get(suberror, f"suberror {suberror}")
            return Stop(StopReason.ERROR, f"vCPU {i}: KVM internal error: {what} at RIP {self.rip(i):#x}", i)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = e.info[0]
            if event == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                return Stop(StopReason.POWEROFF, "guest powered off", i)
            if event == lib.KVM_SYSTEM_EVENT_RESET:
                return Stop(StopReason.RESET, "guest reset", i)
            return Stop(StopReason.ERROR, f"vCPU {i}: guest crashed (system event {event})", i)
        if reason == lib.KVM_EXIT_IO:  # sizes the exit slot cannot hold (vcpu_loop.c io_fits)
            return Stop(StopReason.ERROR, f"vCPU {i}: KVM reported a port I/O exit of {e.info[0]} bytes x {e.info[1]} "
                        f"at offset {e.info[2]:#x}, outside what the VMM can serve", i)
        if reason == lib.KVM_EXIT_MMIO:
            return Stop(StopReason.ERROR, f"vCPU {i}: KVM reported an MMIO exit of {e.info[0]} bytes, "
                        "outside what the VMM can serve", i)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return Stop(StopReason.ERROR, f"vCPU {i}: KVM could not enter the guest (hardware reason {e.info[0]:#x})", i)
        name = EXIT_NAMES.get(reason, str(reason))
        return Stop(StopReason.ERROR, f"vCPU {i}: unhandled exit {name} at RIP {self.rip(i):#x}", i)

    def rip(self, i: int) -> int:
        try:
            return self.fds[i].get_regs().rip
        except KvmError:
            return 0

    def _failed_instruction(self, vcpu: VcpuFd, e) -> tuple[bytes, int, int]:
        """(instruction bytes, RIP, code size in bits) of a failed emulation."""
        sregs = vcpu.get_sregs()
        rip = vcpu.get_regs().rip
        bits = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
        ndata = e.info[0] >> 32
        flags = e.info[1] if ndata >= 1 else 0
        if ndata >= 3 and flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            raw = int(e.info[2]).to_bytes(8, "little") + int(e.info[3]).to_bytes(8, "little")
            size = min(raw[0], 15)
            if size:
                return raw[1 : 1 + size], rip, bits
        # No bytes from KVM: translate CS:RIP and read them from guest RAM.
        linear = (sregs.cs.base + rip) & ((1 << 64) - 1)
        gpa = vcpu.translate(linear) if sregs.cr0 & registers.Cr0.PG else linear
        if gpa is None:
            return b"", rip, bits
        page_left = 4096 - (gpa & 4095)
        try:
            return self.vm.mem.read(gpa, min(15, page_left)), rip, bits
        except Exception:
            return b"", rip, bits

    # -- looking at them -----------------------------------------------------------------
    def state(self, i: int) -> int:
        return lib.avmm_vcpu_state(self.cvm, i)

    def stats_of(self, i: int) -> dict:
        s = lib.avmm_vcpu_stats(self.cvm, i)
        exits = {EXIT_NAMES.get(r, str(r)): s.exits[r] for r in range(lib.AVMM_NR_REASONS) if s.exits[r]}
        ns_exits = {EXIT_NAMES.get(r, str(r)): s.ns_exits[r] for r in range(lib.AVMM_NR_REASONS) if s.ns_exits[r]}
        return {
            "exits": exits,
            "fast_io": s.fast_io,
            "posted": s.posted,
            "kicks": s.kicks,
            "ns_in_run": s.ns_in_run,
            "ns_waiting": s.ns_waiting,
            "ns_exits": ns_exits,  # out of KVM_RUN serving them, by exit reason
            "ns_fast_io": s.ns_fast_io,
            "samples": s.samples,
            "samples_dropped": s.samples_dropped,
            "first_high_rip_ns": s.first_high_rip_ns,  # CLOCK_MONOTONIC, 0: none
        }

    def stats(self) -> list[dict]:
        return [self.stats_of(i) for i in range(self.count)] if self.cvm != ffi.NULL else []

    def loop_stats(self) -> dict:
        return {
            "wakeups": self.loop_wakeups,
            "batches": self.exit_batches,
            "exits": self.exits_served,
            "mean_batch": round(self.exits_served / self.exit_batches, 2) if self.exit_batches else 0.0,
            "poll_window_ns": self.exit_poll.ns,
        }

    def read_registers(self, i: int) -> dict:
        """vCPU i's registers as plain ints (the vCPU must not be running guest code)."""
        vcpu = self.fds[i]
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        out = {name: getattr(regs, name) for name in GP_REGISTERS}
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            out[name] = getattr(sregs, name)
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            seg = getattr(sregs, name)
            out[name] = {f: getattr(seg, f) for f in SEGMENT_FIELDS}
        for name in ("gdt", "idt"):
            table = getattr(sregs, name)
            out[name] = {"base": table.base, "limit": table.limit}
        try:
            dbg = vcpu.get_debugregs()
            out.update({f"dr{k}": dbg.db[k] for k in range(4)}, dr6=dbg.dr6, dr7=dbg.dr7)
        except KvmError:
            pass  # a KVM without KVM_GET_DEBUGREGS: the dump has no debug registers
        return {"vcpu": i, "state": VCPU_STATES.get(self.state(i), "?"), "registers": out}

    # -- changing a stopped vCPU (ctl set/nmi/msr; the caller has paused them) ------------
    def in_exit(self) -> list[int]:
        """The vCPUs waiting for the loop to finish an exit: their registers are not whole
        until they have been served and have parked (the pause in C finishes the exit)."""
        if self.cvm == ffi.NULL:
            return []
        return [i for i in range(len(self.fds)) if self.state(i) == lib.AVMM_VCPU_WAITING]

    def write_registers(self, i: int, changes: dict) -> None:
        """Write registers of a parked vCPU (names and values as registers.normalize gives
        them); checked as a whole first: ConfigError and nothing written if the state it
        would leave is not one a CPU can be in."""
        vcpu = self.fds[i]
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        dbg = vcpu.get_debugregs() if any(name in registers.DEBUG for name in changes) else None
        touched = registers.apply(regs, sregs, dbg, changes)
        old_sregs = vcpu.get_sregs()
        if "sregs" in touched:
            vcpu.set_sregs(sregs)
        try:
            if "regs" in touched:
                vcpu.set_regs(regs)
            if "debugregs" in touched:
                vcpu.set_debugregs(dbg)
        except KvmError:
            vcpu.set_sregs(old_sregs)  # all or nothing
            raise

    def inject_nmi(self, i: int) -> None:
        self.fds[i].nmi()

    def events(self, i: int) -> dict:
        """What KVM_GET_VCPU_EVENTS says is pending or being delivered on vCPU i."""
        ev = self.fds[i].get_events()
        return {
            "exception": {"injected": ev.exception.injected, "pending": ev.exception.pending,
                          "vector": ev.exception.nr, "has_error_code": ev.exception.has_error_code,
                          "error_code": ev.exception.error_code},
            "interrupt": {"injected": ev.interrupt.injected, "vector": ev.interrupt.nr, "soft": ev.interrupt.soft,
                          "shadow": ev.interrupt.shadow},
            "nmi": {"injected": ev.nmi.injected, "pending": ev.nmi.pending, "masked": ev.nmi.masked},
        }

    def read_msrs(self, i: int, indices: list[int]) -> dict[int, int]:
        """The MSRs KVM gives of `indices` (it stops at the first it does not know)."""
        return self.fds[i].get_msrs(indices)

    def write_msr(self, i: int, index: int, value: int) -> bool:
        """False if KVM refuses the value (or the MSR)."""
        return self.fds[i].set_msrs({index: value}) == 1

    def enable_sampling(self, period_ns: int, capacity: int) -> None:
        """RIP samples every `period_ns` on each vCPU (before start())."""
        r = lib.avmm_vm_set_sampling(self.cvm, period_ns, capacity)
        if r < 0:
            raise KvmError(f"cannot set up RIP sampling: {os.strerror(-r)}")

    def rip_samples(self, i: int, capacity: int) -> list[int]:
        """vCPU i's RIP samples (once its thread has ended)."""
        if self.cvm == ffi.NULL:
            return []
        buf = ffi.new("uint64_t[]", capacity)
        n = lib.avmm_vcpu_samples(self.cvm, i, buf, capacity)
        return list(buf[0:n])

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        if self.cvm != ffi.NULL:
            lib.avmm_vm_free(self.cvm)  # stops and joins any thread still running
            self.cvm = ffi.NULL
        for v in self.fds:
            v.close()
        self.fds.clear()
        for name in ("notify_efd", "console_efd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
