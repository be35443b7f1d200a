"""Prometheus metrics, read from the daemon's latest status snapshot at scrape time.

Why pull: the daemon keeps plain counters already (lease state, registry stats, the status,
backend counters) and its main loop publishes them as one immutable `StatusSnapshot`
(netagent/snapshot.py) at least once a second; reading that when Prometheus scrapes means no
metric updates are sprinkled through the daemon and a scrape can never disagree with
`netagent status` (status.json is written from the same snapshot). The only push-style metric is
the reconcile-duration histogram (a distribution cannot be rebuilt later), fed through the
daemon's sync hook.

Imports only the snapshot types: a snapshot of an agent still starting has its defaults, so a
scrape during start-up works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netagent.snapshot import EtcdView, StatusSnapshot

if TYPE_CHECKING:
    from netagent.backends.base import BackendHealth
    from netagent.probe import PeerProbe

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: reconcile runs from ~1 ms (nothing to do) to seconds (thousands of peers, first sync)
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _gauge(name: str, doc: str, value: float | None = None,
           labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    if labels:
        return GaugeMetricFamily(name, doc, labels=list(labels))
    return GaugeMetricFamily(name, doc, value=value if value is not None else 0.0)


class DaemonCollector(Collector):
    """Everything except the histogram, computed from the latest snapshot on each collect()."""

    def __init__(self, snapshot: Callable[[], StatusSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        now = time.monotonic()
        ready = snap.readiness(now)
        yield _gauge("netagent_ready", "1 when the agent is ready (lease, subnet.env, backend, "
                     "masquerade rules)", float(bool(ready) and all(ready.values())))
        checks = _gauge("netagent_readiness_check", "Each readiness condition (1 = met)",
                        labels=("check",))
        for name, ok in sorted(ready.items()):
            checks.add_metric([name], float(ok))
        yield checks
        yield from self._lease(snap, now)
        yield from self._etcd(snap.etcd)
        yield from self._state(snap)
        yield from self._backend(snap.backend_health)
        yield from self._udp(snap.packet_counters)
        yield from self._reachability(snap.probes)

    @staticmethod
    def _lease(snap: StatusSnapshot, now: float) -> Iterator[Metric]:
        info = _gauge("netagent_lease_info", "The lease this host holds (value is always 1)",
                      labels=("subnet", "network", "backend", "public_ip", "reserved"))
        lease = snap.lease
        if lease is not None:
            info.add_metric([lease.label, snap.network, snap.backend, snap.public_ip,
                             "true" if lease.reserved else "false"], 1.0)
        yield info
        if lease is None:
            return
        left = lease.seconds_left(now)
        if left is not None:
            yield _gauge("netagent_lease_expiry_seconds",
                         "Seconds until our etcd lease expires unless renewed", left)
        yield _gauge("netagent_lease_ttl_seconds", "TTL granted at the last renewal",
                     float(lease.ttl))
        yield CounterMetricFamily("netagent_lease_renewals", "Successful lease keepalives",
                                  value=lease.renewals)
        yield CounterMetricFamily("netagent_lease_renewal_failures",
                                  "Lease keepalives that failed (etcd unreachable etc.)",
                                  value=lease.renew_failures)
        yield CounterMetricFamily("netagent_lease_reacquisitions",
                                  "Times our lease key was lost and re-created",
                                  value=lease.reacquired)

    @staticmethod
    def _etcd(etcd: EtcdView) -> Iterator[Metric]:
        errs = CounterMetricFamily("netagent_etcd_request_errors",
                                   "Failed etcd requests by kind", labels=["kind"])
        for kind, n in sorted(etcd.errors.items()):
            errs.add_metric([kind], n)
        yield errs
        yield CounterMetricFamily("netagent_etcd_watch_reconnects",
                                  "Times the lease watch broke and was resumed",
                                  value=etcd.watch_reconnects)
        yield CounterMetricFamily("netagent_etcd_endpoint_failovers",
                                  "Switches to the next etcd endpoint", value=etcd.failovers)

    @staticmethod
    def _state(snap: StatusSnapshot) -> Iterator[Metric]:
        yield _gauge("netagent_peers", "Peer leases known (other hosts' subnets)",
                     float(snap.peers))
        yield _gauge("netagent_invalid_leases", "Lease keys skipped as malformed",
                     float(len(snap.invalid_leases)))
        ent = _gauge("netagent_kernel_entries", "Kernel entries we own, by kind",
                     labels=("kind",))
        for kind, n in sorted(snap.kernel_entries.items()):
            ent.add_metric([kind], float(n))
        yield ent
        yield CounterMetricFamily("netagent_reconciles", "Backend syncs run",
                                  value=snap.reconciles)
        yield CounterMetricFamily("netagent_drift_repairs",
                                  "Kernel entries restored or removed by the periodic full "
                                  "compare (someone changed our state)",
                                  value=snap.drift_repairs)
        yield CounterMetricFamily("netagent_kernel_event_repairs",
                                  "Kernel entries restored right after the kernel announced "
                                  "their deletion (or their device's)",
                                  value=snap.kernel_event_repairs)
        yield CounterMetricFamily("netagent_kernel_repair_backoffs",
                                  "Kernel deletion events whose repair was deferred because "
                                  "the same entry keeps being deleted",
                                  value=snap.kernel_repair_backoffs)
        if snap.last_reconcile:
            yield _gauge("netagent_last_reconcile_timestamp_seconds",
                         "Unix time of the last backend sync", snap.last_reconcile)
        rules = snap.rules
        if rules is not None and rules.families:
            yield _gauge("netagent_masquerade_rules_in_place",
                         "1 when our iptables rules (--ip-masq masquerade, "
                         "--iptables-forward-rules FORWARD; every address family) were in place "
                         "at the last check", float(rules.in_place))
            yield CounterMetricFamily("netagent_masquerade_repairs",
                                      "Times the masquerade rules were found missing and re-applied",
                                      value=rules.repairs)

    @staticmethod
    def _backend(health: BackendHealth | None) -> Iterator[Metric]:
        """The backend's own gauges (BackendHealth.gauges), one family per name."""
        if health is None:
            return
        yield _gauge("netagent_backend_healthy", "1 when the backend's own machinery (routing "
                     "daemon, userspace WireGuard) is working", float(health.ok))
        families: dict[str, GaugeMetricFamily] = {}
        for g in health.gauges:
            fam = families.get(g.name)
            if fam is None:
                fam = families[g.name] = GaugeMetricFamily(
                    f"netagent_{g.name}", g.help, labels=[k for k, _ in g.labels])
            fam.add_metric([v for _, v in g.labels], g.value)
        yield from families.values()

    @staticmethod
    def _udp(stats: Mapping[str, Any] | None) -> Iterator[Metric]:
        """A userspace data path's counters (the udp backend's), when the backend keeps them."""
        if stats is None:
            return
        pk = CounterMetricFamily("netagent_udp_packets", "Packets through the udp backend",
                                 labels=["direction"])
        by = CounterMetricFamily("netagent_udp_bytes", "Bytes through the udp backend",
                                 labels=["direction"])
        for direction in ("rx", "tx"):
            if f"{direction}_packets" in stats:
                pk.add_metric([direction], float(stats[f"{direction}_packets"]))
            if f"{direction}_bytes" in stats:
                by.add_metric([direction], float(stats[f"{direction}_bytes"]))
        drops = CounterMetricFamily("netagent_udp_drops", "Packets the udp backend dropped",
                                    labels=["reason"])
        for reason, n in sorted(dict(stats.get("drops", {})).items()):
            drops.add_metric([str(reason)], float(n))
        yield pk
        yield by
        yield drops

    @staticmethod
    def _reachability(results: Mapping[str, PeerProbe] | None) -> Iterator[Metric]:
        if results is None:
            return
        reach = _gauge("netagent_peer_reachable",
                       "1 when the peer's overlay gateway answered the last probe",
                       labels=("subnet", "public_ip"))
        rtt = _gauge("netagent_peer_rtt_seconds", "Round-trip time of the last answered probe",
                     labels=("subnet", "public_ip"))
        for subnet, r in sorted(results.items()):
            reach.add_metric([subnet, r.public_ip], float(r.reachable))
            if r.rtt is not None:
                rtt.add_metric([subnet, r.public_ip], r.rtt)
        yield reach
        yield rtt


class Metrics:
    """A private registry (no process/platform collectors of other libraries mixed in)."""

    def __init__(self, snapshot: Callable[[], StatusSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(snapshot))
        self.reconcile = Histogram(
            "netagent_reconcile_duration_seconds", "Time one backend sync took",
            buckets=RECONCILE_BUCKETS, registry=self.registry,
        )

    def observe_reconcile(self, seconds: float) -> None:
        self.reconcile.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
