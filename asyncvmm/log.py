"""The VMM's own messages: one line each on stderr, apart from the guest's console."""

from __future__ import annotations

import os
import sys
import time

PREFIX = "asyncvmm: "
_quiet = False

# What a guest can make us say is rate-limited as printk_ratelimit() is: a burst, then
# quiet until the interval is over (and a count of what was left unsaid).
GUEST_BURST = 10
GUEST_INTERVAL_S = 5.0
_guest_window = {"start": float("-inf"), "said": 0, "suppressed": 0}


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(msg: str) -> None:
    if not _quiet:
        _emit(msg)


def guest(msg: str) -> None:
    """info() for what the guest caused: a guest that keeps doing it cannot flood the log."""
    w, now = _guest_window, time.monotonic()
    if now - w["start"] >= GUEST_INTERVAL_S:
        if w["suppressed"]:
            info(f"{w['suppressed']} more messages about the guest left out")
        w.update(start=now, said=0, suppressed=0)
    if w["said"] < GUEST_BURST:
        w["said"] += 1
        info(msg)
    else:
        w["suppressed"] += 1


def error(msg: str) -> None:
    _emit(msg)


def _emit(msg: str) -> None:
    line = (PREFIX + msg + "\n").encode(errors="replace")
    # A terminal in raw mode needs the carriage return the line discipline no longer adds.
    if sys.stderr.isatty():
        line = line.replace(b"\n", b"\r\n")
    try:
        os.write(2, line)
    except OSError:
        pass
