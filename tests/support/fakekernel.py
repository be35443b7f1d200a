"""An in-memory kernel for the reconciler and backend tests, able to fail on demand.

It mimics the netlink semantics the backends rely on, no more: neighbours keyed by
(ifindex, IP), vxlan FDB by (ifindex, MAC) with one dst (replace overwrites it), routes by
(table, dst, metric) where replace overwrites whatever is there (any proto) and delete with a
proto only removes a route of that proto. Deleting a link takes its entries with it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from netagent.kernel import (
    RT_TABLE_MAIN,
    Fdb,
    IPAddress,
    IPInterface,
    IPNetwork,
    KernelError,
    LinkInfo,
    Neigh,
    Op,
    Route,
    RouteLookup,
    VxlanSpec,
)
from netagent.lease import Lease, LeaseAttrs, canonical_json


@dataclass
class FakeKernel:
    links: dict[str, LinkInfo] = field(default_factory=dict)
    neighs: dict[tuple[int, IPAddress], Neigh] = field(default_factory=dict)
    fdb: dict[tuple[int, str], Fdb] = field(default_factory=dict)
    routes: dict[tuple[int, IPNetwork, int], Route] = field(default_factory=dict)
    #: underlay address -> answer of `ip route get` (missing = unreachable)
    lookups: dict[IPAddress, RouteLookup] = field(default_factory=dict)
    #: every write, as (action, entry); link/addr changes as ("link", description)
    log: list[tuple[str, Any]] = field(default_factory=list)
    dumps: list[str] = field(default_factory=list)
    _rules: list[tuple[Callable[[Op], bool], int]] = field(default_factory=list)
    _next_index: int = 10
    csum_off: set[str] = field(default_factory=set)

    # -- failure injection

    def fail(self, pred: Callable[[Op], bool], times: int = 1) -> None:
        """The next `times` writes matching `pred` fail with EBUSY."""
        self._rules.append((pred, times))

    def _should_fail(self, op: Op) -> bool:
        for i, (pred, times) in enumerate(self._rules):
            if times > 0 and pred(op):
                self._rules[i] = (pred, times - 1)
                return True
        return False

    def writes(self) -> int:
        return len(self.log)

    def clear_log(self) -> None:
        self.log.clear()
        self.dumps.clear()

    # -- links

    def add_plain_link(self, name: str, mtu: int = 1500) -> int:
        index = self._next_index
        self._next_index += 1
        self.links[name] = LinkInfo(index, name, "veth", "02:00:00:00:00:01", mtu, True)
        return index

    def link(self, name: str) -> LinkInfo | None:
        return self.links.get(name)

    def _by_index(self, index: int) -> LinkInfo:
        for link in self.links.values():
            if link.index == index:
                return link
        raise KernelError(errno.ENODEV, f"no link {index}")

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None:
        if spec.name in self.links:
            raise KernelError(errno.EEXIST, "exists")
        index = self._next_index
        self._next_index += 1
        self.links[spec.name] = LinkInfo(
            index, spec.name, "vxlan", mac, spec.mtu, False, (), spec.vni, spec.port,
            spec.local, spec.underlay_index, spec.learning, spec.gbp)
        self.log.append(("link", f"create {spec.name}"))

    def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> None:
        if name in self.links:
            raise KernelError(errno.EEXIST, "exists")
        index = self._next_index
        self._next_index += 1
        self.links[name] = LinkInfo(index, name, kind, "", 1500 if mtu is None else mtu, False)
        self.log.append(("link", f"create {name} type {kind}"))

    def delete_link(self, index: int) -> None:
        link = self._by_index(index)
        del self.links[link.name]
        self.neighs = {k: v for k, v in self.neighs.items() if k[0] != index}
        self.fdb = {k: v for k, v in self.fdb.items() if k[0] != index}
        self.routes = {k: v for k, v in self.routes.items() if v.oif != index}
        self.log.append(("link", f"delete {link.name}"))

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None:
        link = self._by_index(index)
        self.links[link.name] = replace(
            link, mtu=link.mtu if mtu is None else mtu, up=link.up if up is None else up,
            mac=link.mac if mac is None else mac)
        self.log.append(("link", f"set {link.name} mtu={mtu} up={up} mac={mac}"))

    def add_addr(self, index: int, addr: IPInterface) -> None:
        link = self._by_index(index)
        self.links[link.name] = replace(link, addrs=(*link.addrs, addr))
        self.log.append(("link", f"addr add {addr} {link.name}"))

    def del_addr(self, index: int, addr: IPInterface) -> None:
        link = self._by_index(index)
        self.links[link.name] = replace(link, addrs=tuple(a for a in link.addrs if a != addr))
        self.log.append(("link", f"addr del {addr} {link.name}"))

    def disable_tx_checksum(self, ifname: str) -> str:
        if ifname in self.csum_off:
            return ""
        self.csum_off.add(ifname)
        self.log.append(("link", f"csum off {ifname}"))
        return "fake"

    # -- dumps

    def sliced_dumps(self) -> FakeKernel:
        """The dumps of a sliced read-back: the same lists (a slice boundary falls between
        their items, so a test can change the kernel between two slices)."""
        return self

    def abandon(self) -> None:
        pass

    def dump_neighs(self, ifindex: int, want: object = None, family: int = 4) -> list[Neigh]:
        self.dumps.append("neigh" if family == 4 else "neigh6")
        return [n for k, n in self.neighs.items() if k[0] == ifindex and n.dst.version == family]

    def dump_fdb(self, ifindex: int, want: object = None) -> list[Fdb]:
        self.dumps.append("fdb")
        return [f for k, f in self.fdb.items() if k[0] == ifindex]

    def dump_routes(self, table: int, want: object = None, family: int = 4) -> list[Route]:
        """The routes, plus the underlay routing that ``lookups`` stands for: one host route
        (proto kernel) per lookup answer, so a changed lookup shows in the dump as it would in
        a real kernel (the backends cache lookups until the non-peer routes change)."""
        self.dumps.append("route" if family == 4 else "route6")
        underlay = [Route(ip_network(ip), look.gateway, look.oif, proto=2)
                    for ip, look in self.lookups.items()
                    if table == RT_TABLE_MAIN and ip.version == family]
        return [r for r in self.routes.values()
                if r.table == table and r.dst.version == family] + underlay

    def lookup_route(self, dst: IPAddress) -> RouteLookup | None:
        return self.lookups.get(dst)

    def lookup_routes(self, dsts: Iterable[IPAddress]) -> dict[IPAddress, RouteLookup | None]:
        """One :meth:`lookup_route` per distinct address (tests count those calls)."""
        return {ip: self.lookup_route(ip) for ip in dict.fromkeys(dsts)}

    # -- writes

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        out: list[Exception | None] = []
        for op in ops:
            if self._should_fail(op):
                out.append(KernelError(errno.EBUSY, f"injected failure for {op}"))
                continue
            try:
                self._write(op)
                self.log.append((op.action, op.entry))
                out.append(None)
            except KernelError as exc:
                out.append(exc)
        return out

    def _write(self, op: Op) -> None:
        e = op.entry
        if isinstance(e, Neigh):
            key = (e.ifindex, e.dst)
            if op.action != "delete":
                self._by_index(e.ifindex)
                self.neighs[key] = e
            elif self.neighs.pop(key, None) is None:
                raise KernelError(errno.ENOENT, "no such neighbour")
        elif isinstance(e, Fdb):
            key2 = (e.ifindex, e.lladdr)
            if op.action != "delete":
                self._by_index(e.ifindex)
                self.fdb[key2] = e
            else:
                have = self.fdb.get(key2)
                if have is None:
                    raise KernelError(errno.ENOENT, "no such fdb entry")
                if have.dst == e.dst:
                    del self.fdb[key2]
        else:
            key3 = (e.table, e.dst, e.metric)
            if op.action == "create" and key3 in self.routes:
                raise KernelError(errno.EEXIST, "route exists")
            if op.action != "delete":
                self.routes[key3] = e
            else:
                have_r = self.routes.get(key3)
                if have_r is None or have_r.proto != e.proto:
                    raise KernelError(errno.ESRCH, "no such route")
                del self.routes[key3]

    # -- state for assertions

    def state(self) -> tuple[frozenset[Any], ...]:
        return (frozenset(self.neighs.values()), frozenset(self.fdb.values()),
                frozenset(self.routes.values()))


# --------------------------------------------------------------------------- peer leases
# Shared by the render and fake-kernel tests: peer i has subnet 10.5.i.0/24, PublicIP
# 192.168.1.i and VtepMAC 0e:00:00:00:00:<i>.


def sub(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def pub(i: int) -> IPv4Address:
    return IPv4Address(f"192.168.1.{i}")


def mac(i: int) -> str:
    return f"0e:00:00:00:00:{i:02x}"


def sub6(i: int) -> IPv6Network:
    """Peer i's IPv6 subnet fd42:0:0:<i>::/64 (dual-stack and IPv6-only tests)."""
    return IPv6Network(f"fd42:0:0:{i:x}::/64")


def pub6(i: int) -> IPv6Address:
    return IPv6Address(f"fd00::{i:x}")


def mac6(i: int) -> str:
    return f"0e:00:00:00:06:{i:02x}"


def vx_lease(i: int, data: str | None = None, btype: str = "vxlan", ip: int | None = None,
             mac_of: int | None = None) -> Lease:
    """A vxlan peer lease; `data` overrides BackendData, `mac_of` picks another MAC."""
    bd = canonical_json({"VNI": 1, "VtepMAC": mac(i if mac_of is None else mac_of)})
    return Lease(sub(i), LeaseAttrs(public_ip=pub(ip or i), backend_type=btype,
                                    backend_data=bd if data is None else data))


def hg_lease(i: int, btype: str = "host-gw") -> Lease:
    return Lease(sub(i), LeaseAttrs(public_ip=pub(i), backend_type=btype))
