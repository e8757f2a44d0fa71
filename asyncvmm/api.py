"""The VM, embedded in an asyncio program — the same machine `asyncvmm run` boots.

    async with asyncvmm.VM(VmConfig(kernel="guest.elf", memory=64 << 20)) as vm:
        await vm.console.expect(rb"# ")
        vm.console.writer.write(b"echo hi\\n")
        ...
        stop = await vm.shutdown(timeout=10)

Call order (a state machine):

    VM(config)  --start()/__aenter__-->  running  <--pause()/resume()-->  paused
    running|paused  --the guest or shutdown()/kill()-->  stopped  --close()/__aexit__-->  closed

It runs on the caller's loop (uvloop or asyncio's), never starts a loop of its own and
never blocks it for long: files are read in worker threads; what the loop's thread does per
guest exit is a few microseconds. Leaving `async with` — normally, on an exception or on
cancellation — stops the vCPU threads and releases every fd and the control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import time
from typing import TYPE_CHECKING

from .config import VmConfig
from .console import CONTROL_SEQUENCE, Console
from .control.server import ControlServer, claim_socket
from .devices.slots import HostResources
from .errors import ConfigError, VmmError
from .log import get_logger
from .machine import BootImages, Machine, Stop, StopReason, read_images

if TYPE_CHECKING:
    from .gdb.server import GdbServer
    from .profile import BootProfile

log = get_logger(__name__)


class ConsoleStream(Console):
    """COM1 as an asyncio stream pair: `reader` (guest output), `writer` (guest input).

    `writer` is a real asyncio.StreamWriter: write() queues bytes for the UART, and
    drain() waits while more than HIGH_WATER bytes are still waiting for the guest to read
    them. `expect()` waits for a pattern in the output.
    """

    HIGH_WATER = 64 * 1024
    LOW_WATER = 16 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        super().__init__()
        loop = loop or asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        self._protocol = _WriterProtocol(loop)
        self._transport = _UartTransport(self, self._protocol)
        self.writer = asyncio.StreamWriter(self._transport, self._protocol, None, loop)
        self._writer_paused = False
        self._buffer = bytearray()  # output read by expect() and not yet returned
        self.transcript = bytearray()  # what the guest wrote lately, for diagnostics

    # -- the machine's side --
    TRANSCRIPT = 1 << 20  # the transcript keeps the last MiB of output

    def write(self, data: bytes) -> None:
        """The guest's output (called by the machine): to `reader` and the transcript."""
        self.transcript += data
        if len(self.transcript) > 2 * self.TRANSCRIPT:
            del self.transcript[: -self.TRANSCRIPT]
        self.reader.feed_data(data)

    def resume_input(self) -> None:
        """The UART has room again (called by the machine): pass on held input."""
        super().resume_input()
        if self._writer_paused and len(self._held) <= self.LOW_WATER:
            self._writer_paused = False
            self._protocol.resume_writing()

    def attach(self, loop, feed, on_break=None, on_quit=None) -> None:
        """A boot's machine takes the input (called by the machine)."""
        super().attach(loop, feed, on_break, on_quit)
        if self._held:
            self.resume_input()

    def detach(self) -> None:
        """Between boots (a guest reset) input written meanwhile waits for the next one."""
        held = bytes(self._held)
        super().detach()
        self._held += held

    def _queue_input(self, data: bytes) -> None:
        if self._feed is None:  # between boots: keep it for the next one
            self._held += data
        else:
            self._push(data)
        if not self._writer_paused and len(self._held) > self.HIGH_WATER:
            self._writer_paused = True
            self._protocol.pause_writing()

    def send_break(self) -> None:
        """A break on the serial line (a Linux guest then takes the next key as SysRq)."""
        if self._on_break is not None:
            self._on_break()

    def close(self) -> None:
        """End of the VM: `reader` reaches EOF, a writer waiting in drain() is released."""
        super().close()
        self._held.clear()
        if not self.reader.at_eof():
            self.reader.feed_eof()
        self._transport.close()
        self._protocol.connection_lost(None)  # a writer waiting in drain() is released

    # -- the user's side --
    async def expect(self, pattern: bytes | str | re.Pattern, timeout: float = 10.0, *, text: bool = False) -> re.Match:
        """Wait until the output matches `pattern`; returns the match on the output read
        so far. Output up to the match's end is consumed; the rest stays for next time.

        text=True: terminal control sequences are taken out of the output first (and are
        gone for later calls too) — for a firmware's or a bootloader's screen output, which
        may move the cursor in the middle of a word."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if text:
                self._buffer[:] = CONTROL_SEQUENCE.sub(b"", self._buffer)
            m = rx.search(self._buffer)
            if m:
                matched = rx.search(bytes(self._buffer))  # a match on a stable copy
                del self._buffer[: matched.end()]
                return matched
            left = deadline - time.monotonic()
            if left <= 0:
                tail = bytes(self._buffer[-200:])
                raise TimeoutError(f"console: {rx.pattern!r} not seen within {timeout} s (last output: {tail!r})")
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancellation that
            # arrives as the read completes (the caller's task would then run on).
            try:
                async with asyncio.timeout(left):
                    chunk = await self.reader.read(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError(f"console: the VM ended before {rx.pattern!r} was seen")
            self._buffer += chunk


class _WriterProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for ConsoleStream.writer (drain waits while the UART is behind)."""


class _UartTransport(asyncio.WriteTransport):
    def __init__(self, console: ConsoleStream, protocol: _WriterProtocol):
        super().__init__()
        self._console = console
        self._protocol = protocol
        self._closing = False

    def write(self, data) -> None:
        if self._closing:
            raise RuntimeError("the console writer is closed")
        self._console._queue_input(bytes(data))

    def get_write_buffer_size(self) -> int:
        return len(self._console._held)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True


class VM:
    """One virtual machine on the running loop (the module docstring has the call order).

    VM(config, *, console=None, control_socket=True)

    config: a VmConfig; checked here, so a bad one raises ConfigError before anything
        starts (its messages name the field: `memory=1`).
    console: where COM1 goes; by default `vm.console`, a ConsoleStream (`reader`,
        `writer`, `expect()`).
    control_socket: serve `asyncvmm ctl NAME` on the VM's control socket.

    The VMM's messages go to the logging module's "asyncvmm" loggers (asyncvmm.machine,
    asyncvmm.quirks, ...): logging.basicConfig(level=logging.INFO) shows them.
    """

    def __init__(self, config: VmConfig, *, console: Console | None = None, control_socket: bool = True):
        """See the class docstring."""
        self.config = config.validate(com1_open=console is not None)
        self._console_given = console
        self.console: ConsoleStream | Console | None = console
        self._control_wanted = control_socket
        self.control: ControlServer | None = None
        self.gdb: GdbServer | None = None  # with -g/-G
        self.host = HostResources()  # host-side device resources kept across guest resets
        self.machine: Machine | None = None
        self.boots = 0
        self._task: asyncio.Task | None = None
        self._stopped: asyncio.Future | None = None
        self._started_at = 0.0
        self._state = "created"
        self._host_stop: Stop | None = None  # what request_stop asked for
        self._snapshot = None  # from_snapshot(): the first boot is this snapshot's machine
        self._incoming = None  # snapshot.migrate.Incoming: the first boot is a migrating VM's
        # --profile-boot: where the first boot's wall time goes (report() when it ended)
        self.profile: BootProfile | None = None
        if config.profile_boot:
            from .profile import BootProfile  # noqa: PLC0415 (only with --profile-boot)

            self.profile = BootProfile(show_rips=bool(config.profile_rip_ms))
            if config.profile_rip_ms:
                self.profile.sample_period_ns = int(config.profile_rip_ms * 1e6)

    # -- life cycle ------------------------------------------------------------------
    async def __aenter__(self) -> "VM":
        """`async with VM(cfg) as vm`: start() it."""
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        """Leaving `async with` (also by an exception or a cancellation): close() it."""
        await self.close()

    async def start(self) -> None:
        """Claim the name, read the images, boot. Raises ConfigError/BootError/KvmError."""
        if self._state != "created":
            raise VmmError(f"VM {self.config.name} was already started")
        self._state = "starting"
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        if self.profile is not None:
            self.profile.created = time.monotonic()
        try:
            if self._control_wanted:
                sock, path = claim_socket(self.config.name)
                self.control = ControlServer(self, sock, path)
            if self.config.gdb is not None:
                from .gdb.server import GdbServer  # noqa: PLC0415

                self.gdb = GdbServer(self.config.gdb)
                self.gdb.vm_kill = lambda: self.request_stop(Stop(StopReason.HOST, "killed by gdb"))
                await self.gdb.start()
            # A VM made from a snapshot reads no kernel: its RAM is the snapshot's (a
            # reset reads the images then).
            restoring = self._snapshot is not None or self._incoming is not None
            images = await read_images(self.config) if not restoring else None
            await self.host.prepare(self.config)  # the disks' vhost-user back-ends, connected
            if self.console is None:
                self.console = ConsoleStream(loop)
            if self.profile is not None:
                self.profile.images = time.monotonic()
                self.profile.unpack_note = images.prepared.note
                if self.profile.show_rips:
                    from .boot.symbols import find_symbols  # noqa: PLC0415

                    cfg = self.config
                    self.profile.symbols = await asyncio.to_thread(find_symbols, cfg.kernel, images.kernel, cfg.symbols)
            self.machine = self._build(images)  # the first boot's errors reach the caller
            if self.profile is not None:
                self.profile.watch(self.machine)
            if self.control is not None:
                await self.control.start()
                log.info(f"VM {self.config.name}: control socket {self.control.path}")
        except BaseException:
            await self.close()
            raise
        if self._incoming is not None:  # RAM and state from the source, then run and say so
            try:
                await self._incoming.receive(self.machine)
            except BaseException:
                await self.close()
                raise
        self._started_at = time.monotonic()
        self._state = "running"
        self._task = loop.create_task(self._run(images), name=f"asyncvmm {self.config.name}")
        if self._incoming is not None:
            incoming, self._incoming = self._incoming, None
            await asyncio.sleep(0)  # the task has started the vCPUs
            await incoming.running()

    def _build(self, images: BootImages | None) -> Machine:
        m = Machine(self.config, self.console, images, self.host)
        m.restore, self._snapshot = self._snapshot, None
        m.incoming = self._incoming is not None
        m.announce = self.boots == 0  # a reset is one line ("...: restarting the guest"), not the whole story again
        m.build()
        self.boots += 1
        if self.gdb is not None:
            self.gdb.attach(m)
        return m

    async def _run(self, images: BootImages | None) -> None:
        stop = Stop(StopReason.ERROR, "the VM never ran")
        try:
            while True:
                stop = await self.machine.run()
                if self.profile is not None:
                    self.profile.finish(self.machine, stop)
                self.machine.close()
                restart = stop.reason in (StopReason.RESET, StopReason.TRIPLE_FAULT)  # as a PC's reset line does
                if restart and not self.config.no_reboot and self._host_stop is not None:
                    # The host's stop came while the guest was resetting: the VM would have
                    # gone on, so it ended because the host asked, and says so.
                    stop = self._host_stop
                    break
                if restart and not self.config.no_reboot:
                    log.info(f"{stop.message}: restarting the guest (boot {self.boots + 1})")
                    if images is None:  # it was made from a snapshot: boot the kernel now
                        images = await read_images(self.config)
                    self.machine = self._build(images)
                    self._state = "running"
                    continue
                break
        except VmmError as e:
            stop = Stop(StopReason.ERROR, str(e))
        finally:
            if self.machine is not None:
                self.machine.close()
            if self.profile is not None:
                self.profile.release()  # what it holds of a boot that ended on an error
            self._state = "stopped"
            if self.gdb is not None:
                self.gdb.vm_ended(0 if stop.reason is StopReason.POWEROFF else 1)
            if not self._stopped.done():
                self._stopped.set_result(stop)

    async def wait(self) -> Stop:
        """Why the VM ended (waits for it)."""
        if self._stopped is None:
            raise VmmError("the VM was not started")
        return await asyncio.shield(self._stopped)

    def request_stop(self, stop: Stop) -> None:
        """Stop the vCPUs without waiting; wait() then returns `stop`. For a signal
        handler or a callback, which cannot await (kill() is the awaitable form)."""
        if self.machine is not None and self._state in ("running", "paused"):
            self._state = "stopping"
            self._host_stop = stop
            self.machine.request_stop(stop)  # paused vCPUs are told to quit too

    async def kill(self) -> Stop:
        """Stop the VM at once (no word to the guest)."""
        self.request_stop(Stop(StopReason.HOST, "killed from the host"))
        return await self.wait()

    def power_button(self) -> bool:
        """Press the guest's ACPI power button. True if the guest listens for it (it has
        enabled the power button event), so it may now power off by itself; False if it
        cannot hear it (no ACPI, not listening yet, or the VM is not running)."""
        if self.machine is None or self._state not in ("running", "paused"):
            return False
        return self.machine.press_power_button()

    async def shutdown(self, timeout: float = 30.0) -> Stop:
        """Ask the guest to power off, wait up to `timeout`, then stop it hard."""
        await self.destroy(timeout, why="stopped hard by shutdown()")
        return await self.wait()

    async def destroy(self, timeout: float = 30.0, *, force: bool = False, why: str = "destroyed from the host") -> str:
        """End the VM; returns how: 'acpi' (the guest powered off through ACPI S5 after
        its power button was pressed) or 'hard' (stopped from outside).

        Unless `force`, the power button is pressed and the guest has `timeout` seconds
        to power off. A guest that does not listen for the button (no ACPI, still booting,
        or an OS without ACPI) cannot hear it, so it is stopped at once instead of after
        a wait that could not end otherwise.
        """
        if self._state in ("stopped", "closed"):
            return "hard"
        if force or timeout <= 0:
            self.request_stop(Stop(StopReason.HOST, f"{why} (forced)"))
        elif not self.power_button():
            self.request_stop(Stop(StopReason.HOST, f"{why} (the guest does not listen for the ACPI power button)"))
        else:
            log.info(f"VM {self.config.name}: pressed the ACPI power button; the guest has {timeout:g} s to power off")
            try:
                async with asyncio.timeout(timeout):
                    stop = await self.wait()
                return "acpi" if stop.reason is StopReason.POWEROFF else "hard"
            except TimeoutError:
                self.request_stop(Stop(StopReason.HOST, f"{why} (the guest did not power off within {timeout:g} s)"))
        await self.wait()
        return "hard"

    async def close(self) -> None:
        """Stop the VM if it runs and release everything (idempotent)."""
        if self._state == "closed":
            return
        if self._task is not None and not self._task.done():
            self.request_stop(Stop(StopReason.HOST, "closed by its owner"))
            try:
                await asyncio.shield(self._task)
            except asyncio.CancelledError:
                await self._task  # our caller was cancelled: finish the teardown anyway
                raise
            finally:
                await self._close_rest()
            return
        await self._close_rest()

    async def _close_rest(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        if self.machine is not None:
            self.machine.close()
        await self.host.stop()  # the disks' vhost-user back-ends (qemu-storage-daemon): after their devices
        self.host.close()  # the TAPs: after the devices that use them
        if self.gdb is not None:
            await self.gdb.close()
        if self.control is not None:
            await self.control.close()
        if self.console is not None and self._console_given is None:
            self.console.close()

    # -- control (what `asyncvmm ctl` asks through the control socket, one implementation) --
    @property
    def state(self) -> "VmState":
        """Where the VM is: created, starting, running, paused, stopping, stopped or closed
        (a VmState, which is a str)."""
        if self._state == "running" and self.machine is not None and self.machine.paused:
            return VmState.PAUSED
        return VmState(self._state)

    def _live(self, what: str) -> Machine:
        if self.state not in (VmState.RUNNING, VmState.PAUSED) or self.machine is None:
            raise VmmError(f"VM {self.config.name} is {self.state}: {what}")
        return self.machine

    def _vcpu(self, vcpu) -> int:
        if isinstance(vcpu, bool) or not isinstance(vcpu, int):
            raise ConfigError(f"vCPU {vcpu!r}: a vCPU's number")
        if not 0 <= vcpu < self.config.cpus:
            have = "vCPU 0" if self.config.cpus == 1 else f"vCPUs 0 to {self.config.cpus - 1}"
            raise ConfigError(f"the VM has no vCPU {vcpu} (it has {have})")
        return vcpu

    @property
    def _vcpu_lock(self) -> asyncio.Lock:
        """One pause/resume or register access at a time: a resume must not land in the
        middle of another request's write."""
        lock = self.__dict__.get("_vcpu_lock_")
        if lock is None:
            lock = self.__dict__["_vcpu_lock_"] = asyncio.Lock()
        return lock

    async def pause(self) -> None:
        """Stop every vCPU from running guest code (returns once none does)."""
        async with self._vcpu_lock:
            self._live("it cannot be paused").pause()

    async def resume(self) -> None:
        """Let the vCPUs run guest code again."""
        async with self._vcpu_lock:
            self._live("it cannot be resumed").resume()

    # -- snapshots (asyncvmm/snapshot, docs/SNAPSHOT.md) ------------------------------------
    async def snapshot(self, path: str, *, stop: bool = False, diff: bool = False) -> dict:
        """Write the VM's whole state to `path` (bhyvectl --suspend). The VM is left paused
        (resume() goes on), or stopped with `stop`. `diff`: only the pages written since
        its last snapshot (which a restore then needs beside it). Returns sizes and times."""
        from .snapshot.take import snapshot  # noqa: PLC0415

        return await snapshot(self, path, stop=stop, diff=diff)

    async def migrate(self, address: str) -> dict:
        """Send the running VM to `asyncvmm run --incoming ADDRESS` (unix:PATH or
        tcp:HOST:PORT): pre-copy rounds while it runs, then stop-and-copy; once it runs
        there this VM stops. Returns rounds, pages and the downtime. MigrationError if it
        fails: this VM goes on running."""
        from .snapshot.migrate import migrate  # noqa: PLC0415

        return await migrate(self, address)

    @classmethod
    def from_snapshot(cls, path: str, *, name: str | None = None, console: Console | None = None,
                      control_socket: bool = True, slots: list | None = None) -> "VM":
        """A VM that goes on from the snapshot at `path` (bhyve -r): the machine is built
        from the configuration the snapshot keeps (disks re-opened by path and checked,
        consoles and TAPs opened anew) and starts where it was. `slots`: the devices the
        caller expects (refused if the snapshot's differ). ConfigError (one line) if the
        file or a disk does not fit; nothing is started. Reads only the file's header and
        state part."""
        from .snapshot.take import load  # noqa: PLC0415

        cfg, snap = load(path, name=name, slots=slots)
        vm = cls(cfg, console=console, control_socket=control_socket)
        vm._snapshot = snap
        return vm

    async def sysrq(self, key: str) -> None:
        """The kernel's serial SysRq on COM1: a break, then `key` (e.g. "h" for help)."""
        self._live("no console to send a SysRq to").send_sysrq(key)

    @contextlib.asynccontextmanager
    async def _vcpus_stopped(self, what: str):
        """The vCPUs out of KVM_RUN with their registers whole, for a read or a write; as
        bhyvectl does, a running VM is paused for it and resumed after. A vCPU waiting on
        the loop for an exit is served first (the loop runs while this waits), so that what
        KVM_RUN still owes it (an IN's value in RAX, RIP past the instruction) is done
        before anything is read or written; a write then takes effect at its next entry."""
        async with self._vcpu_lock:
            m = self._live(what)
            was_paused = m.paused
            m.pause()
            try:
                deadline = time.monotonic() + PARK_TIMEOUT
                while waiting := m.vcpus_in_exit():
                    if time.monotonic() > deadline:
                        raise VmmError(f"vCPU {waiting[0]} did not stop within {PARK_TIMEOUT:g} s")
                    await asyncio.sleep(0.001)
                if self.machine is not m or m.stopping:  # the guest reset or stopped meanwhile
                    raise VmmError(f"VM {self.config.name} reset or stopped meanwhile: try again")
                yield m
            finally:
                if not was_paused and self.machine is m and not m.stopping:
                    m.resume()

    async def regs(self, vcpu: int = 0) -> dict:
        """vCPU `vcpu`'s registers, flat: {"rip": ..., "cr0": ..., "cs": {"selector", "base",
        "limit", "type", ...}, "gdt": {"base", "limit"}, ..., "vcpu": N, "state": the VM's
        state ("running" if it ran: it is paused only for the read)}."""
        vcpu = self._vcpu(vcpu)
        state = self.state
        async with self._vcpus_stopped("no registers to read") as m:
            answer = m.read_registers(vcpu)
        return {"vcpu": vcpu, "state": str(state), **answer["registers"]}

    async def set_registers(self, changes: dict | None = None, /, *, vcpu: int = 0, **regs) -> dict:
        """Write registers of vCPU `vcpu`: `set_registers(rip=0x100000, rax=1)`, or a dict
        `{"cs": {"selector": 8, "base": 0, "limit": 0xffffffff, "access": 0xc09b}}` (access
        rights in VMX's layout, as bhyvectl's --desc-access). Checked as a whole first (a
        non-canonical RIP, reserved bits in CR0/CR4/EFER/RFLAGS, long mode without PAE...):
        ConfigError and nothing written. The VM is paused for the write if it runs; the
        values take effect when the vCPU next runs. Returns the registers after."""
        from .vstate import registers  # noqa: PLC0415

        vcpu = self._vcpu(vcpu)
        wanted = registers.normalize({**(changes or {}), **regs})
        state = self.state
        async with self._vcpus_stopped("no registers to write") as m:
            m.write_registers(vcpu, wanted)
            answer = m.read_registers(vcpu)
        log.info(f"VM {self.config.name}: vCPU {vcpu}: set {', '.join(wanted)} from the host")
        return {"vcpu": vcpu, "state": str(state), **answer["registers"]}

    async def nmi(self, vcpu: int = 0) -> None:
        """Deliver an NMI to vCPU `vcpu` (KVM_NMI), as bhyvectl's --inject-nmi."""
        vcpu = self._vcpu(vcpu)
        async with self._vcpus_stopped("no vCPU to deliver an NMI to") as m:
            m.inject_nmi(vcpu)

    async def events(self, vcpu: int = 0) -> dict:
        """The exception, interrupt and NMI pending or being delivered on vCPU `vcpu`
        (KVM_GET_VCPU_EVENTS; bhyvectl's --get-intinfo)."""
        vcpu = self._vcpu(vcpu)
        async with self._vcpus_stopped("no vCPU events to read") as m:
            return {"vcpu": vcpu, **m.vcpu_events(vcpu)}

    async def read_msrs(self, indices, vcpu: int = 0) -> dict[int, int]:
        """MSRs of vCPU `vcpu` by index; ConfigError naming the first one KVM does not give."""
        vcpu = self._vcpu(vcpu)
        wanted = [int(i) for i in indices]
        for index in wanted:
            if not 0 <= index <= 0xFFFF_FFFF:
                raise ConfigError(f"MSR {index:#x}: an MSR's index is 32 bits")
        async with self._vcpus_stopped("no MSRs to read") as m:
            got = m.read_msrs(vcpu, wanted)
        missing = [i for i in wanted if i not in got]
        if missing:
            raise ConfigError(f"MSR {missing[0]:#x}: KVM does not give it for vCPU {vcpu}")
        return got

    async def write_msr(self, index: int, value: int, vcpu: int = 0) -> None:
        """Write an MSR of vCPU `vcpu`; ConfigError if KVM refuses the MSR or the value."""
        vcpu = self._vcpu(vcpu)
        if not 0 <= index <= 0xFFFF_FFFF or not 0 <= value < 1 << 64:
            raise ConfigError(f"MSR {index:#x}={value:#x}: a 32-bit index and a 64-bit value")
        async with self._vcpus_stopped("no MSRs to write") as m:
            if not m.write_msr(vcpu, index, value):
                raise ConfigError(f"MSR {index:#x}: KVM refuses {value:#x} for vCPU {vcpu}")
        log.info(f"VM {self.config.name}: vCPU {vcpu}: MSR {index:#x} set to {value:#x} from the host")

    def rtc_time(self) -> int:
        """The guest's RTC as a Unix time (seconds, UTC)."""
        return self._live("no RTC to read").rtc.now()

    def set_rtc_time(self, seconds: int) -> None:
        """Set the guest's RTC to a Unix time (seconds, UTC), as bhyvectl's --set-rtc-time."""
        self._live("no RTC to set").rtc.set_now(seconds)
        log.info(f"VM {self.config.name}: RTC set to {seconds} from the host")

    def rtc_nvram(self, offset: int) -> int:
        """One byte of the RTC's CMOS (0-127)."""
        return self._live("no RTC to read").rtc.nvram_read(offset)

    def set_rtc_nvram(self, offset: int, value: int) -> None:
        """Write one byte of the RTC's CMOS: not the clock or its status registers."""
        self._live("no RTC to write").rtc.nvram_write(offset, value)

    def topology(self) -> dict:
        """The vCPUs as sockets x cores x threads (bhyvectl's --get-cpu-topology)."""
        t = self.config.cpu_topology
        return {"sockets": t.sockets, "cores": t.cores, "threads": t.threads, "maxcpus": self.config.cpus}

    def reset(self) -> None:
        """Reset the guest as its reset line would (bhyvectl's --force-reset): the VM
        boots again, unless it runs with no_reboot (then it ends, as for a guest reset)."""
        self._live("it cannot be reset").request_stop(Stop(StopReason.RESET, "reset from the host"))

    def power_off(self) -> None:
        """End the VM as if the guest had powered off, without asking it (bhyvectl's
        --force-poweroff)."""
        self._live("it cannot be powered off")
        self.request_stop(Stop(StopReason.POWEROFF, "powered off from the host (forced)"))

    def state_info(self) -> dict:
        """What `asyncvmm ctl state` shows: name, state, pid, vCPUs, memory, kernel, CPU
        template, whether KVM emulates, boots so far, uptime."""
        cfg = self.config
        m = self.machine
        return {
            "name": cfg.name,
            "state": str(self.state),
            "pid": os.getpid(),
            "vcpus": cfg.cpus,
            "memory": cfg.memory,
            "kernel": cfg.kernel,
            "cpu_template": m.cpu_template.value if m else None,
            "emulating_kvm": m.quirks.enabled if m else None,
            "boots": self.boots,
            "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0,
            "devices": self.devices(),
        }

    def devices(self) -> list[dict]:
        """The PCI slots: where, which driver, and what of the host it uses (disk, TAP)."""
        out = []
        for s in self.config.slots:
            out.append({"slot": f"{s.bus}:{s.slot}:{s.function}", "driver": s.driver, "options": s.options})
        return out

    def stats(self) -> dict:
        """Counters of the current boot: vCPU exits and times, port ranges, the console."""
        m = self.machine
        if m is None:
            return {}
        return m.stats()


class VmState(enum.StrEnum):
    """A VM's life (see the module docstring); each compares equal to its name as a str."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CLOSED = "closed"


PARK_TIMEOUT = 2.0  # seconds the vCPUs have to leave an exit and park for a register access
