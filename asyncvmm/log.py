"""The VMM's own messages, apart from the guest's console: through the `logging` module.

Each part logs to a named logger under "asyncvmm" — asyncvmm.machine (the KVM probe, the
ACPI tables, the boot path, the devices attached), asyncvmm.quirks (what is done
differently on an emulating KVM), asyncvmm.api (the control socket, resets),
asyncvmm.devices... (what a guest made a device say) — so a program that embeds asyncvmm
routes them as it routes its own:

    logging.getLogger("asyncvmm").addHandler(my_handler)   # or logging.basicConfig(level=logging.INFO)

As a library should, asyncvmm adds no handler of its own there (a NullHandler): what it
says at INFO goes nowhere until the program says where. `asyncvmm run` and `asyncvmm ctl`
install CliHandler (use_cli_output), which prints each message as one line,
"asyncvmm: MESSAGE", on stderr.

    log = get_logger(__name__)
    log.info("...")          # the VMM's own news
    log.guest("...")         # what a guest made us say: rate-limited
    log.error("...")

The module-level info(), guest() and error() log to the "asyncvmm" logger itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time

ROOT = "asyncvmm"
PREFIX = "asyncvmm: "
logging.getLogger(ROOT).addHandler(logging.NullHandler())

# What a guest can make us say is rate-limited as printk_ratelimit() is: a burst, then
# quiet until the interval is over (and a count of what was left unsaid). One window for
# the whole process: a flood from any guest is one flood in the log.
GUEST_BURST = 10
GUEST_INTERVAL_S = 5.0
_guest_window = {"start": float("-inf"), "said": 0, "suppressed": 0}


class VmmLogger:
    """A named logger (logging.getLogger(name)) with the VMM's rate-limited guest()."""

    def __init__(self, name: str):
        self.name = name
        self.logger = logging.getLogger(name)

    def info(self, msg: str) -> None:
        held = _held.get()
        if held is not None:  # inside held(): said when the block is over, or not at all
            held.append((self, msg))
            return
        self.logger.info(msg)

    def warning(self, msg: str) -> None:
        self.logger.warning(msg)

    def error(self, msg: str) -> None:
        self.logger.error(msg)

    def guest(self, msg: str) -> None:
        """info() for what the guest caused: a guest that keeps doing it cannot flood the log."""
        w, now = _guest_window, time.monotonic()
        if now - w["start"] >= GUEST_INTERVAL_S:
            if w["suppressed"]:
                self.info(f"{w['suppressed']} more messages about the guest left out")
            w.update(start=now, said=0, suppressed=0)
        if w["said"] < GUEST_BURST:
            w["said"] += 1
            self.info(msg)
        else:
            w["suppressed"] += 1


_held: contextvars.ContextVar[list | None] = contextvars.ContextVar("asyncvmm_log_held", default=None)


@contextlib.contextmanager
def held(say: bool = True):
    """Hold what is said at INFO inside the block (in this thread or task): said when it
    ends well (if `say`), dropped when it raises a ConfigError (the error is then the one
    line a bad input gets), said before any other exception goes on (what led up to a
    KVM failure). Errors are never held."""
    from .errors import ConfigError  # noqa: PLC0415

    said: list[tuple[VmmLogger, str]] = []
    token = _held.set(said)
    try:
        yield
    except ConfigError:
        _held.reset(token)
        raise
    except BaseException:
        _held.reset(token)
        _say(said)
        raise
    _held.reset(token)
    if say:
        _say(said)


def _say(said: list) -> None:
    for logger, msg in said:
        logger.info(msg)


def get_logger(name: str) -> VmmLogger:
    """The logger for module `name` (pass __name__: asyncvmm.machine, ...)."""
    return VmmLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


_root = VmmLogger(ROOT)
info, guest, error = _root.info, _root.guest, _root.error


class CliHandler(logging.Handler):
    """The command line's output: each message one line, "asyncvmm: MESSAGE", on fd 2.

    Written with one os.write (no buffering: a line is out before the VMM goes on), and on
    a terminal with "\\r\\n", since the console may have put it in raw mode."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (PREFIX + record.getMessage() + "\n").encode(errors="replace")
            if sys.stderr.isatty():
                line = line.replace(b"\n", b"\r\n")
            os.write(2, line)
        except Exception:  # a log line must never stop the VMM
            pass


def use_cli_output(quiet: bool = False) -> CliHandler:
    """Print the VMM's messages as the command line does (once per process; `quiet`: errors only)."""
    root = logging.getLogger(ROOT)
    handler = next((h for h in root.handlers if isinstance(h, CliHandler)), None)
    if handler is None:
        handler = CliHandler()
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # the CLI's lines are printed once, by this handler
    set_quiet(quiet)
    return handler


def set_quiet(quiet: bool) -> None:
    """The command line's -q: only errors are printed."""
    for h in logging.getLogger(ROOT).handlers:
        if isinstance(h, CliHandler):
            h.setLevel(logging.ERROR if quiet else logging.INFO)
