"""Kernel entries, the few link facts the backends compare, and the :class:`Kernel` protocol.

Entries (:class:`Neigh`, :class:`Fdb`, :class:`Route`) are frozen dataclasses keyed exactly as
the kernel keys them (neighbour: ifindex + IP; FDB: ifindex + MAC + dst; route: table + dst +
metric), so a diff can never alias two kernel objects. Nothing here does I/O: the reconciler,
the pure renders and the fake kernel import this module without touching netlink.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any, ClassVar, Literal, Protocol

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

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
#: route scopes (``ip route ... scope``): a route through a gateway is "global" (universe); a
#: route straight onto a point-to-point device (``ip route add X dev wg0``) is "link"
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
#: the metric the kernel gives an IPv6 route added with none (IP6_RT_PRIO_USER)
IPV6_DEFAULT_METRIC = 1024
#: route types (``rtm_type``): every route of ours is unicast except the own-subnet blackhole
#: route of ``--ip-blackhole-route`` (``ip route add blackhole X``)
RTN_UNICAST = 1
RTN_BLACKHOLE = 6

EntryKind = Literal["neigh", "fdb", "route"]
#: kinds in apply order; deletes run in the reverse order
KINDS: tuple[EntryKind, ...] = ("neigh", "fdb", "route")


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
    as 1024 here and a read-back compares equal. ``scope`` is universe for routes through a
    gateway (all of vxlan's and host-gw's); a device route (``gateway=None``) may ask for
    :data:`RT_SCOPE_LINK`, as ``ip route add X dev D`` does. IPv6 has no route scopes (the
    kernel reports every IPv6 route as universe), so an IPv6 route is stored as universe.
    ``rtype`` is :data:`RTN_UNICAST` except for a blackhole route (:data:`RTN_BLACKHOLE`: no
    gateway, no device), which the kernel keys like any other (table + dst + metric)."""

    dst: IPNetwork
    gateway: IPAddress | None
    oif: int | None
    onlink: bool = False
    table: int = RT_TABLE_MAIN
    metric: int = 0
    proto: int = RTPROT_NETAGENT
    scope: int = RT_SCOPE_UNIVERSE
    rtype: int = RTN_UNICAST
    _key: tuple[Any, ...] = field(init=False, repr=False, compare=False, hash=False)
    kind: ClassVar[EntryKind] = "route"

    def __post_init__(self) -> None:
        if self.dst.version == 6:
            if self.metric == 0:
                object.__setattr__(self, "metric", IPV6_DEFAULT_METRIC)
            if self.scope != RT_SCOPE_UNIVERSE:
                object.__setattr__(self, "scope", RT_SCOPE_UNIVERSE)
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
class LinkSummary:
    """One line of the link table (``ip link``): enough to find our devices by name and to
    tell whether a bridge still has ports (links whose ``master`` is its index)."""

    index: int
    name: str
    kind: str
    master: int | None


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


class Dumps(Protocol):
    """The three dumps of a drift repair's read-back in slices (``Kernel.sliced_dumps``): they
    may be generators, read a slice at a time while the main loop writes in between."""

    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterable[Neigh]: ...
    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None
                 ) -> Iterable[Fdb]: ...
    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterable[Route]: ...

    def abandon(self) -> None:
        """A read-back stopped half-way: drop what its dumps left unread."""
        ...


class Kernel(Protocol):
    """Everything the reconciler and the backends ask of the kernel; dumps return only what we
    could own. Implementations: :class:`~netagent.kernel.netlink.NetlinkKernel` (raw rtnetlink,
    production), ``tests/support/fakekernel.py`` (in memory, fails on demand) and
    ``tests/support/pyroute2kernel.py`` (one pyroute2 call per request: the reference the raw
    path is compared with).

    ``want`` (key → entry, optional) lets a dump return the wanted object itself for an entry
    equal to it; a kernel may use that to remember entries between dumps (NetlinkKernel does).
    """

    def link(self, name: str) -> LinkInfo | None:
        """The link called ``name`` (any kind), or None when there is none."""
        ...

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None: ...

    def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> None:
        """``ip link add <name> [mtu M] type <kind>`` for kinds that need no attributes
        (``wireguard``, ``bridge``); EEXIST when the name is taken."""
        ...

    def delete_link(self, index: int) -> None: ...
    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None: ...

    def add_addr(self, index: int, addr: IPInterface) -> None:
        """Add ``addr`` (its prefix length as given: /32 and /128 included); IPv6 addresses get
        ``IFA_F_NODAD``. EEXIST when the link already has it."""
        ...

    def del_addr(self, index: int, addr: IPInterface) -> None: ...
    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Neigh]: ...
    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> list[Fdb]: ...
    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Route]: ...

    def sliced_dumps(self) -> Dumps:
        """The dumps for a read-back in slices, on a channel of their own if the kernel's
        requests share one (a dump left half-read must not sit where writes go)."""
        ...

    def lookup_routes(self, dsts: Iterable[IPAddress]) -> dict[IPAddress, RouteLookup | None]:
        """``ip route get`` for each distinct address (None: unreachable)."""
        ...

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """Apply ``ops`` in order; one result per op (None = done), never raising per op."""
        ...

    def disable_tx_checksum(self, ifname: str) -> str: ...
