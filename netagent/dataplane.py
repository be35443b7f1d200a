"""The kernel side of the backends: entry types, a reconciler, and the netlink kernel.

Three layers, so that everything but the last one runs without root:

* **Entries** (:class:`Neigh`, :class:`Fdb`, :class:`Route`) are frozen dataclasses keyed exactly
  as the kernel keys them (neighbour: ifindex + IP; FDB: ifindex + MAC + dst; route: table + dst +
  metric), so a diff can never alias two kernel objects.
* :class:`Reconciler` keeps desired entries per peer and the entries *we own* that the kernel is
  believed to hold, marks keys dirty when either side changes, and applies only dirty keys in a
  fixed order (neighbours, FDB, routes; deletes reversed). A failed item stays dirty and is
  retried on the next apply; the rest still applies. A full resync re-reads the kernel with one
  dump per table and sweeps our own entries that nothing justifies.
* :class:`Kernel` is the narrow interface the reconciler and the backends need;
  :class:`NetlinkKernel` implements it over raw rtnetlink (batched writes, one dump per table;
  ``batched=False`` is the one-pyroute2-call-per-entry reference path), and
  ``tests/fakekernel.py`` implements it in memory with failure injection.

**What is ours.** Routes carry ``proto`` :data:`RTPROT_NETAGENT`; neighbours and FDB entries are
ours because they live on our own vxlan device. Nothing else is ever deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, ClassVar, Literal, Protocol

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

log = logging.getLogger(__name__)

#: Route protocol number marking routes netagent made. Linux leaves values above RTPROT_STATIC
#: (4) to user space; iproute2's rt_protos names 8-18, 42, 99 and 186-192, and other agents use
#: their own (Calico 80, BIRD 12). 111 ("o" in ASCII) is named by none of them. Operators can name
#: it with ``echo "111 netagent" > /etc/iproute2/rt_protos.d/netagent.conf``.
RTPROT_NETAGENT = 111
RT_TABLE_MAIN = 254
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
AF_INET = 2
AF_INET6 = 10
AF_BRIDGE = 7
#: the metric the kernel gives an IPv6 route added with none (IP6_RT_PRIO_USER)
IPV6_DEFAULT_METRIC = 1024

#: kinds in apply order; deletes run in the reverse order
KINDS: tuple[EntryKind, ...] = ("neigh", "fdb", "route")
#: above this many dirty keys of one kind, apply() skips sorting them
_SORT_LIMIT = 256
#: errors that mean "already gone" on delete
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})


# --------------------------------------------------------------------------- entries

EntryKind = Literal["neigh", "fdb", "route"]


@dataclass(frozen=True, slots=True)
class Neigh:
    """A permanent ARP (IPv6: NDP) entry: the peer's overlay gateway address → its VTEP MAC."""

    ifindex: int
    dst: IPAddress
    lladdr: str
    _key: tuple[Any, ...] = field(init=False, repr=False, compare=False, hash=False)
    kind: ClassVar[EntryKind] = "neigh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", (self.ifindex, self.dst))

    @property
    def key(self) -> tuple[Any, ...]:
        """Computed once: every table holding this entry shares one key tuple."""
        return self._key


@dataclass(frozen=True, slots=True)
class Fdb:
    """A permanent vxlan FDB entry (flag self): the peer's VTEP MAC → its underlay address."""

    ifindex: int
    lladdr: str
    dst: IPAddress
    _key: tuple[Any, ...] = field(init=False, repr=False, compare=False, hash=False)
    kind: ClassVar[EntryKind] = "fdb"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", (self.ifindex, self.lladdr, self.dst))

    @property
    def key(self) -> tuple[Any, ...]:
        """Computed once: every table holding this entry shares one key tuple."""
        return self._key


@dataclass(frozen=True, slots=True)
class Route:
    """A unicast route (either family); compared on every attribute we set, keyed like the
    kernel. An IPv6 route asked for with metric 0 gets 1024 from the kernel, so it is stored
    as 1024 here and a read-back compares equal."""

    dst: IPNetwork
    gateway: IPAddress | None
    oif: int | None
    onlink: bool = False
    table: int = RT_TABLE_MAIN
    metric: int = 0
    proto: int = RTPROT_NETAGENT
    _key: tuple[Any, ...] = field(init=False, repr=False, compare=False, hash=False)
    kind: ClassVar[EntryKind] = "route"

    def __post_init__(self) -> None:
        if self.metric == 0 and self.dst.version == 6:
            object.__setattr__(self, "metric", IPV6_DEFAULT_METRIC)
        object.__setattr__(self, "_key", (self.table, self.dst, self.metric))

    @property
    def key(self) -> tuple[Any, ...]:
        """Computed once: every table holding this entry shares one key tuple."""
        return self._key


Entry = Neigh | Fdb | Route


@dataclass(frozen=True)
class Op:
    """One kernel write. ``replace`` creates or overwrites the entry at ``entry.key``;
    ``create`` only creates (EEXIST when anything holds the key: a route we do not know)."""

    action: Literal["replace", "create", "delete"]
    entry: Entry


@dataclass(frozen=True)
class LinkInfo:
    """What we read back about a link (only the attributes the backends compare)."""

    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    up: bool
    addrs: tuple[IPInterface, ...] = ()
    vni: int | None = None
    port: int | None = None
    local: IPAddress | None = None
    underlay_index: int | None = None
    learning: bool | None = None
    gbp: bool = False


@dataclass(frozen=True)
class VxlanSpec:
    """The vxlan device we want; the MAC is passed separately (it is chosen, not derived)."""

    name: str
    vni: int
    port: int
    #: an IPv6 local address makes an IPv6-underlay device (``flannel-v6.<VNI>``)
    local: IPAddress
    underlay_index: int
    mtu: int
    learning: bool = False
    gbp: bool = False


@dataclass(frozen=True)
class RouteLookup:
    """The kernel's answer to ``ip route get``: gateway (None = directly connected) and oif."""

    gateway: IPAddress | None
    oif: int | None


class KernelError(OSError):
    """A kernel request failed; ``errno`` is the netlink error code when there is one."""


class Kernel(Protocol):
    """Everything the backends ask of the kernel. Dumps return only what we could own.

    ``want`` (key → entry, optional) lets a dump return the wanted object itself for an entry
    equal to it; a kernel may use that to remember entries between dumps (NetlinkKernel does).
    """

    def link(self, name: str) -> LinkInfo | None: ...
    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None: ...
    def delete_link(self, index: int) -> None: ...
    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None: ...
    def add_addr(self, index: int, addr: IPInterface) -> None: ...
    def del_addr(self, index: int, addr: IPInterface) -> None: ...
    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Neigh]: ...
    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> list[Fdb]: ...
    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Route]: ...
    def lookup_route(self, dst: IPAddress) -> RouteLookup | None: ...
    def write(self, ops: Sequence[Op]) -> list[Exception | None]: ...
    def disable_tx_checksum(self, ifname: str) -> str: ...


# --------------------------------------------------------------------------- reconciler


@dataclass
class ApplyResult:
    added: int = 0
    removed: int = 0
    failed: dict[tuple[str, tuple[Any, ...]], str] = field(default_factory=dict)
    #: peer subnet -> why its routes were not written (conflict, dependency failed)
    blocked: dict[IPNetwork, str] = field(default_factory=dict)


def _peer_order(subnet: IPNetwork) -> tuple[int, IPNetwork]:
    """IPv4 before IPv6, then by address: idents of both families may want one key while a
    host re-leases across an address-family switch (its old and new key)."""
    return subnet.version, subnet


class Reconciler:
    """Desired vs actual, keyed like the kernel; only dirty keys are written.

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
                 ipv6: bool = False) -> None:
        self.kernel = kernel
        self.route_is_ours = route_is_ours
        self.device = device
        self.device6 = device6
        self.ipv6 = ipv6 or device6 is not None
        self._by_peer: dict[IPNetwork, tuple[Entry, ...]] = {}
        #: kind -> key -> the peer that wants it, or {peer: entry} when several do (rare: two
        #: leases of one host share an FDB entry); a dict per key would cost ~3 MB at 5,000 peers
        self._owners: dict[str, dict[tuple[Any, ...], IPNetwork | dict[IPNetwork, Entry]]] = {
            k: {} for k in KINDS}
        #: kind -> key -> the entry that wins the key (kept in step with _owners)
        self._effective: dict[str, dict[tuple[Any, ...], Entry]] = {k: {} for k in KINDS}
        self._actual: dict[str, dict[tuple[Any, ...], Entry]] = {k: {} for k in KINDS}
        #: routes someone else owns, at keys we might want (from the last full read-back)
        self._foreign: dict[tuple[Any, ...], Route] = {}
        self._read: dict[tuple[Any, ...], Route] | None = None
        #: the main table's routes that are not ours, as of the last read-back: what decides
        #: ``ip route get`` answers, so the backends know when cached lookups went stale
        self.underlay: frozenset[Route] = frozenset()
        self._dirty: dict[str, set[tuple[Any, ...]]] = {k: set() for k in KINDS}
        self.synced = False

    # -- desired side (pure bookkeeping, no I/O)

    def set_peer(self, subnet: IPNetwork, entries: Iterable[Entry] | None) -> None:
        """Replace one peer's desired entries (None or empty = the peer is gone).

        Setting the same entries again is free (no key is marked), so a full sync can hand
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

    def _claim(self, kind: str, key: tuple[Any, ...], subnet: IPNetwork, e: Entry) -> None:
        owners, effective = self._owners[kind], self._effective[kind]
        o = owners.get(key)
        if o is None or (not isinstance(o, dict) and o == subnet):
            owners[key] = subnet
            effective[key] = e
        else:
            if not isinstance(o, dict):
                o = owners[key] = {o: effective[key]}
            o[subnet] = e
            effective[key] = o[min(o, key=_peer_order)]  # the lowest subnet wins a key
        self._dirty[kind].add(key)

    def _release(self, kind: str, key: tuple[Any, ...], subnet: IPNetwork) -> None:
        owners, effective = self._owners[kind], self._effective[kind]
        o = owners.get(key)
        if o is None:
            return
        if isinstance(o, dict):
            o.pop(subnet, None)
            if len(o) == 1:
                (p, e), = o.items()
                owners[key], effective[key] = p, e
            else:
                effective[key] = o[min(o, key=_peer_order)]
        elif o == subnet:
            del owners[key]
            del effective[key]
        self._dirty[kind].add(key)

    def _claims(self, kind: str, key: tuple[Any, ...]) -> dict[IPNetwork, Entry]:
        """Every peer that wants ``key``, with the entry it wants."""
        o = self._owners[kind].get(key)
        if o is None:
            return {}
        if isinstance(o, dict):
            return o
        return {o: self._effective[kind][key]}

    def peers(self) -> frozenset[IPNetwork]:
        return frozenset(self._by_peer)

    def desired(self) -> dict[str, dict[tuple[Any, ...], Entry]]:
        """The effective desired entries by kind and key (lowest subnet wins a key)."""
        return {kind: dict(table) for kind, table in self._effective.items()}

    def _winner(self, kind: str, key: tuple[Any, ...]) -> Entry | None:
        return self._effective[kind].get(key)

    # -- kernel side

    def resync(self) -> None:
        """Read back what we own (one dump per table) and mark every differing key."""
        self.read_back()
        self.compare()

    def read_back(self) -> None:
        """One dump per table: what we own now, and the routes that are not ours."""
        actual: dict[str, dict[tuple[Any, ...], Entry]] = {k: {} for k in KINDS}
        eff = self._effective

        def keep(kind: str, e: Entry) -> None:
            # an entry equal to the one we want is kept as that object, so the dumped copy is
            # freed at once (15,000 copies would otherwise raise the peak RSS by ~6 MB)
            w = eff[kind].get(e.key)
            actual[kind][e.key] = w if w is e or (w is not None and w == e) else e

        for device, family in ((self.device, 4), (self.device6, 6)):
            if device is None:
                continue
            for n in self.kernel.dump_neighs(device, eff["neigh"], family):
                keep("neigh", n)
            for f in self.kernel.dump_fdb(device, eff["fdb"]):
                keep("fdb", f)
        foreign: dict[tuple[Any, ...], Route] = {}
        routes = self.kernel.dump_routes(RT_TABLE_MAIN, eff["route"])
        if self.ipv6:
            routes = [*routes, *self.kernel.dump_routes(RT_TABLE_MAIN, eff["route"], 6)]
        for r in routes:
            if self.route_is_ours(r):
                keep("route", r)
            else:
                foreign[r.key] = r
        self._actual = actual
        self._read = foreign
        self.underlay = frozenset(foreign.values())

    def compare(self) -> None:
        """After :meth:`read_back` (and the desired side is set): mark the keys where the
        kernel differs from what we want, by dict lookups only (no kernel calls)."""
        foreign = self._read if self._read is not None else {}
        self._read = None
        wanted_routes = self._owners["route"]
        self._foreign = {k: r for k, r in foreign.items() if k in wanted_routes}
        for kind in KINDS:
            want, have = self._effective[kind], self._actual[kind]
            dirty = self._dirty[kind]
            for k, e in have.items():
                w = want.get(k)
                if w is e:
                    continue
                if w is None or w != e:
                    dirty.add(k)
                else:
                    have[k] = w  # keep one object per entry, not a dumped twin (memory)
            dirty.update(want.keys() - have.keys())
        self.synced = True

    def forget_device(self, index: int | None = None) -> None:
        """Our device ``index`` (None: every device of ours) went away, and with it its
        neighbours and FDB entries."""
        for kind in ("neigh", "fdb"):
            actual = self._actual[kind]
            gone = [k for k, e in actual.items()
                    if index is None or e.ifindex == index]  # type: ignore[union-attr]
            self._dirty[kind].update(gone)
            for k in gone:
                del actual[k]

    def apply(self) -> ApplyResult:
        """Write the dirty keys in order: upserts neigh → fdb → route, then deletes reversed.

        A route is held back while a neighbour/FDB entry of the same peer is still failing (the
        kernel would otherwise route into an unresolved gateway), and never written over a route
        someone else owns unless that route is on our device or identical but for its proto
        (a route flannel left behind: adopting it is how a migration from flannel converges).
        """
        result = ApplyResult()
        ups: dict[str, list[Entry]] = {k: [] for k in KINDS}
        dels: dict[str, list[Entry]] = {k: [] for k in KINDS}
        for kind in KINDS:
            dirty = self._dirty[kind]
            effective, actual = self._effective[kind], self._actual[kind]
            up, down = ups[kind], dels[kind]
            settled = []
            # sorted for readable logs and repeatable tests; a big batch (a first sync) goes in
            # set order: the kernel does not care about the order within one kind
            keys = sorted(dirty, key=repr) if len(dirty) <= _SORT_LIMIT else dirty
            for key in keys:
                want = effective.get(key)
                have = actual.get(key)
                if want is None:
                    if have is None:
                        settled.append(key)
                    else:
                        down.append(have)
                elif want == have:
                    settled.append(key)
                else:
                    up.append(want)
            dirty.difference_update(settled)
        # phase 1: neighbours and FDB
        first = [Op("replace", e) for k in ("neigh", "fdb") for e in ups[k]]
        #: (peer, IP version) whose L2 entries failed: only that family's route waits
        broken: dict[tuple[IPNetwork, int], str] = {}
        for op, err in zip(first, self.kernel.write(first), strict=True):
            if self._record(op, err, result):
                version = _entry_version(op.entry)
                for peer in self._claims(op.entry.kind, op.entry.key):
                    broken[(peer, version)] = f"{op.entry.kind} failed: {err}"
        # phase 2: routes (not over foreign routes, not for peers whose L2 entries failed)
        routes: list[Op] = []
        foreign, actual_routes = self._foreign, self._actual["route"]
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
            if op.action == "create" and getattr(err, "errno", None) == errno.EEXIST:
                for p in self._claims("route", op.entry.key):
                    result.blocked[p] = (f"route {op.entry.dst} already exists and is not ours "
                                         "(left alone)")
                continue
            self._record(op, err, result)
        for kind in KINDS:
            if not self._dirty[kind]:
                # a set never shrinks its table: after a first sync of 5,000 peers the three
                # emptied sets would keep ~1.5 MB
                self._dirty[kind] = set()
        return result

    def _record(self, op: Op, err: Exception | None, result: ApplyResult) -> bool:
        """Book one write's outcome; True when it failed."""
        e = op.entry
        if err is None and op.action != "delete":  # the common case, kept short
            key = e.key
            self._dirty[e.kind].discard(key)
            self._actual[e.kind][key] = e
            if self._foreign:
                self._foreign.pop(key, None)
            result.added += 1
            return False
        if err is not None and op.action == "delete" and getattr(err, "errno", None) in _GONE:
            err = None
        if err is not None:
            result.failed[(e.kind, e.key)] = str(err)
            log.warning("%s %s %s failed (retried next sync): %s", op.action, e.kind, e, err)
            return True
        self._dirty[e.kind].discard(e.key)
        if op.action == "delete":
            self._actual[e.kind].pop(e.key, None)
            result.removed += 1
        else:
            self._actual[e.kind][e.key] = e
            self._foreign.pop(e.key, None)
            result.added += 1
        return False

    def _adoptable(self, other: Route, want: Route) -> bool:
        same_but_proto = (other.gateway, other.oif) == (want.gateway, want.oif)
        return same_but_proto or (other.oif is not None
                                  and other.oif in (self.device, self.device6))

    def counts(self) -> dict[str, int]:
        has_device = self.device is not None or self.device6 is not None
        return {kind: len(table) for kind, table in self._actual.items()
                if kind == "route" or has_device}


def _entry_version(e: Entry) -> int:
    """The IP version an entry serves: a neighbour's overlay address, an FDB entry's underlay
    address (the IPv6 device's entries point at PublicIPv6), a route's destination."""
    return e.dst.version


# --------------------------------------------------------------------------- checksum offload


def kernel_needs_csum_workaround(release: str) -> bool:
    """Whether the vxlan tx-checksum bug (63 s delays through NAT'd vxlan) may bite this kernel.

    Same rule as Calico's Felix: kernels up to 5.7 are treated as affected (the fix, "netfilter:
    nat: never update the UDP checksum when it's 0", landed in 5.7/5.8 and stable trees are not
    reliably identifiable from the release string). Unparsable releases count as affected: the
    workaround costs a little CPU, the bug costs a minute of timeouts.
    """
    parts = release.split(".")
    try:
        major = int(parts[0])
        minor = int("".join(ch for ch in parts[1] if ch.isdigit()) or "0")
    except (IndexError, ValueError):
        return True
    return (major, minor) <= (5, 7)


# --------------------------------------------------------------------------- raw rtnetlink
#
# The bulk paths (writes and the three table dumps) speak rtnetlink directly over one socket:
# pyroute2 spends ~100 µs of Python per message encoding and parsing, which at 15,000 entries is
# seconds; packing with precompiled ``struct`` formats costs ~2 µs. Writes go out many messages
# per ``send``: the kernel walks every message of one buffer in order, answers only failures
# (no NLM_F_ACK) and acknowledges the last message of each buffer, whose answer therefore means
# "everything before me was processed". Links, addresses and route lookups use the same socket
# (one request each; lookups batched too), so the agent does not import pyroute2 at all; the
# pyroute2 versions stay as the reference path the tests compare against.

_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE, _NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_RTM_NEWNEIGH, _RTM_DELNEIGH, _RTM_GETNEIGH = 28, 29, 30
_NDA_DST, _NDA_LLADDR, _NDA_IFINDEX = 1, 2, 8
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_MULTIPATH, _RTA_TABLE = 1, 4, 5, 6, 9, 15
_RTN_UNICAST = 1
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_RTM_NEWADDR, _RTM_DELADDR, _RTM_GETADDR = 20, 21, 22
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_LINKINFO = 1, 3, 4, 18
_IFLA_INFO_KIND, _IFLA_INFO_DATA = 1, 2
_IFLA_VXLAN_ID, _IFLA_VXLAN_LINK, _IFLA_VXLAN_LOCAL, _IFLA_VXLAN_LEARNING = 1, 3, 4, 7
_IFLA_VXLAN_PORT, _IFLA_VXLAN_LOCAL6, _IFLA_VXLAN_GBP = 15, 17, 23
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
#: no duplicate address detection: our /128 on the IPv6 vxlan device is unique by lease, and
#: DAD would keep it "tentative" (unusable as a source) for a second after every start
_IFA_F_NODAD = 0x02
_RT_SCOPE_UNIVERSE, _RT_SCOPE_NOWHERE = 0, 255
#: one send: well under the default socket send buffer (212,992 bytes)
_BATCH_BYTES = 64 * 1024
#: receive buffer we ask for: a whole batch of failures (~1 KiB of skb each) must fit
_RCVBUF = 8 * 1024 * 1024

_HDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")
_ACTION_FLAGS = {
    "replace": _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_REPLACE,
    "create": _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_EXCL,
    "delete": _NLM_F_REQUEST,
}


def _rta(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return _RTA.pack(n, kind) + data + b"\0" * (-n % 4)


# whole messages of the common shapes in one ``pack`` each (header, body, attributes)
_NEIGH_SET = struct.Struct("=IHHII BxxxiHBB HH4s HH6sxx")
_FDB_MSG = struct.Struct("=IHHII BxxxiHBB HH6sxx HH4s")
_ROUTE_SET = struct.Struct("=IHHII BBBBBBBBI HHI HH4s HHI HH4s HHI")
#: where a neighbour's NDA_DST and NDA_LLADDR headers sit, and an FDB entry's NDA_LLADDR and
#: NDA_DST (the kernel's fill order), for IPv4 and IPv6 addresses: (offset, header, offset,
#: header, length); the bytes up to that length identify the entry
_Sig = tuple[int, bytes, int, bytes, int]
_NEIGH_SIGS: tuple[_Sig, ...] = (
    (12, _RTA.pack(8, _NDA_DST), 20, _RTA.pack(10, _NDA_LLADDR), 32),
    (12, _RTA.pack(20, _NDA_DST), 32, _RTA.pack(10, _NDA_LLADDR), 44),
)
_FDB_SIGS: tuple[_Sig, ...] = (
    (12, _RTA.pack(10, _NDA_LLADDR), 24, _RTA.pack(8, _NDA_DST), 32),
    (12, _RTA.pack(10, _NDA_LLADDR), 24, _RTA.pack(20, _NDA_DST), 44),
)
_UNSEEN = object()
_GET_ROUTE = struct.Struct("=IHHII BBBBBBBBI HH4s")
_GET_ROUTE6 = struct.Struct("=IHHII BBBBBBBBI HH16s")
_mac_cache: dict[str, bytes] = {}


def _mac_bytes(mac: str) -> bytes:
    raw = _mac_cache.get(mac)
    if raw is None:
        if len(_mac_cache) > 100_000:
            _mac_cache.clear()
        raw = _mac_cache[mac] = bytes.fromhex(mac.replace(":", ""))
    return raw


def encode_op(op: Op, seq: int) -> bytes:
    """One rtnetlink request for ``op``, with what ``ip``/``bridge`` send for it.

    Neighbour: RTM_NEWNEIGH/DELNEIGH, AF_INET(6), state PERMANENT. FDB: the same on AF_BRIDGE
    with flag NTF_SELF (the vxlan device's own table) and the remote as NDA_DST. Route: unicast,
    scope universe (our routes always have a gateway), our proto; a delete names the proto (the
    kernel then refuses to delete a route of another proto) and scope NOWHERE, as ``ip route
    del`` does. "replace" is CREATE|REPLACE, "create" is CREATE|EXCL. IPv4 messages of the
    common shapes are packed whole; IPv6 ones (rare) are assembled attribute by attribute.
    """
    e = op.entry
    flags = _ACTION_FLAGS[op.action]
    delete = op.action == "delete"
    if isinstance(e, Neigh):
        v6 = e.dst.version == 6
        if not delete and not v6:
            return _NEIGH_SET.pack(_NEIGH_SET.size, _RTM_NEWNEIGH, flags, seq, 0,
                                   AF_INET, e.ifindex, NUD_PERMANENT, 0, 0,
                                   8, _NDA_DST, e.dst.packed, 10, _NDA_LLADDR,
                                   _mac_bytes(e.lladdr))
        body = (_NDMSG.pack(AF_INET6 if v6 else AF_INET, e.ifindex, NUD_PERMANENT, 0, 0)
                + _rta(_NDA_DST, e.dst.packed))
        if not delete:
            body += _rta(_NDA_LLADDR, _mac_bytes(e.lladdr))
        return (_HDR.pack(_HDR.size + len(body), _RTM_DELNEIGH if delete else _RTM_NEWNEIGH,
                          flags, seq, 0) + body)
    if isinstance(e, Fdb):
        mtype = _RTM_DELNEIGH if delete else _RTM_NEWNEIGH
        if e.dst.version == 4:
            return _FDB_MSG.pack(_FDB_MSG.size, mtype, flags, seq, 0, AF_BRIDGE, e.ifindex,
                                 NUD_PERMANENT, NTF_SELF, 0, 10, _NDA_LLADDR,
                                 _mac_bytes(e.lladdr), 8, _NDA_DST, e.dst.packed)
        body = (_NDMSG.pack(AF_BRIDGE, e.ifindex, NUD_PERMANENT, NTF_SELF, 0)
                + _rta(_NDA_LLADDR, _mac_bytes(e.lladdr)) + _rta(_NDA_DST, e.dst.packed))
        return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body
    table = e.table if e.table < 256 else 0
    v6 = e.dst.version == 6
    if not delete and not v6 and e.gateway is not None and e.oif is not None:
        return _ROUTE_SET.pack(_ROUTE_SET.size, _RTM_NEWROUTE, flags, seq, 0,
                               AF_INET, e.dst.prefixlen, 0, 0, table, e.proto,
                               _RT_SCOPE_UNIVERSE, _RTN_UNICAST, RTNH_F_ONLINK if e.onlink else 0,
                               8, _RTA_TABLE, e.table, 8, _RTA_DST, e.dst.network_address.packed,
                               8, _RTA_PRIORITY, e.metric, 8, _RTA_GATEWAY, e.gateway.packed,
                               8, _RTA_OIF, e.oif)
    family = AF_INET6 if v6 else AF_INET
    if delete:
        mtype = _RTM_DELROUTE
        head = _RTMSG.pack(family, e.dst.prefixlen, 0, 0, table, e.proto, _RT_SCOPE_NOWHERE,
                           0, 0)
    else:
        mtype = _RTM_NEWROUTE
        head = _RTMSG.pack(family, e.dst.prefixlen, 0, 0, table, e.proto,
                           _RT_SCOPE_UNIVERSE, _RTN_UNICAST, RTNH_F_ONLINK if e.onlink else 0)
    body = (head + _rta(_RTA_TABLE, _U32.pack(e.table))
            + _rta(_RTA_DST, e.dst.network_address.packed)
            + _rta(_RTA_PRIORITY, _U32.pack(e.metric)))
    if not delete:
        if e.gateway is not None:
            body += _rta(_RTA_GATEWAY, e.gateway.packed)
        if e.oif is not None:
            body += _rta(_RTA_OIF, _U32.pack(e.oif))
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """A message's top-level attributes (type without flag bits → payload)."""
    out: dict[int, bytes] = {}
    unpack = _RTA.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _open_netlink(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket; with ``netns``, created inside that namespace.

    A socket keeps the namespace it was created in, so this thread enters the namespace only
    for the ``socket()`` call (``setns`` changes the calling thread only) and comes back.
    """
    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)

    if netns is None:
        return make()
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(exc.errno, f"network namespace {netns}: {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(err, f"setns {netns}: {os.strerror(err)}")
        try:
            return make()
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise SystemExit("cannot return to the original network namespace")
    finally:
        os.close(home)
        os.close(target)


class RtNetlink:
    """One raw NETLINK_ROUTE socket for batched writes and table dumps."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = _open_netlink(netns)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self.sock.bind((0, 0))
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        #: messages per send, so that a batch in which every message fails still fits the
        #: receive buffer (each error is a small skb of ~1 KiB true size)
        self.max_batch = max(16, min(4096, rcvbuf // 1536))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self, count: int) -> int:
        """Reserve ``count`` sequence numbers; returns the first."""
        first = self.seq + 1
        self.seq = (self.seq + count) & 0x7FFFFFFF
        if self.seq < first:  # wrapped: start again from 1
            first, self.seq = 1, count
        return first

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """Send ``ops`` in as few buffers as fit; return one result per op, in order."""
        results: list[Exception | None] = [None] * len(ops)
        i = 0
        while i < len(ops):
            first = self._next_seq(min(self.max_batch, len(ops) - i))
            chunk: list[bytes] = []
            size = 0
            while i + len(chunk) < len(ops) and len(chunk) < self.max_batch and size < _BATCH_BYTES:
                msg = encode_op(ops[i + len(chunk)], first + len(chunk))
                chunk.append(msg)
                size += len(msg)
            # ask for an ACK on the last message only: its answer closes the batch
            last = bytearray(chunk[-1])
            flags = _HDR.unpack_from(last)[2] | _NLM_F_ACK
            struct.pack_into("=H", last, 6, flags)
            chunk[-1] = bytes(last)
            self.sock.sendall(b"".join(chunk))
            for seq, code in self._collect(first, first + len(chunk) - 1):
                results[i + seq - first] = KernelError(code, os.strerror(code))
            i += len(chunk)
        return results

    def _collect(self, first: int, last: int) -> list[tuple[int, int]]:
        """Read answers until the one for ``last``; return (seq, errno) of the failures."""
        failed: list[tuple[int, int]] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _f, seq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if mtype == _NLMSG_ERROR and first <= seq <= last:
                    code = -_ERR.unpack_from(data, off + 16)[0]
                    if code:
                        failed.append((seq, code))
                    if seq == last:
                        return failed
                off += (length + 3) & ~3

    def dump(self, mtype: int, body: bytes) -> Iterator[tuple[bytes, int, int]]:
        """One dump request; yields (buffer, start of the message body, end) per answer."""
        seq = self._next_seq(1)
        self.sock.sendall(_HDR.pack(16 + len(body), mtype, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
                          + body)
        while True:
            data = self.sock.recv(1 << 18)
            off = 0
            while off + 16 <= len(data):
                length, rtype, _f, rseq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if rseq == seq:
                    if rtype == _NLMSG_DONE:
                        return
                    if rtype == _NLMSG_ERROR:
                        code = -_ERR.unpack_from(data, off + 16)[0]
                        if code:
                            raise KernelError(code, f"dump: {os.strerror(code)}")
                        return
                    yield data, off + 16, off + length
                off += (length + 3) & ~3


    def request(self, mtype: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """One request with an ACK; returns the answers (type, body) before the ACK.

        For the handful of link and address calls: KernelError carries the kernel's errno."""
        seq = self._next_seq(1)
        self.sock.sendall(_HDR.pack(16 + len(body), mtype, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                                    seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, rtype, _f, rseq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if rseq == seq:
                    if rtype == _NLMSG_ERROR:
                        code = -_ERR.unpack_from(data, off + 16)[0]
                        if code:
                            raise KernelError(code, os.strerror(code))
                        return out
                    out.append((rtype, data[off + 16:off + length]))
                off += (length + 3) & ~3

    def lookup_routes(self, dsts: Sequence[IPAddress]) -> list[tuple[int, bytes]]:
        """``ip route get`` for each address, many per send: (errno, answer body) per address.

        A get without NLM_F_ACK is answered by exactly one message (the route or an error),
        so each batch is complete when every one of its sequence numbers has been answered."""
        out: list[tuple[int, bytes]] = [(0, b"")] * len(dsts)
        i = 0
        while i < len(dsts):
            count = min(self.max_batch, len(dsts) - i)
            first = self._next_seq(count)
            self.sock.sendall(b"".join(
                _GET_ROUTE.pack(_GET_ROUTE.size, _RTM_GETROUTE, _NLM_F_REQUEST, first + j, 0,
                                AF_INET, 32, 0, 0, 0, 0, 0, 0, 0, 8, _RTA_DST,
                                dsts[i + j].packed)
                if dsts[i + j].version == 4 else
                _GET_ROUTE6.pack(_GET_ROUTE6.size, _RTM_GETROUTE, _NLM_F_REQUEST, first + j, 0,
                                 AF_INET6, 128, 0, 0, 0, 0, 0, 0, 0, 20, _RTA_DST,
                                 dsts[i + j].packed)
                for j in range(count)))
            pending = count
            while pending:
                data = self.sock.recv(1 << 18)
                off = 0
                while off + 16 <= len(data):
                    length, rtype, _f, seq, _pid = _HDR.unpack_from(data, off)
                    if length < 16:
                        raise KernelError(errno.EIO, "truncated netlink message")
                    if first <= seq < first + count:
                        body = data[off + 16:off + length]
                        code = -_ERR.unpack_from(body)[0] if rtype == _NLMSG_ERROR else 0
                        out[i + seq - first] = (code, body)
                        pending -= 1
                    off += (length + 3) & ~3
            i += count
        return out


class _Interned:
    """Address objects by their packed bytes, so a dump of 5,000 routes does not parse 5,000
    strings (``IPv4Network("a.b.c.d/n")`` costs ~4 µs; a dict hit ~0.1 µs). 16-byte values
    are IPv6; ``v6`` says which family a network of a short (or empty) prefix belongs to."""

    def __init__(self) -> None:
        self.addrs: dict[bytes, IPAddress] = {}
        self.nets: dict[tuple[bytes, int, bool], IPNetwork] = {}

    def addr(self, raw: bytes) -> IPAddress:
        a = self.addrs.get(raw)
        if a is None:
            if len(self.addrs) > 200_000:
                self.addrs.clear()
            a = self.addrs[raw] = IPv6Address(raw) if len(raw) == 16 else IPv4Address(raw)
        return a

    def net(self, raw: bytes, plen: int, v6: bool = False) -> IPNetwork:
        key = (raw, plen, v6)
        n = self.nets.get(key)
        if n is None:
            if len(self.nets) > 200_000:
                self.nets.clear()
            if v6:
                n = IPv6Network((int.from_bytes(raw.ljust(16, b"\0"), "big"), plen))
            else:
                n = IPv4Network((int.from_bytes(raw.ljust(4, b"\0"), "big"), plen))
            self.nets[key] = n
        return n


# --------------------------------------------------------------------------- netlink


class NetlinkKernel:
    """:class:`Kernel` over netlink. ``netns`` is for tests; the agent runs in its namespace.

    Entry writes and dumps use :class:`RtNetlink` (batched); ``batched=False`` keeps the simple
    path, one pyroute2 call per entry, which the tests use as the reference the batched path
    must match exactly.
    """

    def __init__(self, netns: str | None = None, *, batched: bool = True) -> None:
        self.netns = netns
        self.batched = batched
        self._ipr_: Any = None
        self._rt: RtNetlink | None = None
        self._interned = _Interned()
        #: (kind, ifindex or table) -> message bytes -> entry (None: not one of ours)
        self._remembered: dict[tuple[Any, ...], dict[bytes, Any]] = {}

    @property
    def _ipr(self) -> Any:
        if self._ipr_ is None:
            from pyroute2 import IPRoute

            self._ipr_ = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr_

    @property
    def rt(self) -> RtNetlink:
        if self._rt is None:
            self._rt = RtNetlink(self.netns)
        return self._rt

    def close(self) -> None:
        if self._ipr_ is not None:
            self._ipr_.close()
        if self._rt is not None:
            self._rt.close()

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except NetlinkError as exc:
            raise KernelError(exc.code, f"{exc}") from None

    # links and addresses: a few raw requests (no pyroute2 import in the agent: ~10 MB of RSS
    # and ~150 ms of start-up); ``batched=False`` uses pyroute2, the reference in tests

    def link(self, name: str) -> LinkInfo | None:
        if not self.batched:
            return self._link_pyroute2(name)
        try:
            answers = self.rt.request(_RTM_GETLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0)
                                      + _rta(_IFLA_IFNAME, name.encode() + b"\0"))
        except KernelError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        msg = next((body for t, body in answers if t == _RTM_NEWLINK), None)
        if msg is None:
            return None
        _fam, _type, index, flags, _change = _IFINFO.unpack_from(msg)
        a = _attrs(msg, _IFINFO.size, len(msg))
        kind, vx = "", {}
        info = a.get(_IFLA_LINKINFO)
        if info is not None:
            li = _attrs(info, 0, len(info))
            kind = li.get(_IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
            data = li.get(_IFLA_INFO_DATA)
            if kind == "vxlan" and data is not None:
                d = _attrs(data, 0, len(data))
                local = d.get(_IFLA_VXLAN_LOCAL) or d.get(_IFLA_VXLAN_LOCAL6)
                vx = dict(
                    vni=_U32.unpack(d[_IFLA_VXLAN_ID])[0] if _IFLA_VXLAN_ID in d else None,
                    port=struct.unpack("!H", d[_IFLA_VXLAN_PORT])[0]
                    if _IFLA_VXLAN_PORT in d else None,
                    local=self._interned.addr(local) if local else None,
                    underlay_index=_U32.unpack(d[_IFLA_VXLAN_LINK])[0]
                    if _IFLA_VXLAN_LINK in d else None,
                    learning=bool(d.get(_IFLA_VXLAN_LEARNING, b"\0")[0]),
                    gbp=_IFLA_VXLAN_GBP in d,
                )
        addrs: list[IPInterface] = []
        for data, off, end in self.rt.dump(_RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, index)):
            family, plen, _fl, scope, aindex = _IFADDR.unpack_from(data, off)
            # IPv6: global addresses only (every link has a link-local one nobody configured)
            if aindex != index or not (family == AF_INET or (family == AF_INET6 and scope == 0)):
                continue
            ad = _attrs(data, off + _IFADDR.size, end)
            raw = ad.get(_IFA_LOCAL) or ad.get(_IFA_ADDRESS)
            if raw and family == AF_INET:
                addrs.append(IPv4Interface((IPv4Address(raw), plen)))
            elif raw:
                addrs.append(IPv6Interface((IPv6Address(raw), plen)))
        mtu = a.get(_IFLA_MTU)
        return LinkInfo(
            index=index, name=name, kind=kind, mac=a.get(_IFLA_ADDRESS, b"").hex(":"),
            mtu=_U32.unpack(mtu)[0] if mtu else 0, up=bool(flags & 1), addrs=tuple(addrs),
            **vx,  # type: ignore[arg-type]
        )

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None:
        if not self.batched:
            return self._create_vxlan_pyroute2(spec, mac)
        data = (_rta(_IFLA_VXLAN_ID, _U32.pack(spec.vni))
                + _rta(_IFLA_VXLAN_LINK, _U32.pack(spec.underlay_index))
                + _rta(_IFLA_VXLAN_LOCAL6 if spec.local.version == 6 else _IFLA_VXLAN_LOCAL,
                       spec.local.packed)
                + _rta(_IFLA_VXLAN_PORT, struct.pack("!H", spec.port))
                + _rta(_IFLA_VXLAN_LEARNING, bytes([1 if spec.learning else 0])))
        if spec.gbp:
            data += _rta(_IFLA_VXLAN_GBP, b"")
        linkinfo = _rta(_IFLA_INFO_KIND, b"vxlan") + _rta(_IFLA_INFO_DATA, data)
        body = (_IFINFO.pack(0, 0, 0, 0, 0) + _rta(_IFLA_IFNAME, spec.name.encode() + b"\0")
                + _rta(_IFLA_ADDRESS, _mac_bytes(mac)) + _rta(_IFLA_MTU, _U32.pack(spec.mtu))
                + _rta(_IFLA_LINKINFO, linkinfo))
        self.rt.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)
        return None

    def delete_link(self, index: int) -> None:
        if not self.batched:
            return self._delete_link_pyroute2(index)
        self.rt.request(_RTM_DELLINK, 0, _IFINFO.pack(0, 0, index, 0, 0))
        return None

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None:
        if not self.batched:
            return self._set_link_pyroute2(index, mtu=mtu, up=up, mac=mac)
        attrs = b""
        if mtu is not None:
            attrs += _rta(_IFLA_MTU, _U32.pack(mtu))
        if mac is not None:
            attrs += _rta(_IFLA_ADDRESS, _mac_bytes(mac))
        flags, change = (0, 0) if up is None else (1 if up else 0, 1)  # IFF_UP
        if attrs or change:
            self.rt.request(_RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, flags, change) + attrs)
        return None

    def _addr(self, mtype: int, flags: int, index: int, addr: IPInterface) -> None:
        raw = addr.ip.packed
        if addr.version == 6:
            head = _IFADDR.pack(AF_INET6, addr.network.prefixlen, _IFA_F_NODAD, 0, index)
        else:
            head = _IFADDR.pack(AF_INET, addr.network.prefixlen, 0, 0, index)
        self.rt.request(mtype, flags, head + _rta(_IFA_LOCAL, raw) + _rta(_IFA_ADDRESS, raw))

    def add_addr(self, index: int, addr: IPInterface) -> None:
        if not self.batched:
            return self._add_addr_pyroute2(index, addr)
        return self._addr(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, index, addr)

    def del_addr(self, index: int, addr: IPInterface) -> None:
        if not self.batched:
            return self._del_addr_pyroute2(index, addr)
        return self._addr(_RTM_DELADDR, 0, index, addr)

    # links, addresses and lookups: pyroute2 (the simple path)

    def _link_pyroute2(self, name: str) -> LinkInfo | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self._ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise KernelError(exc.code, str(exc)) from None
        info = msg.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else ""
        data = info.get("IFLA_INFO_DATA") if info else None
        addrs: tuple[IPInterface, ...] = tuple(
            IPv4Interface(f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            if a["family"] == AF_INET
            else IPv6Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in self._call(self._ipr.addr, "dump", index=msg["index"])
            if a["family"] == AF_INET or (a["family"] == AF_INET6 and a["scope"] == 0)
        )
        vx: dict[str, Any] = {}
        if kind == "vxlan" and data is not None:
            local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
            vx = dict(
                vni=data.get("IFLA_VXLAN_ID"),
                port=data.get("IFLA_VXLAN_PORT"),
                local=ip_address(local) if local else None,
                underlay_index=data.get("IFLA_VXLAN_LINK"),
                learning=bool(data.get("IFLA_VXLAN_LEARNING")),
                gbp=data.get("IFLA_VXLAN_GBP") is not None,
            )
        return LinkInfo(
            index=msg["index"], name=name, kind=kind or "", mac=msg.get("IFLA_ADDRESS") or "",
            mtu=msg.get("IFLA_MTU") or 0, up=bool(msg["flags"] & 1), addrs=addrs, **vx,
        )

    def _create_vxlan_pyroute2(self, spec: VxlanSpec, mac: str) -> None:
        kw: dict[str, Any] = dict(
            ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_link=spec.underlay_index,
            vxlan_port=spec.port,
            vxlan_learning=1 if spec.learning else 0, address=mac, mtu=spec.mtu,
        )
        kw["vxlan_local6" if spec.local.version == 6 else "vxlan_local"] = str(spec.local)
        if spec.gbp:
            kw["vxlan_gbp"] = True
        self._call(self._ipr.link, "add", **kw)

    def _delete_link_pyroute2(self, index: int) -> None:
        self._call(self._ipr.link, "del", index=index)

    def _set_link_pyroute2(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None:
        kw: dict[str, Any] = {}
        if mtu is not None:
            kw["mtu"] = mtu
        if mac is not None:
            kw["address"] = mac
        if up is not None:
            kw["state"] = "up" if up else "down"
        if kw:
            self._call(self._ipr.link, "set", index=index, **kw)

    def _add_addr_pyroute2(self, index: int, addr: IPInterface) -> None:
        kw: dict[str, Any] = {"flags": _IFA_F_NODAD} if addr.version == 6 else {}
        self._call(self._ipr.addr, "add", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen, **kw)

    def _del_addr_pyroute2(self, index: int, addr: IPInterface) -> None:
        self._call(self._ipr.addr, "del", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen)

    # dumps (one request per table)

    # Dumps remember each answer by its bytes (only the stable part for neighbours and FDB
    # entries: their cache-info timestamps change all the time): a drift repair that finds the
    # kernel as it was parses nothing and returns the very objects the reconciler wants, so its
    # compare is an identity check (at 5,000 peers ~130 ms → ~40 ms per repair). Only the last
    # dump's answers are remembered, so the memory is bounded by the table, and it holds the
    # wanted objects rather than copies.

    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Neigh]:
        if not self.batched:
            return self._dump_neighs_pyroute2(ifindex, family)
        af = AF_INET6 if family == 6 else AF_INET
        body = _NDMSG.pack(af, 0, 0, 0, 0) + _rta(_NDA_IFINDEX, _U32.pack(ifindex))
        return self._dump_remembered(("neigh", ifindex, af), _RTM_GETNEIGH, body, _NEIGH_SIGS,
                                     lambda d, o, e: self._parse_neigh(ifindex, af, d, o, e),
                                     want)

    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> list[Fdb]:
        if not self.batched:
            return self._dump_fdb_pyroute2(ifindex)
        # an ifinfomsg (not an ndmsg) is what makes the kernel filter by bridge port/device
        body = _IFINFO.pack(AF_BRIDGE, 0, ifindex, 0, 0)
        return self._dump_remembered(("fdb", ifindex, AF_BRIDGE), _RTM_GETNEIGH, body, _FDB_SIGS,
                                     lambda d, o, e: self._parse_fdb(ifindex, d, o, e), want)

    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Route]:
        if not self.batched:
            return self._dump_routes_pyroute2(table, family)
        af = AF_INET6 if family == 6 else AF_INET
        body = _RTMSG.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)
        return self._dump_remembered(("route", table, af), _RTM_GETROUTE, body, (),
                                     lambda d, o, e: self._parse_route(table, af, d, o, e), want)

    def _dump_remembered(self, what: tuple[Any, ...], mtype: int, body: bytes,
                         sigs: tuple[_Sig, ...],
                         parse: Callable[[bytes, int, int], Any],
                         want: Mapping[Any, Entry] | None) -> list[Any]:
        """One dump; answers seen in the previous dump of ``what`` are not parsed again.

        ``sigs``: (offset, attribute header, offset, attribute header, length) alternatives:
        when both headers of one are where the kernel puts them, the first ``length`` bytes are
        the message's identity; otherwise the message is parsed afresh. Without ``sigs``
        (routes) the whole message is the identity."""
        before = self._remembered.get(what, {})
        now: dict[bytes, Any] = {}
        out = []
        for data, off, end in self.rt.dump(mtype, body):
            if not sigs:
                key = data[off:end]
            else:
                for o1, h1, o2, h2, n in sigs:
                    if (end - off >= n and data[off + o1:off + o1 + 4] == h1
                            and data[off + o2:off + o2 + 4] == h2):
                        key = data[off:off + n]
                        break
                else:
                    e = parse(data, off, end)
                    if e is not None:
                        out.append(e)
                    continue
            e = before.get(key, _UNSEEN)
            if e is _UNSEEN:
                e = parse(data, off, end)
                if e is not None and want is not None:
                    w = want.get(e.key)
                    if w is not None and w == e:
                        e = w
            now[key] = e
            if e is not None:
                out.append(e)
        self._remembered[what] = now
        return out

    def _parse_neigh(self, ifindex: int, af: int, data: bytes, off: int, end: int
                     ) -> Neigh | None:
        family, index, state, _fl, _t = _NDMSG.unpack_from(data, off)
        if family != af or index != ifindex or not state & NUD_PERMANENT:
            return None  # kernel-learnt cache entries are not ours
        a = _attrs(data, off + _NDMSG.size, end)
        dst, lladdr = a.get(_NDA_DST), a.get(_NDA_LLADDR)
        if dst and lladdr and len(dst) == (16 if af == AF_INET6 else 4):
            return Neigh(ifindex, self._interned.addr(dst), lladdr.hex(":"))
        return None

    def _parse_fdb(self, ifindex: int, data: bytes, off: int, end: int) -> Fdb | None:
        family, index, state, _fl, _t = _NDMSG.unpack_from(data, off)
        if family != AF_BRIDGE or index != ifindex or not state & NUD_PERMANENT:
            return None
        a = _attrs(data, off + _NDMSG.size, end)
        dst, lladdr = a.get(_NDA_DST), a.get(_NDA_LLADDR)
        if dst and lladdr and len(dst) in (4, 16):
            return Fdb(ifindex, lladdr.hex(":"), self._interned.addr(dst))
        return None

    def _parse_route(self, table: int, af: int, data: bytes, off: int, end: int
                     ) -> Route | None:
        family, dst_len, _s, _tos, rtable, proto, _sc, rtype, flags = \
            _RTMSG.unpack_from(data, off)
        if family != af or rtype != _RTN_UNICAST:
            return None  # unicast only; local/broadcast/blackhole are never ours
        a = _attrs(data, off + _RTMSG.size, end)
        u32 = _U32.unpack
        if _RTA_TABLE in a:
            rtable = u32(a[_RTA_TABLE])[0]
        if rtable != table or _RTA_MULTIPATH in a:
            return None
        gw, oif, prio = a.get(_RTA_GATEWAY), a.get(_RTA_OIF), a.get(_RTA_PRIORITY)
        return Route(
            dst=self._interned.net(a.get(_RTA_DST, b""), dst_len, af == AF_INET6),
            gateway=self._interned.addr(gw) if gw else None,
            oif=u32(oif)[0] if oif else None,
            onlink=bool(flags & RTNH_F_ONLINK),
            table=table,
            metric=u32(prio)[0] if prio else 0,
            proto=proto,
        )

    def _dump_neighs_pyroute2(self, ifindex: int, family: int = 4) -> list[Neigh]:
        out = []
        af = AF_INET6 if family == 6 else AF_INET
        for m in self._call(self._ipr.neigh, "dump", ifindex=ifindex, family=af):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue  # kernel-learnt cache entries are not ours
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr:
                out.append(Neigh(ifindex, ip_address(dst), lladdr.lower()))
        return out

    def _dump_fdb_pyroute2(self, ifindex: int) -> list[Fdb]:
        out = []
        for m in self._call(self._ipr.fdb, "dump", ifindex=ifindex):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr:
                out.append(Fdb(ifindex, lladdr.lower(), ip_address(dst)))
        return out

    def _dump_routes_pyroute2(self, table: int, family: int = 4) -> list[Route]:
        out = []
        af = AF_INET6 if family == 6 else AF_INET
        for m in self._call(self._ipr.route, "dump", table=table, family=af):
            if m["type"] != 1 or (m.get("RTA_TABLE") or m["table"]) != table:
                continue  # unicast only; local/broadcast/blackhole are never ours
            if m.get("RTA_MULTIPATH"):
                continue
            gw = m.get("RTA_GATEWAY")
            zero = "::" if af == AF_INET6 else "0.0.0.0"
            out.append(Route(
                dst=ip_network(f"{m.get('RTA_DST') or zero}/{m['dst_len']}"),
                gateway=ip_address(gw) if gw else None,
                oif=m.get("RTA_OIF"),
                onlink=bool(m["flags"] & RTNH_F_ONLINK),
                table=table,
                metric=m.get("RTA_PRIORITY") or 0,
                proto=m["proto"],
            ))
        return out


    def lookup_route(self, dst: IPAddress) -> RouteLookup | None:
        return self.lookup_routes([dst])[dst]

    def lookup_routes(self, dsts: Iterable[IPAddress]) -> dict[IPAddress, RouteLookup | None]:
        """``ip route get`` for many addresses in a few sends (host-gw asks one per peer)."""
        todo = list(dict.fromkeys(dsts))
        if not self.batched:
            return {ip: self._lookup_route_pyroute2(ip) for ip in todo}
        out: dict[IPAddress, RouteLookup | None] = {}
        for ip, (code, body) in zip(todo, self.rt.lookup_routes(todo), strict=True):
            if code:
                out[ip] = None  # unreachable
                continue
            a = _attrs(body, _RTMSG.size, len(body))
            gw, oif = a.get(_RTA_GATEWAY), a.get(_RTA_OIF)
            out[ip] = RouteLookup(self._interned.addr(gw) if gw else None,
                                  _U32.unpack(oif)[0] if oif else None)
        return out

    def _lookup_route_pyroute2(self, dst: IPAddress) -> RouteLookup | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self._ipr.route("get", dst=str(dst))[0]
        except NetlinkError:
            return None  # unreachable
        gw = msg.get("RTA_GATEWAY")
        return RouteLookup(ip_address(gw) if gw else None, msg.get("RTA_OIF"))

    # writes

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """All ops in as few netlink buffers as fit (see :class:`RtNetlink`); one result per op.

        With ``batched=False``, one pyroute2 request per op (the reference path in tests)."""
        if self.batched:
            return self.rt.write(ops) if ops else []
        results: list[Exception | None] = []
        for op in ops:
            try:
                self._write_one(op)
                results.append(None)
            except Exception as exc:  # noqa: BLE001 - reported per item, never fatal
                results.append(exc)
        return results

    def _write_one(self, op: Op) -> None:
        e = op.entry
        cmd = {"replace": "replace", "create": "add", "delete": "del"}[op.action]
        if isinstance(e, Neigh):
            kw: dict[str, Any] = dict(dst=str(e.dst), ifindex=e.ifindex,
                                      family=AF_INET6 if e.dst.version == 6 else AF_INET)
            if cmd != "del":
                kw.update(lladdr=e.lladdr, state=NUD_PERMANENT)
            self._call(self._ipr.neigh, cmd, **kw)
        elif isinstance(e, Fdb):
            self._call(self._ipr.fdb, cmd, ifindex=e.ifindex, lladdr=e.lladdr, dst=str(e.dst),
                       state=NUD_PERMANENT, family=AF_BRIDGE, flags=NTF_SELF)
        else:
            kw = dict(dst=str(e.dst), table=e.table, priority=e.metric)
            if cmd != "del":
                kw.update(proto=e.proto, flags=RTNH_F_ONLINK if e.onlink else 0)
                if e.gateway is not None:
                    kw["gateway"] = str(e.gateway)
                if e.oif is not None:
                    kw["oif"] = e.oif
            else:
                kw["proto"] = e.proto  # the kernel refuses to delete a route of another proto
            self._call(self._ipr.route, cmd, **kw)

    def disable_tx_checksum(self, ifname: str) -> str:
        """``ethtool -K <dev> tx-checksum-ip-generic off``: pyroute2's ethtool, else the binary.

        Returns how it was done (for the log line), "" when the feature was already off.
        pyroute2's ethtool works on the current namespace only, so with ``netns`` set the binary
        is run through ``ip netns exec``.
        """
        if self.netns is None:
            try:
                from pyroute2.ethtool import Ethtool

                eth = Ethtool()
                try:
                    feats = eth.get_features(ifname)
                    if not feats.features["tx-checksum-ip-generic"].enable:
                        return ""
                    feats.features["tx-checksum-ip-generic"].enable = False
                    eth.set_features(ifname, feats)
                    if not eth.get_features(ifname).features["tx-checksum-ip-generic"].enable:
                        return "pyroute2 ethtool"
                finally:
                    eth.close()
            except Exception as exc:  # noqa: BLE001 - fall back to the binary
                log.info("pyroute2 ethtool could not change %s (%s); trying ethtool", ifname, exc)
        binary = shutil.which("ethtool")
        if binary is None:
            raise KernelError(errno.ENOENT, "ethtool binary not found for the checksum workaround")
        pre = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        shown = subprocess.run([*pre, binary, "-k", ifname], capture_output=True, text=True,
                               timeout=10).stdout
        if "tx-checksum-ip-generic: off" in shown:
            return ""
        cmd = [*pre, binary, "-K", ifname, "tx-checksum-ip-generic", "off"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise KernelError(errno.EIO, f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return "ethtool binary"


def route_owner(network: IPv4Network | None, own: Callable[[], IPv4Network | None],
                network6: IPv6Network | None = None,
                own6: Callable[[], IPv6Network | None] | None = None
                ) -> Callable[[Route], bool]:
    """Our peer routes: our proto, a destination strictly inside the flannel Network (IPv6:
    IPv6Network), and not our own subnet (other parts of the agent may mark whole-Network or
    own-subnet routes with the same proto; the peer sweep must not touch those)."""

    def is_ours(r: Route) -> bool:
        if r.proto != RTPROT_NETAGENT:
            return False
        if r.dst.version == 6:
            net: IPNetwork | None = network6
            mine: IPNetwork | None = own6() if own6 is not None else None
        else:
            net, mine = network, own()
        if net is None:
            return False
        if not r.dst.subnet_of(net) or r.dst.prefixlen <= net.prefixlen:  # type: ignore[arg-type]
            return False
        return mine is None or not r.dst.overlaps(mine)  # type: ignore[arg-type]

    return is_ours


def lookup_all(kernel: Kernel, ips: Iterable[IPAddress]) -> Mapping[IPAddress,
                                                                     RouteLookup | None]:
    """Route lookups for a set of underlay addresses (one per distinct address; in a few
    netlink sends when the kernel offers ``lookup_routes``)."""
    bulk = getattr(kernel, "lookup_routes", None)
    if bulk is not None:
        return bulk(set(ips))  # type: ignore[no-any-return]
    return {ip: kernel.lookup_route(ip) for ip in set(ips)}


# --------------------------------------------------------------------------- host interfaces


@dataclass(frozen=True)
class HostInterface:
    """A link as interface selection needs it (read-only)."""

    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    #: global-scope IPv6 addresses (link-local ones cannot carry the overlay)
    addrs6: tuple[IPv6Address, ...]


_RTA_PREFSRC = 7


def route_get(dst: IPAddress, netns: str | None = None) -> tuple[int, IPAddress | None] | None:
    """``ip route get <dst>``: (output interface index, preferred source address or None), or
    None when there is no route (flannel's ``--iface-can-reach``)."""
    rt = RtNetlink(netns)
    try:
        code, body = rt.lookup_routes([dst])[0]
    finally:
        rt.close()
    if code:
        return None
    a = _attrs(body, _RTMSG.size, len(body))
    if _RTA_OIF not in a:
        return None
    src = a.get(_RTA_PREFSRC)
    return _U32.unpack(a[_RTA_OIF])[0], ip_address(src) if src else None


def host_interfaces(netns: str | None = None
                    ) -> tuple[list[HostInterface], int | None, int | None]:
    """Every link with its IPv4 and global IPv6 addresses, and the interfaces of the IPv4 and of
    the IPv6 default route (``0.0.0.0/0`` / ``::/0``, main table, unicast, lowest metric; None
    without one): four dumps on one raw socket, so choosing the interface needs no pyroute2 in
    the agent. An IPv6-only host has no IPv4 default route, so both are looked up.

    A default route without an ``RTA_OIF`` (multipath, or a nexthop object) is not considered,
    the same for both families."""
    rt = RtNetlink(netns)
    try:
        links: dict[int, tuple[str, int]] = {}
        for data, off, end in rt.dump(_RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0)):
            index = _IFINFO.unpack_from(data, off)[2]
            a = _attrs(data, off + _IFINFO.size, end)
            mtu = a.get(_IFLA_MTU)
            links[index] = (a.get(_IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                            _U32.unpack(mtu)[0] if mtu else 1500)
        v4: dict[int, list[IPv4Address]] = {}
        v6: dict[int, list[IPv6Address]] = {}
        for data, off, end in rt.dump(_RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0)):
            family, _plen, _fl, scope, index = _IFADDR.unpack_from(data, off)
            ad = _attrs(data, off + _IFADDR.size, end)
            if family == AF_INET:
                raw = ad.get(_IFA_LOCAL) or ad.get(_IFA_ADDRESS)
                if raw:
                    v4.setdefault(index, []).append(IPv4Address(raw))
            elif family == AF_INET6 and scope == 0 and _IFA_ADDRESS in ad:
                v6.setdefault(index, []).append(IPv6Address(ad[_IFA_ADDRESS]))
        default: dict[int, int] = {}  # family -> oif of its best default route
        for want in (AF_INET, AF_INET6):
            best: tuple[int, int] | None = None
            for data, off, end in rt.dump(_RTM_GETROUTE,
                                          _RTMSG.pack(want, 0, 0, 0, 0, 0, 0, 0, 0)):
                family, dst_len, _s, _tos, table, _proto, _scope, rtype, _flags = \
                    _RTMSG.unpack_from(data, off)
                if family != want or dst_len != 0 or rtype != _RTN_UNICAST:
                    continue
                ra = _attrs(data, off + _RTMSG.size, end)
                rtable = _U32.unpack(ra[_RTA_TABLE])[0] if _RTA_TABLE in ra else table
                if rtable != 254 or _RTA_OIF not in ra:
                    continue
                prio = _U32.unpack(ra[_RTA_PRIORITY])[0] if _RTA_PRIORITY in ra else 0
                oif = _U32.unpack(ra[_RTA_OIF])[0]
                if best is None or prio < best[0]:
                    best = (prio, oif)
            if best is not None:
                default[want] = best[1]
    finally:
        rt.close()
    out = [HostInterface(name, index, mtu, tuple(v4.get(index, ())), tuple(v6.get(index, ())))
           for index, (name, mtu) in sorted(links.items())]
    return out, default.get(AF_INET), default.get(AF_INET6)
