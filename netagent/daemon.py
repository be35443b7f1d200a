"""`netagent run`: compose config, store, lease, peer table and backend, then loop.

Threads: a watch thread, a keepalive thread and a kernel-event thread (netlink notifications of
deleted devices and entries, netagent/kernel/monitor.py) only put items on one queue; the main
thread is the single writer of state and the only caller of the backend, so the kernel is
touched in one place, in order, after the first full lease snapshot is loaded (DESIGN.md "In
sync first").
Decisions are made by pure functions elsewhere (`lease.plan_lease`, `plan.plan_config_change`,
`backends.check_runnable`); the daemon executes them and publishes one frozen
`StatusSnapshot` for status.json, /readyz and /metrics.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from netagent import systemd
from netagent.backends import backend_class, check_runnable
from netagent.backends.base import (
    Backend,
    BackendHealth,
    HostFacts,
    LeaseContribution,
    SyncReport,
)
from netagent.blackhole import BlackholeRoutes
from netagent.config import ConfigError, NetworkConfig, parse_network_config
from netagent.files import (
    RUN_LOCK,
    FileError,
    SubnetEnv,
    previous_subnets,
    render_subnet_env,
    run_lock_holder,
    take_run_lock,
    write_atomic,
)
from netagent.health import HealthServer, Heartbeat, Watchdog, start_servers, watchdog_interval
from netagent.iface import IfaceError, find_iface, find_iface6, public_ipv6_for
from netagent.iptables import IptablesController
from netagent.kernel import Kernel, KernelChange, KernelMonitor, NetlinkKernel, RepairBackoff
from netagent.lease import (
    NO_PUBLIC_IP,
    LeaseAttrs,
    LeaseError,
    OutOfSubnets,
    PeerId,
    decode_lease,
)
from netagent.leasing import LeaseLost, LeaseManager
from netagent.lograte import LogLimiter
from netagent.peers import PeerChanges, PeerTable, RawLease
from netagent.plan import plan_config_change, relabel_notice
from netagent.probe import PeerRows, Prober, probe_targets
from netagent.registry import EtcdSettings, Registry
from netagent.settings import AgentSettings
from netagent.snapshot import EtcdView, LeaseView, StatusSnapshot, frozen_map
from netagent.store import (
    BACKOFF_MAX,
    BACKOFF_START,
    KeyValue,
    RegistryError,
    Store,
    WatchEvent,
    WatchResync,
)

log = logging.getLogger("netagent")

T = TypeVar("T")

EXIT_OK = 0
EXIT_FATAL = 1
#: seconds a starting agent waits for the run lock (a previous agent still stopping)
RUN_LOCK_WAIT = 10.0
EXIT_OUT_OF_SUBNETS = 2
#: seconds of drift repair per turn of the main loop, between looks at the event queue
REPAIR_SLICE = 0.002

#: seconds between full kernel compares when kernel change notifications are running and the
#: operator left --repair-interval at its default: deletions are repaired from the events, the
#: full compare only catches what no event announces (a link set down, a modified entry)
SAFETY_NET_INTERVAL = 60.0


def full_compare_interval(repair_interval: float, interval_set: bool,
                          events_running: bool) -> float:
    """Seconds between periodic full compares. An interval the operator set is kept as is; the
    default one is stretched to SAFETY_NET_INTERVAL while kernel events repair deletions, since
    each full compare costs O(peers) (a dump of every table, ~0.1 s at 5,000 peers)."""
    if interval_set or not events_running:
        return repair_interval
    return max(repair_interval, SAFETY_NET_INTERVAL)


@dataclass(frozen=True)
class LeaseGone:
    """The keepalive thread found our etcd lease expired or revoked (TTL 0)."""


@dataclass(frozen=True)
class ProbeRound:
    """The prober finished a round: status.json should show its results."""


@dataclass(frozen=True)
class KernelChanges:
    """The kernel announced deletions that may be of our devices or entries."""

    changes: tuple[KernelChange, ...]


#: what the watch, keepalive, probe and kernel-event threads put on the main loop's queue
QueueItem = WatchEvent | WatchResync | LeaseGone | ProbeRound | KernelChanges


def status_json(doc: dict[str, Any], encoded: Mapping[str, str] | None = None) -> str:
    """status.json's text: one top-level key a line, sorted, each value compact. Any
    ``indent`` makes the json module fall back from its C encoder to pure Python, ~3.5× slower:
    at 5,000 peers the peer list took ~27 ms a write instead of ~8 ms. ``encoded``: values
    already in JSON text (the peer list, kept encoded row by row: ``PeerRows``)."""
    text = {k: json.dumps(v, sort_keys=True) for k, v in doc.items()}
    text.update(encoded or {})
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {text[k]}" for k in sorted(text)) + "\n}\n"


def etcd_settings(s: AgentSettings) -> EtcdSettings:
    return EtcdSettings(
        endpoints=s.etcd_endpoints, prefix=s.etcd_prefix, cafile=s.etcd_cafile,
        certfile=s.etcd_certfile, keyfile=s.etcd_keyfile, username=s.etcd_username,
        password=s.etcd_password,
    )


def missing_config_message(registry: Store) -> str:
    key = registry.key("config")
    v2 = registry.find_v2_value(key)
    if v2 is not None:
        return (
            f"network config {key} is missing from the etcd v3 store, but the v2 store has it "
            f"(written with ETCDCTL_API=2 etcdctl set). netagent reads only v3: run "
            f"`netagent migrate-v2` or `etcdctl put {key} '<json>'` to copy it"
        )
    return (
        f"network config {key} not found in etcd (v3 API); create it with: etcdctl put {key} "
        "'{\"Network\": \"10.5.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}'"
    )


@dataclass
class AgentStatus:
    """What the agent knows about itself; written to <state-dir>/status.json for the CLI."""

    phase: str = "starting"
    ready: bool = False
    subnet_file_written: bool = False
    backend: str = ""
    subnet: str = ""
    lease_key: str = ""
    public_ip: str = ""
    mtu: int = 0
    peers: int = 0
    last_reconcile: float = 0.0
    reconciles: int = 0
    drift_repairs: int = 0
    #: entries restored (devices re-created count their entries) on a kernel deletion event
    kernel_event_repairs: int = 0
    #: kernel deletion events whose repair was deferred because the entry keeps going away
    kernel_repair_backoffs: int = 0
    reacquired: int = 0
    backend_programmed: bool = False
    #: "off", "in place", or what is wrong with the --ip-masq rules
    masquerade: str = "off"
    #: subnet -> public_ip, backend, reachable, rtt_ms (from the peer probe)
    peer_list: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel_entries: dict[str, int] = field(default_factory=dict)
    skipped_peers: dict[str, str] = field(default_factory=dict)
    invalid_leases: dict[str, str] = field(default_factory=dict)
    #: why the latest network config in etcd was rejected ("" when it is in force)
    config_error: str = ""


class Daemon:
    def __init__(self, settings: AgentSettings, registry: Store | None = None) -> None:
        self.settings = settings
        self.registry: Store = registry or Registry(etcd_settings(settings))
        #: the main loop's working record (only it writes); readers get `snapshot`
        self.status = AgentStatus()
        self.snapshot = StatusSnapshot()
        self.events: queue.Queue[QueueItem] = queue.Queue()
        self.stop = threading.Event()
        self.config: NetworkConfig | None = None
        self.backend: Backend | None = None
        self.leases: LeaseManager | None = None
        self.peers = PeerTable()
        self.contribution: LeaseContribution | None = None
        self._threads: list[threading.Thread] = []
        self._subnets_prefix = self.registry.key("subnets/")
        self._config_key = self.registry.key("config")
        self._config_raw = b""
        #: the config key was deleted (e.g. the whole prefix wiped): peers' lease deletions are
        #: held, not programmed, until a config is back (issue 19 item 2b)
        self._config_missing = False
        self._held_deletes: set[str] = set()
        self.host: HostFacts | None = None
        #: digest of the last status.json written (the text itself is ~3 MB at 20,000 peers)
        self._last_status = b""
        self._status_dirty = False
        self._status_written_at = 0.0
        #: status.json's peer list, row by row (O(changed rows) per write)
        self._rows = PeerRows()
        self._rows_of = 0  # id() of the PeerTable the rows were made from
        self.status.peer_list = self._rows.rows
        #: problems already logged, so a retry loop logs each once
        self._warned: set[str] = set()
        #: hostile-input lines (malformed leases): first at once, repeats summarised per 10 s
        self.log_limiter = LogLimiter(log)
        #: "reconciled: ..." lines: a peer rewriting valid values every few ms must not make
        #: one line per sync either
        self.sync_log = LogLimiter(log, logging.INFO)
        self.last_sync_seconds = 0.0
        # operations wiring (health/metrics servers, masquerade, probe, watchdog)
        self.rules = IptablesController(
            enabled=settings.iptables, ip_masq=settings.ip_masq,
            forward=settings.iptables_forward_rules,
            random_fully=not settings.ip_masq_fully_random_disable)
        #: --ip-blackhole-route: re-checked with the iptables rules
        self.blackholes = BlackholeRoutes(settings.ip_blackhole_route, self.make_kernel)
        self.prober: Prober | None = None
        self.heartbeat = Heartbeat(limit=60.0)
        #: called with each sync's duration in seconds (the metrics histogram)
        self.sync_hooks: list[Callable[[float], None]] = []
        self._servers: list[HealthServer] = []
        self._notified_ready = False
        #: our subnet was lost and no other was free: not ready until restarted
        self.out_of_subnets = False
        # kernel events: per-entry back-off, repairs deferred by it, what the next sync is for
        self.backoff = RepairBackoff(cap=settings.repair_interval)
        self._deferred: dict[tuple[Any, ...], KernelChange] = {}
        self._deferred_at = math.inf
        self._event_apply = False
        self._event_full = False
        #: the kernel-event thread is reading notifications (else deletions wait for the timer)
        self.events_running = False
        #: the drift repair under way in slices (Backend.repair_steps), and when it began
        self._repair: Generator[None, None, SyncReport] | None = None
        self._repair_began = 0.0

    # ------------------------------------------------------------------ start-up steps

    def _phase(self, phase: str) -> None:
        self.status.phase = phase
        systemd.notify(f"STATUS={phase}")
        self._write_status()

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        """Call fn until it succeeds or we are stopped, backing off 100 ms → 5 s."""
        delay = BACKOFF_START
        while not self.stop.is_set():
            try:
                return fn()
            except RegistryError as exc:
                if exc.kind == "config":
                    raise
                log.warning("%s: %s (retrying in %.1f s)", what, exc, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        return None

    def _set_config_error(self, why: str) -> None:
        """Show why the latest config is not in force (status.json `config_error`)."""
        if why != self.status.config_error:
            self.status.config_error = why
            self._write_status()

    def load_config(self) -> NetworkConfig | None:
        """Read <prefix>/config; retry every second until present, valid and runnable (like
        flannel; a config this agent cannot run is waited out the same way, reported in
        status.json and the log, with /readyz false)."""
        key = self.registry.key("config")
        last_msg = ""
        while not self.stop.is_set():
            msg = ""
            try:
                kv = self.registry.get(key)
                if kv is None:
                    msg = missing_config_message(self.registry)
                else:
                    config = parse_network_config(kv.value)
                    why = check_runnable(config)
                    if not why:
                        self._config_raw = kv.value
                        self._set_config_error("")
                        return config
                    msg = f"network config {key} cannot be used: {why}"
                    self._set_config_error(why)
            except ConfigError as exc:
                msg = f"network config {key} is invalid: {exc}"
                self._set_config_error(str(exc))
            except RegistryError as exc:
                if exc.kind == "config":
                    raise
                msg = f"cannot read {key}: {exc}"
            if msg != last_msg:
                log.error("%s (retrying every second)", msg)
                last_msg = msg
            self.stop.wait(1.0)
        return None

    def make_backend(self, config: NetworkConfig, host: HostFacts) -> Backend:
        """A backend instance for `config` (the unit tests give theirs a fake kernel)."""
        return backend_class(config.backend.type)(config, host)

    def make_kernel(self) -> Kernel:
        """The kernel the blackhole routes are written through (the unit tests give a fake)."""
        return NetlinkKernel()

    def make_prober(self, config: NetworkConfig) -> Prober | None:
        """The peer reachability prober (ICMP to each peer's overlay gateway), started; none
        for alloc, which carries no traffic (nor in the unit tests, which send no packets)."""
        if config.backend.type == "alloc":
            return None
        return Prober(lambda: probe_targets(self.peers.peers), self.stop,
                      on_round=lambda: self.events.put(ProbeRound())).start()

    def host_facts(self, config: NetworkConfig | None = None) -> HostFacts:
        s = self.settings
        config = config or self.config
        if config is not None and not config.enable_ipv4:
            # IPv6-only: the interface is chosen by its IPv6 side (the host may have no IPv4
            # at all) and the lease's PublicIP is 0.0.0.0, as flannel writes it
            iface6, addr6, only6 = find_iface6(s.iface, s.iface_regex, s.public_ipv6,
                                               can_reach=s.iface_can_reach)
            log.info("using interface %s (index %d, MTU %d, address %s), public IPv6 %s "
                     "(IPv6-only network)", iface6.name, iface6.index, iface6.mtu, addr6, only6)
            return HostFacts(iface6.name, iface6.index, iface6.mtu, NO_PUBLIC_IP, NO_PUBLIC_IP,
                             Path(s.state_dir), only6, iface_addr6=addr6)
        iface, addr, public = find_iface(s.iface, s.iface_regex, s.public_ip,
                                         can_reach=s.iface_can_reach)
        public6 = None
        if config is not None and config.enable_ipv6:
            public6 = public_ipv6_for(iface, s.public_ipv6)
        log.info("using interface %s (index %d, MTU %d, address %s), public IP %s%s",
                 iface.name, iface.index, iface.mtu, addr, public,
                 f", public IPv6 {public6}" if public6 else "")
        return HostFacts(iface.name, iface.index, iface.mtu, addr, public, Path(s.state_dir),
                         public6, iface_addr6=public6 if public6 in iface.addrs6 else None)

    def subnet_env(self) -> SubnetEnv:
        assert self.config is not None and self.leases is not None
        assert self.contribution is not None
        lease = self.leases.lease
        return SubnetEnv(self.config.network, lease.subnet, self.contribution.mtu,
                         self.settings.ip_masq, self.config.ipv6_network, lease.ipv6_subnet)

    def write_subnet_env(self) -> bool:
        """(Re)write subnet.env when its content differs; False (and logged) on failure."""
        path = Path(self.settings.subnet_file)
        text = render_subnet_env(self.subnet_env())
        try:
            if path.exists() and path.read_text() == text:
                self.status.subnet_file_written = True
                return True
        except OSError:
            pass
        try:
            write_atomic(path, text)
        except FileError as exc:
            if str(exc) not in self._warned:
                log.error("%s (previous file left as it was; retrying)", exc)
                self._warned.add(str(exc))
            return False
        self._warned = {w for w in self._warned if str(path) not in w}
        self.status.subnet_file_written = True
        log.info("wrote %s", path)
        return True

    # ------------------------------------------------------------------ run

    def readiness(self, health: BackendHealth | None = None) -> dict[str, bool]:
        """The conditions behind READY=1 and /readyz; all must hold (main loop only: the
        HTTP threads read them from the snapshot)."""
        leases = self.leases
        held = leases is not None and leases.state is not None and leases.seconds_left() != 0.0
        if health is None and self.backend is not None:
            health = self.backend.health()
        checks = {
            "lease": held and not self.out_of_subnets,
            "subnet_env": self.status.subnet_file_written,
            "backend": self.status.backend_programmed and (health is None or health.ok),
        }
        if self.settings.ip_masq:
            checks["masquerade"] = self.rules.state().in_place
        return checks

    def _publish(self) -> StatusSnapshot:
        """Build and swap in the immutable snapshot status.json, /readyz and /metrics read
        (netagent/snapshot.py); called by the main loop at every turn and status write."""
        st, leases, backend = self.status, self.leases, self.backend
        lease = None
        if leases is not None and leases.state is not None:
            state = leases.state
            left = leases.seconds_left()
            lease = LeaseView(state.lease.label, state.lease.reserved, state.ttl,
                              state.renewals, state.renew_failures, state.reacquired,
                              None if left is None else time.monotonic() + left)
        health = backend.health() if backend is not None else None
        counters = None
        if backend is not None and backend.stats is not None:
            raw = dict(backend.stats)  # the packet loop updates it in place: copy
            counters = frozen_map({**raw, "drops": frozen_map(raw.get("drops"))})
        reg = self.registry.stats
        cfg = self.config
        self.snapshot = StatusSnapshot(
            built_at=time.monotonic(), phase=st.phase, ready=st.ready,
            checks=frozen_map(self.readiness(health)),
            subnet_file_written=st.subnet_file_written, backend=st.backend, subnet=st.subnet,
            lease_key=st.lease_key, public_ip=st.public_ip,
            network=" + ".join(str(n) for n in (cfg.network, cfg.ipv6_network) if n)
            if cfg is not None else "",
            mtu=st.mtu, peers=st.peers, last_reconcile=st.last_reconcile,
            reconciles=st.reconciles, drift_repairs=st.drift_repairs, reacquired=st.reacquired,
            kernel_event_repairs=st.kernel_event_repairs,
            kernel_repair_backoffs=st.kernel_repair_backoffs,
            backend_programmed=st.backend_programmed, masquerade=st.masquerade,
            # the loop's live rows (PeerRows, updated row by row): only the loop's own
            # status write reads them, so a view and not an O(peers) copy
            peer_list=MappingProxyType(st.peer_list), kernel_entries=frozen_map(st.kernel_entries),
            skipped_peers=frozen_map(st.skipped_peers),
            invalid_leases=frozen_map(st.invalid_leases), config_error=st.config_error,
            backend_health=health, lease=lease,
            etcd=EtcdView(frozen_map(reg.errors), reg.watch_reconnects, reg.failovers),
            rules=self.rules.state() if self.rules.enabled else None,
            packet_counters=counters,
            probes=MappingProxyType(self.prober.results) if self.prober is not None else None)
        return self.snapshot

    def _start_ops(self) -> None:
        """Health/metrics servers and the watchdog run from the start, so liveness answers
        while we wait for etcd."""
        s = self.settings
        if s.healthz_port or s.metrics_port:
            from netagent.metrics import Metrics

            metrics = Metrics(lambda: self.snapshot)
            self.sync_hooks.append(metrics.observe_reconcile)
            self._servers = start_servers(s.healthz_ip, s.healthz_port, s.metrics_port,
                                          lambda: self.snapshot.readiness(), metrics.render)
        interval = watchdog_interval(os.environ)
        if interval is not None:
            self.heartbeat.limit = max(2 * interval, 1.0)
            Watchdog(interval, self.heartbeat.alive, systemd.notify, self.stop).start()

    def _masquerade(self) -> None:
        """Our iptables rules (netagent/iptables.py) for the network and lease in force."""
        cfg, leases = self.config, self.leases
        if cfg is None or leases is None or leases.state is None:
            if not self.rules.enabled:
                self.rules.reconcile(None, None, None, None)  # the clean-up of old chains
            return
        lease = leases.lease
        self.rules.reconcile(cfg.network, lease.subnet, cfg.ipv6_network, lease.ipv6_subnet)
        if self.rules.enabled:
            self.status.masquerade = self.rules.summary
        self.blackholes.reconcile([lease.subnet, lease.ipv6_subnet])

    def _lock(self) -> int | None:
        """Hold the state dir's run lock (``netagent cleanup`` refuses while it is held).
        Another holder: an agent still stopping (a restart overlapping) or a cleanup running;
        wait up to RUN_LOCK_WAIT seconds, then give up: two agents on one state dir would
        fight over the same kernel entries."""
        deadline = time.monotonic() + RUN_LOCK_WAIT
        while not self.stop.is_set():
            fd = take_run_lock(self.settings.state_dir)
            if fd is not None:
                return fd
            if time.monotonic() >= deadline:
                holder = run_lock_holder(self.settings.state_dir)
                log.error("another netagent (agent or cleanup, PID %s) holds %s; not starting",
                          holder or "unknown", Path(self.settings.state_dir) / RUN_LOCK)
                return None
            self.stop.wait(0.2)
        return None

    def run(self) -> int:
        lock: int | None = None
        try:
            lock = self._lock()
            if lock is None:
                return EXIT_FATAL
            self._start_ops()
            return self._run()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_FATAL
        except RegistryError as exc:
            log.error("etcd: %s", exc)
            return EXIT_FATAL
        except IfaceError as exc:
            log.error("%s", exc.args[0] if exc.args else exc)
            return EXIT_FATAL
        finally:
            self.stop.set()
            systemd.notify("STOPPING=1")
            for t in self._threads:
                t.join(timeout=5)
            if self.backend is not None:
                self.backend.shutdown()
            self.registry.close()
            for srv in self._servers:
                srv.stop()
            if lock is not None:
                os.close(lock)  # releases the run lock (the file stays: its PID is advisory)

    def _run(self) -> int:
        self._phase("waiting for network config")
        self.config = self.load_config()
        if self.config is None:
            return EXIT_OK
        cfg = self.config
        if cfg.backend_defaulted:
            log.info("no Backend in the network config: using %s (netagent's default)",
                     cfg.backend.type)
        if cfg.enable_ipv4:
            log.info("network %s, subnets /%d from %s to %s, backend %s", cfg.network,
                     cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.backend.type)
        if cfg.enable_ipv6:
            log.info("IPv6 network %s, subnets /%d from %s to %s%s", cfg.ipv6_network,
                     cfg.ipv6_subnet_len, cfg.ipv6_subnet_min, cfg.ipv6_subnet_max,
                     "" if cfg.enable_ipv4 else f", backend {cfg.backend.type} (IPv6-only)")
        host = self.host = self.host_facts()
        self.status.public_ip = str(host.public_ip if cfg.enable_ipv4 else host.public_ipv6)
        self.backend = self.make_backend(cfg, host)
        self.status.backend = cfg.backend.type
        self._phase("preparing backend")
        self.contribution = self.backend.prepare()
        attrs = LeaseAttrs(public_ip=host.public_ip, public_ipv6=host.public_ipv6,
                           backend_type=self.contribution.backend_type,
                           backend_data=self.contribution.backend_data,
                           backend_v6_data=self.contribution.backend_v6_data)
        previous, previous6 = previous_subnets(self.settings.subnet_file)
        self.leases = LeaseManager(self.registry, cfg, attrs, ttl=self.settings.subnet_lease_ttl,
                                   previous_subnet=previous, previous_subnet6=previous6,
                                   lease_file=Path(self.settings.state_dir) / "etcd-leases")
        # One listing at one revision serves the lease choice and the peer table (the watch
        # resumes after it): at 5,000 leases each listing costs ~0.3 s of start-up.
        self._phase("loading peer leases")
        listed = self._retry("listing leases",
                             lambda: self.registry.list_prefix(self.registry.key("")))
        if listed is None:
            return EXIT_OK
        items, revision = listed
        self._phase("acquiring lease")
        # the listing serves the first try only: a retry after an error lists afresh (a create
        # whose answer was lost may have made our key, and only a new listing shows it)
        first: list[list[KeyValue]] = [items]
        leases = self.leases
        try:
            lease = self._retry("acquiring a subnet lease",
                                lambda: leases.acquire(listing=first.pop() if first else None))
        except OutOfSubnets as exc:
            log.error("%s; not writing %s", exc, self.settings.subnet_file)
            return EXIT_OUT_OF_SUBNETS
        if lease is None:
            return EXIT_OK
        self._lease_changed()
        if self.leases.dropped:  # deleted after the listing; their delete events follow
            gone = {self._subnets_prefix + name for name in self.leases.dropped}
            items = [kv for kv in items if kv.key not in gone]
        for kv in items:  # the config may have changed since we read it: handle it in the loop
            if kv.key == self._config_key and kv.value != self._config_raw:
                self.events.put(WatchEvent("put", kv.key, kv.value, 0, kv.mod_revision))
        # before the peer table fills: this phase's status.json write then carries no O(peers)
        # peer list ahead of the first kernel write (~30 ms at 5,000 peers)
        self._phase("programming backend")
        self.peers = PeerTable(lease.ident, cfg.primary_network, own_ipv6=lease.ipv6_subnet,
                               network6=cfg.ipv6_network)
        self._log_rejected(self.peers.reset(self._raw(items), decoded=self.leases.listed))
        self.leases.listed = {}
        del listed, items  # ~2.5 MB at 5,000 peers, otherwise held for the agent's lifetime
        self._sync(None)
        self._masquerade()
        self.write_subnet_env()
        self._start_threads(revision + 1)
        # everything built so far lives as long as the agent: keep the cyclic GC off it
        gc.collect()
        gc.freeze()
        self.prober = self.make_prober(cfg)
        self._loop()
        log.info("stopping; kernel state and lease left in place")
        return EXIT_OK

    def _lease_changed(self) -> None:
        assert self.leases is not None and self.backend is not None
        lease = self.leases.lease
        self.backend.activate(lease)
        self.status.subnet = lease.label
        self.status.lease_key = self.leases.key
        self.status.mtu = self.contribution.mtu if self.contribution else 0
        self.status.reacquired = self.leases.state.reacquired if self.leases.state else 0

    def _raw(self, items: Iterable[KeyValue]) -> list[RawLease]:
        out = []
        for kv in items:
            if not kv.key.startswith(self._subnets_prefix):
                continue
            out.append(RawLease(kv.key[len(self._subnets_prefix):], kv.value, kv.lease_id,
                                kv.mod_revision))
        return out

    def _start_threads(self, start_revision: int) -> None:
        def watch() -> None:
            # one watch for the config and the subnets, resumable from one revision
            for item in self.registry.watch_prefix(self.registry.key(""), start_revision, self.stop):
                self.events.put(item)

        def keepalive() -> None:
            assert self.leases is not None
            while not self.stop.wait(self.leases.keepalive_interval()):
                if not self.leases.renew():
                    self.events.put(LeaseGone())

        targets: list[tuple[str, Callable[[], None]]] = [("watch", watch),
                                                         ("keepalive", keepalive)]
        monitor = self.make_monitor()
        if monitor is not None:
            def kernel_events() -> None:
                try:
                    self.events_running = True
                    monitor.run(self.stop,
                                lambda ch: self.events.put(KernelChanges(tuple(ch))))
                except OSError as exc:  # the periodic repair still covers everything
                    log.error("kernel change notifications stopped: %s", exc)
                finally:
                    self.events_running = False
                    monitor.close()

            targets.append(("kernel-events", kernel_events))
        for name, target in targets:
            t = threading.Thread(target=target, name=f"netagent-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def make_monitor(self) -> KernelMonitor | None:
        """The kernel change notifications socket; None (the periodic repair alone) when the
        kernel refuses it."""
        try:
            return KernelMonitor()
        except OSError as exc:
            log.warning("no kernel change notifications (%s): deleted entries come back with "
                        "the periodic repair only", exc)
            return None

    def _loop(self) -> None:
        assert self.leases is not None
        interval = self._full_compare_interval()
        next_repair = time.monotonic() + interval
        next_file_check = time.monotonic() + self.settings.repair_interval
        resync = float(self.settings.iptables_resync)
        next_rules = time.monotonic() + resync
        while not self.stop.is_set():
            self.heartbeat.beat()
            self.log_limiter.flush()
            self.sync_log.flush()
            if self._status_dirty:
                self._write_status(soon=True)
            checks = self.readiness()
            ready = all(checks.values())
            if ready != self.status.ready:
                self.status.ready = ready
                self._phase("running" if ready else "not ready: " + ", ".join(
                    k for k, ok in checks.items() if not ok))
            else:
                if time.monotonic() - self.snapshot.built_at >= 0.5:
                    # at least once a second (the loop turns that often when idle): backend
                    # health, counters; not at every turn of a drift repair in slices
                    self._publish()
                if ready and not self._notified_ready:
                    self._notified_ready = True
                    systemd.notify("READY=1")
                    log.info("ready: subnet %s, %d peers", self.leases.lease.label,
                             len(self.peers.peers))
            if self._full_compare_interval() != interval:  # the event thread started or stopped
                last = next_repair - interval
                interval = self._full_compare_interval()
                next_repair = last + interval
            retry = self._deferred_at if self._deferred else math.inf
            timeout = max(0.0, min(next_repair, next_file_check, next_rules, retry)
                          - time.monotonic())
            if self._repair is not None or self._rows.pending:  # work in slices: only look
                timeout = 0.0
            try:
                item = self.events.get(timeout=min(timeout, 1.0))
            except queue.Empty:
                item = None
            changed: set[PeerId] = set()
            full = repair = False
            # squash everything queued into one sync
            while item is not None:
                res = self._handle(item)
                if res is None:
                    full = True  # a config change, a new listing, a new lease of ours
                else:
                    changed |= res
                try:
                    item = self.events.get_nowait()
                except queue.Empty:
                    item = None
            if self.stop.is_set():
                break
            if self._deferred and time.monotonic() >= self._deferred_at:
                deferred = list(self._deferred.values())
                self._deferred.clear()
                self._deferred_at = math.inf
                if self._kernel_event(deferred) is None:
                    full = True
            event, self._event_apply, self._event_full = (
                self._event_apply or self._event_full, False, False)
            if time.monotonic() >= next_repair:
                repair = not full  # what an event explains is not drift
                next_repair = time.monotonic() + interval
            if time.monotonic() >= next_file_check:  # a stat: on --repair-interval as before
                next_file_check = time.monotonic() + self.settings.repair_interval
                if not self.status.subnet_file_written or not Path(self.settings.subnet_file).exists():
                    self.status.subnet_file_written = False
                    self.write_subnet_env()
            if time.monotonic() >= next_rules:  # --iptables-resync
                next_rules = time.monotonic() + resync
                self._masquerade()
            if full:  # a config change, a new listing: one whole sync, any repair dropped
                self._drop_repair()
                self._sync(None, event=event)
            else:
                if changed or event:
                    self._sync(frozenset(changed), event=event)
                if repair and self._repair is None:
                    self._start_repair()
                if self._repair is not None:
                    self._repair_slice()
            if self._rows.pending:  # a probe round's rows, a slice a turn
                self._rows.refresh(self.peers.peers)
                if not self._rows.pending:
                    # at once, as before the rows were kept: a round's results reach
                    # status.json no later than the events queued after the round
                    self._write_status()

    def _start_repair(self) -> None:
        """The periodic full compare, run in slices between events (DESIGN.md "No stall
        during drift repair")."""
        assert self.backend is not None
        self._repair = self.backend.repair_steps(self.peers.peers)
        self._repair_began = time.monotonic()

    def _drop_repair(self) -> None:
        if self._repair is not None:
            self._repair.close()
            self._repair = None

    def _repair_slice(self, budget: float = REPAIR_SLICE) -> None:
        """Run the drift repair for about ``budget`` seconds (whole steps); its sync report
        is booked when it ends."""
        assert self._repair is not None
        until = time.monotonic() + budget
        try:
            # an event that arrives meanwhile waits for one step (~1 ms), not the whole slice
            while time.monotonic() < until and self.events.empty():
                next(self._repair)
            return
        except StopIteration as done:
            report: SyncReport = done.value
            self.status.backend_programmed = True
        except Exception:  # a backend bug must not kill the agent; retried next cycle
            log.exception("drift repair failed")
            report = SyncReport(failed=1)
            self.status.backend_programmed = False
        self._repair = None
        self._booked(report, self._repair_began, repair=True)

    def _full_compare_interval(self) -> float:
        events = self.events_running and self.backend is not None \
            and self.backend.repairs_from_events
        return full_compare_interval(self.settings.repair_interval,
                                     self.settings.repair_interval_set, events)

    def _handle(self, item: QueueItem) -> set[PeerId] | None:
        """Apply one queued item to state; return changed subnets (None = needs a full sync)."""
        assert self.leases is not None
        if isinstance(item, LeaseGone):
            return self._recover("our etcd lease expired or was revoked")
        if isinstance(item, ProbeRound):  # every row changes: redone in slices, then written
            if self.prober is not None:
                self._rows.new_round(self.peers.peers, self.prober.results)
            return set()
        if isinstance(item, KernelChanges):
            return self._kernel_event(item.changes)
        if isinstance(item, WatchResync):
            cfg_kv = next((kv for kv in item.items if kv.key == self._config_key), None)
            if cfg_kv is not None and cfg_kv.value != self._config_raw:
                self._config_event(cfg_kv.value)
            elif cfg_kv is not None:
                self._release_held_deletes()
            elif not self._config_missing:
                self._config_event(None)
            raws = self._raw(item.items)
            own_name = self.leases.key[len(self._subnets_prefix):]
            if not any(r.name == own_name for r in raws):
                self._recover("our lease key is missing after a re-list")
            if self._config_missing:  # no config (a wiped or new etcd): add, never remove
                listed = {r.name for r in raws}
                for raw in raws:
                    self._log_rejected(self.peers.put(raw))
                self._held_deletes = {lease.key for lease in self.peers.peers.values()
                                      if lease.key not in listed} | (self._held_deletes - listed)
                return None
            changes = self.peers.reset(raws)
            self._log_rejected(changes)
            return None
        if isinstance(item, WatchEvent):
            if item.key == self._config_key:
                return self._config_event(item.value if item.kind == "put" else None)
            if not item.key.startswith(self._subnets_prefix):
                return set()
            name = item.key[len(self._subnets_prefix):]
            if item.key == self.leases.key:
                return self._own_key_event(item)
            if item.kind == "put":
                self._held_deletes.discard(name)
                changes = self.peers.put(RawLease(name, item.value, item.lease_id, item.revision))
                self._log_rejected(changes)
            elif self._config_missing:
                self._held_deletes.add(name)
                return set()
            else:
                changes = self.peers.delete(name)
            return set(changes.changed)
        return set()

    def _kernel_event(self, changes: Iterable[KernelChange]) -> set[PeerId] | None:
        """Deletions the kernel announced: the backend's own ones are repaired now (entries:
        marked for the next apply; a device: a full sync re-creates it), unless the same entry
        keeps going away, which backs off (DESIGN.md "Event-driven repair")."""
        backend = self.backend
        if backend is None:
            return set()
        now = time.monotonic()
        accepted: list[KernelChange] = []
        for ch in changes:
            if not backend.owns_change(ch):
                continue  # the echo of our own delete, a foreign route, another device
            key = (ch.kind, ch.name or ch.key)  # a device by name: re-created, it has a new index
            due = self.backoff.due(key, now)
            if due > now:
                self.status.kernel_repair_backoffs += 1
                self._deferred[key] = ch
                self._deferred_at = min(self._deferred_at, due)
                continue
            self.backoff.repaired(key, now)
            self._deferred.pop(key, None)
            if not self._deferred:
                self._deferred_at = math.inf
            accepted.append(ch)
        if not accepted:
            return set()
        if backend.entries_gone(accepted):
            self._event_apply = True
            return set()
        self._event_full = True
        return None

    def _own_key_event(self, ev: WatchEvent) -> set[PeerId] | None:
        assert self.leases is not None
        if ev.kind == "delete":
            return self._recover("our lease key was deleted")
        try:
            seen = decode_lease(ev.key[len(self._subnets_prefix):], ev.value, ev.lease_id)
        except LeaseError as exc:
            log.error("our lease key was overwritten with an unreadable value (%s); restoring", exc)
            self.leases.restore()
            return set()
        if seen.attrs.host_ip != self.leases.public_ip:
            log.error("our lease key %s was overwritten by %s", ev.key, seen.attrs.host_ip)
            return self._recover("our subnet was taken over")
        if self.leases.state is not None and seen.lease_id != self.leases.lease.lease_id:
            kind = "a reservation" if seen.reserved else f"etcd lease {seen.lease_id:016x}"
            log.info("our lease key is now %s; following it", kind)
            self.leases.state.lease = seen
        return set()

    # ------------------------------------------------------------------ live reconfiguration

    def _config_event(self, raw: bytes | None) -> set[PeerId] | None:
        """A new <prefix>/config: validate it, then apply it live (None = full sync needed)."""
        if raw is None:
            log.warning("network config %s was deleted; keeping the running configuration and "
                        "the peers we know (their lease deletions wait for a config)",
                        self._config_key)
            self._config_missing = True
            self._set_config_error(f"{self._config_key} deleted from etcd: running on the last "
                                   "known good configuration and peers until it is back")
            return set()
        released = self._release_held_deletes()
        if raw == self._config_raw:
            return None if released else set()
        try:
            new = parse_network_config(raw)
            why = check_runnable(new)
        except ConfigError as exc:
            why = str(exc)
        if why:
            self._set_config_error(why)
            log.error("new network config rejected (%s); the running configuration stays in "
                      "force", why)
            return set()
        self._set_config_error("")
        self._config_raw = raw
        if new == self.config:
            return None if released else set()
        self._apply_config(new)
        return None

    def _release_held_deletes(self) -> bool:
        """A config is back: apply the peer deletions held meanwhile (the keys not re-put)."""
        if not self._config_missing:
            return False
        self._config_missing = False
        if self.status.config_error.endswith("until it is back"):
            self._set_config_error("")
        held, self._held_deletes = self._held_deletes, set()
        for name in sorted(held):
            self.peers.delete(name)
        if held:
            log.info("network config is back: %d peer lease(s) deleted meanwhile removed", len(held))
        return bool(held)

    def _apply_config(self, new: NetworkConfig) -> None:
        """Switch to `new` without a restart, executing `plan_config_change`'s steps (DESIGN.md
        "Live reconfiguration"): new backend first, the old one's removal where the plan puts
        it; a step that fails keeps (or restores) the running backend."""
        assert self.config is not None and self.leases is not None and self.host is not None
        assert self.backend is not None
        old_cfg, old_backend, old_host = self.config, self.backend, self.host
        lease = self.leases.lease
        plan = plan_config_change(old_cfg, new, lease, self.host.public_ipv6)
        log.warning("network config changed: backend %s -> %s, network %s -> %s; applying live "
                    "(%s)", old_cfg.backend.type, new.backend.type, old_cfg.network,
                    new.network, ", ".join(plan.steps))
        if plan.release_old_first:
            old_backend.shutdown()
        if plan.teardown_old_first:
            self._teardown(old_backend, old_cfg.backend.type)
        if plan.refresh_host:
            try:  # IPv6 turned on, or IPv4 on/off: the host's public addresses change
                self.host = self.host_facts(new)
            except IfaceError as exc:
                log.error("cannot enable IPv6 (%s); keeping the current config", exc)
                if plan.release_old_first:
                    old_backend.prepare()
                return
        backend = self.make_backend(new, self.host)
        try:
            contribution = backend.prepare()
        except Exception as exc:  # noqa: BLE001 - keep running on the old config
            log.error("cannot set up backend %s (%s); keeping %s", new.backend.type, exc,
                      old_cfg.backend.type)
            if plan.same_device:
                old_backend.prepare()
            return
        if plan.teardown_old_after_prepare:
            # another backend: its device is ready; the old entries go now, just before the
            # new ones are programmed, because both may want the same route keys
            self._teardown(old_backend, old_cfg.backend.type)
            old_backend.shutdown()
        if plan.drop_families:
            self._drop_families(old_cfg, old_host, list(plan.drop_families))
        self.config = new
        self.leases.config = new
        self.peers.set_network(new.primary_network, new.ipv6_network)
        attrs = LeaseAttrs(public_ip=self.host.public_ip, public_ipv6=self.host.public_ipv6,
                           backend_type=contribution.backend_type,
                           backend_data=contribution.backend_data,
                           backend_v6_data=contribution.backend_v6_data)
        self.backend, self.contribution = backend, contribution
        self.status.backend = new.backend.type
        if plan.keeps_lease:
            self.leases.update_attrs(attrs)
        else:
            renumbering, notice = relabel_notice(lease, new)
            log.log(logging.ERROR if renumbering else logging.WARNING, "%s", notice)
            self.leases.attrs = attrs
            # the subnets that still fit are kept (an address family turned on or off changes
            # the key, not the other family's subnet); the old key goes once the new one exists
            self.leases.previous_subnet = plan.kept_subnet
            self.leases.previous_subnet6 = plan.kept_subnet6
            try:
                self._retry("leasing a subnet in the new network",
                            lambda: self.leases.acquire(replacing=lease))  # type: ignore[union-attr]
            except OutOfSubnets as exc:
                log.error("%s", exc)
                self.out_of_subnets = True
                return
            self.peers.set_own(self.leases.lease.ident, self.leases.lease.ipv6_subnet)
        self._lease_changed()
        self._sync(None)
        self._masquerade()
        self.write_subnet_env()
        log.info("now running %s on %s", new.backend.type, self.leases.lease.label)

    def _drop_families(self, old: NetworkConfig, host: HostFacts, families: list[int]) -> None:
        """An address family turned off: its entries and device go, and only those. An
        instance of the old backend that knows that family alone sweeps what it owns, so the
        other family's entries stay untouched for the new backend to adopt as they are."""
        for family in families:
            name = f"{old.backend.type} IPv{family}"
            try:
                part = self.make_backend(old.only_family(family), host)
                part.prepare_teardown()  # finds the devices as they are
            except Exception:  # noqa: BLE001 - the switch goes on; what is left stays, logged
                log.exception("removing the %s entries failed", name)
                continue
            self._teardown(part, name)
            part.shutdown()

    @staticmethod
    def _teardown(backend: Backend, name: str) -> None:
        try:
            backend.teardown()
        except Exception:  # noqa: BLE001 - leftovers are swept by the next full sync or start
            log.exception("removing the %s backend's kernel entries failed", name)

    def _recover(self, why: str) -> set[PeerId] | None:
        assert self.leases is not None
        log.warning("%s; re-acquiring subnet %s", why, self.leases.lease.label)
        old = self.leases.lease.ident
        try:
            self._retry("re-acquiring our lease", self.leases.reacquire)
        except LeaseLost as exc:
            log.error("%s", exc)
        except OutOfSubnets as exc:
            log.error("lost subnet %s and %s", self.leases.lease.label, exc)
            self.out_of_subnets = True
            return set()
        if self.leases.lease.ident != old:
            self.peers.set_own(self.leases.lease.ident, self.leases.lease.ipv6_subnet)
            self._lease_changed()
            self._masquerade()
            self.write_subnet_env()
            return None
        self.status.reacquired = self.leases.state.reacquired if self.leases.state else 0
        return set()

    def _log_rejected(self, changes: PeerChanges) -> None:
        for name, why in changes.rejected.items():  # a peer may rewrite one every few ms
            self.log_limiter.log(f"lease {name}", "skipping malformed lease subnets/%s: %s",
                                 name, why)

    def _sync(self, changed: frozenset[PeerId] | None, repair: bool = False,
              event: bool = False) -> None:
        """Program the peers: the ones in `changed`, or (None) a full compare against the
        kernel; `repair` marks the periodic drift repair, whose changes are drift (counted
        and logged as such) — a full sync after a config change or a new listing is not;
        `event` marks a repair after a kernel deletion event (counted apart)."""
        assert self.backend is not None
        start = time.monotonic()
        try:
            report = self.backend.sync(self.peers.peers, changed)
            self.status.backend_programmed = True
        except Exception:  # a backend bug must not kill the agent; retried next cycle
            log.exception("backend sync failed")
            report = SyncReport(failed=1)
            self.status.backend_programmed = False
        self._booked(report, start, changed, repair, event)

    def _booked(self, report: SyncReport, start: float,
                changed: frozenset[PeerId] | None = None, repair: bool = False,
                event: bool = False) -> None:
        """A sync's (or a sliced drift repair's) outcome into the status and logs."""
        self.status.reconciles += 1
        if event and report.added:
            self.status.kernel_event_repairs += report.added
            log.warning("kernel event: %d deleted kernel entries restored", report.added)
        elif repair and report.changes:
            self.status.drift_repairs += report.changes
            log.warning("drift repair: %d kernel entries restored, %d removed", report.added,
                        report.removed)
        elif report.changes:
            self.sync_log.log("reconciled", "reconciled: %d added, %d removed", report.added,
                              report.removed)
        self.status.last_reconcile = time.time()
        self.status.peers = len(self.peers.peers)
        self.status.kernel_entries = dict(report.entries)
        self.status.skipped_peers = {str(k): v for k, v in report.skipped.items()}
        self.status.invalid_leases = dict(self.peers.invalid)
        # the rows of the peers this sync was for (a drift repair changes no peer: none)
        rows: Iterable[PeerId] | None = () if repair else changed
        if id(self.peers) != self._rows_of:  # a new table: every row
            self._rows_of, rows = id(self.peers), None
        self._rows.update(self.peers.peers, rows)
        self.last_sync_seconds = time.monotonic() - start
        for hook in self.sync_hooks:
            hook(self.last_sync_seconds)
        self._write_status(soon=changed is not None)

    def _write_status(self, soon: bool = False) -> None:
        """Write status.json; with `soon`, at most once a second (the loop flushes the rest),
        so a burst of watch events does not turn into a burst of file writes."""
        now = time.monotonic()
        # rate-limited, or a probe round's rows are being redone (written after them)
        if (soon and now - self._status_written_at < 1.0) or self._rows.pending:
            self._status_dirty = True
            self._publish()
            return
        self._status_dirty = False
        doc = self._publish().status_doc(peer_list=False)
        text = status_json(doc, {"peer_list": self._rows.text()})
        # digested in slices: one encode() of the whole text would be another ~3 MB at once
        h = hashlib.blake2b(digest_size=16)
        for i in range(0, len(text), 1 << 16):
            h.update(text[i:i + (1 << 16)].encode())
        digest = h.digest()
        if digest == self._last_status:
            return
        self._last_status = digest
        self._status_written_at = now
        try:
            write_atomic(Path(self.settings.state_dir) / "status.json", text, durable=False)
        except FileError as exc:
            if "status" not in self._warned:
                log.warning("cannot write status: %s", exc)
                self._warned.add("status")
