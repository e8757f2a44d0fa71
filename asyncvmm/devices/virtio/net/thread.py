"""virtio-net's own thread on a TAP (cext/net_thread.h): what vhost-net does in the kernel.

One C thread per device waits in ppoll on every queue pair's doorbells and TAP and moves
the frames (avmm_net_rx/tx) with no loop and no Python between; the loop parks it while it
touches the device (reset, queue set-up, restored state, a snapshot's hold, the TAP's
active queues) and hears from it on an eventfd when a ring broke.

`ASYNCVMM_NET_THREAD=0` keeps the data path on the loop (the model before it, for
comparison: perf/ab.py --b-env ASYNCVMM_NET_THREAD=0).
"""

from __future__ import annotations

import os

from .... import seccomp
from ...._native import ffi, lib
from ....poll import POLL_MAX_NS
from ..device import DeviceError

ENABLED = os.environ.get("ASYNCVMM_NET_THREAD", "1") != "0"


class NetThread:
    """The C thread of one device; started parked-free, serving what is set up."""

    def __init__(self, net, name: str, pairs: int, *, poll: bool, seccomp_mode: str):
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        cfg = ffi.new("struct avmm_net_thread_config *")
        cfg.poll_max_ns = POLL_MAX_NS if poll else 0
        cfg.notify_fd = self.notify_fd
        cfg.seccomp_action = seccomp.action(seccomp_mode)
        cfg.npairs = pairs
        ffi.memmove(cfg.name, (b"net" + name.removeprefix("virtio-net").encode())[:15].ljust(16, b"\0"), 16)
        self._t = lib.avmm_net_thread_start(net, cfg)
        if self._t == ffi.NULL:
            err = ffi.errno
            os.close(self.notify_fd)
            raise DeviceError(f"{name}: cannot start its thread: {os.strerror(err)}")

    def park(self) -> None:
        lib.avmm_net_thread_park(self._t)

    def unpark(self) -> None:
        lib.avmm_net_thread_unpark(self._t)

    def broken(self) -> bool:
        """After the thread's word on notify_fd: whether a ring broke (the word is read)."""
        try:
            os.eventfd_read(self.notify_fd)
        except BlockingIOError:
            pass
        return bool(lib.avmm_net_thread_stats(self._t).broken)

    def stats(self) -> dict:
        t = lib.avmm_net_thread_stats(self._t)
        return {f: getattr(t, f) for f in ("turns", "waits", "polls", "poll_hits", "poll_ns", "parks", "rx_stops",
                                           "tx_waits")} | {"broken": bool(t.broken),
                                                           "seccomp_failed": bool(t.seccomp_failed)}

    def stop(self) -> None:
        """Stop and join the thread (it touches nothing after), close its eventfd."""
        if self._t != ffi.NULL:
            lib.avmm_net_thread_stop(self._t)
            self._t = ffi.NULL
        if self.notify_fd >= 0:
            os.close(self.notify_fd)
            self.notify_fd = -1
