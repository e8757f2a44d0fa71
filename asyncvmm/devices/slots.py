"""bhyve's `-s SLOT[:FUNC],DRIVER[,CONF]`: the slots' checks, and what a driver gets to build.

The drivers themselves register beside their devices (devices/registry.py). Each has two
steps: `check` parses its CONF when the configuration is validated (bad options are
refused before anything starts), `build` makes the PCI function when the machine is built
(that is when images are opened and locked, sockets bound).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import PciSlot, VmConfig
from ..errors import ConfigError
from ..poll import device_threads_may_poll, devices_may_poll
from .registry import lookup, names, register, slot_name

if TYPE_CHECKING:
    from ..console import Console
    from .virtio.net.passt import Passt
    from .virtio.net.tap import Tap

STOP_WAIT = 2.0  # seconds a back-end's daemon gets to exit after SIGTERM, when stop() did not run

__all__ = ["BuildContext", "HostResources", "describe", "driver_names", "lookup", "may_poll", "slot_name"]


class HostResources:
    """Host-side things a device keeps across guest resets (a reset builds a new machine,
    but a TAP that the user bridged or moved must not be recreated): owned by the VM,
    closed when it ends."""

    def __init__(self):
        self.taps: dict[tuple[int, int], Tap | Passt] = {}
        self.consoles: dict[str, Console] = {}  # COM2..COM4's backends, by port
        self.backends: dict[tuple[int, int], Any] = {}  # disks' vhost-user back-ends (vhost_user/attach.py)
        self.disks: dict[tuple[int, int], Any] = {}  # disks' BlockOptions, format decided once (attach.py)

    async def prepare(self, cfg: VmConfig) -> None:
        """What must run before the machine is built: passt for each virtio-net on it, the
        disks' vhost-user back-ends connected (their qemu-storage-daemons started)."""
        drivers = {s.driver for s in cfg.slots}
        if "virtio-net" in drivers:  # (the modules are imported only for VMs that have the devices)
            self.start_processes(cfg)
        if "virtio-blk" in drivers:
            from .virtio.vhost_user import attach  # noqa: PLC0415

            await attach.prepare(self, cfg)

    async def stop(self) -> None:
        """prepare()'s back-ends closed, their daemons stopped (before close())."""
        if self.backends:
            from .virtio.vhost_user import attach  # noqa: PLC0415

            await attach.stop(self)

    def console(self, name: str, spec: str):
        """The backend of COM port `name` (-l NAME,SPEC), opened on first use."""
        if name not in self.consoles:
            from ..console import open_console  # noqa: PLC0415

            self.consoles[name] = open_console(spec)
        return self.consoles[name]

    def start_processes(self, config: VmConfig) -> None:
        """Start the helper processes the slots need (passt) now, not when the machine is
        built: `asyncvmm run`'s seccomp filter, installed in between, refuses fork and exec."""
        from .virtio.net.passt import Passt  # noqa: PLC0415
        from .virtio.net.tap import NetOptions  # noqa: PLC0415

        for slot in config.slots:
            key = (slot.slot, slot.function)
            if slot.driver == "virtio-net" and key not in self.taps:
                opts = NetOptions.parse(slot.options, slot_name(slot))
                if opts.passt is not None:
                    self.taps[key] = Passt(opts.passt, f"virtio-net@{slot.slot}.{slot.function}")

    def close(self) -> None:
        for backend in self.backends.values():  # stop() did not run: the connections at least
            backend.close()
            if backend.process is not None and backend.process.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    backend.process.proc.terminate()
                _reap(backend.process.proc.pid, STOP_WAIT)
        self.backends.clear()
        for tap in self.taps.values():
            tap.close()
        self.taps.clear()
        for console in self.consoles.values():
            console.close()
        self.consoles.clear()


def _reap(pid: int, timeout: float) -> None:
    """A child just sent SIGTERM: waited for (at most `timeout`, then SIGKILL) and reaped,
    so no zombie is left when the loop that would have reaped it is gone."""
    deadline = time.monotonic() + timeout
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.005)
    except (ChildProcessError, ProcessLookupError):
        pass  # asyncio's child watcher reaped it first


@dataclass
class BuildContext:
    """What a driver gets from the machine to build its device."""

    config: VmConfig
    mem: object  # GuestMemory
    router: object  # IrqRouter
    notify: object  # NotifyBinder
    host: HostResources | None = None


def may_poll(ctx: "BuildContext") -> bool:
    """Whether a device's data path busy-polls (asyncvmm.poll)."""
    return ctx.config.poll and devices_may_poll(ctx.config.cpus)


def thread_may_poll(ctx: "BuildContext") -> bool:
    """Whether a device's own thread busy-polls (asyncvmm.poll.device_threads_may_poll)."""
    return ctx.config.poll and device_threads_may_poll(ctx.config.cpus)


def _hostbridge_check(slot: PciSlot, cfg: VmConfig) -> None:
    if (slot.slot, slot.function) != (0, 0) or slot.options:
        raise ConfigError(f"-s {slot_name(slot)}hostbridge: the host bridge is always 0:0 and takes no options")


register("hostbridge", _hostbridge_check, None)  # bhyve's `-s 0,hostbridge`: ours is always there


def driver_names() -> list[str]:
    """The -s drivers there are (for help and errors), in order."""
    return names()


def describe(slot: PciSlot, cfg: VmConfig, host: HostResources | None) -> str | None:
    """One phrase for the log on what the slot attached (the image, the TAP); None for
    what attaches nothing of the host's."""
    where = f"{slot.slot}:{slot.function}"
    if slot.driver == "virtio-blk":
        from .virtio.block.image import BlockOptions  # noqa: PLC0415

        disk = BlockOptions.parse(slot.options, slot_name(slot))
        backend = host.backends.get((slot.slot, slot.function)) if host is not None else None
        if disk.vhost_user:
            return f"{where} virtio-blk vhost-user back-end {disk.vhost_user}"
        if backend is not None:
            return f"{where} virtio-blk {disk.path} (through qemu-storage-daemon{', read-only' if disk.readonly else ''})"
        how = [w for w, on in (("read-only", disk.readonly), ("O_DIRECT", disk.direct),
                               (f"engine {disk.engine}", disk.engine != "uring")) if on]
        return f"{where} virtio-blk {disk.path}" + (f" ({', '.join(how)})" if how else "")
    if slot.driver == "virtio-blk-backend":
        name = slot.options.split(",")[0]
        return f"{where} virtio-blk on the block backend {name!r} ({type(cfg.block_backends.get(name)).__name__})"
    if slot.driver == "virtio-net":
        from .virtio.net.tap import NetOptions, format_mac, stable_mac  # noqa: PLC0415

        net = NetOptions.parse(slot.options, slot_name(slot))
        tap = host.taps.get((slot.slot, slot.function)) if host is not None else None
        made = "" if tap is None else " (created)" if getattr(tap, "created", False) else " (existing)"
        mac = format_mac(net.mac or stable_mac(cfg.name, f"{slot.slot}.{slot.function}"))
        if net.passt is not None:
            from .virtio.net.passt import passt_user  # noqa: PLC0415

            pid = f"pid {tap.pid}, " if tap is not None and hasattr(tap, "pid") else ""
            fwd = "".join(f", {p} {h}->{g}" for p, h, g in net.passt.forwards)
            return f"{where} virtio-net passt ({pid}as {passt_user()}{fwd}), MAC {mac}"
        return f"{where} virtio-net TAP {net.tap}{made}, MAC {mac}"
    return None
