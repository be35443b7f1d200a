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
  :class:`NetlinkKernel` implements it with pyroute2 (imported lazily, so importing this module is
  cheap), and ``tests/fakekernel.py`` implements it in memory with failure injection.

**What is ours.** Routes carry ``proto`` :data:`RTPROT_NETAGENT`; neighbours and FDB entries are
ours because they live on our own vxlan device. Nothing else is ever deleted.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Literal, Protocol

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
AF_BRIDGE = 7

#: kinds in apply order; deletes run in the reverse order
KINDS: tuple[EntryKind, ...] = ("neigh", "fdb", "route")
#: errors that mean "already gone" on delete
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})


# --------------------------------------------------------------------------- entries

EntryKind = Literal["neigh", "fdb", "route"]


@dataclass(frozen=True)
class Neigh:
    """A permanent ARP entry: the peer's overlay gateway address → its VTEP MAC."""

    ifindex: int
    dst: IPv4Address
    lladdr: str
    @property
    def kind(self) -> EntryKind:
        return "neigh"

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.ifindex, self.dst)


@dataclass(frozen=True)
class Fdb:
    """A permanent vxlan FDB entry (flag self): the peer's VTEP MAC → its underlay address."""

    ifindex: int
    lladdr: str
    dst: IPv4Address
    @property
    def kind(self) -> EntryKind:
        return "fdb"

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.ifindex, self.lladdr, self.dst)


@dataclass(frozen=True)
class Route:
    """An IPv4 unicast route; compared on every attribute we set, keyed like the kernel."""

    dst: IPv4Network
    gateway: IPv4Address | None
    oif: int | None
    onlink: bool = False
    table: int = RT_TABLE_MAIN
    metric: int = 0
    proto: int = RTPROT_NETAGENT
    @property
    def kind(self) -> EntryKind:
        return "route"

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.table, self.dst, self.metric)


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
    addrs: tuple[IPv4Interface, ...] = ()
    vni: int | None = None
    port: int | None = None
    local: IPv4Address | None = None
    underlay_index: int | None = None
    learning: bool | None = None
    gbp: bool = False


@dataclass(frozen=True)
class VxlanSpec:
    """The vxlan device we want; the MAC is passed separately (it is chosen, not derived)."""

    name: str
    vni: int
    port: int
    local: IPv4Address
    underlay_index: int
    mtu: int
    learning: bool = False
    gbp: bool = False


@dataclass(frozen=True)
class RouteLookup:
    """The kernel's answer to ``ip route get``: gateway (None = directly connected) and oif."""

    gateway: IPv4Address | None
    oif: int | None


class KernelError(OSError):
    """A kernel request failed; ``errno`` is the netlink error code when there is one."""


class Kernel(Protocol):
    """Everything the backends ask of the kernel. Dumps return only what we could own."""

    def link(self, name: str) -> LinkInfo | None: ...
    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None: ...
    def delete_link(self, index: int) -> None: ...
    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None: ...
    def add_addr(self, index: int, addr: IPv4Interface) -> None: ...
    def del_addr(self, index: int, addr: IPv4Interface) -> None: ...
    def dump_neighs(self, ifindex: int) -> list[Neigh]: ...
    def dump_fdb(self, ifindex: int) -> list[Fdb]: ...
    def dump_routes(self, table: int) -> list[Route]: ...
    def lookup_route(self, dst: IPv4Address) -> RouteLookup | None: ...
    def write(self, ops: Sequence[Op]) -> list[Exception | None]: ...
    def disable_tx_checksum(self, ifname: str) -> str: ...


# --------------------------------------------------------------------------- reconciler


@dataclass
class ApplyResult:
    added: int = 0
    removed: int = 0
    failed: dict[tuple[str, tuple[Any, ...]], str] = field(default_factory=dict)
    #: peer subnet -> why its routes were not written (conflict, dependency failed)
    blocked: dict[IPv4Network, str] = field(default_factory=dict)


class Reconciler:
    """Desired vs actual, keyed like the kernel; only dirty keys are written.

    ``route_is_ours`` decides which dumped routes we own (our proto inside our network);
    ``device`` is the ifindex whose permanent neighbours/FDB entries are ours (None: we own none,
    as in host-gw). Several peers may want the same key (two leases of one host share an FDB
    entry): the entry stays while any peer wants it, and the lowest subnet wins a conflict, so the
    result does not depend on event order.
    """

    def __init__(self, kernel: Kernel, route_is_ours: Callable[[Route], bool],
                 device: int | None = None) -> None:
        self.kernel = kernel
        self.route_is_ours = route_is_ours
        self.device = device
        self._by_peer: dict[IPv4Network, tuple[Entry, ...]] = {}
        #: kind -> key -> {peer: entry}
        self._wanted: dict[str, dict[tuple[Any, ...], dict[IPv4Network, Entry]]] = {
            k: {} for k in KINDS}
        self._actual: dict[str, dict[tuple[Any, ...], Entry]] = {k: {} for k in KINDS}
        #: routes someone else owns, at keys we might want (from the last full read-back)
        self._foreign: dict[tuple[Any, ...], Route] = {}
        self._dirty: dict[str, set[tuple[Any, ...]]] = {k: set() for k in KINDS}
        self.synced = False

    # -- desired side (pure bookkeeping, no I/O)

    def set_peer(self, subnet: IPv4Network, entries: Iterable[Entry] | None) -> None:
        """Replace one peer's desired entries (None or empty = the peer is gone)."""
        new = tuple(entries or ())
        old = self._by_peer.pop(subnet, ())
        if new:
            self._by_peer[subnet] = new
        for e in old:
            wanted = self._wanted[e.kind].get(e.key)
            if wanted is not None:
                wanted.pop(subnet, None)
                if not wanted:
                    del self._wanted[e.kind][e.key]
            self._dirty[e.kind].add(e.key)
        for e in new:
            self._wanted[e.kind].setdefault(e.key, {})[subnet] = e
            self._dirty[e.kind].add(e.key)

    def peers(self) -> frozenset[IPv4Network]:
        return frozenset(self._by_peer)

    def desired(self) -> dict[str, dict[tuple[Any, ...], Entry]]:
        """The effective desired entries by kind and key (lowest subnet wins a key)."""
        return {kind: {key: self._winner(kind, key) for key in table}  # type: ignore[misc]
                for kind, table in self._wanted.items()}

    def _winner(self, kind: str, key: tuple[Any, ...]) -> Entry | None:
        wanted = self._wanted[kind].get(key)
        if not wanted:
            return None
        return wanted[min(wanted)]

    # -- kernel side

    def resync(self) -> None:
        """Read back what we own (one dump per table) and mark every key for comparison."""
        actual: dict[str, dict[tuple[Any, ...], Entry]] = {k: {} for k in KINDS}
        if self.device is not None:
            for n in self.kernel.dump_neighs(self.device):
                actual["neigh"][n.key] = n
            for f in self.kernel.dump_fdb(self.device):
                actual["fdb"][f.key] = f
        foreign: dict[tuple[Any, ...], Route] = {}
        for r in self.kernel.dump_routes(RT_TABLE_MAIN):
            if self.route_is_ours(r):
                actual["route"][r.key] = r
            else:
                foreign[r.key] = r
        self._actual = actual
        self._foreign = {k: r for k, r in foreign.items() if k in self._wanted["route"]}
        for kind in KINDS:
            self._dirty[kind] = set(actual[kind]) | set(self._wanted[kind])
        self.synced = True

    def forget_device(self) -> None:
        """Our device went away (and with it its neighbours and FDB entries)."""
        for kind in ("neigh", "fdb"):
            self._dirty[kind] |= set(self._actual[kind])
            self._actual[kind] = {}

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
            for key in sorted(self._dirty[kind], key=repr):
                want = self._winner(kind, key)
                have = self._actual[kind].get(key)
                if want is None:
                    if have is None:
                        self._dirty[kind].discard(key)
                    else:
                        dels[kind].append(have)
                elif want == have:
                    self._dirty[kind].discard(key)
                else:
                    ups[kind].append(want)
        # phase 1: neighbours and FDB
        first = [Op("replace", e) for k in ("neigh", "fdb") for e in ups[k]]
        broken: dict[IPv4Network, str] = {}
        for op, err in zip(first, self.kernel.write(first), strict=True):
            if self._record(op, err, result):
                for peer in self._wanted[op.entry.kind].get(op.entry.key, {}):
                    broken[peer] = f"{op.entry.kind} failed: {err}"
        # phase 2: routes (not over foreign routes, not for peers whose L2 entries failed)
        routes: list[Op] = []
        for e in ups["route"]:
            assert isinstance(e, Route)
            peers = self._wanted["route"].get(e.key, {})
            why = next((broken[p] for p in peers if p in broken), None)
            other = self._foreign.get(e.key)
            if why is None and other is not None and not self._adoptable(other, e):
                why = (f"route {e.dst} already exists with proto {other.proto} via "
                       f"{other.gateway} (not ours, left alone)")
            if why is not None:
                for p in peers:
                    result.blocked[p] = why
                continue
            # a key we have never seen anything at is created, not replaced: a route someone
            # added since the last read-back makes it fail with EEXIST instead of being clobbered
            known = e.key in self._actual["route"] or other is not None
            routes.append(Op("replace" if known else "create", e))
        # phase 3: deletes, reversed
        last = routes + [Op("delete", e) for k in reversed(KINDS) for e in dels[k]]
        for op, err in zip(last, self.kernel.write(last), strict=True):
            if op.action == "create" and getattr(err, "errno", None) == errno.EEXIST:
                for p in self._wanted["route"].get(op.entry.key, {}):
                    result.blocked[p] = (f"route {op.entry.dst} already exists and is not ours "
                                         "(left alone)")
                continue
            self._record(op, err, result)
        return result

    def _record(self, op: Op, err: Exception | None, result: ApplyResult) -> bool:
        """Book one write's outcome; True when it failed."""
        e = op.entry
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
        return same_but_proto or (self.device is not None and other.oif == self.device)

    def counts(self) -> dict[str, int]:
        return {kind: len(table) for kind, table in self._actual.items()
                if kind == "route" or self.device is not None}


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


# --------------------------------------------------------------------------- netlink


class NetlinkKernel:
    """:class:`Kernel` over pyroute2. ``netns`` is for tests; the agent runs in its namespace."""

    def __init__(self, netns: str | None = None) -> None:
        from pyroute2 import IPRoute

        self.netns = netns
        self._ipr = IPRoute(netns=netns) if netns else IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except NetlinkError as exc:
            raise KernelError(exc.code, f"{exc}") from None

    # links

    def link(self, name: str) -> LinkInfo | None:
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
        addrs = tuple(
            IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in self._call(self._ipr.addr, "dump", index=msg["index"], family=AF_INET)
        )
        vx: dict[str, Any] = {}
        if kind == "vxlan" and data is not None:
            local = data.get("IFLA_VXLAN_LOCAL")
            vx = dict(
                vni=data.get("IFLA_VXLAN_ID"),
                port=data.get("IFLA_VXLAN_PORT"),
                local=IPv4Address(local) if local else None,
                underlay_index=data.get("IFLA_VXLAN_LINK"),
                learning=bool(data.get("IFLA_VXLAN_LEARNING")),
                gbp=data.get("IFLA_VXLAN_GBP") is not None,
            )
        return LinkInfo(
            index=msg["index"], name=name, kind=kind or "", mac=msg.get("IFLA_ADDRESS") or "",
            mtu=msg.get("IFLA_MTU") or 0, up=bool(msg["flags"] & 1), addrs=addrs, **vx,
        )

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None:
        kw: dict[str, Any] = dict(
            ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_link=spec.underlay_index,
            vxlan_local=str(spec.local), vxlan_port=spec.port,
            vxlan_learning=1 if spec.learning else 0, address=mac, mtu=spec.mtu,
        )
        if spec.gbp:
            kw["vxlan_gbp"] = True
        self._call(self._ipr.link, "add", **kw)

    def delete_link(self, index: int) -> None:
        self._call(self._ipr.link, "del", index=index)

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
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

    def add_addr(self, index: int, addr: IPv4Interface) -> None:
        self._call(self._ipr.addr, "add", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen)

    def del_addr(self, index: int, addr: IPv4Interface) -> None:
        self._call(self._ipr.addr, "del", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen)

    # dumps (one request per table)

    def dump_neighs(self, ifindex: int) -> list[Neigh]:
        out = []
        for m in self._call(self._ipr.neigh, "dump", ifindex=ifindex, family=AF_INET):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue  # kernel-learnt cache entries are not ours
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr:
                out.append(Neigh(ifindex, IPv4Address(dst), lladdr.lower()))
        return out

    def dump_fdb(self, ifindex: int) -> list[Fdb]:
        out = []
        for m in self._call(self._ipr.fdb, "dump", ifindex=ifindex):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr and ":" not in dst:
                out.append(Fdb(ifindex, lladdr.lower(), IPv4Address(dst)))
        return out

    def dump_routes(self, table: int) -> list[Route]:
        out = []
        for m in self._call(self._ipr.route, "dump", table=table, family=AF_INET):
            if m["type"] != 1 or (m.get("RTA_TABLE") or m["table"]) != table:
                continue  # unicast only; local/broadcast/blackhole are never ours
            if m.get("RTA_MULTIPATH"):
                continue
            gw = m.get("RTA_GATEWAY")
            out.append(Route(
                dst=IPv4Network(f"{m.get('RTA_DST') or '0.0.0.0'}/{m['dst_len']}"),
                gateway=IPv4Address(gw) if gw else None,
                oif=m.get("RTA_OIF"),
                onlink=bool(m["flags"] & RTNH_F_ONLINK),
                table=table,
                metric=m.get("RTA_PRIORITY") or 0,
                proto=m["proto"],
            ))
        return out

    def lookup_route(self, dst: IPv4Address) -> RouteLookup | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self._ipr.route("get", dst=str(dst))[0]
        except NetlinkError:
            return None  # unreachable
        gw = msg.get("RTA_GATEWAY")
        return RouteLookup(IPv4Address(gw) if gw else None, msg.get("RTA_OIF"))

    # writes

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """One request per op for now; the signature lets a later version batch them."""
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
            kw: dict[str, Any] = dict(dst=str(e.dst), ifindex=e.ifindex, family=AF_INET)
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


def route_owner(network: IPv4Network | None, own: Callable[[], IPv4Network | None]
                ) -> Callable[[Route], bool]:
    """Our peer routes: our proto, a destination strictly inside the flannel Network, and not
    our own subnet (other parts of the agent may mark whole-Network or own-subnet routes with
    the same proto; the peer sweep must not touch those)."""

    def is_ours(r: Route) -> bool:
        if r.proto != RTPROT_NETAGENT or network is None:
            return False
        if not r.dst.subnet_of(network) or r.dst.prefixlen <= network.prefixlen:
            return False
        mine = own()
        return mine is None or not r.dst.overlaps(mine)

    return is_ours


def lookup_all(kernel: Kernel, ips: Iterable[IPv4Address]) -> Mapping[IPv4Address,
                                                                        RouteLookup | None]:
    """Route lookups for a set of underlay addresses (one per distinct address)."""
    return {ip: kernel.lookup_route(ip) for ip in set(ips)}
