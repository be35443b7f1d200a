"""The host-gw backend: one route per peer, ``subnet via PublicIP dev <iface>``.

No device of its own: the routes live on the shared underlay interface and are ours only by
their ``proto``. host-gw needs every host on one L2 segment; a peer that is not directly
reachable is skipped and reported (log + ``SyncReport.skipped``) instead of being left for the
kernel to refuse with "network is unreachable" (flannel #598, #996).
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

from backends.base import LeaseContribution
from backends.render import ReconcilingBackend, Rendered, is_direct
from netagent.dataplane import Entry, Route, RouteLookup
from netagent.lease import Lease


def render_hostgw_peers(
    peers: Mapping[IPv4Network, Lease],
    *,
    iface_index: int,
    own_ip: IPv4Address | None = None,
    lookups: Mapping[IPv4Address, RouteLookup | None],
) -> Rendered:
    """A route via the peer's PublicIP for each host-gw peer the interface reaches directly."""
    entries: dict[IPv4Network, tuple[Entry, ...]] = {}
    skipped: dict[IPv4Network, str] = {}
    for subnet, lease in peers.items():
        btype, public = lease.attrs.backend_type, lease.attrs.public_ip
        if btype != "host-gw":
            skipped[subnet] = f"BackendType {btype or '(none)'!r} is not host-gw; ignoring"
            continue
        if own_ip is not None and public == own_ip:
            skipped[subnet] = f"lease has our own PublicIP {own_ip} (a stale lease of this host?)"
            continue
        lookup = lookups.get(public)
        if not is_direct(lookup, iface_index):
            if lookup is None:
                how = "no route"
            elif lookup.gateway is not None:
                how = f"reached via gateway {lookup.gateway}"
            else:
                how = f"reached through another interface (index {lookup.oif})"
            skipped[subnet] = (f"PublicIP {public} is not directly reachable on the interface "
                               f"({how}); host-gw needs all hosts on one L2 segment")
            continue
        entries[subnet] = (Route(subnet, gateway=public, oif=iface_index),)
    return Rendered(entries, skipped)


class HostGwBackend(ReconcilingBackend):
    type_name = "host-gw"

    def prepare(self) -> LeaseContribution:
        if self.host.public_ip != self.host.iface_addr:
            raise RuntimeError(
                f"host-gw: PublicIP {self.host.public_ip} differs from the interface address "
                f"{self.host.iface_addr}; probably behind NAT, which host-gw cannot work through"
            )
        self.reconciler = self._new_reconciler(None)
        return LeaseContribution(backend_type="host-gw", backend_data="",
                                 mtu=self.host.iface_mtu)

    def activate(self, own: Lease) -> None:
        self.own = own

    def render(self, peers: Mapping[IPv4Network, Lease],
               lookups: Mapping[IPv4Address, RouteLookup | None]) -> Rendered:
        return render_hostgw_peers(peers, iface_index=self.host.iface_index,
                                   own_ip=self.host.public_ip, lookups=lookups)

    def wants_lookup(self, lease: Lease) -> bool:
        return lease.attrs.backend_type == "host-gw"
