"""The machine as gdb sees it: vCPUs stopped and released, memory by linear address,
breakpoints, and the vCPU exits that are debug events.

All of it runs on the loop's thread. The vCPU threads (cext/vcpu_loop.c) know one thing
of it: a per-vCPU *hold* (avmm_vcpu_hold). A held vCPU leaves the guest and parks as a
paused one does; releasing it lets it run. gdb's all-stop mode is built from that:

    running --debug event / Ctrl-C / client connects--> stopping --settled--> stopped
    stopped --c/s/vCont (some or all vCPUs released)--> running
    any --detach, client gone--> detached (breakpoints removed, all released)

Stopping holds every vCPU, then *settles*: exits the vCPUs posted meanwhile are served
(through Vcpus.serve_posted) until every held vCPU is parked; only then are registers
whole (an I/O exit completes on the vCPU's next KVM_RUN) and the stop is reported. A
second debug event met while stopping is kept but not reported (a breakpoint hit again
on the next resume; gdb's all-stop mode reports one at a time).

Debug events: KVM_EXIT_DEBUG (#DB: single step, a debug register; #BP with
KVM_GUESTDBG_USE_SW_BP) and, on an emulating KVM, int3 as an emulation failure (the
emulator cannot execute it; see asyncvmm/quirks.py). An int3 that is not one of ours is
left to the guest as before.

On an emulating KVM the debug registers' execute breakpoints fire but data breakpoints
never do (the instruction emulator does not check them; measured): there, write
watchpoints are served by single-stepping the released vCPUs and comparing the watched
bytes after each instruction — correct, and slow (an exit per instruction).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

from .. import platform
from .._native import ffi, lib
from ..errors import GuestMemoryError
from ..log import get_logger
from ..vstate.vcpu import Msr
from .breakpoints import (
    INT3,
    BreakpointError,
    DebugRegisters,
    Dr6,
    HardwareBreakpoint,
    Kind,
    SoftwareBreakpoints,
)
from .paging import Paging, pages, translate
from .registers import RegisterFile

log = get_logger("asyncvmm.gdb")

BP_VECTOR = 3  # #BP
DB_VECTOR = 1  # #DB
SETTLE_TIMEOUT_NS = 2_000_000_000


class Signal(enum.IntEnum):
    """The signal numbers of stop replies (gdb's own numbering)."""

    INT = 2  # stopped by Ctrl-C
    TRAP = 5  # a breakpoint, a step, a watchpoint, or the stop on attach


class State(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DETACHED = "detached"


@dataclass(frozen=True)
class StopEvent:
    vcpu: int
    signal: Signal
    why: str = ""  # "swbreak", "hwbreak", "watch", "step", "attach", "interrupt"
    addr: int = 0  # a watchpoint's address


class TargetError(Exception):
    """A request gdb made that cannot be done (answered with an error reply)."""


@dataclass
class EmulatedWatch:
    linear: int
    length: int
    gpa: int
    last: bytes


class Target:
    """One Machine (one boot) under a debugger. `on_stop(event)` is called once the
    vCPUs are stopped after a debug event, Ctrl-C or attach."""

    def __init__(self, machine, *, wait: bool = False):
        self.m = machine
        self.vcpus = machine.vcpus
        self.vm = machine.vm
        self.n = self.vcpus.count
        self.sw = SoftwareBreakpoints(self.vm.mem)
        self.dr = DebugRegisters()
        self.emulating = self.vm.emulating
        self.watches: list[EmulatedWatch] = []  # write watchpoints served by stepping
        self.stepping: set[int] = set()
        self.released: set[int] = set(range(self.n))
        self.state = State.DETACHED
        self.pending: list[StopEvent] = []
        self.on_stop: Callable[[StopEvent], None] | None = None
        self._removed: set[int] = set()  # gpas of breakpoints removed (a vCPU may still meet them)
        self._regfiles: dict[int, RegisterFile] = {}
        self._ids = ffi.new("int[]", max(self.n, 1))
        self._settling = False
        self._finish_scheduled = False
        self._warned_watch = False
        if wait:  # -G w: nothing runs before a client has looked
            for i in range(self.n):
                lib.avmm_vcpu_hold(self.vcpus.cvm, i, 1)
            self.released = set()
            self.state = State.STOPPED
            self.pending = [StopEvent(0, Signal.TRAP, "attach")]

    @property
    def active(self) -> bool:
        return self.state is not State.DETACHED

    # -- stopping ----------------------------------------------------------------------
    def attach(self) -> None:
        """A client came: stop the guest (as QEMU's stub does) unless it is stopped."""
        if self.state is State.DETACHED or self.state is State.RUNNING:
            self.stop(StopEvent(0, Signal.TRAP, "attach"))

    def interrupt(self, vcpu: int) -> None:
        if self.state is State.RUNNING:
            self.stop(StopEvent(vcpu, Signal.INT, "interrupt"))

    def stop(self, event: StopEvent) -> None:
        """Hold every vCPU; report `event` once they are parked (from the loop, later:
        this may be called while a vCPU's exit is being served)."""
        if self.state in (State.STOPPING, State.STOPPED):
            self.pending.append(event)
            return
        self.state = State.STOPPING
        self.pending = [event]
        self._hold_all()
        if not self._finish_scheduled:
            self._finish_scheduled = True
            asyncio.get_running_loop().call_soon(self._finish_stop)

    def _hold_all(self) -> None:
        for i in range(self.n):
            lib.avmm_vcpu_hold(self.vcpus.cvm, i, 1)
        self.released = set()

    def _finish_stop(self) -> None:
        self._finish_scheduled = False
        if self.state is not State.STOPPING:
            return
        self.settle()
        if self.state is State.STOPPED and self.on_stop is not None and self.pending:
            self.on_stop(self.pending[0])

    def settle(self) -> None:
        """Serve what the held vCPUs posted until all are parked; then STOPPED."""
        if self._settling or self.vcpus.cvm == ffi.NULL:
            return
        self._settling = True
        try:
            while not self.m.stopping:
                r = lib.avmm_vm_settle(self.vcpus.cvm, self._ids, self.n, SETTLE_TIMEOUT_NS)
                if r == 0:
                    break
                if r < 0:
                    log.error("gdb: a vCPU did not stop within 2 s; its registers may be stale")
                    break
                for k in range(r):
                    self.vcpus.serve_posted(self._ids[k])
        finally:
            self._settling = False
        self.state = State.STOPPED
        self._regfiles.clear()

    def stop_now(self) -> None:
        """Stop synchronously (not from within an exit being served)."""
        if self.state is State.RUNNING or self.state is State.DETACHED:
            self.state = State.STOPPING
            self.pending = self.pending or [StopEvent(0, Signal.TRAP, "attach")]
            self._hold_all()
        if self.state is State.STOPPING:
            self.settle()

    # -- resuming ----------------------------------------------------------------------
    def resume(self, actions: dict[int, str]) -> None:
        """Release the vCPUs in `actions` ('c' continue, 's' one instruction); the rest
        stay stopped."""
        if self.state is not State.STOPPED:
            raise TargetError("the target is not stopped")
        self._flush_registers()
        self.stepping = {i for i, a in actions.items() if a == "s"}
        for i in range(self.n):
            self._set_guest_debug(i, i in self.stepping)
        self._refresh_watches()
        self.state = State.RUNNING
        self.pending = []
        for i in actions:
            self.released.add(i)
            lib.avmm_vcpu_hold(self.vcpus.cvm, i, 0)

    def detach(self) -> None:
        """Remove every breakpoint and let every vCPU run, with no debugging."""
        if self.state is State.DETACHED:
            return
        if self.vcpus.cvm == ffi.NULL or self.m.stopping:
            self.state = State.DETACHED
            return
        self.stop_now()
        self._flush_registers()
        for bp in self.sw.by_gpa.values():
            self._removed.add(bp.gpa)
        self.sw.remove_all()
        self.dr.clear()
        self.watches.clear()
        self.stepping = set()
        for i in range(self.n):
            self.vcpus.fds[i].set_guest_debug(0)
        self.state = State.DETACHED
        self.pending = []
        for i in range(self.n):
            lib.avmm_vcpu_hold(self.vcpus.cvm, i, 0)
        self.released = set(range(self.n))

    def _set_guest_debug(self, i: int, step: bool) -> None:
        control = 0
        if step or self.watches:
            control |= lib.KVM_GUESTDBG_SINGLESTEP
        if self.dr:
            control |= lib.KVM_GUESTDBG_USE_HW_BP
        if self.sw.by_gpa and not self.emulating:  # an emulating KVM reports int3 as a failure
            control |= lib.KVM_GUESTDBG_USE_SW_BP
        if control:
            control |= lib.KVM_GUESTDBG_ENABLE
        self.vcpus.fds[i].set_guest_debug(control, self.dr.debugreg() if self.dr else None)

    # -- the exits that are debug events (Machine calls these) --------------------------
    def on_debug_exit(self, i: int, exception: int, pc: int, dr6: int) -> bool:
        """A KVM_EXIT_DEBUG; returns True (the vCPU resumes, or parks if held)."""
        if exception == BP_VECTOR:
            if self.active and self._is_ours(i, pc):
                self._event(StopEvent(i, Signal.TRAP, "swbreak"))
            else:  # the guest's own int3 (hardware KVM, USE_SW_BP): deliver #BP as the CPU would
                self._deliver_breakpoint(self.vcpus.fds[i])
            return True
        if not self.active:
            return True
        hw = self.dr.hit(dr6)
        if hw is not None:
            if hw.kind is Kind.HARDWARE:
                self._event(StopEvent(i, Signal.TRAP, "hwbreak"))
            else:
                self._event(StopEvent(i, Signal.TRAP, "watch", hw.addr))
            return True
        if dr6 & Dr6.BS:
            hit = self._check_watches()
            if hit is not None:
                self._event(StopEvent(i, Signal.TRAP, "watch", hit.linear))
            elif i in self.stepping:
                self.stepping.discard(i)
                self._event(StopEvent(i, Signal.TRAP, "step"))
        return True

    @staticmethod
    def _deliver_breakpoint(vcpu) -> None:
        """Pass the #BP on to the guest, as QEMU does: RIP is left at the int3 — KVM
        injects it as the software exception it intercepted, with that instruction's
        length, so the guest's handler sees the RIP after it (hardware KVM only: this
        exit needs KVM_GUESTDBG_USE_SW_BP, which an emulating KVM does not get)."""
        events = vcpu.get_events()
        events.exception.injected = 1
        events.exception.nr = BP_VECTOR
        events.exception.has_error_code = 0
        vcpu.set_events(events)

    def on_int3(self, i: int) -> bool:
        """An emulation failure on int3 (an emulating KVM): True if it was ours."""
        vcpu = self.vcpus.fds[i]
        sregs = vcpu.get_sregs()
        linear = (sregs.cs.base + vcpu.get_regs().rip) & 0xFFFF_FFFF_FFFF_FFFF
        gpa = translate(self._paging(sregs), linear, self.vm.mem.read)
        if self.active and (linear in self.sw.by_linear or gpa in self.sw.by_gpa):
            self._event(StopEvent(i, Signal.TRAP, "swbreak"))
            return True
        if gpa is not None and gpa in self._removed:
            try:
                if self.vm.mem.read(gpa, 1)[0] != INT3:
                    return True  # ours a moment ago, now gone: run the real instruction
            except GuestMemoryError:
                pass
        return False

    def _event(self, event: StopEvent) -> None:
        self.stop(event)

    def _is_ours(self, i: int, pc: int) -> bool:
        if pc in self.sw.by_linear:
            return True
        gpa = translate(self._paging(self.vcpus.fds[i].get_sregs()), pc, self.vm.mem.read)
        return gpa in self.sw.by_gpa

    # -- registers ---------------------------------------------------------------------
    def registers(self, i: int) -> RegisterFile:
        if self.state is not State.STOPPED:
            raise TargetError("the target is running")
        if not 0 <= i < self.n:
            raise TargetError(f"no vCPU {i}")
        rf = self._regfiles.get(i)
        if rf is None:
            rf = self._regfiles[i] = RegisterFile(self.vcpus.fds[i], Msr.KERNEL_GS_BASE)
        return rf

    def _flush_registers(self) -> None:
        for rf in self._regfiles.values():
            rf.flush()
        self._regfiles.clear()

    # -- memory ------------------------------------------------------------------------
    @staticmethod
    def _paging(sregs) -> Paging:
        return Paging(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)

    def _vcpu_paging(self, i: int) -> Paging:
        rf = self._regfiles.get(i)
        sregs = rf.sregs if rf is not None else self.vcpus.fds[i].get_sregs()
        return self._paging(sregs)

    def _gpa(self, paging: Paging, linear: int) -> int | None:
        return translate(paging, linear, self.vm.mem.read)

    def read_memory(self, i: int, linear: int, length: int) -> bytes:
        """Up to `length` bytes at `linear` in vCPU i's address space, page by page,
        stopping at the first page not mapped to RAM; breakpoints show the original."""
        paging = self._vcpu_paging(i)
        out = bytearray()
        for lin, n in pages(linear, length):
            gpa = self._gpa(paging, lin)
            if gpa is None or not self.vm.mem.contains(gpa, n):
                break
            chunk = bytearray(self.vm.mem.read(gpa, n))
            self.sw.shadow(gpa, chunk)
            out += chunk
        if length and not out:
            raise TargetError(f"cannot read guest memory at {linear:#x}")
        return bytes(out)

    def write_memory(self, i: int, linear: int, data: bytes) -> None:
        """All of `data` or nothing: every page must be mapped to RAM, and not the BIOS
        area (which a PC has as ROM; the ACPI tables live there)."""
        paging = self._vcpu_paging(i)
        pieces = []
        off = 0
        for lin, n in pages(linear, len(data)):
            gpa = self._gpa(paging, lin)
            if gpa is None or not self.vm.mem.contains(gpa, n):
                raise TargetError(f"no guest RAM at {lin:#x}")
            if gpa < platform.ACPI_TABLES_END and gpa + n > platform.ACPI_TABLES_START:
                raise TargetError(f"{lin:#x} is in the BIOS area (read-only)")
            pieces.append((gpa, data[off : off + n]))
            off += n
        for gpa, chunk in pieces:
            buf = bytearray(chunk)
            for bp in self.sw.covering(gpa, len(buf)):  # the int3 stays; it will restore this
                bp.original = buf[bp.gpa - gpa]
                buf[bp.gpa - gpa] = INT3
            self.vm.mem.write(gpa, bytes(buf))

    # -- breakpoints -------------------------------------------------------------------
    def insert(self, i: int, kind: Kind, addr: int, length: int) -> None:
        if kind is Kind.SOFTWARE:
            gpa = self._gpa(self._vcpu_paging(i), addr)
            if gpa is None or not self.vm.mem.contains(gpa, 1):
                raise TargetError(f"no guest RAM at {addr:#x} for a breakpoint")
            self.sw.insert(addr, gpa)
            self._removed.discard(gpa)
            return
        if kind is Kind.WRITE_WATCH and self.emulating:
            self._insert_emulated_watch(i, addr, length)
            return
        if kind in (Kind.READ_WATCH, Kind.ACCESS_WATCH) and self.emulating:
            raise TargetError("this KVM emulates guest code and does not check data breakpoints: "
                              "only write watchpoints (by single-stepping) are possible")
        try:
            self.dr.insert(HardwareBreakpoint(kind, addr, length))
        except BreakpointError as e:
            raise TargetError(str(e)) from None

    def remove(self, kind: Kind, addr: int, length: int) -> None:
        if kind is Kind.SOFTWARE:
            bp = self.sw.by_linear.get(addr)
            if bp is not None:
                self._removed.add(bp.gpa)
            self.sw.remove(addr)
        elif kind is Kind.WRITE_WATCH and self.emulating:
            self.watches = [w for w in self.watches if (w.linear, w.length) != (addr, length)]
        else:
            self.dr.remove(HardwareBreakpoint(kind, addr, length))

    def _insert_emulated_watch(self, i: int, addr: int, length: int) -> None:
        if not 1 <= length <= 8:
            raise TargetError(f"a watchpoint covers 1 to 8 bytes, not {length}")
        gpa = self._gpa(self._vcpu_paging(i), addr)
        if gpa is None or not self.vm.mem.contains(gpa, length):
            raise TargetError(f"no guest RAM at {addr:#x} to watch")
        if not self._warned_watch:
            self._warned_watch = True
            log.info("gdb: this KVM emulates guest code and does not check data breakpoints (measured): "
                     "write watchpoints are served by single-stepping the vCPUs, one exit per instruction")
        if all((w.linear, w.length) != (addr, length) for w in self.watches):
            self.watches.append(EmulatedWatch(addr, length, gpa, self.vm.mem.read(gpa, length)))

    def _refresh_watches(self) -> None:
        for w in self.watches:
            w.last = self.vm.mem.read(w.gpa, w.length)

    def _check_watches(self) -> EmulatedWatch | None:
        for w in self.watches:
            now = self.vm.mem.read(w.gpa, w.length)
            if now != w.last:
                w.last = now
                return w
        return None

    # -- threads -----------------------------------------------------------------------
    def describe(self, i: int) -> str:
        state = {lib.AVMM_VCPU_PAUSED: "stopped", lib.AVMM_VCPU_DONE: "ended"}.get(self.vcpus.state(i), "running")
        return f"vCPU {i} ({state})"
