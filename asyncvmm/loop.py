"""The event loop: uvloop when it is installed, asyncio's default loop otherwise."""

from __future__ import annotations

import asyncio


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro):
    """Run `coro` to completion on a new loop of the best kind available."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
