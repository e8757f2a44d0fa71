"""Run one VM to its end on a loop: build, boot, restart on reset, map the end to a status."""

from __future__ import annotations

import asyncio
import signal

from . import cli, log
from .config import VmConfig
from .console import Console, open_console
from .machine import Machine, Stop, StopReason
from .loop import run as run_loop

STATUS = {
    StopReason.POWEROFF: cli.EXIT_OK,
    StopReason.RESET: cli.EXIT_OK,
    StopReason.ERROR: cli.EXIT_ERROR,
    StopReason.TRIPLE_FAULT: cli.EXIT_TRIPLE_FAULT,
    StopReason.HOST: cli.EXIT_HOST,
}


async def run_machine(cfg: VmConfig, console: Console) -> Stop:
    """Boot `cfg` until it powers off, fails, or resets with no_reboot; returns the stop."""
    loop = asyncio.get_running_loop()
    while True:
        machine = Machine(cfg, console)
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        try:
            machine.build()
            for sig in signals:
                loop.add_signal_handler(
                    sig, machine.request_stop, Stop(StopReason.HOST, f"stopped by {signal.Signals(sig).name}")
                )
            stop = await machine.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            machine.close()
        if stop.reason is StopReason.RESET and not cfg.no_reboot:
            log.info(f"{stop.message}: restarting the guest")
            continue
        return stop


def run_to_end(cfg: VmConfig) -> int:
    console = open_console(cfg.console)
    try:
        stop = run_loop(run_machine(cfg, console))
    finally:
        console.close()
    if stop.reason in (StopReason.POWEROFF, StopReason.RESET):
        log.info(stop.message)
    else:
        log.error(stop.message)
    return STATUS[stop.reason]
