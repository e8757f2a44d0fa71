"""Busy polling on the loop's thread: how long to spin for the next event before sleeping.

A wake-up of a sleeping thread through an eventfd costs microseconds (many more in a
nested guest); an exit-heavy guest, or a disk at queue depth 1, produces its next event
sooner than that. So after serving an event, the loop spins a little for the next one.
The window adapts as KVM's halt polling does, on the whole wait from the start of the poll
that missed: when the loop had to be woken for an event that came within the maximum
window, a longer window would have caught it and it grows; when the wait was longer,
polling would not have helped and it shrinks — a quiet guest costs no CPU. (The device
threads' C windows, cext/devthread.h, follow the same rule.)

Busy polling needs a CPU of its own: a loop thread that spins takes the CPU from the
vCPUs (and, in the benchmarks, from the thread playing the guest). The devices' data
paths poll only when the host has a CPU to spare beyond one per vCPU and one for the
loop (`devices_may_poll`); a device's own thread (virtio-blk's) polls with a CPU beyond the
vCPUs' (`device_threads_may_poll`); the exit path polls always (its window is a few µs).
"""

from __future__ import annotations

import os
import time

POLL_MIN_NS = 5_000
POLL_MAX_NS = 50_000
POLL_SLICE_NS = 2_000_000  # at most this long polling in one callback: other loop work goes on


class PollWindow:
    def __init__(self, max_ns: int = POLL_MAX_NS, min_ns: int = POLL_MIN_NS):
        self.max_ns = max_ns
        self.min_ns = min_ns
        self.ns = 0  # the current window
        self.idle_since = 0  # when the poll that last missed began (monotonic ns), 0: never

    def woken(self, now: int) -> None:
        """The loop was woken for an event: adapt the window to how long it slept."""
        if not self.idle_since or not self.max_ns:
            return
        if now - self.idle_since <= self.max_ns:
            self.ns = min(max(self.ns * 2, self.min_ns), self.max_ns)
        elif self.ns:
            self.ns = self.ns // 2 if self.ns // 2 >= self.min_ns else 0

    def gave_up(self) -> None:
        """The poll found nothing for a whole window: the wait began that window ago."""
        self.idle_since = time.monotonic_ns() - self.ns


def device_threads_may_poll(vcpus: int) -> bool:
    """Whether a device's own thread (virtio-blk's, cext/blk_thread.h) busy-polls: with a CPU
    beyond the vCPUs'. Its polling holds up nothing on the loop (which no longer carries that
    data path), and its window adapts to what the polls find: when the waits are long it
    stops polling by itself, so a quiet disk costs no CPU."""
    return (os.cpu_count() or 1) >= vcpus + 1


def devices_may_poll(vcpus: int) -> bool:
    """Whether the device data paths busy-poll: only with a CPU to spare for the loop."""
    return (os.cpu_count() or 1) >= vcpus + 2
