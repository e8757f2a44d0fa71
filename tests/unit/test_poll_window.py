"""asyncvmm.poll.PollWindow: KVM's halt-polling rule on the whole wait, from the start of the
poll that missed to the wake-up (Documentation/virt/kvm/halt-polling.rst)."""

from __future__ import annotations

import time

from asyncvmm.poll import POLL_MAX_NS, POLL_MIN_NS, PollWindow


def _missed_then_woken(w: PollWindow, after_ns: int) -> None:
    """A poll of the current window found nothing; the event came `after_ns` after it ended."""
    w.gave_up()
    w.woken(time.monotonic_ns() + after_ns)


def test_an_event_within_reach_grows_the_window_from_its_minimum_to_its_maximum():
    w = PollWindow()
    w.gave_up()  # nothing polled yet (window 0): the wait began now
    w.woken(time.monotonic_ns() + 3_000)
    assert w.ns == POLL_MIN_NS
    for _ in range(10):
        _missed_then_woken(w, 1_000)
    assert w.ns == POLL_MAX_NS


def test_an_event_beyond_the_maximum_counting_the_poll_shrinks_the_window():
    # 40 µs after a 50 µs poll ended is 90 µs after it began: no window up to the
    # maximum would have caught it, so polling shrinks (measured from the poll's end, the
    # 40 µs would have kept a window at 50 µs that never catches anything).
    w = PollWindow()
    w.ns = POLL_MAX_NS
    _missed_then_woken(w, 40_000)
    assert w.ns == POLL_MAX_NS // 2
    _missed_then_woken(w, 40_000)  # 25 + 40 µs: still beyond
    assert w.ns == POLL_MAX_NS // 4
    _missed_then_woken(w, 100_000)
    assert w.ns == POLL_MAX_NS // 8
    _missed_then_woken(w, 100_000)
    assert w.ns == 0  # halved below the minimum: off


def test_a_window_of_zero_max_never_polls():
    w = PollWindow(max_ns=0)
    _missed_then_woken(w, 1_000)
    assert w.ns == 0
