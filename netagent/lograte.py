"""Rate-limited log lines: the first of a kind at once, the rest counted and summarised.

A hostile or broken peer can write a malformed lease value every few milliseconds; each write
is a watch event, and one warning per event would bury every other line of the log (and cost
the main loop a formatted write per event). :class:`LogLimiter` logs the first message of a key
immediately, counts the repeats for ``window`` seconds, and then logs one summary line with the
latest message: ``"... (and 532 more in the last 10 s)"``. The summary comes from
:meth:`LogLimiter.flush`, which the caller runs on its timer (the daemon's loop wakes at least
once a second), so a burst that stops still gets its count logged.

Keys are bounded (``max_keys``): past that, messages share one overflow key, so an attacker
writing to ever new key names cannot grow memory or the log either. Not thread-safe: one
caller (the daemon's main loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

#: the key messages share once max_keys distinct keys are being tracked
OVERFLOW = "*"


@dataclass
class _Window:
    start: float
    suppressed: int
    #: the latest message and its arguments, formatted only if a summary shows it
    last: str
    last_args: tuple[object, ...] = ()


class LogLimiter:
    """One logger, one level; see the module docstring."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING,
                 window: float = 10.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        #: messages suppressed since start (all keys): what a metric or status can show
        self.suppressed_total = 0

    def log(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged within the window; True if logged.
        The message is only formatted when it is logged or is the one a summary will show."""
        now = self.clock()
        if key not in self._windows and len(self._windows) >= self.max_keys:
            key = OVERFLOW
        w = self._windows.get(key)
        if w is not None and now - w.start < self.window:
            w.suppressed += 1
            w.last, w.last_args = msg, args
            self.suppressed_total += 1
            return False
        if w is not None:
            self._summary(w)
        text = msg % args if args else msg
        self._windows[key] = _Window(now, 0, text)
        self.logger.log(self.level, "%s", text)
        return True

    def flush(self) -> None:
        """Log the summary of every window that has ended with repeats; forget ended windows
        (so the key table only holds keys active in the last window)."""
        now = self.clock()
        for key in [k for k, w in self._windows.items() if now - w.start >= self.window]:
            self._summary(self._windows.pop(key))

    def _summary(self, w: _Window) -> None:
        if w.suppressed:
            last = w.last % w.last_args if w.last_args else w.last
            self.logger.log(self.level, "%s (and %d more in the last %g s)", last,
                            w.suppressed, self.window)
            w.suppressed = 0
