"""A live address-family switch without root (issue 9): turning IPv4 off or on changes every
host's lease key, and the hosts re-lease one by one. What makes it lossless for the family
that stays, played here as the daemon plays it against the in-memory kernel:

* the peer table keeps a host's old and new key both as peers while both exist (a dual-stack
  lease is inside an IPv6-only network by its IPv6 side; an IPv6-only lease is inside a
  dual-stack network by its IPv6 subnet), and never takes a lease holding one of our own
  subnets for a peer, whatever its key;
* the reconciler keeps an entry while any peer wants it (idents of both families may);
* the family turned off goes through a backend that knows only that family
  (``NetworkConfig.only_family``), so the other family's entries and device stay as they are
  and the new backend adopts them with zero kernel writes.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from support.fakekernel import FakeKernel, mac, mac6, pub, pub6, sub, sub6

from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend, render_hostgw_peers
from netagent.backends.vxlan import VxlanBackend, render_vxlan_peers
from netagent.config import NetworkConfig, parse_network_config
from netagent.kernel import Reconciler, Route, RouteLookup
from netagent.lease import NO_PUBLIC_IP, Lease, LeaseAttrs, canonical_json, encode_attrs
from netagent.peers import PeerTable, RawLease

NET4 = IPv4Network("10.5.0.0/16")
NET6 = IPv6Network("fd42::/48")


def cfg(btype: str, ipv4: bool) -> NetworkConfig:
    doc: dict[str, Any] = {"EnableIPv6": True, "IPv6Network": str(NET6),
                           "Backend": {"Type": btype}}
    if ipv4:
        doc["Network"] = str(NET4)
    else:
        doc["EnableIPv4"] = False
    return parse_network_config(json.dumps(doc))


def lease(i: int, btype: str, ipv4: bool) -> Lease:
    vx = btype == "vxlan"
    return Lease(sub(i) if ipv4 else None, LeaseAttrs(
        public_ip=pub(i) if ipv4 else NO_PUBLIC_IP, public_ipv6=pub6(i), backend_type=btype,
        backend_data=canonical_json({"VNI": 1, "VtepMAC": mac(i)}) if vx and ipv4 else "",
        backend_v6_data=canonical_json({"VNI": 1, "VtepMAC": mac6(i)}) if vx else ""),
        sub6(i))


def raw(lz: Lease) -> RawLease:
    return RawLease(lz.key, encode_attrs(lz.attrs).encode(), 7)


def facts(k: FakeKernel, tmp: Path, ipv4: bool) -> HostFacts:
    eth = k.links["eth0"].index
    ip = pub(1) if ipv4 else NO_PUBLIC_IP
    return HostFacts("eth0", eth, 1500, ip, ip, tmp, pub6(1), iface_addr6=pub6(1))


def backend(btype: str, config: NetworkConfig, host: HostFacts, k: FakeKernel) -> Any:
    if btype == "vxlan":
        return VxlanBackend(config, host, kernel=k, csum_workaround=False)
    return HostGwBackend(config, host, kernel=k)


def kernel(btype: str) -> FakeKernel:
    k = FakeKernel()
    k.add_plain_link("eth0")
    eth = k.links["eth0"].index
    for i in (2, 3):
        k.lookups[pub(i)] = RouteLookup(None, eth)
        k.lookups[pub6(i)] = RouteLookup(None, eth)
    return k


def entries(k: FakeKernel, version: int) -> set[Any]:
    """Every neighbour, FDB entry and route of one address family (FDB: by its remote)."""
    neighs = {n for n in k.neighs.values() if n.dst.version == version}
    fdb = {f for f in k.fdb.values() if f.dst.version == version}
    return neighs | fdb | {r for r in k.routes.values() if r.dst.version == version}


@pytest.mark.parametrize("btype", ["vxlan", "host-gw"])
def test_ipv4_turned_off_keeps_every_ipv6_entry_untouched(btype: str, tmp_path: Path) -> None:
    k = kernel(btype)
    dual, only6 = cfg(btype, True), cfg(btype, False)
    host = facts(k, tmp_path, True)
    old = backend(btype, dual, host, k)
    old.prepare()
    old.activate(lease(1, btype, True))
    table = PeerTable(sub(1), NET4, own_ipv6=sub6(1), network6=NET6)
    table.reset([raw(lease(i, btype, True)) for i in (1, 2, 3)])
    assert set(table.peers) == {sub(2), sub(3)}
    old.sync(table.peers)
    v6_before = entries(k, 6)
    assert v6_before and entries(k, 4)
    v6_dev = k.links.get("flannel-v6.1")

    # the switch, as the daemon makes it: the peers stay (inside by their IPv6 side)…
    assert not table.set_network(only6.primary_network, only6.ipv6_network)
    new = backend(btype, only6, facts(k, tmp_path, False), k)
    new.prepare()
    # …the IPv4 side goes through a backend that knows IPv4 alone…
    assert dual.only_family(4).enable_ipv6 is False and dual.only_family(4).network == NET4
    part = backend(btype, dual.only_family(4), host, k)
    part.prepare_teardown()
    part.teardown()
    assert entries(k, 4) == set() and "flannel.1" not in k.links
    assert entries(k, 6) == v6_before and k.links.get("flannel-v6.1") == v6_dev
    # …and the new backend adopts the IPv6 side as it is
    k.clear_log()
    table.set_own(sub6(1), sub6(1))
    new.activate(lease(1, btype, False))
    assert new.sync(table.peers).changes == 0 and k.log == []

    # peer 2 re-leases: new key first, then the old one goes — no kernel write either time
    ch = table.put(raw(lease(2, btype, False)))
    assert ch.added == {sub6(2)}
    assert new.sync(table.peers, ch.changed).changes == 0
    ch = table.delete(lease(2, btype, True).key)
    assert ch.removed == {sub(2)}
    assert new.sync(table.peers, ch.changed).changes == 0
    assert k.log == [] and entries(k, 6) == v6_before
    # our own old dual-stack key, delivered late, is still ours: never a peer
    assert not table.put(raw(lease(1, btype, True)))
    assert set(table.peers) == {sub6(2), sub(3)}
    # a full compare (drift repair) agrees
    assert new.sync(table.peers).changes == 0 and k.log == []


@pytest.mark.parametrize("btype", ["vxlan", "host-gw"])
def test_ipv4_turned_on_adds_ipv4_and_keeps_every_ipv6_entry(btype: str, tmp_path: Path) -> None:
    k = kernel(btype)
    dual, only6 = cfg(btype, True), cfg(btype, False)
    old = backend(btype, only6, facts(k, tmp_path, False), k)
    old.prepare()
    old.activate(lease(1, btype, False))
    table = PeerTable(sub6(1), NET6, own_ipv6=sub6(1), network6=NET6)
    table.reset([raw(lease(i, btype, False)) for i in (1, 2, 3)])
    old.sync(table.peers)
    v6_before = entries(k, 6)
    assert v6_before and not entries(k, 4)

    # IPv6-only leases stay inside the dual-stack network by their IPv6 subnet
    assert not table.set_network(dual.primary_network, dual.ipv6_network)
    new = backend(btype, dual, facts(k, tmp_path, True), k)
    new.prepare()
    k.clear_log()
    table.set_own(sub(1), sub6(1))
    new.activate(lease(1, btype, True))
    rep = new.sync(table.peers)
    assert rep.changes == 0 and entries(k, 6) == v6_before
    assert rep.skipped[sub6(2)].startswith("IPv4 side left out: the lease has no IPv4 subnet")

    # peer 2 re-leases with both families: only its IPv4 entries are written
    ch = table.put(raw(lease(2, btype, True)))
    assert ch.added == {sub(2)}
    rep = new.sync(table.peers, ch.changed)
    assert rep.removed == 0 and rep.added == (3 if btype == "vxlan" else 1)
    assert {e.dst.version for _, e in k.log if _ != "link"} == {4}
    k.clear_log()
    ch = table.delete(lease(2, btype, False).key)
    assert ch.removed == {sub6(2)}
    assert new.sync(table.peers, ch.changed).changes == 0 and k.log == []
    assert entries(k, 6) == v6_before


def test_only_family_keeps_the_rest_of_the_config() -> None:
    dual = cfg("vxlan", True)
    v4, v6 = dual.only_family(4), dual.only_family(6)
    assert (v4.enable_ipv4, v4.enable_ipv6, v4.network, v4.ipv6_network) == (
        True, False, NET4, None)
    assert (v6.enable_ipv4, v6.enable_ipv6, v6.network, v6.ipv6_network) == (
        False, True, None, NET6)
    assert v6.primary_network == NET6 and v4.backend == v6.backend == dual.backend
    assert v6 == cfg("vxlan", False).only_family(6)


def test_renders_give_an_ipv6_only_lease_its_ipv6_side_in_a_dual_stack_network() -> None:
    vx = render_vxlan_peers({sub6(2): lease(2, "vxlan", False)}, vni=1, device_index=7,
                            own_ip=pub(1), device6_index=8, own_ip6=pub6(1))
    assert [e.kind for e in vx.entries[sub6(2)]] == ["neigh", "fdb", "route"]
    assert all(e.ifindex == 8 for e in vx.entries[sub6(2)][:2])  # type: ignore[attr-defined]
    assert "IPv4 side left out" in vx.skipped[sub6(2)]
    # with its IPv6 side unusable too, it is skipped for that reason
    bad = Lease(None, LeaseAttrs(public_ip=NO_PUBLIC_IP, public_ipv6=pub6(3),
                                 backend_type="vxlan"), sub6(3))
    vx = render_vxlan_peers({sub6(3): bad}, vni=1, device_index=7, own_ip=pub(1),
                            device6_index=8, own_ip6=pub6(1))
    assert vx.entries == {} and vx.skipped[sub6(3)] == "the lease has no BackendV6Data"
    # an IPv4-only network has no IPv6 side to give it
    vx = render_vxlan_peers({sub6(2): lease(2, "vxlan", False)}, vni=1, device_index=7,
                            own_ip=pub(1))
    assert vx.entries == {} and "no IPv4 subnet" in vx.skipped[sub6(2)]
    lookups = {pub6(2): RouteLookup(None, 3)}
    hg = render_hostgw_peers({sub6(2): lease(2, "host-gw", False)}, iface_index=3,
                             own_ip=pub(1), lookups=lookups, ipv6=True, own_ip6=pub6(1))
    assert hg.entries == {sub6(2): (Route(sub6(2), gateway=pub6(2), oif=3),)}
    assert "IPv4 side left out" in hg.skipped[sub6(2)]
    hg = render_hostgw_peers({sub6(2): lease(2, "host-gw", False)}, iface_index=3,
                             own_ip=pub(1), lookups=lookups)
    assert hg.entries == {} and "no IPv4 subnet" in hg.skipped[sub6(2)]


def test_reconciler_orders_idents_of_both_families() -> None:
    """An IPv4 and an IPv6 ident wanting one key: no comparison across families fails, the
    IPv4 one wins, and the entry stays while either wants it."""
    rec = Reconciler(kernel=None, route_is_ours=lambda r: True, device=7)  # type: ignore[arg-type]
    a = Route(sub6(2), gateway=pub6(2), oif=3)
    b = Route(sub6(2), gateway=pub6(9), oif=3)
    rec.set_peer(sub6(2), [b])
    rec.set_peer(sub(2), [a])
    assert rec.desired()["route"][a.key] == a
    rec.set_peer(sub(2), None)
    assert rec.desired()["route"][a.key] == b
    rec.set_peer(sub6(2), None)
    assert rec.desired()["route"] == {}


def test_ipv6_turned_off_on_host_gw_behind_ipv6_nat_still_removes_the_ipv6_routes(
        tmp_path: Path) -> None:
    """A dual-stack host-gw host whose PublicIPv6 is not on its interface (allowed: only the
    IPv4 side is checked for NAT in dual stack). An IPv6-only host-gw refuses such a host, but
    removing its IPv6 routes must not: prepare_teardown skips the checks."""
    k = kernel("host-gw")
    dual = cfg("host-gw", True)
    host = facts(k, tmp_path, True)
    natted = HostFacts(host.iface, host.iface_index, host.iface_mtu, host.iface_addr,
                       host.public_ip, tmp_path, pub6(1), iface_addr6=None)
    old = backend("host-gw", dual, natted, k)
    old.prepare()
    old.activate(lease(1, "host-gw", True))
    old.sync({sub(i): lease(i, "host-gw", True) for i in (2, 3)})
    v4_before = entries(k, 4)
    assert entries(k, 6) and v4_before
    part = backend("host-gw", dual.only_family(6), natted, k)
    with pytest.raises(RuntimeError, match="behind NAT"):
        part.prepare()
    part.prepare_teardown()
    part.teardown()
    assert entries(k, 6) == set() and entries(k, 4) == v4_before
