"""What the control socket does for each command: one table, command name -> handler.

A handler takes the VM (asyncvmm.api.VM, whose methods are the one implementation the
embedding API shares) and the request's fields, and returns the result object. A request
the VM cannot take as given (no such vCPU, a register value no CPU can hold, a field of
the wrong type) raises ConfigError: the answer says so with "usage": true, and `ctl`
exits with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..api import VM

Handler = Callable[["VM", dict], Awaitable[dict]]
HANDLERS: dict[str, Handler] = {}


def handler(name: str):
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


def _int(req: dict, key: str, default: int | None = None, *, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value = req.get(key, default)
    if value is None:
        raise ConfigError(f"the request needs {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: a number, not {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key} {value}: out of range ({lo} to {hi})")
    return value


def _vcpu(req: dict) -> int:
    return _int(req, "vcpu", 0, hi=(1 << 31) - 1)


@handler("state")
async def state(vm: "VM", req: dict) -> dict:
    return vm.state_info()


@handler("regs")
async def regs(vm: "VM", req: dict) -> dict:
    return await vm.regs(_vcpu(req))


@handler("set")
async def set_registers(vm: "VM", req: dict) -> dict:
    changes = req.get("registers")
    if not isinstance(changes, dict):
        raise ConfigError("set needs registers: {NAME: VALUE, ...}")
    return await vm.set_registers(changes, vcpu=_vcpu(req))


@handler("nmi")
async def nmi(vm: "VM", req: dict) -> dict:
    vcpu = _vcpu(req)
    await vm.nmi(vcpu)
    return {"vcpu": vcpu}


@handler("events")
async def events(vm: "VM", req: dict) -> dict:
    return await vm.events(_vcpu(req))


@handler("msr")
async def msr(vm: "VM", req: dict) -> dict:
    """{"index": N} or {"indices": [N...]} reads; with "value" writes the one index."""
    vcpu = _vcpu(req)
    if "indices" in req:
        indices = req["indices"]
        if not isinstance(indices, list) or not indices:
            raise ConfigError("indices: a list of MSR numbers")
        wanted = [_int({"index": i}, "index", hi=0xFFFF_FFFF) for i in indices]
    else:
        wanted = [_int(req, "index", hi=0xFFFF_FFFF)]
    if "value" in req:
        if len(wanted) != 1:
            raise ConfigError("an MSR write names one MSR")
        await vm.write_msr(wanted[0], _int(req, "value"), vcpu)
    got = await vm.read_msrs(wanted, vcpu)
    return {"vcpu": vcpu, "msrs": {f"{i:#x}": got[i] for i in wanted}}


@handler("rtc")
async def rtc(vm: "VM", req: dict) -> dict:
    """{"time": SECONDS} sets the clock; {"offset": N, "value": B} writes an NVRAM byte;
    {"offset": N} reads one. The answer has the time and, with an offset, the byte."""
    if "time" in req:
        vm.set_rtc_time(_int(req, "time", hi=(1 << 63) - 1))
    out: dict = {}
    if "offset" in req:
        offset = _int(req, "offset", hi=127)
        if "value" in req:
            vm.set_rtc_nvram(offset, _int(req, "value", hi=255))
        out["offset"] = offset
        out["value"] = vm.rtc_nvram(offset)
    elif "value" in req:
        raise ConfigError("an NVRAM write needs its offset")
    out["time"] = vm.rtc_time()
    return out


@handler("topology")
async def topology(vm: "VM", req: dict) -> dict:
    return vm.topology()


@handler("stats")
async def stats(vm: "VM", req: dict) -> dict:
    return vm.stats()


@handler("pause")
async def pause(vm: "VM", req: dict) -> dict:
    await vm.pause()
    return vm.state_info()


@handler("resume")
async def resume(vm: "VM", req: dict) -> dict:
    await vm.resume()
    return vm.state_info()


@handler("snapshot")
async def snapshot(vm: "VM", req: dict) -> dict:
    path = req.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ConfigError(f"snapshot path {path!r}: an absolute path")
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(f"snapshot {path}: no directory {os.path.dirname(path)}")
    stop, resume = bool(req.get("stop", False)), bool(req.get("resume", False))
    info = await vm.snapshot(path, stop=stop, diff=bool(req.get("diff", False)))
    if resume and not stop:
        await vm.resume()
    return {**info, "stop": stop, "resumed": resume and not stop}


@handler("migrate")
async def migrate(vm: "VM", req: dict) -> dict:
    address = req.get("address")
    if not isinstance(address, str):
        raise ConfigError("migrate: the destination's address (unix:PATH or tcp:HOST:PORT)")
    from ..snapshot.migrate import parse_address  # noqa: PLC0415

    parse_address(address)
    return await vm.migrate(address)


@handler("sysrq")
async def sysrq(vm: "VM", req: dict) -> dict:
    key = req.get("key")
    if not isinstance(key, str) or len(key) != 1 or not key.isprintable() or not key.isascii():
        raise ConfigError(f"sysrq {key!r}: the key is one printable character (h for help)")
    await vm.sysrq(key)
    return {"key": key}


@handler("reset")
async def reset(vm: "VM", req: dict) -> dict:
    vm.reset()
    return {"how": "reset", "reboots": not vm.config.no_reboot}


@handler("poweroff")
async def poweroff(vm: "VM", req: dict) -> dict:
    vm.power_off()
    await vm.wait()
    return {"how": "poweroff"}


@handler("destroy")
async def destroy(vm: "VM", req: dict) -> dict:
    timeout = req.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
        raise ConfigError(f"timeout {timeout!r}: seconds, 0 to 3600")
    how = await vm.destroy(float(timeout), force=bool(req.get("force", False)))
    return {"how": how}
