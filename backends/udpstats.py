"""The udp packet loop's counters: the shape ``backend.stats`` has (read by the metrics
collector) and how a loop's plain local integers get there.

A loop counts in local ints (no lock, no dict of the shared shape per packet) and hands them
over every :data:`FLUSH_EVERY` packets while a burst lasts, or when idle at most every
:data:`FLUSH_INTERVAL`: flushing on every idle moment cost more than forwarding when the loop
wakes up once per ACK.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: packets between counter flushes while a burst lasts (so a scrape is never far behind)
FLUSH_EVERY = 1024

#: seconds: an idle loop flushes its counters at most this often (and at least this late)
FLUSH_INTERVAL = 0.05

DROP_REASONS = ("unknown_source", "spoofed_inner_source", "malformed", "not_for_us",
                "no_route", "ttl_expired", "not_ipv4", "send_error", "tun_write_error")


def new_stats() -> dict[str, Any]:
    """The shape the metrics collector reads (``daemon.backend.stats``)."""
    return {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0,
            # offload effect: TCP segments merged into super-packets on receive, super-packets
            # segmented on send (each send is several tx_packets)
            "rx_gro_merged": 0, "tx_tso_packets": 0,
            "drops": dict.fromkeys(DROP_REASONS, 0)}


class StatsFlusher:
    """Moves the loops' local counters into one shared ``stats`` dict (the only place both
    loop threads write), and says when an idle loop should."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        self._lock = threading.Lock()
        self._flush_at = 0.0  # counters are flushed when idle at most this often
        #: a loop went idle with counts not flushed yet: its poll() must wake up to flush
        self.dirty = False

    def flush(self, counts: dict[str, int], drops: dict[str, int]) -> None:
        """Add a thread's local counters to ``stats`` and zero them."""
        self._flush_at = time.monotonic() + FLUSH_INTERVAL
        with self._lock:
            st = self.stats
            for k, v in counts.items():
                if v:
                    st[k] = st.get(k, 0) + v
                    counts[k] = 0
            d = st["drops"]
            for k, v in drops.items():
                if v:
                    d[k] += v
                    drops[k] = 0

    def due(self, pending: int) -> bool:
        """Whether an idle loop with `pending` unflushed packets should flush now; if not yet,
        :attr:`dirty` makes the sleeping loop wake up within FLUSH_INTERVAL to do it."""
        if not pending:
            return False
        if time.monotonic() >= self._flush_at:
            return True
        self.dirty = True
        return False
