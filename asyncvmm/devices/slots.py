"""bhyve's `-s SLOT[:FUNC],DRIVER[,CONF]`: which driver builds what, and its checks.

Each driver has two steps: `check` parses its CONF when the configuration is validated
(bad options are refused before anything starts), `build` makes the PCI function when the
machine is built (that is when images are opened and locked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import PciSlot, VmConfig, check_readable
from ..errors import ConfigError
from ..poll import devices_may_poll


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


def _where(slot: PciSlot) -> str:
    return f"{slot.slot}:{slot.function}," if slot.function else f"{slot.slot},"


def _blk_check(slot: PciSlot, cfg: VmConfig) -> None:
    from .virtio.block.image import BlockOptions  # noqa: PLC0415 (loads the C core)

    opts = BlockOptions.parse(slot.options, _where(slot))
    check_readable(opts.path, "disk")


def _blk_build(slot: PciSlot, ctx: BuildContext):
    from .virtio.block.device import VirtioBlk  # noqa: PLC0415
    from .virtio.block.image import BlockOptions  # noqa: PLC0415
    from .virtio.transport_pci import VirtioPciDevice  # noqa: PLC0415

    opts = BlockOptions.parse(slot.options, _where(slot))
    blk = VirtioBlk(opts, ctx.mem, queues=ctx.config.cpus, name=f"virtio-blk@{slot.slot}.{slot.function}",
                    poll=ctx.config.poll and devices_may_poll(ctx.config.cpus))
    try:
        return VirtioPciDevice(blk, ctx.router, ctx.notify, msi=ctx.config.force_msi)
    except BaseException:
        blk.close()
        raise


def _net_check(slot: PciSlot, cfg: VmConfig) -> None:
    from .virtio.net.tap import NetOptions  # noqa: PLC0415

    NetOptions.parse(slot.options, _where(slot))


def _net_build(slot: PciSlot, ctx: BuildContext):
    from .virtio.net.device import VirtioNet  # noqa: PLC0415
    from .virtio.net.tap import NetOptions, Tap, stable_mac  # noqa: PLC0415
    from .virtio.transport_pci import VirtioPciDevice  # noqa: PLC0415

    opts = NetOptions.parse(slot.options, _where(slot))
    where = f"{slot.slot}.{slot.function}"
    pairs = min(opts.queues or ctx.config.cpus, VirtioNet.MAX_PAIRS)
    tap = None
    if ctx.host is not None:  # the TAP outlives the boot: a reset reuses it
        key = (slot.slot, slot.function)
        tap = ctx.host.taps.get(key)
        if tap is None:
            tap = ctx.host.taps[key] = Tap(opts.tap, pairs)
    net = VirtioNet(opts, ctx.mem, mac=stable_mac(ctx.config.name, where), queues=ctx.config.cpus,
                    name=f"virtio-net@{where}", poll=ctx.config.poll and devices_may_poll(ctx.config.cpus), tap=tap)
    try:
        return VirtioPciDevice(net, ctx.router, ctx.notify, msi=ctx.config.force_msi)
    except BaseException:
        net.close()
        raise


def _hostbridge_check(slot: PciSlot, cfg: VmConfig) -> None:
    if (slot.slot, slot.function) != (0, 0) or slot.options:
        raise ConfigError(f"-s {_where(slot)}hostbridge: the host bridge is always 0:0 and takes no options")


def _lpc():
    from .pci import lpc  # noqa: PLC0415

    return lpc


@dataclass(frozen=True)
class Driver:
    check: Callable[[PciSlot, VmConfig], None]
    build: Callable[[PciSlot, BuildContext], object] | None  # None: nothing to add


DRIVERS: dict[str, Driver] = {
    "virtio-blk": Driver(_blk_check, _blk_build),
    "virtio-net": Driver(_net_check, _net_build),
    "hostbridge": Driver(_hostbridge_check, None),  # bhyve's `-s 0,hostbridge`: ours is always there
    "lpc": Driver(lambda s, c: _lpc().check(s, c), lambda s, ctx: _lpc().build(s, ctx)),  # devices/pci/lpc.py
}


def check_slots(cfg: VmConfig) -> None:
    seen: dict[tuple[int, int], str] = {}
    for s in cfg.slots:
        if s.bus != 0:
            raise ConfigError(f"-s {s.bus}:{s.slot}:{s.function},{s.driver}: only PCI bus 0 exists")
        if (s.slot, s.function) in seen:
            raise ConfigError(f"-s {_where(s)}{s.driver}: slot {s.slot}:{s.function} is taken by {seen[(s.slot, s.function)]}")
        if (s.slot, s.function) == (0, 0) and s.driver != "hostbridge":
            raise ConfigError(f"-s {_where(s)}{s.driver}: slot 0:0 is the host bridge's")
        seen[(s.slot, s.function)] = s.driver
        DRIVERS[s.driver].check(s, cfg)
