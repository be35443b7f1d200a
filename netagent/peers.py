"""The peer table: a pure fold of lease snapshots and watch events into peer id -> Lease.

A peer is known by its lease's :attr:`~netagent.lease.Lease.ident`: the IPv4 subnet, or the
IPv6 subnet in an IPv6-only network.

Like flannel's LeaseWatcher (snapshot diff, upsert by subnet) but testable on its own: no I/O,
no clock. Malformed values are skipped with a reason and never remove a peer that was valid
before (its kernel entries keep serving traffic until a valid value or a delete arrives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from netagent.lease import Lease, LeaseError, PeerId, decode_lease, lease_ident, parse_subnet_key


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

    ``network`` is the config's primary network (IPv4, or IPv6 when IPv4 is off): a lease is
    inside when its ident is in it, so after a switch to an IPv6-only network the old
    dual-stack leases (known by their IPv4 subnet) step aside until their hosts re-lease.

    Leases outside the network (left over from before a live network change, or written for
    another network) are kept aside in `outside`, so a later network change can bring them back.
    """

    def __init__(self, own_subnet: PeerId | None = None,
                 network: PeerId | None = None) -> None:
        self.own_subnet = own_subnet
        self.network = network
        self.peers: dict[PeerId, Lease] = {}
        self.outside: dict[PeerId, Lease] = {}
        #: key name -> reason, for keys currently holding an unusable value
        self.invalid: dict[str, str] = {}
        #: bumped whenever `peers` changes, so readers can cache what they derive from it
        self.version = 0

    def _inside(self, subnet: PeerId) -> bool:
        net = self.network
        return net is None or (subnet.version == net.version
                               and subnet.subnet_of(net))  # type: ignore[arg-type]

    def _decode(self, raw: RawLease, changes: PeerChanges) -> Lease | None:
        try:
            return decode_lease(raw.name, raw.value, raw.lease_id, raw.revision)
        except LeaseError as exc:
            self.invalid[raw.name] = str(exc)
            changes.rejected[raw.name] = str(exc)
            return None

    def reset(self, snapshot: Iterable[RawLease]) -> PeerChanges:
        """Replace the table with a full listing; report what was added and removed."""
        changes = PeerChanges()
        new: dict[PeerId, Lease] = {}
        self.invalid = {}
        self.outside = {}
        for raw in snapshot:
            lease = self._decode(raw, changes)
            if lease is None:
                continue
            if lease.ident == self.own_subnet:
                continue
            if not self._inside(lease.ident):
                self.outside[lease.ident] = lease
                continue
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
        self.version += 1
        return changes

    def put(self, raw: RawLease) -> PeerChanges:
        changes = PeerChanges()
        lease = self._decode(raw, changes)
        if lease is None or lease.ident == self.own_subnet:
            return changes
        self.invalid.pop(raw.name, None)
        if not self._inside(lease.ident):
            self.outside[lease.ident] = lease
            if self.peers.pop(lease.ident, None) is not None:
                changes.removed.add(lease.ident)
                self.version += 1
            return changes
        if self.peers.get(lease.ident) != lease:
            self.peers[lease.ident] = lease
            changes.added.add(lease.ident)
            self.version += 1
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
            lease = self.peers.get(subnet)
            if lease is not None and lease.key == name:
                del self.peers[subnet]
                changes.removed.add(subnet)
            lease = self.outside.get(subnet)
            if lease is not None and lease.key == name:
                del self.outside[subnet]
        if changes:
            self.version += 1
        return changes

    def set_network(self, network: PeerId | None) -> PeerChanges:
        """The network changed live: peers outside it step aside, returning ones come back."""
        changes = PeerChanges()
        self.network = network
        for subnet in list(self.peers):
            if not self._inside(subnet):
                self.outside[subnet] = self.peers.pop(subnet)
                changes.removed.add(subnet)
        for subnet in list(self.outside):
            if self._inside(subnet) and subnet != self.own_subnet:
                self.peers[subnet] = self.outside.pop(subnet)
                changes.added.add(subnet)
        if changes:
            self.version += 1
        return changes

    def set_own(self, subnet: PeerId | None) -> PeerChanges:
        """Our subnet changed (renumbering): it stops or starts being a peer entry."""
        changes = PeerChanges()
        self.own_subnet = subnet
        if subnet is not None and subnet in self.peers:
            del self.peers[subnet]
            changes.removed.add(subnet)
            self.version += 1
        return changes
