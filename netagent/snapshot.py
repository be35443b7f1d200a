"""One immutable picture of the agent, published by the main loop for everything that reads it.

The main loop is the single writer of the daemon's state; the HTTP threads (/readyz,
/metrics) and status.json must not read half-updated objects (a dict mutated during a scrape,
a lease replaced between two reads). So the loop builds a `StatusSnapshot` (frozen, with
read-only mappings and copies of anything another thread mutates) and swaps one reference;
readers take that reference and see one consistent moment. No duck typing: every field is
typed, and a snapshot of an agent still starting has its defaults.

Freshness: the loop publishes after every sync and at every turn (it turns at least once a
second, `Daemon._loop`), so a backend's `health()` (a BGP session that drops between syncs)
reaches /readyz and /metrics within a second without the HTTP threads calling backend code.
Time-based values are evaluated at read time from deadlines, not frozen: the lease's expiry is
kept as a monotonic deadline, so a main loop stuck in an etcd retry cannot leave /readyz saying
"lease held" after the lease has run out.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netagent.backends.base import BackendHealth
    from netagent.iptables import RulesState
    from netagent.probe import PeerProbe

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def frozen_map(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of a dict the main loop replaces (never mutates) after publishing."""
    return MappingProxyType(dict(d)) if d else _EMPTY


@dataclass(frozen=True)
class LeaseView:
    """The lease we hold, as /metrics shows it."""

    label: str
    reserved: bool
    ttl: int
    renewals: int
    renew_failures: int
    reacquired: int
    #: monotonic time the etcd lease runs out unless renewed (None for a reservation)
    expires_at: float | None

    def seconds_left(self, now: float) -> float | None:
        return None if self.expires_at is None else max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class EtcdView:
    """The registry's counters (copied: the watch and keepalive threads update them)."""

    errors: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    watch_reconnects: int = 0
    failovers: int = 0


@dataclass(frozen=True)
class StatusSnapshot:
    """Everything status.json, /readyz and /metrics show, at one moment."""

    #: monotonic time the main loop built it
    built_at: float = 0.0
    phase: str = "starting"
    ready: bool = False
    #: readiness conditions at build time ("lease" is re-checked against the deadline)
    checks: Mapping[str, bool] = field(default_factory=lambda: _EMPTY)
    subnet_file_written: bool = False
    backend: str = ""
    subnet: str = ""
    lease_key: str = ""
    public_ip: str = ""
    #: "10.5.0.0/16 + fd00::/48"; "" before the config is known
    network: str = ""
    mtu: int = 0
    peers: int = 0
    last_reconcile: float = 0.0
    reconciles: int = 0
    drift_repairs: int = 0
    kernel_event_repairs: int = 0
    kernel_repair_backoffs: int = 0
    reacquired: int = 0
    backend_programmed: bool = False
    masquerade: str = "off"
    peer_list: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    kernel_entries: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    skipped_peers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    invalid_leases: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    config_error: str = ""
    #: the backend's own machinery at build time (None before a backend exists)
    backend_health: BackendHealth | None = None
    lease: LeaseView | None = None
    etcd: EtcdView = field(default_factory=EtcdView)
    #: our iptables rules (None when neither --ip-masq nor --iptables-forward-rules)
    rules: RulesState | None = None
    #: a userspace data path's packet counters (udp): rx/tx packets and bytes, drops by reason
    packet_counters: Mapping[str, Any] | None = None
    #: the last probe round's results, by peer subnet (None: no prober)
    probes: Mapping[str, PeerProbe] | None = None

    def readiness(self, now: float | None = None) -> dict[str, bool]:
        """The conditions behind READY=1 and /readyz, with the lease checked at `now`."""
        checks = dict(self.checks)
        if "lease" in checks and self.lease is not None:
            left = self.lease.seconds_left(time.monotonic() if now is None else now)
            checks["lease"] = checks["lease"] and left != 0.0
        return checks

    def status_doc(self, peer_list: bool = True) -> dict[str, Any]:
        """status.json, the document `netagent status` reads (keys unchanged since 0.1);
        without ``peer_list`` for a writer that has it encoded already."""
        h = self.backend_health
        doc = {
            "phase": self.phase, "ready": self.ready,
            "subnet_file_written": self.subnet_file_written, "backend": self.backend,
            "subnet": self.subnet, "lease_key": self.lease_key, "public_ip": self.public_ip,
            "mtu": self.mtu, "peers": self.peers, "last_reconcile": self.last_reconcile,
            "reconciles": self.reconciles, "drift_repairs": self.drift_repairs,
            "reacquired": self.reacquired, "backend_programmed": self.backend_programmed,
            "masquerade": self.masquerade,
            # a shallow copy: the entries are the loop's own dicts, never mutated once built
            "peer_list": dict(self.peer_list) if peer_list else {},
            "kernel_entries": dict(self.kernel_entries),
            "skipped_peers": dict(self.skipped_peers),
            "invalid_leases": dict(self.invalid_leases), "config_error": self.config_error,
            "backend_health": {} if h is None else {"ok": h.ok, "detail": h.detail, **h.info},
        }
        if not peer_list:
            del doc["peer_list"]
        return doc
