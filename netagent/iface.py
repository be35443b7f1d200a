"""Choose the external interface and public IP (read-only netlink).

flannel's rules (flannel-compat.md §15): `--iface` names or IPs tried in order, then
`--iface-regex` on IPs then names, else the interface of the IPv4 default route; `--public-ip`
overrides the advertised address (and without iface flags selects the interface owning it).
An IPv6-only network (`"EnableIPv4": false`) uses the same rules on global IPv6 addresses, the
IPv6 default route and `--public-ipv6` (`choose_iface6`): such a host may have no IPv4 address
or IPv4 default route at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address


class IfaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Iface:
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    #: global-scope IPv6 addresses (link-local ones cannot carry the overlay)
    addrs6: tuple[IPv6Address, ...] = ()


@dataclass(frozen=True)
class HostIfaces:
    """What interface selection reads from the kernel: the links, and the interface index of
    the IPv4 and of the IPv6 default route (None without one)."""

    ifaces: tuple[Iface, ...]
    default_index: int | None
    default6_index: int | None


@dataclass(frozen=True)
class Reach:
    """What ``ip route get <target>`` answered for ``--iface-can-reach``: the route's output
    interface and preferred source address (``oif`` None: no route)."""

    target: str
    oif: int | None
    src: IPv4Address | IPv6Address | None = None


def _reached(ifaces: Sequence[Iface], reach: Reach, version: int
             ) -> tuple[Iface, IPv4Address | IPv6Address]:
    """The interface --iface-can-reach picked and its address of `version`: the route's
    source when it is of that family and on the interface, else the interface's first one."""
    flag = f"--iface-can-reach {reach.target}"
    if reach.oif is None:
        raise IfaceError(f"{flag}: no route to it")
    chosen = next((i for i in ifaces if i.index == reach.oif), None)
    if chosen is None:
        raise IfaceError(f"{flag}: the route's interface (index {reach.oif}) is gone")
    if chosen.name == "lo":
        # a local route: the target is this host's own address (or loopback), and lo with
        # 127.0.0.1 must never become the overlay's underlay and advertised address
        try:
            target = ip_address(reach.target)
        except ValueError:
            target = None
        owner = next((i.name for i in ifaces if i.name != "lo"
                      and target in (*i.addrs, *i.addrs6)), None)
        hint = f"; to use {owner}, pass --iface {owner}" if owner else ""
        raise IfaceError(f"{flag}: that is an address of this host (the route to it is local, "
                         f"through lo){hint}")
    addrs: Sequence[IPv4Address | IPv6Address] = chosen.addrs if version == 4 else chosen.addrs6
    if reach.src is not None and reach.src in addrs:
        return chosen, reach.src
    if not addrs:
        kind = "IPv4" if version == 4 else "global IPv6"
        raise IfaceError(f"{flag}: the route leaves through {chosen.name}, which has no {kind} "
                         "address")
    return chosen, addrs[0]


def reach_for(target: str, netns: str | None = None) -> Reach:
    """Ask the kernel the way to `target` (flannel's ``--iface-can-reach``)."""
    from netagent.kernel.host import route_get

    try:
        dst = ip_address(target)
    except ValueError:
        raise IfaceError(f"--iface-can-reach {target!r} is not an IP address") from None
    found = route_get(dst, netns)
    return Reach(target, *found) if found else Reach(target, None)


def list_ifaces(*, netns: str | None = None) -> HostIfaces:
    """The links with their addresses, and the IPv4 and IPv6 default routes' interfaces."""
    from netagent.kernel.host import host_interfaces

    links, default, default6 = host_interfaces(netns)
    return HostIfaces(tuple(Iface(h.name, h.index, h.mtu, h.addrs, h.addrs6) for h in links),
                      default, default6)


def choose_iface(
    ifaces: Sequence[Iface],
    names: Sequence[str] = (),
    regexes: Sequence[str] = (),
    public_ip: str = "",
    default_index: int | None = None,
    reach: Reach | None = None,
) -> tuple[Iface, IPv4Address, IPv4Address]:
    """Pure selection; returns (interface, its address, public IP).

    Order, as flannel: `--iface` entries, `--iface-regex`, the owner of `--public-ip`, the
    interface `--iface-can-reach` found (`reach`; its route's source address when that is an
    IPv4 address of it, else its first IPv4 address — an IPv6 target picks the interface
    only), the IPv4 default route's."""
    chosen: Iface | None = None
    addr: IPv4Address | None = None
    for spec in names:
        try:
            want: IPv4Address | None = IPv4Address(spec)
        except ValueError:
            want = None
        for i in ifaces:
            if (want is not None and want in i.addrs) or (want is None and i.name == spec):
                chosen, addr = i, (want if want is not None else (i.addrs[0] if i.addrs else None))
                break
        if chosen:
            break
    if chosen is None and names:
        raise IfaceError(f"none of --iface {', '.join(names)} exists with an IPv4 address")
    if chosen is None and regexes:
        for rx in regexes:
            pat = re.compile(rx)
            for i in ifaces:
                hit = next((a for a in i.addrs if pat.search(str(a))), None)
                if hit is not None:
                    chosen, addr = i, hit
                    break
                if pat.search(i.name) and i.addrs:
                    chosen, addr = i, i.addrs[0]
                    break
            if chosen:
                break
        if chosen is None:
            raise IfaceError(f"no interface matches --iface-regex {', '.join(regexes)}")
    if chosen is None and public_ip:
        want = IPv4Address(public_ip)
        chosen = next((i for i in ifaces if want in i.addrs), None)
        addr = want if chosen else None
    if chosen is None and reach is not None:
        chosen, found = _reached(ifaces, reach, 4)
        addr = IPv4Address(found)
    if chosen is None and default_index is not None:
        chosen = next((i for i in ifaces if i.index == default_index), None)
        addr = chosen.addrs[0] if chosen and chosen.addrs else None
    if chosen is None:
        raise IfaceError(
            "cannot find the external interface: no IPv4 default route; use --iface or --public-ip"
        )
    if addr is None:
        raise IfaceError(f"interface {chosen.name} has no IPv4 address")
    public = IPv4Address(public_ip) if public_ip else addr
    return chosen, addr, public


def public_ipv6_for(iface: Iface, wanted: str) -> IPv6Address:
    """The IPv6 address to advertise: --public-ipv6, else the interface's first global one."""
    if wanted:
        try:
            return IPv6Address(wanted)
        except ValueError:
            raise IfaceError(f"--public-ipv6 {wanted!r} is not an IPv6 address") from None
    if not iface.addrs6:
        raise IfaceError(f"EnableIPv6 is set but {iface.name} has no global IPv6 address; "
                         "add one or pass --public-ipv6")
    return iface.addrs6[0]


def find_iface(names: Sequence[str], regexes: Sequence[str], public_ip: str, *,
               can_reach: str = "", netns: str | None = None
               ) -> tuple[Iface, IPv4Address, IPv4Address]:
    """`choose_iface` on the links of this host (or of namespace `netns`).

    `can_reach` (flannel's ``--iface-can-reach``; ignored when `names` or `regexes` are given)
    asks the kernel for the route to that IP, as ``ip route get`` would. The target may be of
    either family: an IPv6 target picks the interface its IPv6 route leaves through, and that
    interface's first IPv4 address is used (the route's source is used only when it is an IPv4
    address of the interface)."""
    host = list_ifaces(netns=netns)
    given = bool(names or regexes)
    default = None if given else host.default_index
    reach = reach_for(can_reach, netns) if can_reach and not given else None
    try:
        return choose_iface(host.ifaces, names, regexes, public_ip, default, reach)
    except ValueError as exc:
        raise IfaceError(str(exc)) from None


def choose_iface6(
    ifaces: Sequence[Iface],
    names: Sequence[str] = (),
    regexes: Sequence[str] = (),
    public_ipv6: str = "",
    default6_index: int | None = None,
    reach: Reach | None = None,
) -> tuple[Iface, IPv6Address, IPv6Address]:
    """Pure selection for an IPv6-only network; returns (interface, its address, public IPv6).

    The interface address is the global IPv6 address that matched (an `--iface` address, a
    regex hit, the `--public-ipv6` the interface owns), else the interface's first global one.
    The public IPv6 — what the lease advertises — is `--public-ipv6` when given (it need not
    be on any interface: 1:1 NAT), else the interface address.

    Order, as flannel: each `--iface` (a name or an IPv6 address) in turn; else each
    `--iface-regex` in turn, first on every interface's global IPv6 addresses, then on the
    names; else the interface owning `--public-ipv6`; else the interface `--iface-can-reach`
    found (`reach`: its route's source when that is a global IPv6 address of it, else its first
    one); else the interface of the IPv6 default route (`default6_index`; pass None when iface
    flags are given, as `find_iface6` does).
    Where flannel gives up on an entry that names an interface without a global IPv6 address,
    the next entry (or, for a regex, the next interface whose name matches) is tried; the
    error lists why each entry failed.
    """
    public: IPv6Address | None = None
    if public_ipv6:
        try:
            public = IPv6Address(public_ipv6)
        except ValueError:
            raise IfaceError(f"--public-ipv6 {public_ipv6!r} is not an IPv6 address") from None
    why: list[str] = []

    def usable(i: Iface) -> bool:
        if not i.addrs6:
            why.append(f"interface {i.name} has no global IPv6 address")
        return bool(i.addrs6)

    found: tuple[Iface, IPv6Address] | None = None
    for spec in names:
        try:
            want = ip_address(spec)
        except ValueError:
            named = next((i for i in ifaces if i.name == spec), None)
            if named is None:
                why.append(f"no interface {spec}")
            elif usable(named):
                found = (named, named.addrs6[0])
        else:
            if want.version == 4:
                why.append(f"{spec} is an IPv4 address")
            elif want.is_link_local:
                why.append(f"{spec} is link-local (the overlay needs a global IPv6 address)")
            else:
                owner = next((i for i in ifaces if want in i.addrs6), None)
                if owner is None:
                    why.append(f"no interface has the global IPv6 address {spec}")
                else:
                    found = (owner, IPv6Address(want))
        if found is not None:
            break
    if found is None and names:
        raise IfaceError(f"none of --iface {', '.join(names)} is usable for IPv6: "
                         + "; ".join(why))

    if found is None and regexes:
        for rx in regexes:
            try:
                pat = re.compile(rx)
            except re.error as exc:
                raise IfaceError(f"--iface-regex {rx!r} is not a valid regex: {exc}") from None
            found = next(((i, a) for i in ifaces for a in i.addrs6 if pat.search(str(a))), None)
            if found is None:
                named = next((i for i in ifaces if pat.search(i.name) and usable(i)), None)
                found = (named, named.addrs6[0]) if named is not None else None
            if found is not None:
                break
            why.append(f"{rx!r} matches no global IPv6 address, nor the name of an interface "
                       "with one")
        if found is None:
            raise IfaceError(f"no interface matches --iface-regex {', '.join(regexes)} for IPv6: "
                             + "; ".join(why))

    if found is None and public is not None:
        owner = next((i for i in ifaces if public in i.addrs6), None)
        found = (owner, public) if owner is not None else None

    if found is None and reach is not None:
        chosen6, addr6 = _reached(ifaces, reach, 6)
        found = (chosen6, IPv6Address(addr6))

    if found is None:
        chosen = next((i for i in ifaces if i.index == default6_index), None) \
            if default6_index is not None else None
        if chosen is None:
            hint = (f"no interface has --public-ipv6 {public}, and " if public is not None
                    else "")
            raise IfaceError(f"cannot find the external interface: {hint}no IPv6 default route; "
                             "use --iface or --public-ipv6")
        if not chosen.addrs6:
            raise IfaceError(f"interface {chosen.name} has no global IPv6 address")
        found = (chosen, chosen.addrs6[0])

    iface, addr = found
    return iface, addr, public if public is not None else addr


def find_iface6(names: Sequence[str], regexes: Sequence[str], public_ipv6: str,
                *, netns: str | None = None, can_reach: str = ""
                ) -> tuple[Iface, IPv6Address, IPv6Address]:
    """`choose_iface6` on the links of this host (or of namespace `netns`).

    `can_reach` as in `find_iface`: the route the kernel picks to that IP, of either family;
    an IPv4 target picks the interface only, and its first global IPv6 address is used."""
    host = list_ifaces(netns=netns)
    given = bool(names or regexes)
    default6 = None if given else host.default6_index
    reach = reach_for(can_reach, netns) if can_reach and not given else None
    return choose_iface6(host.ifaces, names, regexes, public_ipv6, default6, reach)


def routes_via_for(subnet_text: str) -> str:
    """A route through a gateway for the network of `subnet_text` (mk-docker-opts' last check).

    Returns a description of the clashing route, or "" when there is none.
    """
    from ipaddress import IPv4Interface

    from netagent.kernel.host import gateway_route_to

    return gateway_route_to(IPv4Interface(subnet_text).network)
