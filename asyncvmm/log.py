"""The VMM's own messages: one line each on stderr, apart from the guest's console."""

from __future__ import annotations

import os
import sys

PREFIX = "asyncvmm: "
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(msg: str) -> None:
    if not _quiet:
        _emit(msg)


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
