"""The reconciler: desired entries per peer against what the kernel holds, written by delta.

It keeps one :class:`~netagent.kernel.delta.DeltaTracker` per entry kind (neighbours, FDB,
routes), keyed as the kernel keys entries, and adds what a generic tracker does not know: which
peer wants which key (several may; the lowest subnet wins a conflict), which routes are ours,
the write order (neighbours → FDB → routes, deletes reversed), routes held back while their
peer's L2 entries of the same family fail, and never writing over a route someone else owns.
It talks to the kernel only through :class:`~netagent.kernel.entries.Kernel`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from netagent.kernel.delta import DeltaTracker
from netagent.kernel.entries import (
    KINDS,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_NETAGENT,
    Dumps,
    Entry,
    IPAddress,
    IPNetwork,
    Kernel,
    Op,
    Route,
    RouteLookup,
)
from netagent.lease import subnet_within, subnets_overlap

log = logging.getLogger(__name__)

#: above this many pending keys of one kind, apply() skips sorting them
_SORT_LIMIT = 256
#: errors that mean "already gone" on delete
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})

Key = tuple[Any, ...]

#: dumped entries handled per slice of a sliced read-back (~1 ms of the loop's time each)
SLICE_ENTRIES = 400


@dataclass
class ApplyResult:
    added: int = 0
    removed: int = 0
    failed: dict[tuple[str, Key], str] = field(default_factory=dict)
    #: peer subnet -> why its routes were not written (conflict, dependency failed)
    blocked: dict[IPNetwork, str] = field(default_factory=dict)


def _peer_order(subnet: IPNetwork) -> tuple[int, IPNetwork]:
    """IPv4 before IPv6, then by address: idents of both families may want one key while a
    host re-leases across an address-family switch (its old and new key)."""
    return subnet.version, subnet


def _errno(err: Exception | None) -> int | None:
    return err.errno if isinstance(err, OSError) else None


class Reconciler:
    """Desired vs actual, keyed like the kernel; only pending keys are written.

    ``route_is_ours`` decides which dumped routes we own (our proto inside our network);
    ``device`` is the ifindex whose permanent neighbours/FDB entries are ours (None: we own none,
    as in host-gw), ``device6`` the same for the IPv6 device (``flannel-v6.<VNI>``); ``ipv6``
    adds the IPv6 route table to read-backs (dual stack). A peer is known by its lease's ident
    (its IPv4 subnet; its IPv6 subnet when the lease has no IPv4 side) and its entries may be
    of both families. Several peers may want the same key (two leases of one host share an FDB
    entry; a host's old and new key during an address-family switch): the entry stays while any
    peer wants it, and the lowest subnet (IPv4 first) wins a conflict, so the result does not
    depend on event order.
    """

    def __init__(self, kernel: Kernel, route_is_ours: Callable[[Route], bool],
                 device: int | None = None, *, device6: int | None = None,
                 ipv6: bool = False, dumps: Dumps | None = None) -> None:
        self.kernel = kernel
        #: what :meth:`read_back_steps` dumps with (None: ``kernel.sliced_dumps()``, asked
        #: for at the first sliced read-back)
        self.dumps: Dumps | None = dumps
        self.route_is_ours = route_is_ours
        self.device = device
        self.device6 = device6
        self.ipv6 = ipv6 or device6 is not None
        self._by_peer: dict[IPNetwork, tuple[Entry, ...]] = {}
        #: kind -> key -> the peer that wants it, or {peer: entry} when several do (rare: two
        #: leases of one host share an FDB entry); a dict per key would cost ~3 MB at 5,000 peers
        self._owners: dict[str, dict[Key, IPNetwork | dict[IPNetwork, Entry]]] = {
            k: {} for k in KINDS}
        #: kind -> desired (the entry that wins each key) vs actual (what we own in the kernel)
        self._tables: dict[str, DeltaTracker[Key, Entry]] = {k: DeltaTracker() for k in KINDS}
        #: routes someone else owns, at keys we might want (from the last full read-back)
        self._foreign: dict[Key, Route] = {}
        self._read: dict[Key, Route] | None = None
        #: the main table's routes that are not ours, as of the last read-back: what decides
        #: ``ip route get`` answers, so the backends know when cached lookups went stale
        self.underlay: frozenset[Route] = frozenset()
        self.synced = False

    # -- desired side (pure bookkeeping, no I/O)

    def set_peer(self, subnet: IPNetwork, entries: Iterable[Entry] | None) -> None:
        """Replace one peer's desired entries (None or empty = the peer is gone).

        Setting the same entries again is free (no key is touched), so a full sync can hand
        every peer in without re-comparing the unchanged ones here."""
        new = tuple(entries or ())
        old = self._by_peer.get(subnet, ())
        if new == old:
            return
        if new:
            self._by_peer[subnet] = new
        else:
            self._by_peer.pop(subnet, None)
        for e in old:
            self._release(e.kind, e.key, subnet)
        for e in new:
            self._claim(e.kind, e.key, subnet, e)

    def _claim(self, kind: str, key: Key, subnet: IPNetwork, e: Entry) -> None:
        owners, table = self._owners[kind], self._tables[kind]
        o = owners.get(key)
        if o is None or (not isinstance(o, dict) and o == subnet):
            owners[key] = subnet
            table.set_desired(key, e)
            return
        if not isinstance(o, dict):
            o = owners[key] = {o: table.desired[key]}
        o[subnet] = e
        table.set_desired(key, o[min(o, key=_peer_order)])  # the lowest subnet wins a key

    def _release(self, kind: str, key: Key, subnet: IPNetwork) -> None:
        owners, table = self._owners[kind], self._tables[kind]
        o = owners.get(key)
        if o is None:
            return
        if isinstance(o, dict):
            o.pop(subnet, None)
            if len(o) == 1:
                (p, e), = o.items()
                owners[key] = p
                table.set_desired(key, e)
            else:
                table.set_desired(key, o[min(o, key=_peer_order)])
        elif o == subnet:
            del owners[key]
            table.delete_desired(key)

    def _claims(self, kind: str, key: Key) -> dict[IPNetwork, Entry]:
        """Every peer that wants ``key``, with the entry it wants."""
        o = self._owners[kind].get(key)
        if o is None:
            return {}
        if isinstance(o, dict):
            return o
        return {o: self._tables[kind].desired[key]}

    def peers(self) -> frozenset[IPNetwork]:
        return frozenset(self._by_peer)

    def peer_keys(self) -> list[IPNetwork]:
        """The peers with entries, as a list (no hashing: cheap at any size)."""
        return list(self._by_peer)

    def desired(self) -> dict[str, dict[Key, Entry]]:
        """The effective desired entries by kind and key (lowest subnet wins a key)."""
        return {kind: dict(t.desired) for kind, t in self._tables.items()}

    # -- kernel side

    def resync(self) -> None:
        """Read back what we own (one dump per table) and compare every key."""
        self.read_back()
        self.compare()

    def read_back(self) -> None:
        """One dump per table: what we own now, and the routes that are not ours."""
        tables, kernel = self._tables, self.kernel
        devices = [(d, f) for d, f in ((self.device, 4), (self.device6, 6)) if d is not None]
        # generators: the dumped entries go straight into the trackers (no list of 15,000
        # (key, entry) pairs beside them at the peak)
        tables["neigh"].replace_actual(
            (n.key, n) for d, f in devices
            for n in kernel.dump_neighs(d, tables["neigh"].desired, f))
        tables["fdb"].replace_actual(
            (e.key, e) for d, _f in devices for e in kernel.dump_fdb(d, tables["fdb"].desired))
        want_routes = tables["route"].desired
        routes = kernel.dump_routes(RT_TABLE_MAIN, want_routes)
        if self.ipv6:
            routes = [*routes, *kernel.dump_routes(RT_TABLE_MAIN, want_routes, 6)]
        foreign: dict[Key, Route] = {}

        def ours() -> Iterator[tuple[Key, Entry]]:
            for r in routes:
                if self.route_is_ours(r):
                    yield r.key, r
                else:
                    foreign[r.key] = r

        tables["route"].replace_actual(ours())
        self._read = foreign
        self.underlay = frozenset(foreign.values())

    def read_back_steps(self, per_slice: int | None = None) -> Generator[None, None, None]:
        """The drift repair's read-back in slices: yields after every ``per_slice`` dumped
        entries, so the caller can handle events between slices; the trackers are changed only
        by the last step, by what the dumps show that the trackers did not know.

        The caller may write in between (events: an apply, a kernel deletion). A key whose
        actual side changed after the read-back began is left as the loop knows it, whatever
        the (possibly older) dump said: the write or the event is newer than what was read, so
        a stale read never undoes it. Everything else is compared as :meth:`read_back` does,
        key by key: a dumped entry unlike what we believe is held is taken in, a held key the
        dumps did not show is forgotten (and so written again), routes someone else owns are
        noted. Closing the generator while it reads changes nothing; in its last steps (one per
        kind) each kind is taken in whole or not at all."""
        if not self.synced:  # the first read-back is the start-up one: whole
            self.read_back()
            return
        per_slice = per_slice or SLICE_ENTRIES
        if self.dumps is None:
            self.dumps = self.kernel.sliced_dumps()
        tables, dumps = self._tables, self.dumps
        devices = [(d, f) for d, f in ((self.device, 4), (self.device6, 6)) if d is not None]
        for t in tables.values():
            t.touched = set()
        done = False
        try:
            seen: dict[str, set[Key]] = {k: set() for k in KINDS}
            #: key -> the dumped entry, where it differs from what the tracker held then
            found: dict[str, dict[Key, Entry]] = {k: {} for k in KINDS}
            foreign: dict[Key, Route] = {}
            n = 0

            def note(kind: str, e: Entry) -> None:
                k = e.key
                seen[kind].add(k)
                have = tables[kind].actual.get(k)
                if have is e or have == e:
                    if found[kind]:
                        found[kind].pop(k, None)  # a key seen twice: the last answer stands
                else:
                    found[kind][k] = e

            for d, f in devices:
                for nb in dumps.dump_neighs(d, tables["neigh"].desired, f):
                    note("neigh", nb)
                    n += 1
                    if n % per_slice == 0:
                        yield
            for d, _f in devices:
                for fd in dumps.dump_fdb(d, tables["fdb"].desired):
                    note("fdb", fd)
                    n += 1
                    if n % per_slice == 0:
                        yield
            for fam in (4, 6) if self.ipv6 else (4,):
                for r in dumps.dump_routes(RT_TABLE_MAIN, tables["route"].desired, fam):
                    if self.route_is_ours(r):
                        note("route", r)
                    else:
                        foreign[r.key] = r
                    n += 1
                    if n % per_slice == 0:
                        yield
            done = True  # every dump read to its end
            # the held keys the dumps did not show, also in slices (each check hashes a key:
            # ~1 µs, the addresses' hashes are Python code; 60,000 keys at 20,000 peers)
            gone: dict[str, list[Key]] = {k: [] for k in KINDS}
            for kind in KINDS:
                held, shown, out = list(tables[kind].actual), seen[kind], gone[kind]
                for i in range(0, len(held), per_slice):
                    yield
                    out += (k for k in held[i:i + per_slice] if k not in shown)
            # the last steps, a kind each: what changed meanwhile is newer than the dumps
            for i, kind in enumerate(KINDS):
                if i:
                    yield
                t = tables[kind]
                skip, t.touched = t.touched or set(), None
                for k, got in found[kind].items():
                    if k not in skip:
                        t.set_actual(k, got)
                for k in gone[kind]:
                    if k not in skip:
                        t.delete_actual(k)
                if kind == "route":
                    self._read = {k: r for k, r in foreign.items() if k not in skip}
                    self._read.update((k, r) for k, r in self._foreign.items() if k in skip)
                    self.underlay = frozenset(foreign.values())
        finally:
            for t in tables.values():
                t.touched = None
            if not done:
                dumps.abandon()  # a dump left half-read: its socket goes

    def compare(self) -> None:
        """After :meth:`read_back` (and the desired side is set): note the foreign routes at
        keys we want. The trackers already hold every difference; this marks the reconciler
        synced (a backend does not apply before its first full compare)."""
        foreign = self._read if self._read is not None else {}
        self._read = None
        wanted_routes = self._owners["route"]
        self._foreign = {k: r for k, r in foreign.items() if k in wanted_routes}
        self.synced = True

    def desired_keys(self, kind: str) -> Mapping[Key, Entry]:
        """The desired entries of one kind by key (a live view: read, never keep)."""
        table = self._tables.get(kind)
        return table.desired if table is not None else {}

    def entry_gone(self, kind: str, key: Key) -> bool:
        """The kernel announced that the entry at ``key`` was deleted: forget it on the actual
        side, so the next :meth:`apply` writes it again. True when we want that key (the echo
        of our own delete, or someone else's entry, is not ours to repair)."""
        table = self._tables.get(kind)
        if table is None or key not in table.desired:
            return False
        if key in table.actual:
            table.delete_actual(key)
        return True

    def forget_device(self, index: int | None = None) -> None:
        """Our device ``index`` (None: every device of ours) went away, and with it its
        neighbours and FDB entries."""
        for kind in ("neigh", "fdb"):
            table = self._tables[kind]
            gone = [k for k, e in table.actual.items()
                    if index is None or e.ifindex == index]  # type: ignore[union-attr]
            for k in gone:
                table.delete_actual(k)

    def apply(self) -> ApplyResult:
        """Write the pending keys in order: upserts neigh → fdb → route, then deletes reversed.

        A route is held back while a neighbour/FDB entry of the same peer is still failing (the
        kernel would otherwise route into an unresolved gateway), and never written over a route
        someone else owns unless that route is on our device or identical but for its proto
        (a route flannel left behind: adopting it is how a migration from flannel converges).
        """
        result = ApplyResult()
        ups: dict[str, list[Entry]] = {}
        dels: dict[str, list[Entry]] = {}
        for kind in KINDS:
            table = self._tables[kind]
            up, down = table.pending()
            # sorted for readable logs and repeatable tests; a big batch (a first sync) goes in
            # set order: the kernel does not care about the order within one kind
            if len(up) + len(down) <= _SORT_LIMIT:
                up.sort(key=repr)
                down.sort(key=repr)
            want, have = table.desired, table.actual
            ups[kind] = [want[k] for k in up]
            dels[kind] = [have[k] for k in down]
        # phase 1: neighbours and FDB
        first = [Op("replace", e) for k in ("neigh", "fdb") for e in ups[k]]
        #: (peer, IP version) whose L2 entries failed: only that family's route waits
        broken: dict[tuple[IPNetwork, int], str] = {}
        for op, err in zip(first, self.kernel.write(first), strict=True):
            if self._record(op, err, result):
                # a neighbour's overlay address, an FDB entry's underlay address (the IPv6
                # device's entries point at PublicIPv6): the family whose route must wait
                version = op.entry.dst.version
                for peer in self._claims(op.entry.kind, op.entry.key):
                    broken[(peer, version)] = f"{op.entry.kind} failed: {err}"
        # phase 2: routes (not over foreign routes, not for peers whose L2 entries failed)
        routes: list[Op] = []
        foreign, actual_routes = self._foreign, self._tables["route"].actual
        for e in ups["route"]:
            assert isinstance(e, Route)
            key = e.key
            other = foreign.get(key)
            if broken or other is not None:
                peers = self._claims("route", key)
                version = e.dst.version
                why = next((broken[(p, version)] for p in peers if (p, version) in broken),
                           None)
                if why is None and other is not None and not self._adoptable(other, e):
                    why = (f"route {e.dst} already exists with proto {other.proto} via "
                           f"{other.gateway} (not ours, left alone)")
                if why is not None:
                    for p in peers:
                        result.blocked[p] = why
                    continue
            # a key we have never seen anything at is created, not replaced: a route someone
            # added since the last read-back makes it fail with EEXIST instead of being clobbered
            known = other is not None or key in actual_routes
            routes.append(Op("replace" if known else "create", e))
        # phase 3: deletes, reversed
        last = routes + [Op("delete", e) for k in reversed(KINDS) for e in dels[k]]
        for op, err in zip(last, self.kernel.write(last), strict=True):
            if op.action == "create" and _errno(err) == errno.EEXIST:
                for p in self._claims("route", op.entry.key):
                    result.blocked[p] = (f"route {op.entry.dst} already exists and is not ours "
                                         "(left alone)")
                continue
            self._record(op, err, result)
        for table in self._tables.values():
            table.trim()
        return result

    def _record(self, op: Op, err: Exception | None, result: ApplyResult) -> bool:
        """Book one write's outcome; True when it failed (the key then stays pending)."""
        e = op.entry
        if err is not None and op.action == "delete" and _errno(err) in _GONE:
            err = None
        if err is not None:
            result.failed[(e.kind, e.key)] = str(err)
            log.warning("%s %s %s failed (retried next sync): %s", op.action, e.kind, e, err)
            return True
        table = self._tables[e.kind]
        if op.action == "delete":
            table.delete_actual(e.key)
            result.removed += 1
        else:
            table.mark_written(e.key, e)  # e is the desired entry: apply() wrote it from there
            if self._foreign:
                self._foreign.pop(e.key, None)
            result.added += 1
        return False

    def _adoptable(self, other: Route, want: Route) -> bool:
        same_but_proto = (other.gateway, other.oif) == (want.gateway, want.oif)
        return same_but_proto or (other.oif is not None
                                  and other.oif in (self.device, self.device6))

    def counts(self) -> dict[str, int]:
        has_device = self.device is not None or self.device6 is not None
        return {kind: len(t.actual) for kind, t in self._tables.items()
                if kind == "route" or has_device}


def route_owner(network: IPv4Network | None, own: Callable[[], IPv4Network | None],
                network6: IPv6Network | None = None,
                own6: Callable[[], IPv6Network | None] | None = None
                ) -> Callable[[Route], bool]:
    """Our peer routes: our proto, a destination strictly inside the flannel Network (IPv6:
    IPv6Network), and not our own subnet (other parts of the agent may mark whole-Network or
    own-subnet routes with the same proto; the peer sweep must not touch those). Only unicast
    routes: the own-subnet blackhole route (``--ip-blackhole-route``) is never a peer route,
    even one left over from an earlier subnet."""

    def is_ours(r: Route) -> bool:
        if r.proto != RTPROT_NETAGENT or r.rtype != RTN_UNICAST:
            return False
        if r.dst.version == 6:
            net: IPNetwork | None = network6
            mine: IPNetwork | None = own6() if own6 is not None else None
        else:
            net, mine = network, own()
        if net is None:
            return False
        # by ints: ipaddress's own methods would cache an address and a __dict__ on each
        # peer subnet (the routes' dst are the leases' own objects)
        if not subnet_within(r.dst, net) or r.dst.prefixlen <= net.prefixlen:
            return False
        return mine is None or not subnets_overlap(r.dst, mine)

    return is_ours


def lookup_all(kernel: Kernel, ips: Iterable[IPAddress]) -> Mapping[IPAddress,
                                                                     RouteLookup | None]:
    """Route lookups for a set of underlay addresses (one per distinct address, in a few
    netlink sends)."""
    return kernel.lookup_routes(set(ips))
