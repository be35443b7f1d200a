"""The host-gw backend: one route per peer, ``subnet via PublicIP dev <iface>``.

No device of its own: the routes live on the shared underlay interface and are ours only by
their ``proto``. host-gw needs every host on one L2 segment; a peer that is not directly
reachable is skipped and reported (log + ``SyncReport.skipped``) instead of being left for the
kernel to refuse with "network is unreachable" (flannel #598, #996). Dual stack adds the same
route for the peer's IPv6 subnet via its PublicIPv6.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address

from netagent.backends.base import LeaseContribution
from netagent.backends.render import ReconcilingBackend, Rendered, is_direct
from netagent.kernel import Entry, IPAddress, Route, RouteLookup
from netagent.lease import Lease, PeerId


def _not_direct(public: IPAddress, lookup: RouteLookup | None) -> str:
    if lookup is None:
        how = "no route"
    elif lookup.gateway is not None:
        how = f"reached via gateway {lookup.gateway}"
    else:
        how = f"reached through another interface (index {lookup.oif})"
    return (f"{public} is not directly reachable on the interface ({how}); host-gw needs all "
            "hosts on one L2 segment")


def render_hostgw_peers(
    peers: Mapping[PeerId, Lease],
    *,
    iface_index: int,
    own_ip: IPv4Address | None = None,
    lookups: Mapping[IPAddress, RouteLookup | None],
    ipv6: bool = False,
    own_ip6: IPv6Address | None = None,
    ipv4: bool = True,
) -> Rendered:
    """A route via the peer's PublicIP for each host-gw peer the interface reaches directly;
    with ``ipv6``, also its IPv6 subnet via its PublicIPv6 (a peer whose IPv6 side is missing
    or unreachable keeps its IPv4 route and is reported). Without ``ipv4`` (an IPv6-only
    network) only the IPv6 route, and a peer without a usable IPv6 side is skipped."""
    entries: dict[PeerId, tuple[Entry, ...]] = {}
    skipped: dict[PeerId, str] = {}
    for ident, lease in peers.items():
        btype, public = lease.attrs.backend_type, lease.attrs.public_ip
        if btype != "host-gw":
            skipped[ident] = f"BackendType {btype or '(none)'!r} is not host-gw; ignoring"
            continue
        routes: list[Route] = []
        note = ""
        if ipv4:
            if lease.subnet is None:
                no4 = "the lease has no IPv4 subnet (an IPv6-only lease)"
                if not ipv6:
                    skipped[ident] = no4
                    continue
                note = f"IPv4 side left out: {no4}"  # a host switching from IPv6-only
            elif own_ip is not None and public == own_ip:
                skipped[ident] = (f"lease has our own PublicIP {own_ip} (a stale lease of this "
                                  "host?)")
                continue
            else:
                lookup = lookups.get(public)
                if not is_direct(lookup, iface_index):
                    skipped[ident] = "PublicIP " + _not_direct(public, lookup)
                    continue
                routes.append(Route(lease.subnet, gateway=public, oif=iface_index))
        if ipv6 or not ipv4:
            why, route6 = _hostgw_v6_route(lease, iface_index, own_ip6, lookups)
            if route6 is not None:
                routes.append(route6)
            elif not routes:
                skipped[ident] = why
                continue
            else:
                note = f"IPv6 side left out: {why}"
        if note:
            skipped[ident] = note
        entries[ident] = tuple(routes)
    return Rendered(entries, skipped)


def _hostgw_v6_route(lease: Lease, iface_index: int, own_ip6: IPv6Address | None,
                     lookups: Mapping[IPAddress, RouteLookup | None]) -> tuple[str, Route | None]:
    subnet6, public6 = lease.ipv6_subnet, lease.attrs.public_ipv6
    if subnet6 is None:
        return "the lease has no IPv6 subnet", None
    if public6 is None:
        return "the lease has no PublicIPv6", None
    if own_ip6 is not None and public6 == own_ip6:
        return f"lease has our own PublicIPv6 {own_ip6}", None
    lookup = lookups.get(public6)
    if not is_direct(lookup, iface_index):
        return "PublicIPv6 " + _not_direct(public6, lookup), None
    return "", Route(subnet6, gateway=public6, oif=iface_index)


class HostGwBackend(ReconcilingBackend):
    type_name = "host-gw"

    def prepare(self) -> LeaseContribution:
        if not self.config.enable_ipv4:
            public6, addr6 = self.host.public_ipv6, self.host.iface_addr6
            if public6 is None or public6 != addr6:
                raise RuntimeError(
                    f"host-gw: PublicIPv6 {public6} is not an address of {self.host.iface} "
                    f"({addr6}); probably behind NAT, which host-gw cannot work through")
        elif self.host.public_ip != self.host.iface_addr:
            raise RuntimeError(
                f"host-gw: PublicIP {self.host.public_ip} differs from the interface address "
                f"{self.host.iface_addr}; probably behind NAT, which host-gw cannot work through"
            )
        if self.ipv6 and self.host.public_ipv6 is None:
            raise RuntimeError("host-gw: EnableIPv6 is set but this host has no PublicIPv6")
        self.reconciler = self._new_reconciler(None)
        return LeaseContribution(backend_type="host-gw", backend_data="",
                                 mtu=self.host.iface_mtu)

    def prepare_teardown(self) -> None:
        # the NAT checks do not matter for removing routes (a dual-stack host whose
        # PublicIPv6 is not on the interface still had IPv6 routes to remove)
        self.reconciler = self._new_reconciler(None)

    def activate(self, own: Lease) -> None:
        self.own = own

    def render(self, peers: Mapping[PeerId, Lease],
               lookups: Mapping[IPAddress, RouteLookup | None]) -> Rendered:
        return render_hostgw_peers(peers, iface_index=self.host.iface_index,
                                   own_ip=self.host.public_ip, lookups=lookups,
                                   ipv6=self.ipv6, own_ip6=self.host.public_ipv6,
                                   ipv4=self.config.enable_ipv4)

    def lookup_targets(self, lease: Lease) -> tuple[IPAddress, ...]:
        if lease.attrs.backend_type != "host-gw":
            return ()
        out: list[IPAddress] = []
        if self.config.enable_ipv4 and lease.subnet is not None:
            out.append(lease.attrs.public_ip)
        public6 = lease.attrs.public_ipv6
        if self.ipv6 and public6 is not None:
            out.append(public6)
        return tuple(out)
