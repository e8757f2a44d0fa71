"""The `-s SLOT,DRIVER[,CONF]` drivers: each device registers its name beside itself.

A device module ends with its registration:

    register("virtio-rnd", check=_check, build=_build)

`check(slot, cfg)` parses the slot's CONF when the configuration is validated (a bad
option is refused before anything starts: ConfigError, one line); `build(slot, ctx)`
makes the PCI function when the machine is built (slots.BuildContext). Configuration
validation asks this registry (`lookup`); it does not import the devices itself: the
registry imports a driver's module (PROVIDERS) the first time that driver is asked for,
so a VM without virtio-net never loads virtio-net's code (start-up time; --help lists the
names without importing anything).

`check_slots` is the whole `-s` check config validation runs: bus 0 only, a slot taken
once, 0:0 the host bridge's, a known driver, then the driver's own check.

This module imports nothing of asyncvmm's but its errors: config.py and the devices both
import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# Each driver's name and the module that registers it (imported on the first lookup of
# that name). A new device: its module, and this line.
PROVIDERS = {
    "hostbridge": "asyncvmm.devices.slots",
    "lpc": "asyncvmm.devices.pci.lpc",
    "virtio-blk": "asyncvmm.devices.virtio.block.device",
    "virtio-blk-backend": "asyncvmm.devices.virtio.block.backend",
    "virtio-net": "asyncvmm.devices.virtio.net.device",
    "virtio-rnd": "asyncvmm.devices.virtio.rnd",
    "virtio-console": "asyncvmm.devices.virtio.console",
}


@dataclass(frozen=True)
class Driver:
    """A `-s` driver: how its options are checked and its device built."""

    name: str
    check: Callable[[Any, Any], None]  # (PciSlot, VmConfig)
    build: Callable[[Any, Any], Any] | None  # (PciSlot, BuildContext) -> PciDevice; None: nothing to add
    shares_memory: Callable[[Any, Any], bool] | None = None  # (PciSlot, HostResources) -> RAM must be a memfd


DRIVERS: dict[str, Driver] = {}


def register(name: str, check: Callable[[Any, Any], None], build: Callable[[Any, Any], Any] | None,
             shares_memory: Callable[[Any, Any], bool] | None = None) -> Driver:
    if name not in PROVIDERS:
        raise ValueError(f"-s driver {name!r} is not in registry.PROVIDERS")
    if name in DRIVERS and DRIVERS[name].check is not check:
        raise ValueError(f"-s driver {name!r} registered twice")
    DRIVERS[name] = d = Driver(name, check, build, shares_memory)
    return d


def shares_memory(cfg, host=None) -> bool:
    """Whether a device of the VmConfig hands guest RAM to another process (a vhost-user
    back-end): then RAM is a memfd mapped shared."""
    for s in cfg.slots:
        d = lookup(s.driver)
        if d is not None and d.shares_memory is not None and d.shares_memory(s, host):
            return True
    return False


def lookup(name: str) -> Driver | None:
    module = PROVIDERS.get(name)
    if module is None:
        return None
    if name not in DRIVERS:
        importlib.import_module(module)
        if name not in DRIVERS:
            raise ValueError(f"{module} does not register -s driver {name!r}")
    return DRIVERS[name]


def names() -> list[str]:
    return sorted(PROVIDERS)


def slot_name(slot) -> str:
    """How the user wrote the slot, for messages: `3,` or `3:1,`."""
    return f"{slot.slot}:{slot.function}," if slot.function else f"{slot.slot},"


def check_slots(cfg) -> None:
    """Every `-s` of a VmConfig (ConfigError: one line naming the option)."""
    seen: dict[tuple[int, int], str] = {}
    for s in cfg.slots:
        where = slot_name(s)
        if s.bus != 0:
            raise ConfigError(f"-s {s.bus}:{s.slot}:{s.function},{s.driver}: only PCI bus 0 exists")
        if (s.slot, s.function) in seen:
            raise ConfigError(f"-s {where}{s.driver}: slot {s.slot}:{s.function} is taken by {seen[(s.slot, s.function)]}")
        if (s.slot, s.function) == (0, 0) and s.driver != "hostbridge":
            raise ConfigError(f"-s {where}{s.driver}: slot 0:0 is the host bridge's")
        seen[(s.slot, s.function)] = s.driver
        driver = lookup(s.driver)
        if driver is None:
            raise ConfigError(f"-s {where}{s.driver}: no such driver {s.driver!r}")
        driver.check(s, cfg)
