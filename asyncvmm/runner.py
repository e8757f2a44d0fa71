"""`asyncvmm run`'s loop: one VM (the same as the API's) until it ends, then a status."""

from __future__ import annotations

import asyncio
import signal
import sys

from . import seccomp
from .api import VM
from .config import VmConfig
from .console import open_console
from .errors import EXIT_ERROR, EXIT_HOST, EXIT_OK, EXIT_TRIPLE_FAULT
from .log import get_logger
from .loop import run as run_loop
from .machine import Stop, StopReason

log = get_logger(__name__)

STATUS = {
    StopReason.POWEROFF: EXIT_OK,
    StopReason.RESET: EXIT_OK,
    StopReason.ERROR: EXIT_ERROR,
    StopReason.TRIPLE_FAULT: EXIT_TRIPLE_FAULT,
    StopReason.HOST: EXIT_HOST,
}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_vm(cfg: VmConfig, reports: list[str] | None = None, snapshot=None, incoming=None) -> Stop:
    """Run the VM until it ends; with --profile-boot its report is appended to `reports`."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    running: list[VM] = []
    pressed: list[bool] = []  # the power button was pressed for a SIGTERM already

    def on_signal(sig: signal.Signals) -> None:
        stop = Stop(StopReason.HOST, f"stopped by {sig.name}")
        if running and running[0].state in ("running", "paused"):
            vm = running[0]
            # SIGTERM asks the guest, as bhyve does: the ACPI power button. A guest that
            # does not listen for it is stopped at once, and so is one that got a SIGTERM.
            if sig == signal.SIGTERM and not pressed:
                pressed.append(True)
                if vm.power_button():
                    log.info("SIGTERM: pressed the ACPI power button (SIGINT or another SIGTERM stops the VM at once)")
                    return
                stop = Stop(StopReason.HOST, "stopped by SIGTERM (the guest does not listen for the ACPI power button)")
            vm.request_stop(stop)
        else:  # still starting, or already ending: unwind, restoring the terminal
            main.cancel(stop.message)

    # The handlers cover the whole run, from before the terminal goes raw until after it
    # is restored: a signal at any point ends through the finally clauses below.
    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        console = open_console(cfg.console)
        try:
            vm = VM(cfg, console=console)
            if snapshot is not None:  # --restore: the first boot is the snapshot's machine
                vm._snapshot = snapshot
            vm._incoming = incoming  # --incoming: the first boot is the migrating VM
            try:
                # Before the filter, which refuses fork and exec: passt and the disks'
                # qemu-storage-daemons, started and connected (the VM's start finds them).
                await vm.host.prepare(cfg)
                seccomp.confine_process(cfg.seccomp)  # this process is the VMM's: the loop's filter too
            except BaseException:
                await vm.host.stop()
                vm.host.close()
                raise
            async with vm:
                running.append(vm)
                stop = await vm.wait()
                if vm.profile is not None and reports is not None:
                    reports.append(vm.profile.report())  # complete: the first boot has ended
                return stop
        finally:
            console.close()
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


def run_to_end(cfg: VmConfig, snapshot=None) -> int:
    reports: list[str] = []
    try:
        stop = run_loop(run_vm(cfg, reports, snapshot))
    except asyncio.CancelledError as e:
        stop = Stop(StopReason.HOST, str(e.args[0]) if e.args else "stopped")
    for report in reports:  # after the console is closed and the terminal restored
        sys.stderr.write(report + "\n")
        sys.stderr.flush()
    if stop.reason in (StopReason.POWEROFF, StopReason.RESET):
        log.info(stop.message)
    else:
        log.error(stop.message)
    return STATUS[stop.reason]
