"""The bgp backend: pod subnets distributed by BGP through BIRD 2, no encapsulation.

netagent renders bird.conf (``render.py``), has BIRD check and load it, and supervises BIRD
(``supervisor.py``); BIRD speaks BGP and programs the kernel (routes ``proto bird``), so this
backend makes no kernel writes of its own except removing BIRD's leftovers when the network
is switched away from bgp (``kernelroutes.py``).

Threads: ``sync`` runs on the daemon's main loop (the only writer: files, starting BIRD,
``birdc configure``); a poller thread only reads (``birdc show protocols all``) and keeps the
:class:`BackendHealth` that /readyz, /metrics and status read, so none of them ever waits for
BIRD.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Mapping
from typing import Any

from netagent.backends.base import (
    Backend,
    BackendGauge,
    BackendHealth,
    HostFacts,
    LeaseContribution,
    SyncReport,
)
from netagent.backends.bgp.birdc import BirdError, BirdProtocol, birdc, parse_show_protocols
from netagent.backends.bgp.kernelroutes import KernelRouteError, bird_routes, remove_bird_routes
from netagent.backends.bgp.render import (
    BirdConfig,
    lease_backend_data,
    render_bird_conf,
    render_idle_conf,
)
from netagent.backends.bgp.supervisor import BirdSupervisor
from netagent.config import BgpOptions, NetworkConfig
from netagent.lease import Lease, PeerId

log = logging.getLogger("netagent.bgp")

#: seconds between two `show protocols all` polls
POLL_INTERVAL = 1.0


def health_from_protocols(rows: list[BirdProtocol], problem: str = "", socket: str = ""
                          ) -> BackendHealth:
    """What status, /readyz and /metrics show: one session per BGP protocol. BIRD answering
    with a config in force is healthy even with sessions down (a lone host has none; a peer
    being down is the peer's problem, shown per session)."""
    sessions: list[dict[str, Any]] = []
    gauges: list[BackendGauge] = []
    for p in rows:
        if p.proto != "BGP":
            continue
        state = p.bgp_state or p.info.split(" ")[0] or p.state
        sessions.append({"name": p.name, "peer": p.neighbor, "state": state,
                         "routes_received": p.routes_imported,
                         "routes_sent": p.routes_exported, "since": p.since,
                         "last_error": p.last_error})
        labels = (("peer", p.neighbor or p.name), ("name", p.name))
        gauges.append(BackendGauge("bgp_session_up", "1 when the BGP session is Established",
                                   float(p.established), labels))
        gauges.append(BackendGauge("bgp_routes_received", "Routes accepted from the BGP peer",
                                   float(p.routes_imported), labels))
    up = sum(1 for s in sessions if s["state"] == "Established")
    info: dict[str, Any] = {"bird": "running", "bird_socket": socket,
                            "bgp_sessions_up": f"{up}/{len(sessions)}", "sessions": sessions}
    if problem:
        return BackendHealth(ok=False, detail=problem, info=info, gauges=tuple(gauges))
    return BackendHealth(ok=True, detail="", info=info, gauges=tuple(gauges))


class BgpBackend(Backend):
    type_name = "bgp"

    @classmethod
    def check_config(cls, config: NetworkConfig) -> str:
        """IPv4 only for now: refused before anything runs (at start the agent waits and says
        why; live, the running config stays)."""
        if config.enable_ipv6 or not config.enable_ipv4:
            return "Backend.Type: bgp carries IPv4 only for now; turn EnableIPv6 off"
        return ""

    def __init__(self, config: NetworkConfig, host: HostFacts) -> None:
        super().__init__(config, host)
        opts = config.backend.options
        self.opts: BgpOptions = opts if isinstance(opts, BgpOptions) else BgpOptions()
        self.bird = BirdSupervisor(host.state_dir, self.opts.bird_socket)
        self.own: Lease | None = None
        self._lock = threading.Lock()
        self._health = BackendHealth(ok=False, detail="BIRD not started yet")
        #: why the last apply failed ("" = the file in force is the one we want)
        self._problem = ""
        #: the text BIRD has in force (None: not loaded by this instance yet)
        self._loaded: str | None = None
        self._rejected: str | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> LeaseContribution:
        if not self.config.enable_ipv4 or self.config.enable_ipv6:
            raise RuntimeError("bgp: IPv4 only for now (EnableIPv6 / IPv6-only networks are not "
                               "supported by the bgp backend yet)")
        if shutil.which("bird") is None or shutil.which("birdc") is None:
            # also with BIRDSocket: every file is checked with the local `bird -p` first
            raise RuntimeError("bgp: BIRD 2 is not installed (apt-get install bird2)")
        if self.host.public_ip != self.host.iface_addr:
            raise RuntimeError(
                f"bgp: PublicIP {self.host.public_ip} differs from the interface address "
                f"{self.host.iface_addr}; peers would dial an address BIRD does not listen on")
        if self.own is not None:  # prepared again after a failed switch: poll again
            self._start_poller()
        return LeaseContribution(backend_type="bgp", backend_data=lease_backend_data(self.opts),
                                 mtu=self.config.backend.mtu or self.host.iface_mtu)

    def prepare_teardown(self) -> None:
        return None

    def activate(self, own: Lease) -> None:
        self.own = own
        self._start_poller()

    def _start_poller(self) -> None:
        if self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="bgp-health", daemon=True)
            self._poller.start()

    def shutdown(self) -> None:
        """Stop polling; BIRD keeps running (and routing) so a restarted agent adopts it."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def teardown(self) -> None:
        """Switched away from bgp: stop our BIRD (peers withdraw our subnet, BIRD removes its
        kernel routes) and remove any proto-bird route it left inside the Network. An external
        BIRD gets a file without our sessions instead."""
        self.shutdown()
        network = self.config.network
        if self.bird.external:
            try:
                self.bird.write_checked(render_idle_conf(self.host.public_ip))
                self.bird.reload()
            except BirdError as exc:
                log.error("bgp teardown: cannot reconfigure the external BIRD: %s", exc)
        elif self.bird.stop():
            log.info("stopped BIRD (the network no longer uses bgp)")
        if network is not None:
            try:
                gone = remove_bird_routes(network)
            except KernelRouteError as exc:
                log.error("bgp teardown: cannot remove BIRD's leftover routes: %s", exc)
                return
            if gone:
                log.info("removed %d proto-bird routes BIRD left behind", gone)

    # ------------------------------------------------------------------ sync

    def render(self, peers: Mapping[PeerId, Lease]) -> BirdConfig:
        assert self.own is not None and self.own.subnet is not None
        assert self.config.network is not None
        return render_bird_conf(self.opts, network=self.config.network,
                                own_subnet=self.own.subnet, router_id=self.host.public_ip,
                                source=self.host.iface_addr, iface=self.host.iface,
                                peers=peers)

    def sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None = None
    ) -> SyncReport:
        conf = self.render(peers)
        report = SyncReport(skipped=dict(conf.skipped))
        try:
            self._apply(conf.text, full=changed is None)
            problem = ""
        except BirdError as exc:
            problem = str(exc)
            report.failed = 1
        if problem and problem != self._problem:
            log.error("bgp: %s", problem)  # once per distinct problem, not every repair cycle
        elif self._problem and not problem:
            log.info("bgp: BIRD has the wanted bird.conf in force again")
        with self._lock:
            self._problem = problem
            if problem:
                self._health = BackendHealth(ok=False, detail=problem,
                                             info=dict(self._health.info),
                                             gauges=self._health.gauges)
        report.entries = {"bgp_peer": len(conf.neighbors)}
        return report

    def _apply(self, text: str, full: bool) -> None:
        """Get `text` in force: checked, written, loaded (or BIRD started on it). Raises
        BirdError, leaving the file in force as it was."""
        self.bird.reap()
        running = self.bird.answering()
        if running and text == self._loaded:
            return
        if text == self._rejected and not full:  # a full sync (repair timer) checks again
            raise BirdError(self._problem or "bird.conf was rejected")
        try:
            self.bird.write_checked(text)
        except BirdError as exc:
            self._rejected = text
            raise BirdError("new bird.conf rejected, BIRD refused the new file (the previous "
                            f"one stays in force): {exc}") from None
        self._rejected = None
        if running:
            if self._loaded is None:
                log.info("bgp: adopting the BIRD already running on %s (pid %s); its sessions "
                         "and routes stay", self.bird.socket, self.bird.pid())
            reply = self.bird.reload()
            log.info("bgp: BIRD reloaded bird.conf (%s)", reply)
        elif self.bird.external:
            raise BirdError(f"no BIRD answers on {self.bird.socket} (Backend.BIRDSocket: "
                            "netagent does not start that one)")
        else:
            if self._loaded is not None or self.bird.pid() is not None:
                log.error("bgp: BIRD is not answering on %s; starting it again", self.bird.socket)
            network = self.config.network
            try:
                leftovers = bool(network is not None and bird_routes(network))
            except KernelRouteError as exc:
                log.warning("bgp: cannot read the kernel's proto-bird routes (%s); starting "
                            "BIRD without graceful-restart recovery", exc)
                leftovers = False
            try:
                self.bird.start(recovery=leftovers)
            except BirdError as exc:
                raise BirdError(f"cannot start BIRD: {exc}") from None
        self._loaded = text

    # ------------------------------------------------------------------ health

    def health(self) -> BackendHealth:
        with self._lock:
            return self._health

    def _poll(self) -> None:
        """Read BIRD's view every POLL_INTERVAL until shutdown (reads only)."""
        while not self._stop.is_set():
            self.refresh_health()
            self._stop.wait(POLL_INTERVAL)

    def refresh_health(self) -> None:
        try:
            text = birdc(self.bird.socket, "show", "protocols", "all", timeout=3.0)
            rows = parse_show_protocols(text)
            with self._lock:
                self._health = health_from_protocols(rows, self._problem, self.bird.socket)
        except BirdError as exc:
            with self._lock:
                # the main loop's reason (start failed, no BIRD on BIRDSocket) says more
                self._health = BackendHealth(
                    ok=False,
                    detail=self._problem or f"BIRD not answering on {self.bird.socket}: {exc}",
                    info={"bird": "not running", "bird_socket": self.bird.socket,
                          "bgp_sessions_up": "0/0", "sessions": []})

