"""Host read-outs: what interface selection and the CLI ask the kernel (read-only).

``route_get`` (``ip route get``), ``host_interfaces`` (links, addresses, default routes) and
``gateway_route_to`` (mk-docker-opts' clash check), each on a short-lived raw socket, so the
agent and the CLI need no pyroute2 to pick an interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from netagent.kernel.entries import AF_INET, AF_INET6, RT_TABLE_MAIN, IPAddress
from netagent.kernel.netlink import NetlinkKernel
from netagent.kernel.rtnetlink import (
    _IFA_ADDRESS,
    _IFA_LOCAL,
    _IFADDR,
    _IFINFO,
    _IFLA_IFNAME,
    _IFLA_MTU,
    _RTA_OIF,
    _RTA_PREFSRC,
    _RTA_PRIORITY,
    _RTA_TABLE,
    _RTM_GETADDR,
    _RTM_GETLINK,
    _RTM_GETROUTE,
    _RTMSG,
    _RTN_UNICAST,
    _U32,
    RtNetlink,
    _attrs,
)


@dataclass(frozen=True)
class HostInterface:
    """A link as interface selection needs it (read-only)."""

    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    #: global-scope IPv6 addresses (link-local ones cannot carry the overlay)
    addrs6: tuple[IPv6Address, ...]




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
                if rtable != RT_TABLE_MAIN or _RTA_OIF not in ra:
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


def gateway_route_to(net: IPv4Network, netns: str | None = None) -> str:
    """A route through a gateway for exactly ``net`` in the main table, described as
    ``"<net> via <gateway>"``, or "" when there is none (mk-docker-opts' last check: such a
    route would send the containers' own subnet away from the bridge)."""
    kernel = NetlinkKernel(netns)
    try:
        routes = kernel.dump_routes(RT_TABLE_MAIN)
    finally:
        kernel.close()
    for r in routes:
        if r.dst == net and net.prefixlen > 0 and r.gateway is not None:
            return f"{net} via {r.gateway}"
    return ""
