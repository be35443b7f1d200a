"""The wireguard backend: encrypted pod traffic, flannel-compatible, kernel module or wireguard-go.

Kernel state per address family (``separate`` mode, flannel's default): device ``flannel-wg``
(IPv6: ``flannel-wg-v6``), our subnet's network address as /32 (/128) on it, and one route for
the whole Network on it (scope link, our ``proto``). Peers are not kernel routes but WireGuard
peers (endpoint PublicIP:Port, AllowedIPs = the peer's subnet), programmed through one reconcile
path for both implementations: read the device (``get``), diff against the rendered peers,
write only the difference (:mod:`.model`). Every peer on our device must be justified by a lease
(mark and sweep), unlike flannel (k3s#5216).

The device is made by the kernel module where ``ip link add type wireguard`` works, else by
``wireguard-go`` (supervised by :mod:`.wggo`: adopted across our restarts, restarted with its
device re-created on the next sync when it died). Which one runs is logged at start and shown
by ``health()`` (``netagent status``, status.json, /metrics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

from netagent.backends.base import (
    Backend,
    BackendGauge,
    BackendHealth,
    HostFacts,
    LeaseContribution,
    SyncReport,
)
from netagent.backends.wireguard import kernelio
from netagent.backends.wireguard.client import UapiClient, WgClient, WgToolClient
from netagent.backends.wireguard.keys import KeyFileError, KeySource, load_private_key
from netagent.backends.wireguard.model import (
    WG_OVERHEAD,
    Family,
    UapiError,
    WgChange,
    WgPeer,
    WgState,
    diff_device,
    lease_data,
    merge_by_key,
    public_key,
    render_wg_peers,
)
from netagent.backends.wireguard.wggo import SOCKET_DIR, WireguardGo
from netagent.config import NetworkConfig, WireguardOptions
from netagent.kernel import RT_SCOPE_LINK, Kernel, KernelError, Op, Route, address_device
from netagent.lease import Lease, PeerId

log = logging.getLogger(__name__)

DEVICE = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
#: "kernel" or "wireguard-go" forces one implementation (default: kernel when it works)
IMPLEMENTATION_ENV = "NETAGENT_WIREGUARD_IMPLEMENTATION"
KERNEL, USERSPACE = "kernel", "wireguard-go"


class WireguardError(OSError):
    """The backend cannot be set up (config it does not implement, no WireGuard at all,
    wireguard-go not coming up, a bad key file): the daemon reports "cannot start: …" and
    exits, or keeps its running config on a live switch. An OSError so it is reported that way
    without a traceback."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    family: Family
    port: int
    mtu: int
    network: IPv4Network | IPv6Network


class WgLink:
    """One device of ours: make or adopt it, address it, route the Network to it, and read and
    write its peers through the client its implementation needs."""

    def __init__(self, spec: DeviceSpec, kernel: Kernel, state_dir: Path, key: KeySource,
                 psk: str, sock_dir: Path) -> None:
        self.spec = spec
        self.kernel = kernel
        self.key = key
        self.psk = psk
        self.state_dir = state_dir
        self.sock_dir = sock_dir
        self.proc = WireguardGo(spec.name, state_dir, sock_dir=sock_dir)
        self.implementation = ""
        self.ifindex = 0
        self.client: WgClient | None = None
        self.peers = 0
        self.route_ok = False

    # -- the device

    def alive(self) -> bool:
        if self.implementation == USERSPACE:
            return self.proc.alive()
        return self.implementation == KERNEL

    def ensure(self) -> bool:
        """Make the device right; True when it was (re)created (every peer must be written)."""
        name, k = self.spec.name, self.kernel
        if self.implementation == USERSPACE:
            self.proc.alive()  # notes its death (and exit status) before the device is looked at
        link = k.link(name)
        if link is not None and link.kind == "wireguard":
            self._use(KERNEL)
        elif link is not None and link.kind == "tun" and (self.proc.alive() or self.proc.adopt()):
            self._use(USERSPACE)
        else:
            if link is not None:
                why = ("its wireguard-go is gone" if link.kind == "tun"
                       else f"it is a {link.kind or 'non-wireguard'} link")
                log.warning("%s exists but %s; re-creating it", name, why)
                k.delete_link(link.index)
            self._create()
            link = k.link(name)
            if link is None:
                raise KernelError(0, f"{name} vanished right after creation")
            self.ifindex = 0
        created = link.index != self.ifindex
        self.ifindex = link.index
        if link.mtu != self.spec.mtu:
            log.info("setting %s MTU %d → %d", name, link.mtu, self.spec.mtu)
            k.set_link(link.index, mtu=self.spec.mtu)
        return created

    def _create(self) -> None:
        force = os.environ.get(IMPLEMENTATION_ENV, "")
        err = "not tried (" + IMPLEMENTATION_ENV + "=wireguard-go)"
        if force != USERSPACE:
            err = kernelio.create_kernel_wireguard(self.spec.name)
            if not err:
                log.info("%s: created with the kernel WireGuard module", self.spec.name)
                self._use(KERNEL)
                return
            if force == KERNEL:
                raise WireguardError(f"{self.spec.name}: the kernel WireGuard device cannot "
                                     f"be created ({err}) and {IMPLEMENTATION_ENV}=kernel")
        if not WireguardGo.available():
            raise WireguardError(f"{self.spec.name}: no kernel WireGuard module ({err}) and "
                                 "no wireguard-go in PATH: install the kernel module or the "
                                 "wireguard-go package")
        if self.proc.death:
            self.proc.restarts += 1
            log.error("%s: %s; restarting it (the device is re-created)", self.spec.name,
                      self.proc.death)
        try:
            self.proc.start()
        except RuntimeError as exc:
            raise WireguardError(str(exc)) from None
        log.info("%s: kernel WireGuard unavailable (%s); running wireguard-go (PID %d)",
                 self.spec.name, err, self.proc.pid)
        self._use(USERSPACE)

    def _use(self, impl: str) -> None:
        if impl == self.implementation and self.client is not None:
            return
        self.implementation = impl
        if impl == KERNEL:
            self.client = WgToolClient(self.spec.name, self.key.path, self.psk,
                                       self.state_dir / f"{self.spec.name}.psk")
        else:
            self.client = UapiClient(self.proc.sock)

    def read(self) -> WgState:
        assert self.client is not None
        return self.client.get()

    def write_peers(self, peers: Mapping[str, WgPeer]) -> tuple[int, int]:
        """Only the difference; returns (added or updated, removed)."""
        assert self.client is not None
        have = self.client.get()
        change = diff_device(have, self.key.private_key, self.spec.port, peers)
        if change.empty:
            self.peers = len(have.peers)
            return 0, 0
        try:
            self.client.set(change)
        except UapiError as exc:
            if len(change.add) + len(change.update) <= 1:
                raise
            # one peer the device refuses must not hold back the others: device settings and
            # removals first, then each peer on its own; what still fails is retried next sync
            log.warning("%s: writing %d peer changes at once failed (%s); writing them one by "
                        "one", self.spec.name, len(change.add) + len(change.update), exc)
            failed = self._write_one_by_one(change)
            if failed:
                self.peers = len(self.client.get().peers)
                raise UapiError(f"{len(failed)} peer(s) not written: {'; '.join(failed)}"
                                ) from None
        self.peers = len(peers)
        for p in change.add:
            log.info("%s: peer %s added (%s, %s)", self.spec.name, p.public_key, p.endpoint,
                     ",".join(map(str, sorted(p.allowed_ips, key=str))))
        for p, fields in change.update:
            log.info("%s: peer %s updated (%s)", self.spec.name, p.public_key,
                     ", ".join(sorted(fields)))
        for key in change.remove:
            log.info("%s: peer %s removed (no lease carries it)", self.spec.name, key)
        return len(change.add) + len(change.update), len(change.remove)

    def _write_one_by_one(self, change: WgChange) -> list[str]:
        assert self.client is not None
        device = WgChange(change.private_key, change.listen_port, change.remove)
        if not device.empty:
            self.client.set(device)
        failed = []
        for p in change.add:
            try:
                self.client.set(WgChange(add=(p,)))
            except UapiError as exc:
                failed.append(f"{p.public_key}: {exc}")
        for p, fields in change.update:
            try:
                self.client.set(WgChange(update=((p, fields),)))
            except UapiError as exc:
                failed.append(f"{p.public_key}: {exc}")
        return failed

    # -- address and route

    def ensure_address(self, subnet: IPv4Network | IPv6Network | None) -> int:
        """``subnet``'s network address as /32 (/128), other in-Network addresses removed,
        link up. Returns the kernel writes made."""
        k = self.kernel
        link = k.link(self.spec.name)
        if link is None or subnet is None:
            return 0
        want = (IPv4Interface(f"{subnet.network_address}/32") if subnet.version == 4
                else IPv6Interface(f"{subnet.network_address}/128"))
        return address_device(k, link, want, self.spec.network)

    def ensure_route(self) -> int:
        """The whole Network on the device. A route at that key through another device is
        someone else's and left alone; one through our device (flannel's, proto boot, on a host
        taken over) is adopted: replaced with our proto."""
        net, idx = self.spec.network, self.ifindex
        want = Route(net, gateway=None, oif=idx, scope=RT_SCOPE_LINK)
        have = [r for r in self.kernel.dump_routes(want.table, family=net.version)
                if r.key == want.key]
        if have and have[0] == want:
            self.route_ok = True
            return 0
        if have and have[0].proto != want.proto and have[0].oif != idx:
            log.error("route %s exists (proto %d, index %s) and is not ours; traffic will not "
                      "reach %s", net, have[0].proto, have[0].oif, self.spec.name)
            self.route_ok = False
            return 0
        (err,) = self.kernel.write([Op("replace", want)])
        if err is not None:
            log.warning("route %s dev %s failed (retried next sync): %s", net, self.spec.name,
                        err)
            self.route_ok = False
            return 0
        self.route_ok = True
        return 1

    def delete(self) -> None:
        """Teardown: stop our wireguard-go (by its recorded PID) and delete the device."""
        if self.implementation == USERSPACE or self.proc.pid or self.proc.adopt():
            self.proc.stop()
        link = self.kernel.link(self.spec.name)
        if link is not None and link.kind in ("wireguard", "tun"):
            self.kernel.delete_link(link.index)
            log.info("removed %s and its route to %s", self.spec.name, self.spec.network)
        if isinstance(self.client, WgToolClient):
            self.client.close()
        self.ifindex = 0
        self.route_ok = False


class WireguardBackend(Backend):
    type_name = "wireguard"

    def __init__(self, config: NetworkConfig, host: HostFacts, *, kernel: Kernel | None = None,
                 sock_dir: Path = SOCKET_DIR) -> None:
        super().__init__(config, host)
        self._kernel = kernel
        self.sock_dir = sock_dir
        opts = config.backend.options
        self.opts: WireguardOptions = opts if isinstance(opts, WireguardOptions) \
            else WireguardOptions()
        self.mtu = (self.opts.mtu or config.backend.mtu or host.iface_mtu) - WG_OVERHEAD
        self.key: KeySource | None = None
        self.public_key = ""
        self.own: Lease | None = None
        self.links: list[WgLink] = []
        #: peers left out by the render, and the last good peer of each lease (kept serving
        #: while its lease is malformed)
        self._skipped: dict[tuple[int, PeerId], str] = {}
        self._last_good: dict[tuple[int, PeerId], WgPeer] = {}
        self._failure = ""

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            self._kernel = kernelio.new_kernel()
        return self._kernel

    def _specs(self) -> list[DeviceSpec]:
        c, out = self.config, []
        if c.enable_ipv4 and c.network is not None:
            out.append(DeviceSpec(DEVICE, 4, self.opts.listen_port, self.mtu, c.network))
        if c.enable_ipv6 and c.ipv6_network is not None:
            out.append(DeviceSpec(DEVICE_V6, 6, self.opts.listen_port_v6, self.mtu,
                                  c.ipv6_network))
        return out

    @classmethod
    def check_config(cls, config: NetworkConfig) -> str:
        """Mode: flannel's single-device modes are not implemented with two families (with
        one family there is one device either way, and "separate" programs the same)."""
        opts = config.backend.options
        mode = opts.mode if isinstance(opts, WireguardOptions) else "separate"
        if mode == "separate" or (mode in ("auto", "ipv4") and not config.enable_ipv6):
            return ""
        return (f"Backend.Mode: {mode!r} (one flannel-wg device carrying both address families) "
                "is not implemented by netagent for this network; use \"separate\" (flannel-wg "
                "and flannel-wg-v6, flannel's default)")

    # -- lifecycle

    def prepare(self) -> LeaseContribution:
        if self.config.enable_ipv6 and self.host.public_ipv6 is None:
            raise WireguardError("wireguard: EnableIPv6 is set but this host has no PublicIPv6")
        try:
            self.key = load_private_key(self.host.state_dir)
        except KeyFileError as exc:
            raise WireguardError(str(exc)) from None
        self.public_key = public_key(self.key.private_key)
        log.info("wireguard: private key %s (%s), public key %s", self.key.path, self.key.how,
                 self.public_key)
        self.links = [WgLink(s, self.kernel, self.host.state_dir, self.key, self.opts.psk,
                             self.sock_dir) for s in self._specs()]
        data = data6 = ""
        for link in self.links:
            link.ensure()
            # key and port now (the listen port must be bound before peers learn of it);
            # the peers the device already has stay until the first full sync compares them
            link.write_peers(link.read().peers)
            log.info("wireguard: %s (%s, index %d, MTU %d, port %d)", link.spec.name,
                     link.implementation, link.ifindex, link.spec.mtu, link.spec.port)
            if link.spec.family == 4:
                data = lease_data(self.public_key, link.spec.port)
            else:
                data6 = lease_data(self.public_key, link.spec.port)
        return LeaseContribution(backend_type="wireguard", backend_data=data, mtu=self.mtu,
                                 backend_v6_data=data6)

    def activate(self, own: Lease) -> None:
        self.own = own
        for link in self.links:
            link.ensure_address(self._own_subnet(link))
            link.ensure_route()

    def _own_subnet(self, link: WgLink) -> IPv4Network | IPv6Network | None:
        if self.own is None:
            return None
        return self.own.subnet if link.spec.family == 4 else self.own.ipv6_subnet

    def sync(self, peers: Mapping[PeerId, Lease],
             changed: frozenset[PeerId] | None = None) -> SyncReport:
        """Render all peers (cheap), read each device, write only the difference. A full sync
        (and any sync that finds wireguard-go dead) first repairs device, address and route."""
        report = SyncReport()
        failures: list[str] = []
        for link in self.links:
            try:
                if changed is None or not link.alive():
                    if link.ensure():
                        link.route_ok = False
                    report.added += link.ensure_address(self._own_subnet(link))
                    report.added += link.ensure_route()
                added, removed = link.write_peers(self._desired(link, peers))
                report.added += added
                report.removed += removed
            except (UapiError, OSError, RuntimeError) as exc:
                report.failed += 1
                failures.append(f"{link.spec.name}: {exc}")
                log.error("wireguard: %s not programmed (retried next sync): %s",
                          link.spec.name, exc)
        self._failure = "; ".join(failures)
        report.entries = {"route": sum(link.route_ok for link in self.links),
                          "wg_peer": sum(link.peers for link in self.links)}
        report.skipped = {ident: why for (_, ident), why in self._skipped.items()}
        return report

    def _desired(self, link: WgLink, peers: Mapping[PeerId, Lease]) -> dict[str, WgPeer]:
        fam = link.spec.family
        own_ip = self.host.public_ip if fam == 4 else self.host.public_ipv6
        own_id = self.own.ident if self.own is not None else None
        leases = {i: lz for i, lz in peers.items() if i != own_id}
        rendered = render_wg_peers(leases, family=fam, own_public_key=self.public_key,
                                   default_port=link.spec.port, psk=self.opts.psk,
                                   keepalive=self.opts.persistent_keepalive, own_ip=own_ip)
        chosen = dict(rendered.peers)
        for gone in [k for k in self._last_good if k[0] == fam and k[1] not in leases]:
            del self._last_good[gone]  # lease gone: the peer goes too
        for ident, why in rendered.skipped.items():
            slot: tuple[int, PeerId] = (fam, ident)
            old = self._last_good.get(slot)
            keep = old is not None and leases[ident].attrs.backend_type == "wireguard"
            text = why + ("; its previous peer entry keeps serving" if keep else "")
            if self._skipped.get(slot) != text:
                log.warning("%s: skipping lease %s: %s", link.spec.name, ident, text)
            self._skipped[slot] = text
            if keep and old is not None:
                chosen[ident] = old
        for done in [k for k in self._skipped if k[0] == fam and k[1] not in rendered.skipped]:
            if done[1] in leases:
                log.info("%s: lease %s is no longer skipped", link.spec.name, done[1])
            del self._skipped[done]
        for ident, peer in rendered.peers.items():
            self._last_good[(fam, ident)] = peer
        return merge_by_key(chosen, {i: lz.mod_revision for i, lz in leases.items()})

    def health(self) -> BackendHealth:
        impls = sorted({link.implementation for link in self.links if link.implementation})
        dead = [link for link in self.links if not link.alive()]
        detail = ""
        if dead:
            detail = "; ".join(
                f"{link.spec.name}: " + (link.proc.death or "wireguard-go is not running"
                                         if link.implementation == USERSPACE
                                         else "device not set up")
                for link in dead)
        elif self._failure:
            detail = self._failure
        gauges = [BackendGauge("wireguard_implementation", "1 for the WireGuard implementation "
                               "in use (kernel or wireguard-go)", 1.0,
                               (("implementation", impl),)) for impl in impls]
        for link in self.links:
            labels = (("device", link.spec.name),)
            gauges += [
                BackendGauge("wireguard_up", "1 while the WireGuard device's data path runs",
                             0.0 if link in dead else 1.0, labels),
                BackendGauge("wireguard_peers", "WireGuard peers on the device",
                             float(link.peers), labels),
                BackendGauge("wireguard_device_writes", "configuration writes to the device "
                             "since the agent started (0 when nothing changed)",
                             float(link.client.sets if link.client else 0), labels),
                BackendGauge("wireguard_go_restarts", "times wireguard-go was found dead and "
                             "restarted", float(link.proc.restarts), labels),
            ]
        return BackendHealth(
            ok=not dead, detail=detail,
            info={"implementation": ",".join(impls) or "none", "public_key": self.public_key,
                  "devices": ",".join(link.spec.name for link in self.links),
                  "listen_ports": ",".join(str(link.spec.port) for link in self.links),
                  "device_writes": sum(link.client.sets for link in self.links if link.client),
                  "wireguard_go_restarts": sum(link.proc.restarts for link in self.links),
                  "wireguard_go_pids": ",".join(str(link.proc.pid) for link in self.links
                                                if link.proc.pid) or "none"},
            gauges=tuple(gauges))

    def shutdown(self) -> None:
        """Nothing to stop: the device (and wireguard-go, in its own session) keeps forwarding
        so a restart does not interrupt traffic; the next run adopts them."""

    def prepare_teardown(self) -> None:
        """Find our devices (no key, no process started) so :meth:`teardown` can remove them."""
        self.key = self.key or KeySource("", self.host.state_dir / "wgkey", "unused")
        self.links = self.links or [WgLink(s, self.kernel, self.host.state_dir, self.key, "",
                                           self.sock_dir) for s in self._specs()]

    def teardown(self) -> None:
        """A live switch away from wireguard: stop wireguard-go, delete the devices (their
        addresses and the Network routes go with them)."""
        if not self.links:
            self.prepare_teardown()
        for link in self.links:
            link.delete()
