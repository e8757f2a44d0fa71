"""`asyncvmm run`'s loop: one VM (the same as the API's) until it ends, then a status."""

from __future__ import annotations

import asyncio
import signal

from . import cli, log
from .api import VM
from .config import VmConfig
from .console import open_console
from .loop import run as run_loop
from .machine import Stop, StopReason

STATUS = {
    StopReason.POWEROFF: cli.EXIT_OK,
    StopReason.RESET: cli.EXIT_OK,
    StopReason.ERROR: cli.EXIT_ERROR,
    StopReason.TRIPLE_FAULT: cli.EXIT_TRIPLE_FAULT,
    StopReason.HOST: cli.EXIT_HOST,
}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_vm(cfg: VmConfig) -> Stop:
    loop = asyncio.get_running_loop()
    console = open_console(cfg.console)
    try:
        async with VM(cfg, console=console) as vm:
            for sig in SIGNALS:
                loop.add_signal_handler(sig, vm.request_stop, Stop(StopReason.HOST, f"stopped by {sig.name}"))
            try:
                return await vm.wait()
            finally:
                for sig in SIGNALS:
                    loop.remove_signal_handler(sig)
    finally:
        console.close()


def run_to_end(cfg: VmConfig) -> int:
    stop = run_loop(run_vm(cfg))
    if stop.reason in (StopReason.POWEROFF, StopReason.RESET):
        log.info(stop.message)
    else:
        log.error(stop.message)
    return STATUS[stop.reason]
