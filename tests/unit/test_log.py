"""The VMM's own messages (asyncvmm.log)."""

from __future__ import annotations

from asyncvmm import log


def test_what_a_guest_causes_is_rate_limited(capfd, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(log, "_guest_window", {"start": float("-inf"), "said": 0, "suppressed": 0})
    for i in range(log.GUEST_BURST + 5):
        log.guest(f"bad thing {i}")
    lines = capfd.readouterr().err.splitlines()
    assert lines == [f"asyncvmm: bad thing {i}" for i in range(log.GUEST_BURST)]
    now[0] += log.GUEST_INTERVAL_S
    log.guest("later")
    assert capfd.readouterr().err.splitlines() == ["asyncvmm: 5 more messages about the guest left out",
                                                   "asyncvmm: later"]
    log.info("not the guest's")  # the VMM's own messages are not limited
    assert capfd.readouterr().err == "asyncvmm: not the guest's\n"
