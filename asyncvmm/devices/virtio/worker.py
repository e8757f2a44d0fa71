"""A device's queues on the loop: doorbells, budgets, continuations, polling, breakdown.

Every virtio device runs its queues the same way, written once here (as Cloud
Hypervisor's epoll helper and kvmtool's virtio core do):

* a doorbell is the queue's ioeventfd, a reader on the loop (`watch`); so is any other fd
  the device waits on (an engine's completions, a TAP, a socket); flow control removes
  and re-adds readers (`unwatch`), never blocks;
* a callback serves at most a budget of work; the rest is continued with `call_soon`
  (`soon`, one pending continuation per key), so the loop's other callbacks run between;
* after a batch the loop may spin briefly for the next one (asyncvmm.poll, `poll`);
* a ring the driver broke stops every reader and continuation of the device and sets
  DEVICE_NEEDS_RESET through the transport (`broken`); the other devices carry on.

Queues served from Python (`serve`): the worker pops chains and hands each to the
device's handler, which returns the bytes it wrote into the chain (the chain is then used)
or None (it cannot take it now: the chain goes back to the ring, and the device calls
`resume(vq)` when it can — input arrived, tokens came, a socket became writable). A chain
the driver got wrong never reaches the handler: it is given back with 0 bytes, counted.

Queues whose data path is C (virtio-blk, virtio-net) use watch/soon/poll/broken around
their C calls.

Call order: start() at activate (on the loop), then any; stop() at reset or breakdown
(readers removed but the persistent ones, continuations cancelled); start() again at the
next activate; stop(closing=True) when the device closes.
Thread ownership: the loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable

from ...poll import POLL_MAX_NS, POLL_SLICE_NS, PollWindow
from .queue import Chain, RingBroken, Virtqueue

DEFAULT_BUDGET = 64  # chains per callback for a queue served from Python

Handler = Callable[[Chain], "int | None"]


class QueueWorker:
    """One device's queues on the loop (see the module docstring)."""

    def __init__(self, name: str, needs_reset: Callable[[str], None], *, poll: bool = False,
                 budget: int = DEFAULT_BUDGET):
        """`needs_reset(why)`: the device's (the transport sets DEVICE_NEEDS_RESET)."""
        self.name = name
        self._needs_reset = needs_reset
        self.window = PollWindow(POLL_MAX_NS if poll else 0)
        self.budget = budget
        self.loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[int, tuple] = {}
        self._persistent: set[int] = set()  # readers a stop() leaves (completions still due)
        self._writers: dict[int, tuple] = {}
        self._soon: dict[Hashable, asyncio.Handle] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._served: dict[int, tuple[Virtqueue, Handler, int]] = {}
        self.counters: Counter[str] = Counter()
        self.running = False
        self._held: list[tuple[Callable, tuple]] | None = None  # hold(): calls due meanwhile
        self._hold_hooks: list[tuple[Callable[[], None], Callable[[], None]]] = []  # on_hold()

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.running = True

    def stop(self, *, closing: bool = False) -> None:
        """Remove every reader (but the persistent ones, unless `closing`) and writer,
        cancel every continuation and timer."""
        self.running = False
        keep = set() if closing else self._persistent
        if self.loop is not None:
            for fd in [fd for fd in self._readers if fd not in keep]:
                self.loop.remove_reader(fd)
                del self._readers[fd]
            for fd in list(self._writers):
                self.loop.remove_writer(fd)
        self._writers.clear()
        if closing:
            self._readers.clear()
            self._persistent.clear()
        for h in [*self._soon.values(), *self._timers.values()]:
            h.cancel()
        self._soon.clear()
        self._timers.clear()
        self._served.clear()

    def hold(self) -> None:
        """Serve nothing until release(): every reader and writer off the loop (kept), and
        continuations and timers that come due meanwhile kept for release. A snapshot holds
        a paused VM's devices so that no request touches guest RAM while it is written."""
        if self.loop is None or self._held is not None:
            return
        self._held = []
        for fd in self._readers:
            self.loop.remove_reader(fd)
        for fd in self._writers:
            self.loop.remove_writer(fd)
        for hold, _ in self._hold_hooks:
            hold()

    def release(self) -> None:
        """After hold(): serve again, and run what came due meanwhile."""
        held, self._held = self._held, None
        if held is None or self.loop is None:
            return
        for _, release in self._hold_hooks:
            release()
        for fd, (callback, args) in self._readers.items():
            self.loop.add_reader(fd, callback, *args)
        for fd, (callback, args) in self._writers.items():
            self.loop.add_writer(fd, callback, *args)
        for callback, args in held:
            self.loop.call_soon(callback, *args)

    def on_hold(self, hold: Callable[[], None], release: Callable[[], None]) -> None:
        """Call `hold()` at each hold() and `release()` at each release(): a device whose
        data path runs in a thread of its own parks and unparks it there."""
        self._hold_hooks.append((hold, release))

    # -- fds ---------------------------------------------------------------------------------
    def watch(self, fd: int, callback: Callable, *args, persistent: bool = False) -> None:
        """Call `callback(*args)` when `fd` is readable (a doorbell, completions, a socket).
        `persistent`: it stays across stop() (an engine's completions of requests in flight
        at a reset or breakdown), until stop(closing=True)."""
        if fd not in self._readers:
            self.loop.add_reader(fd, callback, *args)
            self._readers[fd] = (callback, args)
        if persistent:
            self._persistent.add(fd)

    def unwatch(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self.loop.remove_reader(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._readers

    def watch_write(self, fd: int, callback: Callable, *args) -> None:
        """Call `callback(*args)` when `fd` is writable (a backend that took no more)."""
        if fd not in self._writers:
            self.loop.add_writer(fd, callback, *args)
            self._writers[fd] = (callback, args)

    def unwatch_write(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self.loop.remove_writer(fd)

    # -- continuations -------------------------------------------------------------------
    def soon(self, key: Hashable, callback: Callable, *args) -> None:
        """`callback(*args)` after the loop's other ready callbacks (at most one per key):
        the rest of a batch that spent its budget."""
        if key not in self._soon and self.running:
            self._soon[key] = self.loop.call_soon(self._run_soon, key, callback, args)

    def _run_soon(self, key: Hashable, callback: Callable, args: tuple) -> None:
        del self._soon[key]
        if self._held is not None:
            self._held.append((callback, args))
            return
        callback(*args)

    def later(self, key: Hashable, delay: float, callback: Callable, *args) -> None:
        """`callback(*args)` in `delay` seconds (at most one per key; an earlier one stays)."""
        if key not in self._timers and self.running:
            self._timers[key] = self.loop.call_later(delay, self._run_later, key, callback, args)

    def _run_later(self, key: Hashable, callback: Callable, args: tuple) -> None:
        del self._timers[key]
        if self._held is not None:
            self._held.append((callback, args))
            return
        callback(*args)

    # -- polling -------------------------------------------------------------------------
    def woken(self) -> None:
        """The loop was woken for this device's event: adapt the poll window."""
        self.window.woken(time.monotonic_ns())

    def poll(self, step: Callable[[int], int]) -> bool:
        """Spin for more work while the window is open: `step(max_ns)` serves what comes
        within max_ns (returns how much it served, 0 nothing, < 0 a ring broke). False if a
        ring broke (the caller calls `broken`)."""
        w = self.window
        deadline = time.monotonic_ns() + POLL_SLICE_NS
        ok = True
        while w.ns and self.running and time.monotonic_ns() < deadline:
            n = step(w.ns)
            if n < 0:
                ok = False
                break
            if n == 0:
                break
        w.gave_up()
        return ok

    # -- breakdown -----------------------------------------------------------------------
    def broken(self, queues: Iterable[Virtqueue]) -> None:
        """Some ring broke: stop the device, and ask the driver to reset it (naming each)."""
        self.stop()
        whys = [f"queue {vq.index}: the driver broke the ring ({vq.broken.name.lower()})" for vq in queues
                if vq.broken is not None]
        self.counters["broken"] += 1
        for why in whys or [f"{self.name}: a ring broke"]:
            self._needs_reset(why)

    def _ring_broke(self, e: RingBroken) -> None:
        self.stop()
        self.counters["broken"] += 1
        self._needs_reset(str(e))

    # -- queues served from Python ---------------------------------------------------------
    def serve(self, vq: Virtqueue, handler: Handler, *, budget: int | None = None) -> None:
        """Serve `vq` from Python: its doorbell a reader; each chain to `handler`, at most
        `budget` (default: the worker's) per callback."""
        self._served[vq.index] = (vq, handler, budget or self.budget)
        self.watch(vq.kick_fd, self._kicked, vq)
        self._run(vq)  # doorbells rung before DRIVER_OK

    def resume(self, vq: Virtqueue) -> None:
        """The device can take chains again (soon, not now: the caller may be mid-batch)."""
        if vq.index in self._served:
            self.soon(("serve", vq.index), self._run, vq)

    def _kicked(self, vq: Virtqueue) -> None:
        vq.drain_kick()
        self._run(vq)

    def _run(self, vq: Virtqueue) -> None:
        """One batch: up to the budget, then a continuation; or until the handler says stop
        or the ring is empty (then notifications on again, and a re-check)."""
        entry = self._served.get(vq.index)
        if entry is None or not self.running:
            return
        _, handler, budget = entry
        try:
            for _ in range(budget):
                chain = vq.pop()
                if chain is None:
                    if vq.enable_notify():
                        continue  # came while we were turning notifications on
                    break
                if chain.error is not None:
                    self.counters["bad_chains"] += 1
                    vq.push(chain, 0)
                    continue
                written = handler(chain)
                if written is None:  # the device cannot take it now; it calls resume()
                    vq.unpop(1)
                    break
                vq.push(chain, written)
            else:
                self.counters["budget_spent"] += 1
                self.soon(("serve", vq.index), self._run, vq)
        except RingBroken as e:
            vq.publish()
            self._ring_broke(e)
            return
        vq.publish()
