"""How a pod is attached: the two strategies (``bridge``, ``routed``), each with the CHECK of
what it made, and the kernel handles they share (netlink sockets in both namespaces, sysctls).

- **bridge**: the host end of the pod's veth is a port of the bridge, which holds each
  family's gateway address;
- **routed**: no bridge; the pod's address is a /32 (/128), its gateway (the same address as
  in bridge mode) sits on no device and is reached through a permanent neighbour entry for the
  host veth's MAC; the host routes the pod by a /32 (/128) on the host veth marked
  :data:`~netagent.cni.conf.POD_ROUTE_PROTO`, which the agent never sweeps. Everything sits on
  the veth pair, so deleting the host veth undoes it all, except where bridge-mode pods share
  the host: there the host answers ARP/NDP on the bridge for routed pods
  (:func:`_proxy_on_bridge`), and DEL sweeps the IPv6 proxy entries whose pod is gone.

A strategy appends what it creates to the ADD's undo list, so a failed ADD is rolled back by
the verb whatever the strategy did.
"""

from __future__ import annotations

import os

from netagent.cni.conf import POD_ROUTE_PROTO, host_veth_name
from netagent.cni.errors import (
    ADDRESS_UNAVAILABLE,
    CHECK_FAILED,
    INTERFACE_EXISTS,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    CniError,
)
from netagent.cni.fast import digest, format_ip, ip_version, netmask_any, parse_cidr_any, parse_ip_any
from netagent.cni.skel import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from netagent.cni.conf import Config
    from netagent.cni.ipamcall import IpamLease
    from netagent.cni.link import Link, Neigh, Netlink
    from netagent.cni.skel import Env
    from netagent.cni.subnet import SubnetEnv

    #: what an attach step gives the result: interfaces, ips, routes
    Attachment = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
    Attach = Callable[[Config, Env, SubnetEnv, "Namespaces", list[IpamLease], int,
                       list[tuple[str, Any]]], Attachment]
    Check = Callable[[Config, Env, "Namespaces", Link, "Link | None", str, list[str],
                      dict[int, str], list[Any]], None]

class Namespaces:
    """Netlink sockets for the host namespace and (optionally) the container's.

    The process enters the container namespace only long enough to open a socket there; the
    socket stays bound to that namespace, so every later call is a plain send/recv.
    """

    def __init__(self, netns_path: str) -> None:
        from netagent.cni.fast import setns
        from netagent.cni.link import Netlink

        self.host: Netlink = Netlink()
        self.cont: Netlink | None = None
        self.netns_fd = -1
        if not netns_path:
            return
        try:
            self.netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CniError(INVALID_ENV, f"failed to open netns {netns_path!r}: {e.strerror}",
                           "CNI_NETNS") from None
        host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                setns(self.netns_fd)
            except OSError as e:
                raise CniError(INVALID_ENV, f"{netns_path!r} is not a network namespace: "
                               f"{e.strerror}", "CNI_NETNS") from None
            try:
                self.cont = Netlink()
            finally:
                setns(host_fd)
        finally:
            os.close(host_fd)

    def close(self) -> None:
        self.host.close()
        if self.cont is not None:
            self.cont.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)


def write_sysctl(path: str, value: str) -> bool:
    """Set a /proc/sys knob of the current (host) namespace if it differs; False on failure.

    Read first: most calls find the value already set, and a read is cheaper than a write
    that the kernel turns into a notifier chain.
    """
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as e:
        log(f"cannot set {path} to {value}: {e}")
        return False


def host_plen(version: int) -> int:
    return 128 if version == 6 else 32


def _bridge_mac(sub: SubnetEnv) -> str:
    """0a:58 + four bytes naming the gateway: locally administered, stable across re-creation.

    The IPv4 gateway's bytes, as before; an IPv6-only network hashes its gateway instead
    (every host's is ``…::1``, so its low bytes would name nothing).
    """
    if sub.v4 is not None:
        low = f"{sub.v4.gateway:08x}"
    else:
        low = digest(sub.primary.gateway_ip)[:8]
    return "0a:58:" + ":".join(low[i:i + 2] for i in range(0, 8, 2))


def _ensure_bridge(nl: Netlink, name: str, sub: SubnetEnv, mtu: int) -> Any:
    """Create (or adopt) the bridge with one gateway address per family; safe when ADDs race."""
    import errno

    from netagent.cni.link import NetlinkError

    br = nl.link(name)
    created = False
    if br is None:
        created = True
        try:
            nl.add_bridge(name, _bridge_mac(sub))
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
        br = nl.link(name)
        if br is None:
            raise CniError(INTERNAL, f"bridge {name} vanished after creation")
    if br.kind != "bridge":
        raise CniError(INVALID_CONFIG, f"{name} exists and is not a bridge (kind {br.kind!r})")
    have = set(nl.addrs(br.index))
    for fam in sub.families:
        if (fam.gateway_ip, fam.plen) in have:
            continue
        if fam.version == 6:
            # the gateway must answer at once: no DAD on the bridge (its link-local address
            # included), and IPv6 must be on for it (EACCES when disable_ipv6=1)
            conf = f"/proc/sys/net/ipv6/conf/{name}"
            write_sysctl(f"{conf}/accept_dad", "0")
            write_sysctl(f"{conf}/disable_ipv6", "0")
        try:
            nl.add_addr(br.index, fam.gateway_ip, fam.plen, nodad=True)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
    if created or br.mtu != mtu or not br.up:
        # setting the MTU after creation pins it (the kernel otherwise follows its ports and
        # falls back to 1500 when the last one leaves)
        nl.set_link(br.index, up=True, mtu=mtu)
    if created:
        # routed pods attached before the bridge existed: their ADD found no bridge to answer
        # ARP/NDP on (a routed ADD adds its host route before it looks, so one of the two
        # always sees the other)
        routed = _routed_pod_ips(nl, sub)
        if routed:
            _proxy_on_bridge(nl, br, routed, [])
    return br


def _enable_forwarding(sub: SubnetEnv) -> None:
    """The bridge is the pods' gateway, so the host must forward each family it carries
    (bridge's isGateway does the same). IPv6 forwarding on ``all`` also makes the host stop
    accepting router advertisements on interfaces with accept_ra=1; hosts configured by SLAAC
    need accept_ra=2 on their uplink, as with the reference bridge plugin."""
    if sub.v4 is not None:
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if sub.v6 is not None:
        write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def container_routes(cfg: Config, sub: SubnetEnv, leases: list[IpamLease]
                      ) -> list[dict[str, Any]]:
    """Per family: the delegate's routes, else a default route (or, when the pod's default
    route belongs to another interface, one to the overlay network) via the bridge."""
    out: list[dict[str, Any]] = []
    for lease in leases:
        if lease.routes:
            out += [{"dst": str(r["dst"]), "gw": str(r.get("gw") or lease.gateway)}
                    for r in lease.routes if r.get("dst")]
            continue
        fam = sub.family(lease.version)
        assert fam is not None
        dst = fam.default_dst if cfg.is_default_gateway else fam.network_cidr
        out.append({"dst": dst, "gw": lease.gateway})
    return out


def _add_veth(ns: Namespaces, env: Env, mtu: int, undo: list[tuple[str, Any]]
              ) -> tuple[Link, Link]:
    """The pod's veth pair, (host end, container end); a host end left by an earlier
    attachment of the same IDs is replaced."""
    import errno

    from netagent.cni.link import NetlinkError

    assert ns.cont is not None
    hname = host_veth_name(env.container_id, env.ifname)
    if ns.host.del_link_by_name(hname):
        log(f"removed stale host veth {hname} of an earlier attachment")
    try:
        ns.host.add_veth(hname, env.ifname, ns.netns_fd, mtu)
    except NetlinkError as e:
        if e.errno == errno.EEXIST:
            raise CniError(INTERFACE_EXISTS, f"container interface {env.ifname} already "
                           f"exists in {env.netns}") from None
        raise
    undo.append(("veth", hname))
    hv = ns.host.link(hname)
    if hv is None:
        raise CniError(INTERNAL, f"host veth {hname} vanished after creation")
    cv = ns.cont.link(env.ifname)
    if cv is None:
        raise CniError(INTERNAL, f"container veth {env.ifname} vanished after creation")
    return hv, cv


def _add_pod_addrs(cont: Netlink, env: Env, cv: Link, leases: list[IpamLease],
                   host_prefix: bool) -> None:
    """One address per lease on the pod interface: with the subnet's prefix length, or as a
    single host (/32, /128) with ``host_prefix``."""
    import errno

    from netagent.cni.link import NetlinkError

    for lease in leases:
        plen = host_plen(lease.version) if host_prefix else lease.plen
        try:
            # IPv6 without DAD: usable the moment ADD returns (the reference bridge
            # waits ~1 s for DAD to settle instead)
            cont.add_addr(cv.index, lease.ip, plen, nodad=True)
        except NetlinkError as e:
            if e.errno == errno.EACCES and lease.version == 6:
                raise CniError(INTERNAL, f"cannot add {lease.ip}/{plen} to "
                               f"{env.ifname}: IPv6 is disabled in {env.netns} "
                               "(net.ipv6.conf.*.disable_ipv6=1)") from None
            raise


def _add_pod_routes(cont: Netlink, cv: Link, routes: list[dict[str, Any]]) -> None:
    import errno

    from netagent.cni.link import NetlinkError

    for r in routes:
        dst_version, dst_int, dst_plen = parse_cidr_any(r["dst"])
        try:
            cont.add_route(format_ip(dst_version, dst_int), dst_plen, r["gw"], cv.index)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise


def attach_bridged(cfg: Config, env: Env, sub: SubnetEnv, ns: Namespaces,
                    leases: list[IpamLease], mtu: int, undo: list[tuple[str, Any]]
                    ) -> Attachment:
    """Bridge mode: the host end is a port of the bridge, which holds each family's gateway."""
    assert ns.cont is not None
    br = _ensure_bridge(ns.host, cfg.bridge, sub, mtu)
    _enable_forwarding(sub)
    hv, cv = _add_veth(ns, env, mtu, undo)
    ns.host.set_link(hv.index, master=br.index, up=True)
    if cfg.hairpin:
        ns.host.set_hairpin(hv.index, True)
    _add_pod_addrs(ns.cont, env, cv, leases, host_prefix=False)
    ns.cont.set_link(cv.index, up=True)
    routes = container_routes(cfg, sub, leases)
    _add_pod_routes(ns.cont, cv, routes)
    br = ns.host.link(cfg.bridge) or br
    interfaces = [
        {"name": br.name, "mac": br.mac},
        {"name": hv.name, "mac": hv.mac},
        {"name": cv.name, "mac": cv.mac, "sandbox": env.netns, "mtu": mtu},
    ]
    ips = [{"address": f"{lease.ip}/{lease.plen}", "gateway": lease.gateway,
            "interface": 2} for lease in leases]
    return interfaces, ips, routes


def attach_routed(cfg: Config, env: Env, sub: SubnetEnv, ns: Namespaces,
                   leases: list[IpamLease], mtu: int, undo: list[tuple[str, Any]]
                   ) -> Attachment:
    """Routed mode: no bridge, everything on the veth pair (so deleting it undoes it all).

    Pod: its address as a single host, a link route to the gateway (held by no host device)
    and a permanent neighbour gateway → host end's MAC, then the usual routes via the
    gateway. Host: a link route to the pod on the host end (:data:`POD_ROUTE_PROTO`) and a
    permanent neighbour pod → pod MAC. Neither side ever sends ARP or NDP.
    """
    import errno

    from netagent.cni.link import RT_SCOPE_LINK, NetlinkError

    assert ns.cont is not None
    _enable_forwarding(sub)
    hv, cv = _add_veth(ns, env, mtu, undo)
    if sub.v6 is not None:
        # the host end receives the pod's IPv6 packets: IPv6 must be on there (a host may
        # default new links to disable_ipv6=1)
        write_sysctl(f"/proc/sys/net/ipv6/conf/{hv.name}/disable_ipv6", "0")
    ns.host.set_link(hv.index, up=True)
    _add_pod_addrs(ns.cont, env, cv, leases, host_prefix=True)
    ns.cont.set_link(cv.index, up=True)
    for lease in leases:
        # the gateway first: a route via it needs it on-link
        ns.cont.add_route(lease.gateway, host_plen(lease.version), "", cv.index,
                          scope=RT_SCOPE_LINK)
        ns.cont.add_neigh(cv.index, lease.gateway, hv.mac)
    routes = container_routes(cfg, sub, leases)
    _add_pod_routes(ns.cont, cv, routes)
    for lease in leases:
        plen = host_plen(lease.version)
        try:
            ns.host.add_route(lease.ip, plen, "", hv.index, scope=RT_SCOPE_LINK,
                              proto=POD_ROUTE_PROTO)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
            raise CniError(ADDRESS_UNAVAILABLE, f"the host already has a route to "
                           f"{lease.ip}/{plen}: in use outside this plugin's IPAM") from None
        ns.host.add_neigh(hv.index, lease.ip, cv.mac, protocol=POD_ROUTE_PROTO)
    br = ns.host.link(cfg.bridge)
    if br is not None and br.kind == "bridge":
        _proxy_on_bridge(ns.host, br, [lease.ip for lease in leases], undo)
    interfaces: list[dict[str, Any]] = [
        {"name": hv.name, "mac": hv.mac},
        {"name": cv.name, "mac": cv.mac, "sandbox": env.netns, "mtu": mtu},
    ]
    ips: list[dict[str, Any]] = [
        {"address": f"{lease.ip}/{host_plen(lease.version)}", "gateway": lease.gateway,
         "interface": 1} for lease in leases]
    return interfaces, ips, routes


def _proxy_on_bridge(nl: Netlink, br: Link, ips: list[str], undo: list[tuple[str, Any]]
                     ) -> None:
    """Let bridge-mode pods reach routed pods of the same subnet on this host.

    A bridge pod holds the whole subnet on-link, so for a routed pod's address it asks ARP or
    NDP on the bridge, where no pod answers. The host answers instead (with the bridge's MAC)
    and then routes by the /32 (/128): proxy ARP for IPv4, which answers for any address the
    host routes out of another link; for IPv6, which has no such catch-all, a proxy entry per
    address, marked :data:`POD_ROUTE_PROTO` so DEL and GC can sweep the ones whose pod is
    gone. No delay before answering (the kernel's default is a random wait up to 0.8 s).
    """
    if any(":" not in ip for ip in ips):
        write_sysctl(f"/proc/sys/net/ipv4/conf/{br.name}/proxy_arp", "1")
        write_sysctl(f"/proc/sys/net/ipv4/neigh/{br.name}/proxy_delay", "0")
    v6 = [ip for ip in ips if ":" in ip]
    if v6:
        write_sysctl(f"/proc/sys/net/ipv6/conf/{br.name}/proxy_ndp", "1")
        write_sysctl(f"/proc/sys/net/ipv6/neigh/{br.name}/proxy_delay", "0")
    for ip in v6:
        nl.add_neigh(br.index, ip, proxy=True, protocol=POD_ROUTE_PROTO)
        undo.append(("proxy", (br.index, ip)))


def _routed_pod_ips(nl: Netlink, sub: SubnetEnv) -> list[str]:
    """Addresses of this subnet's routed pods on this host, from their host routes."""
    from netagent.cni.link import RT_TABLE_MAIN

    out = []
    for r in nl.routes():
        if r.proto != POD_ROUTE_PROTO or r.table != RT_TABLE_MAIN:
            continue
        version, value, plen = parse_cidr_any(r.dst)
        fam = sub.family(version)
        if (fam is not None and plen == host_plen(version)
                and value & netmask_any(version, fam.plen) == fam.subnet):
            out.append(format_ip(version, value))
    return out


def sweep_bridge_proxies(nl: Netlink, bridge: str) -> None:
    """Remove our IPv6 proxy entries on the bridge whose routed pod is gone (its /128 host
    route went with its veth); entries we did not mark are left alone. Stale ones matter: the
    host would keep answering for an address IPAM may give to a bridge pod next."""
    from netagent.cni.link import AF_INET6

    br = nl.link(bridge)
    if br is None:
        return
    ours = [n for n in nl.neighs(br.index, AF_INET6, proxy=True)
            if n.protocol == POD_ROUTE_PROTO]
    if not ours:
        return
    live = {r.dst.partition("/")[0] for r in nl.routes(AF_INET6)
            if r.proto == POD_ROUTE_PROTO and r.dst.endswith("/128")}
    for n in ours:
        if n.ip not in live:
            nl.del_neigh(br.index, n.ip, proxy=True)


def check_routed(cfg: Config, env: Env, ns: Namespaces, cv: Link, hv: Link | None,
                  hname: str, ips: list[str], gateways: dict[int, str],
                  pod_routes: list[Any]) -> None:
    """What a routed ADD made besides addresses and prevResult's routes: the pod's link route
    and permanent neighbour for each gateway, the host's marked route and permanent
    neighbour for each address, and the proxy entries when the bridge exists."""
    from netagent.cni.link import AF_INET6, RT_TABLE_MAIN

    assert ns.cont is not None
    if hv is None:
        raise CniError(CHECK_FAILED, f"host veth {hname} not found")
    if not hv.up:
        raise CniError(CHECK_FAILED, f"host veth {hname} is down")
    pod_neigh = {n.ip: n for n in ns.cont.neighs(cv.index)}
    for version, gw in gateways.items():
        if not gw:
            continue
        gw = format_ip(*parse_ip_any(gw))
        dst = f"{gw}/{host_plen(version)}"
        if not any(r.dst == dst and r.oif == cv.index and not r.gw for r in pod_routes):
            raise CniError(CHECK_FAILED, f"route to the gateway {dst} not found on "
                           f"{env.ifname} in {env.netns}")
        _require_permanent_neighbour(pod_neigh, gw, hv.mac, f"{env.ifname} in {env.netns}")
    host_routes = ns.host.routes()
    host_neigh = {n.ip: n for n in ns.host.neighs(hv.index)}
    for ip in ips:
        dst = f"{ip}/{host_plen(ip_version(ip))}"
        if not any(r.dst == dst and r.oif == hv.index and r.proto == POD_ROUTE_PROTO
                   and r.table == RT_TABLE_MAIN for r in host_routes):
            raise CniError(CHECK_FAILED, f"host route {dst} dev {hname} proto "
                           f"{POD_ROUTE_PROTO} not found")
        _require_permanent_neighbour(host_neigh, ip, cv.mac, hname)
    br = ns.host.link(cfg.bridge)
    if br is None or br.kind != "bridge":
        return
    proxies = {n.ip for n in ns.host.neighs(br.index, AF_INET6, proxy=True)}
    for ip in ips:
        if ":" in ip and ip not in proxies:
            raise CniError(CHECK_FAILED, f"proxy entry for {ip} not found on {cfg.bridge} "
                           "(bridge-mode pods cannot reach this pod)")


def _require_permanent_neighbour(neighs: dict[str, Neigh], ip: str, mac: str, where: str
                                 ) -> None:
    """CHECK of one of the permanent neighbour entries a routed ADD makes on either side."""
    n = neighs.get(ip)
    if n is None or not n.permanent or n.mac != mac:
        raise CniError(CHECK_FAILED, f"permanent neighbour {ip} lladdr {mac} not found "
                       f"on {where}")


def check_bridged(cfg: Config, env: Env, ns: Namespaces, cv: Link, hv: Link | None,
                  hname: str, ips: list[str], gateways: dict[int, str],
                  pod_routes: list[Any]) -> None:
    """What a bridge ADD made besides addresses and prevResult's routes: the host veth is a
    port of the bridge, with hairpin mode when the config asks for it."""
    br = ns.host.link(cfg.bridge)
    if hv is None or br is None or hv.master != br.index:
        raise CniError(CHECK_FAILED, f"host veth {hname} is not a port of {cfg.bridge}")
    if cfg.hairpin and not ns.host.hairpin(hv.index):
        raise CniError(CHECK_FAILED, f"hairpin mode is off on {hname}")


#: per mode (``conf.MODES``): how ADD attaches a pod and how CHECK verifies it
STRATEGIES: dict[str, tuple[Attach, Check]] = {
    "bridge": (attach_bridged, check_bridged),
    "routed": (attach_routed, check_routed),
}
