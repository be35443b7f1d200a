"""The pyroute2 reference :class:`~netagent.kernel.Kernel`: one pyroute2 call per request.

Production speaks raw rtnetlink (``netagent.kernel.netlink``); this second implementation is what
the privileged equivalence tests (``tests/netns/test_netlink_batch.py``) and the scale bench's
``--simple`` run compare it with: the same ops through both must leave the kernel in the same
state, and both must read it back the same. It lives with the tests because only they use it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_network
from typing import Any

from netagent.kernel import ethtool
from netagent.kernel.entries import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    NTF_SELF,
    NUD_PERMANENT,
    RTNH_F_ONLINK,
    Entry,
    Fdb,
    IPAddress,
    IPInterface,
    KernelError,
    LinkInfo,
    Neigh,
    Op,
    Route,
    RouteLookup,
    VxlanSpec,
)

#: no duplicate address detection on IPv6 addresses (as the raw path: see rtnetlink)
IFA_F_NODAD = 0x02


class Pyroute2Kernel:
    """:class:`~netagent.kernel.Kernel` over pyroute2's ``IPRoute``, in namespace ``netns``."""

    def __init__(self, netns: str | None = None) -> None:
        from pyroute2 import IPRoute

        self.netns = netns
        self._ipr: Any = IPRoute(netns=netns) if netns else IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kw)
        except NetlinkError as exc:
            raise KernelError(exc.code, f"{exc}") from None

    def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> None:
        kw: dict[str, Any] = {"mtu": mtu} if mtu is not None else {}
        self._call(self._ipr.link, "add", ifname=name, kind=kind, **kw)

    def sliced_dumps(self) -> Pyroute2Kernel:
        return self  # pyroute2 reads a whole dump per call: nothing is left half-read

    def abandon(self) -> None:
        pass

    def lookup_routes(self, dsts: Iterable[IPAddress]) -> dict[IPAddress, RouteLookup | None]:
        return {ip: self.lookup_route(ip) for ip in dict.fromkeys(dsts)}

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """One pyroute2 request per op; one result per op."""
        results: list[Exception | None] = []
        for op in ops:
            try:
                self._write_one(op)
                results.append(None)
            except Exception as exc:  # noqa: BLE001 - reported per item, never fatal
                results.append(exc)
        return results

    def disable_tx_checksum(self, ifname: str) -> str:
        return ethtool.disable_tx_checksum(ifname, self.netns)

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

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None:
        kw: dict[str, Any] = dict(
            ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_link=spec.underlay_index,
            vxlan_port=spec.port,
            vxlan_learning=1 if spec.learning else 0, address=mac, mtu=spec.mtu,
        )
        kw["vxlan_local6" if spec.local.version == 6 else "vxlan_local"] = str(spec.local)
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

    def add_addr(self, index: int, addr: IPInterface) -> None:
        kw: dict[str, Any] = {"flags": IFA_F_NODAD} if addr.version == 6 else {}
        self._call(self._ipr.addr, "add", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen, **kw)

    def del_addr(self, index: int, addr: IPInterface) -> None:
        self._call(self._ipr.addr, "del", index=index, address=str(addr.ip),
                   prefixlen=addr.network.prefixlen)


    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Neigh]:
        out = []
        af = AF_INET6 if family == 6 else AF_INET
        for m in self._call(self._ipr.neigh, "dump", ifindex=ifindex, family=af):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue  # kernel-learnt cache entries are not ours
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr:
                out.append(Neigh(ifindex, ip_address(dst), lladdr.lower()))
        return out

    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> list[Fdb]:
        out = []
        for m in self._call(self._ipr.fdb, "dump", ifindex=ifindex):
            if m["ifindex"] != ifindex or not m["state"] & NUD_PERMANENT:
                continue
            dst, lladdr = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if dst and lladdr:
                out.append(Fdb(ifindex, lladdr.lower(), ip_address(dst)))
        return out

    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Route]:
        out = []
        af = AF_INET6 if family == 6 else AF_INET
        for m in self._call(self._ipr.route, "dump", table=table, family=af):
            if m["type"] not in (1, 6) or (m.get("RTA_TABLE") or m["table"]) != table:
                continue  # unicast and blackhole only; local/broadcast are never ours
            if m.get("RTA_MULTIPATH"):
                continue
            gw = m.get("RTA_GATEWAY")
            zero = "::" if af == AF_INET6 else "0.0.0.0"
            out.append(Route(
                dst=ip_network(f"{m.get('RTA_DST') or zero}/{m['dst_len']}"),
                gateway=ip_address(gw) if gw else None,
                oif=m.get("RTA_OIF") if m["type"] == 1 else None,
                onlink=bool(m["flags"] & RTNH_F_ONLINK),
                table=table,
                metric=m.get("RTA_PRIORITY") or 0,
                proto=m["proto"],
                scope=m["scope"],
                rtype=m["type"],
            ))
        return out


    def lookup_route(self, dst: IPAddress) -> RouteLookup | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self._ipr.route("get", dst=str(dst))[0]
        except NetlinkError:
            return None  # unreachable
        gw = msg.get("RTA_GATEWAY")
        return RouteLookup(ip_address(gw) if gw else None, msg.get("RTA_OIF"))


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
                kw.update(proto=e.proto, scope=e.scope, flags=RTNH_F_ONLINK if e.onlink else 0,
                          type=e.rtype)
                if e.gateway is not None:
                    kw["gateway"] = str(e.gateway)
                if e.oif is not None:
                    kw["oif"] = e.oif
            else:
                kw["proto"] = e.proto  # the kernel refuses to delete a route of another proto
            self._call(self._ipr.route, cmd, **kw)
