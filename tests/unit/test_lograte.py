"""LogLimiter: the first line at once, repeats counted, one summary per window, bounded keys.

Fake time throughout: the limiter's promise is about counts per window, so the tests step the
clock rather than sleep.
"""

from __future__ import annotations

import logging

import pytest

from netagent.lograte import LogLimiter

log = logging.getLogger("test.lograte")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.lograte"]


def test_burst_gives_one_line_then_one_summary_with_the_count(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    lim = LogLimiter(log, window=10, clock=clock)
    assert lim.log("k", "bad value %d", 0)
    for i in range(1, 533):
        clock.now += 0.01
        assert not lim.log("k", "bad value %d", i)
    lim.flush()  # window not over yet: nothing
    assert lines(caplog) == ["bad value 0"]
    clock.now = 110.0
    lim.flush()
    assert lines(caplog) == ["bad value 0", "bad value 532 (and 532 more in the last 10 s)"]
    assert lim.suppressed_total == 532
    lim.flush()  # said once
    assert len(lines(caplog)) == 2
    assert lim.log("k", "bad value %d", 999), "a new window logs at once again"


def test_sustained_flood_is_two_lines_per_window_and_keys_are_independent(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    lim = LogLimiter(log, window=10, clock=clock)
    for _ in range(6000):  # 60 s at one every 10 ms, flushed as the daemon's loop does
        clock.now += 0.01
        lim.log("a", "flood")
        lim.flush()
    lim.log("b", "another peer's problem")
    out = lines(caplog)
    assert "another peer's problem" in out
    assert 10 <= len(out) <= 14, out  # 6 windows: first line + summary each, plus b
    summaries = [m for m in out if "more in the last" in m]
    assert sum(int(m.split("(and ")[1].split()[0]) for m in summaries) + out.count("flood") \
        >= 6000 - 1000, "every write is accounted for except the current window's"


def test_keys_are_bounded_and_overflow_is_summarised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    lim = LogLimiter(log, window=10, max_keys=3, clock=clock)
    for i in range(1000):
        lim.log(f"key{i}", "bad key %d", i)
    assert len(lim._windows) == 4  # 3 keys + the overflow key
    clock.now += 10
    lim.flush()
    out = lines(caplog)
    assert out[:4] == ["bad key 0", "bad key 1", "bad key 2", "bad key 3"]
    assert out[4:] == ["bad key 999 (and 996 more in the last 10 s)"]
    assert lim._windows == {}
