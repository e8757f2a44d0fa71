"""bhyve's `-s SLOT[:FUNC],DRIVER[,CONF]`: the slots' checks, and what a driver gets to build.

The drivers themselves register beside their devices (devices/registry.py). Each has two
steps: `check` parses its CONF when the configuration is validated (bad options are
refused before anything starts), `build` makes the PCI function when the machine is built
(that is when images are opened and locked, sockets bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PciSlot, VmConfig
from ..errors import ConfigError
from ..poll import devices_may_poll
from .registry import DRIVERS, lookup, register, slot_name

__all__ = ["DRIVERS", "BuildContext", "HostResources", "lookup", "slot_name", "may_poll"]


class HostResources:
    """Host-side things a device keeps across guest resets (a reset builds a new machine,
    but a TAP that the user bridged or moved must not be recreated): owned by the VM,
    closed when it ends."""

    def __init__(self):
        self.taps: dict[tuple[int, int], object] = {}
        self.consoles: dict[str, object] = {}  # COM2..COM4's backends (console.Console), by port

    def console(self, name: str, spec: str):
        """The backend of COM port `name` (-l NAME,SPEC), opened on first use."""
        if name not in self.consoles:
            from ..console import open_console  # noqa: PLC0415

            self.consoles[name] = open_console(spec)
        return self.consoles[name]

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()
        self.taps.clear()
        for console in self.consoles.values():
            console.close()
        self.consoles.clear()


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


def _hostbridge_check(slot: PciSlot, cfg: VmConfig) -> None:
    if (slot.slot, slot.function) != (0, 0) or slot.options:
        raise ConfigError(f"-s {slot_name(slot)}hostbridge: the host bridge is always 0:0 and takes no options")


register("hostbridge", _hostbridge_check, None)  # bhyve's `-s 0,hostbridge`: ours is always there
