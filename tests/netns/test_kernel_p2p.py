"""Privileged: a point-to-point overlay device through the kernel package's public API only.

What the WireGuard backend needs (and any TUN-style backend): adopt a link someone else made
(wireguard-go makes a TUN) or create one of a given kind, give it a /32 and a /128 (NODAD), set
its MTU and bring it up, and own a scope-link route on it (proto 111) through the reconciler,
which must then find nothing to do on a read-back and sweep the route once no peer wants it.
The raw-netlink kernel does it in one namespace and the pyroute2 reference kernel in a twin;
iproute2's view of both must match. Also: the host read-out behind mk-docker-opts' route check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

import pytest
from support.harness import RUN_ID, add_netns, del_netns, need_root, sh
from support.pyroute2kernel import Pyroute2Kernel

from netagent.kernel import (
    RT_SCOPE_LINK,
    RT_TABLE_MAIN,
    RTPROT_NETAGENT,
    Kernel,
    KernelError,
    NetlinkKernel,
    Reconciler,
    Route,
    gateway_route_to,
)

pytestmark = pytest.mark.privileged

NET = IPv4Network("10.5.0.0/16")
NET6 = IPv6Network("fd42::/48")
TUN = "wgtun0"
BRIDGE = "wgbr0"


def js(ns: str, *args: str) -> Any:
    out = sh(*args, ns=ns).stdout
    return json.loads(out) if out.strip() else []


@pytest.fixture
def twins() -> Iterator[tuple[str, str]]:
    need_root()
    names = (f"na{RUN_ID}pr", f"na{RUN_ID}pp")
    made: list[str] = []
    try:
        for n in names:
            add_netns(n)
            made.append(n)
            # a TUN as wireguard-go leaves it: made by someone else, persistent, no carrier
            sh("ip", "tuntap", "add", "dev", TUN, "mode", "tun", ns=n)
        yield names
    finally:
        for n in made:
            del_netns(n)


def program(kernel: Kernel) -> tuple[int, Reconciler]:
    """The WireGuard-style sequence: adopt the TUN, address it, MTU + up, one owned route."""
    link = kernel.link(TUN)
    assert link is not None and link.kind == "tun"
    kernel.set_link(link.index, mtu=1420, up=True)
    kernel.add_addr(link.index, IPv4Interface("10.5.3.0/32"))
    kernel.add_addr(link.index, IPv6Interface("fd42:0:0:3::/128"))
    with pytest.raises(KernelError):  # the same address twice: a clear EEXIST, not a crash
        kernel.add_addr(link.index, IPv4Interface("10.5.3.0/32"))
    kernel.create_link(BRIDGE, "bridge", mtu=1420)
    with pytest.raises(KernelError):
        kernel.create_link(BRIDGE, "bridge")

    # the backend's own ownership rule: our proto, on our device, inside the Network
    def is_ours(r: Route) -> bool:
        return r.proto == RTPROT_NETAGENT and r.oif == link.index

    rec = Reconciler(kernel, is_ours, ipv6=True)
    rec.set_peer(NET, [Route(NET, None, link.index, scope=RT_SCOPE_LINK),
                       Route(NET6, None, link.index, scope=RT_SCOPE_LINK)])
    rec.resync()
    res = rec.apply()
    assert (res.added, res.removed, res.failed, res.blocked) == (2, 0, {}, {})
    return link.index, rec


def view(ns: str) -> dict[str, Any]:
    link = js(ns, "ip", "-j", "-d", "link", "show", TUN)[0]
    br = js(ns, "ip", "-j", "-d", "link", "show", BRIDGE)[0]
    addrs = sorted((a["local"], a["prefixlen"], a.get("nodad", False))
                   for a in js(ns, "ip", "-j", "addr", "show", "dev", TUN)[0]["addr_info"]
                   if a.get("scope") == "global")
    routes = sorted(json.dumps(r, sort_keys=True)
                    for fam in ("-4", "-6")
                    for r in js(ns, "ip", fam, "-j", "-d", "route", "show", "dev", TUN)
                    if r.get("protocol") in ("111", RTPROT_NETAGENT))
    return {"mtu": link["mtu"], "up": "UP" in link["flags"], "kind": br["linkinfo"]["info_kind"],
            "br_mtu": br["mtu"], "addrs": addrs, "routes": routes}


def test_point_to_point_device_raw_matches_pyroute2(twins: tuple[str, str]) -> None:
    raw_ns, ref_ns = twins
    raw, ref = NetlinkKernel(raw_ns), Pyroute2Kernel(ref_ns)
    try:
        _, rec = program(raw)
        program(ref)
        got = view(raw_ns)
        assert got == view(ref_ns)
        assert got["mtu"] == 1420 and got["up"]
        assert (got["kind"], got["br_mtu"]) == ("bridge", 1420)
        assert got["addrs"] == [("10.5.3.0", 32, False), ("fd42:0:0:3::", 128, True)]
        routes = [json.loads(r) for r in got["routes"]]
        assert sorted(r["dst"] for r in routes) == ["10.5.0.0/16", "fd42::/48"]
        assert all(r["scope"] == "link" for r in routes if r["dst"] == "10.5.0.0/16")
        # read back: the kernel holds what we want, so nothing is written
        rec.resync()
        res = rec.apply()
        assert (res.added, res.removed) == (0, 0)
        assert sorted(str(r.dst) for r in raw.dump_routes(RT_TABLE_MAIN)
                      if r.proto == RTPROT_NETAGENT) == ["10.5.0.0/16"]
        # no peer wants the routes any more: both are swept, the device and addresses stay
        rec.set_peer(NET, None)
        res = rec.apply()
        assert (res.added, res.removed, res.failed) == (0, 2, {})
        assert view(raw_ns)["routes"] == [] and raw.link(TUN) is not None
        assert len(view(raw_ns)["addrs"]) == 2
        link = raw.link(BRIDGE)
        assert link is not None
        raw.delete_link(link.index)
        assert raw.link(BRIDGE) is None
    finally:
        raw.close()
        ref.close()


def test_gateway_route_to_finds_only_a_gateway_route_for_exactly_that_net(
        twins: tuple[str, str]) -> None:
    """mk-docker-opts' last check (``iface.routes_via_for``) without pyroute2."""
    ns = twins[0]
    sh("ip", "link", "set", TUN, "up", ns=ns)
    sh("ip", "addr", "add", "192.168.90.1/24", "dev", TUN, ns=ns)
    net = IPv4Network("10.5.7.0/24")
    assert gateway_route_to(net, ns) == ""
    sh("ip", "route", "add", str(net), "dev", TUN, ns=ns)  # no gateway: not a clash
    assert gateway_route_to(net, ns) == ""
    sh("ip", "route", "add", "10.5.7.0/25", "via", "192.168.90.9", ns=ns)  # another net
    assert gateway_route_to(net, ns) == ""
    sh("ip", "route", "replace", str(net), "via", "192.168.90.9", ns=ns)
    assert gateway_route_to(net, ns) == f"{net} via {IPv4Address('192.168.90.9')}"
