"""The peer table: a pure fold of lease snapshots and watch events into peer id -> Lease.

A peer is known by its lease's :attr:`~netagent.lease.Lease.ident`: the IPv4 subnet, or the
IPv6 subnet in an IPv6-only network.

Like flannel's LeaseWatcher (snapshot diff, upsert by subnet) but testable on its own: no I/O,
no clock. Malformed values are skipped with a reason and never remove a peer that was valid
before (its kernel entries keep serving traffic until a valid value or a delete arrives).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Network

from netagent.lease import (
    Lease,
    LeaseError,
    PeerId,
    decode_lease,
    lease_ident,
    parse_subnet_key,
    subnet_within,
)


@dataclass(frozen=True)
class RawLease:
    """A subnets/ key as read from etcd: last path element, value, lease id, revision."""

    name: str
    value: bytes
    lease_id: int = 0
    revision: int = 0


@dataclass
class PeerChanges:
    added: set[PeerId] = field(default_factory=set)
    removed: set[PeerId] = field(default_factory=set)
    #: key name -> why it was skipped
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> frozenset[PeerId]:
        return frozenset(self.added | self.removed)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class PeerTable:
    """ident -> Lease for every lease in etcd inside our network, except our own.

    ``network`` is the config's primary network (IPv4, or IPv6 when IPv4 is off), ``network6``
    the IPv6 network beside an IPv4 one (dual stack). A lease is inside when its subnet of the
    primary family is in ``network``; in a dual-stack network a lease with no IPv4 subnet (an
    IPv6-only lease) is inside by its IPv6 subnet, and in an IPv6-only network a dual-stack
    lease is inside by its IPv6 side. So while the hosts of a live address-family switch
    re-lease one by one, the old and the new key of a host are both peers for a moment, each
    wanting the same entries of the family that stays (the reconciler keeps an entry while
    any peer wants it): the traffic of that family never sees the host leaseless.

    Leases outside the network (left over from before a live network change, or written for
    another network) are kept aside in `outside`, so a later network change can bring them back.
    A lease holding one of our own subnets (``own_subnet``, the ident; ``own_ipv6``, our IPv6
    subnet beside an IPv4 ident) is ours, whichever key it sits under: never a peer.
    """

    def __init__(self, own_subnet: PeerId | None = None,
                 network: PeerId | None = None, *, own_ipv6: IPv6Network | None = None,
                 network6: IPv6Network | None = None) -> None:
        self.own_subnet = own_subnet
        self.own_ipv6 = own_ipv6
        self.network = network
        self.network6 = network6
        self.peers: dict[PeerId, Lease] = {}
        self.outside: dict[PeerId, Lease] = {}
        #: other keys naming a peer's ident (key name -> lease), displaced by a later put: a
        #: host's old key during an address-family switch, or the short-lived key of a host
        #: that lost a subnet clash. When the key in `peers` goes, one of these takes over,
        #: so a key's delete never hides another live key of the same subnet.
        self.shadowed: dict[PeerId, dict[str, Lease]] = {}
        #: key name -> reason, for keys currently holding an unusable value
        self.invalid: dict[str, str] = {}

    def _inside(self, lease: Lease) -> bool:
        net = self.network
        if net is None:
            return True
        if net.version == 6:
            sub6 = lease.ipv6_subnet
            return sub6 is not None and subnet_within(sub6, net)
        if lease.subnet is not None:
            return subnet_within(lease.subnet, net)
        net6, sub6 = self.network6, lease.ipv6_subnet
        return net6 is not None and sub6 is not None and subnet_within(sub6, net6)

    def _is_own(self, lease: Lease) -> bool:
        own = (self.own_subnet, self.own_ipv6)
        return (lease.subnet is not None and lease.subnet in own) or (
            lease.ipv6_subnet is not None and lease.ipv6_subnet in own)

    def _decode(self, raw: RawLease, changes: PeerChanges) -> Lease | None:
        try:
            return decode_lease(raw.name, raw.value, raw.lease_id, raw.revision)
        except LeaseError as exc:
            self.invalid[raw.name] = str(exc)
            changes.rejected[raw.name] = str(exc)
            return None

    def reset(self, snapshot: Iterable[RawLease],
              decoded: Mapping[str, Lease] | None = None) -> PeerChanges:
        """Replace the table with a full listing; report what was added and removed.

        ``decoded``: key name -> Lease already decoded from these very values (the start-up
        listing the lease choice parsed), so 5,000 leases are not decoded twice (~50 ms)."""
        changes = PeerChanges()
        new: dict[PeerId, Lease] = {}
        self.invalid = {}
        self.outside = {}
        self.shadowed = {}
        for raw in snapshot:
            lease = decoded.get(raw.name) if decoded else None
            if lease is None:
                lease = self._decode(raw, changes)
            if lease is None:
                continue
            if self._is_own(lease):
                continue
            if not self._inside(lease):
                self.outside[lease.ident] = lease
                continue
            other = new.get(lease.ident)
            if other is not None and other.key != lease.key:
                self.shadowed.setdefault(lease.ident, {})[other.key] = other
            new[lease.ident] = lease
        # a key whose value is now malformed keeps its last good lease
        for subnet, old in self.peers.items():
            if subnet not in new and old.key in self.invalid:
                new[subnet] = old
        for subnet, lease in new.items():
            if self.peers.get(subnet) != lease:
                changes.added.add(subnet)
        changes.removed = set(self.peers) - set(new)
        self.peers = new
        return changes

    def put(self, raw: RawLease) -> PeerChanges:
        changes = PeerChanges()
        lease = self._decode(raw, changes)
        if lease is None or self._is_own(lease):
            return changes
        self.invalid.pop(raw.name, None)
        if not self._inside(lease):
            self.outside[lease.ident] = lease
            if self.peers.pop(lease.ident, None) is not None:
                changes.removed.add(lease.ident)
            return changes
        current = self.peers.get(lease.ident)
        shadow = self.shadowed.get(lease.ident)
        if shadow is not None:
            shadow.pop(lease.key, None)
        if current is not None and current.key != lease.key:
            self.shadowed.setdefault(lease.ident, {})[current.key] = current
        if current != lease:
            self.peers[lease.ident] = lease
            changes.added.add(lease.ident)
        return changes

    def delete(self, name: str) -> PeerChanges:
        """A key was deleted. Its name gives the subnet (a lease's subnet comes from its key),
        so this is a dict lookup, not a scan: with 5,000 peers the scan (re-deriving every
        lease's key name) cost ~10 ms per delete event."""
        changes = PeerChanges()
        self.invalid.pop(name, None)
        try:
            candidates = [lease_ident(*parse_subnet_key(name))]
        except LeaseError:  # never stored under this name, but look everywhere to be sure
            candidates = [*self.peers, *self.outside]
        for subnet in candidates:
            shadow = self.shadowed.get(subnet)
            if shadow is not None:
                shadow.pop(name, None)
            lease = self.peers.get(subnet)
            if lease is not None and lease.key == name:
                del self.peers[subnet]
                if shadow:  # another live key names this subnet: it serves on
                    _, self.peers[subnet] = shadow.popitem()
                    changes.added.add(subnet)
                else:
                    changes.removed.add(subnet)
            if shadow == {}:
                del self.shadowed[subnet]
            lease = self.outside.get(subnet)
            if lease is not None and lease.key == name:
                del self.outside[subnet]
        return changes

    def set_network(self, network: PeerId | None,
                    network6: IPv6Network | None = None) -> PeerChanges:
        """The network changed live: peers outside it step aside, returning ones come back."""
        changes = PeerChanges()
        self.network, self.network6 = network, network6
        for subnet in list(self.peers):
            if not self._inside(self.peers[subnet]):
                self.outside[subnet] = self.peers.pop(subnet)
                changes.removed.add(subnet)
        for subnet in list(self.outside):
            lease = self.outside[subnet]
            if self._inside(lease) and not self._is_own(lease):
                self.peers[subnet] = self.outside.pop(subnet)
                changes.added.add(subnet)
        return changes

    def set_own(self, subnet: PeerId | None, ipv6: IPv6Network | None = None) -> PeerChanges:
        """Our subnets changed (renumbering, an address family switched): a lease holding one
        of them stops being a peer entry."""
        changes = PeerChanges()
        self.own_subnet, self.own_ipv6 = subnet, ipv6
        for ident in [i for i, lease in self.peers.items() if self._is_own(lease)]:
            del self.peers[ident]
            changes.removed.add(ident)
        return changes
