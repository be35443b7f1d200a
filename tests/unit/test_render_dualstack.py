"""Dual stack without root: the vxlan and host-gw renders with IPv6 sides, the reconciler's
per-family hold-back, and both backends against the in-memory kernel (issue 9)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

import pytest
from support.fakekernel import FakeKernel, mac, mac6, pub, pub6, sub, sub6

from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend, render_hostgw_peers
from netagent.backends.vxlan import VxlanBackend, render_vxlan_peers
from netagent.config import parse_network_config
from netagent.kernel import (
    IPV6_DEFAULT_METRIC,
    RTPROT_NETAGENT,
    Fdb,
    Neigh,
    Op,
    Reconciler,
    Route,
    RouteLookup,
    encode_op,
    route_owner,
)
from netagent.lease import Lease, LeaseAttrs, canonical_json

DEV, DEV6, IFACE = 7, 8, 3
NET6 = IPv6Network("fd42::/48")
OWN = IPv4Network("10.5.1.0/24")
OWN6 = IPv6Network("fd42:0:0:1::/64")


def dual_lease(i: int, btype: str = "vxlan", v6data: str | None = None,
               public6: IPv6Address | None = None, subnet6: IPv6Network | None = None,
               no_v6_subnet: bool = False) -> Lease:
    data = canonical_json({"VNI": 1, "VtepMAC": mac(i)}) if btype == "vxlan" else ""
    d6 = canonical_json({"VNI": 1, "VtepMAC": mac6(i)}) if btype == "vxlan" else ""
    return Lease(sub(i), LeaseAttrs(public_ip=pub(i), public_ipv6=public6 or pub6(i),
                                    backend_type=btype, backend_data=data,
                                    backend_v6_data=d6 if v6data is None else v6data),
                 None if no_v6_subnet else subnet6 or sub6(i))


def vx_render(peers: dict[IPv4Network, Lease], **kw: object):  # type: ignore[no-untyped-def]
    return render_vxlan_peers(peers, vni=1, device_index=DEV, own_ip=pub(99),  # type: ignore[arg-type]
                              device6_index=DEV6, own_ip6=pub6(0x99), **kw)


# --------------------------------------------------------------------------- pure renders


def test_vxlan_dual_stack_peer_gets_both_families() -> None:
    out = vx_render({sub(2): dual_lease(2)})
    gw6 = sub6(2).network_address
    assert out.skipped == {}
    assert out.entries[sub(2)][3:] == (
        Neigh(DEV6, gw6, mac6(2)),
        Fdb(DEV6, mac6(2), pub6(2)),
        Route(sub6(2), gateway=gw6, oif=DEV6, onlink=True),
    )
    assert out.entries[sub(2)][2] == Route(sub(2), gateway=IPv4Address("10.5.2.0"), oif=DEV,
                                           onlink=True)
    # the kernel gives an IPv6 route without a metric 1024; stored so, read-backs compare equal
    assert out.entries[sub(2)][5].metric == IPV6_DEFAULT_METRIC


@pytest.mark.parametrize(("lease", "why"), [
    (dual_lease(2, no_v6_subnet=True), "no IPv6 subnet"),
    (dual_lease(2, v6data=""), "no BackendV6Data"),
    (dual_lease(2, v6data='{"VNI":1,"VtepMAC":"ff:00:00:00:00:01"}'), "multicast"),
    (dual_lease(2, v6data='{"VNI":2,"VtepMAC":"0e:00:00:00:06:02"}'), "VNI"),
    (dual_lease(2, v6data='{"VNI":1}'), "no VtepMAC"),
    (dual_lease(2, public6=pub6(0x99)), "our own PublicIPv6"),
])
def test_vxlan_peer_with_a_bad_ipv6_side_keeps_its_ipv4_entries(lease: Lease, why: str) -> None:
    out = vx_render({sub(2): lease})
    assert [e.dst.version for e in out.entries[sub(2)]] == [4, 4, 4]
    assert out.skipped[sub(2)].startswith("IPv6 side left out") and why in out.skipped[sub(2)]


def test_vxlan_without_ipv6_device_ignores_v6_sides() -> None:
    out = render_vxlan_peers({sub(2): dual_lease(2)}, vni=1, device_index=DEV)
    assert [e.dst.version for e in out.entries[sub(2)]] == [4, 4, 4] and out.skipped == {}


def test_vxlan_direct_routing_per_family() -> None:
    """On one segment in IPv4 but routed in IPv6: direct IPv4 route, vxlan IPv6 entries."""
    lookups = {pub(2): RouteLookup(None, IFACE), pub6(2): RouteLookup(pub6(1), IFACE)}
    out = vx_render({sub(2): dual_lease(2)}, direct_routing=True, lookups=lookups)
    assert out.entries[sub(2)][0] == Route(sub(2), gateway=pub(2), oif=IFACE)
    assert [e.kind for e in out.entries[sub(2)][1:]] == ["neigh", "fdb", "route"]


def test_hostgw_dual_stack_routes_and_unreachable_v6() -> None:
    lookups = {pub(2): RouteLookup(None, IFACE), pub6(2): RouteLookup(None, IFACE),
               pub(3): RouteLookup(None, IFACE), pub6(3): RouteLookup(pub6(1), IFACE)}
    peers = {sub(2): dual_lease(2, "host-gw"), sub(3): dual_lease(3, "host-gw")}
    out = render_hostgw_peers(peers, iface_index=IFACE, own_ip=pub(99), lookups=lookups,
                              ipv6=True, own_ip6=pub6(0x99))
    assert out.entries[sub(2)] == (Route(sub(2), gateway=pub(2), oif=IFACE),
                                   Route(sub6(2), gateway=pub6(2), oif=IFACE))
    assert out.entries[sub(3)] == (Route(sub(3), gateway=pub(3), oif=IFACE),)
    assert "PublicIPv6" in out.skipped[sub(3)] and "gateway" in out.skipped[sub(3)]
    assert sub(2) not in out.skipped


# --------------------------------------------------------------------------- reconciler


def test_route_owner_per_family() -> None:
    is_ours = route_owner(IPv4Network("10.5.0.0/16"), lambda: OWN, NET6, lambda: OWN6)
    assert is_ours(Route(sub6(2), pub6(2), IFACE))
    assert not is_ours(Route(OWN6, pub6(2), IFACE))  # our own subnet
    assert not is_ours(Route(NET6, pub6(2), IFACE))  # the whole network
    assert not is_ours(Route(IPv6Network("fd43::/64"), pub6(2), IFACE))  # outside
    assert not is_ours(Route(sub6(2), pub6(2), IFACE, proto=4))  # not our proto
    v4_only = route_owner(IPv4Network("10.5.0.0/16"), lambda: OWN)
    assert not v4_only(Route(sub6(2), pub6(2), IFACE)) and v4_only(Route(sub(2), pub(2), IFACE))


def test_a_failed_ipv6_neighbour_holds_back_only_the_ipv6_route() -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    dev = k.add_plain_link("flannel.1")
    dev6 = k.add_plain_link("flannel-v6.1")
    rec = Reconciler(k, route_owner(IPv4Network("10.5.0.0/16"), lambda: OWN, NET6,
                                    lambda: OWN6), dev, device6=dev6)
    rec.resync()
    entries = render_vxlan_peers({sub(2): dual_lease(2)}, vni=1, device_index=dev,
                                 device6_index=dev6).entries[sub(2)]
    rec.set_peer(sub(2), entries)
    k.fail(lambda op: isinstance(op.entry, Neigh) and op.entry.dst.version == 6)
    result = rec.apply()
    assert sub(2) in result.blocked and "neigh failed" in result.blocked[sub(2)]
    assert set(k.routes) == {(254, sub(2), 0)}  # the IPv4 route went in
    rec.apply()  # retried: now everything is there
    assert {key[1] for key in k.routes} == {sub(2), sub6(2)}
    assert rec.counts() == {"neigh": 2, "fdb": 2, "route": 2}


def test_ipv6_netlink_messages() -> None:
    """IPv6 requests carry AF_INET6 and 16-byte addresses (what ``ip -6`` sends)."""
    n = encode_op(Op("replace", Neigh(DEV6, sub6(2).network_address, mac6(2))), 1)
    assert n[16] == 10 and sub6(2).network_address.packed in n and len(n) == 16 + 12 + 20 + 12
    f = encode_op(Op("replace", Fdb(DEV6, mac6(2), pub6(2))), 1)
    assert f[16] == 7 and pub6(2).packed in f
    r = encode_op(Op("replace", Route(sub6(2), sub6(2).network_address, DEV6, onlink=True)), 1)
    assert r[16] == 10 and r[17] == 64 and (1024).to_bytes(4, "little") in r
    d = encode_op(Op("delete", Route(sub6(2), pub6(2), IFACE)), 1)
    assert d[16] == 10 and d[21] == RTPROT_NETAGENT  # rtm_protocol


# --------------------------------------------------------------------------- backends


def dual_config(backend: str) -> object:
    return parse_network_config(
        f'{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"{NET6}",'
        f'"Backend":{backend}}}')


def facts(k: FakeKernel, state: Path) -> HostFacts:
    eth = k.links["eth0"]
    return HostFacts("eth0", eth.index, 1500, pub(1), pub(1), state, pub6(1))


def own_lease(btype: str) -> Lease:
    return Lease(OWN, LeaseAttrs(public_ip=pub(1), public_ipv6=pub6(1), backend_type=btype),
                 OWN6)


def test_vxlan_backend_dual_stack_devices_and_idempotent_sync(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    b = VxlanBackend(dual_config('{"Type":"vxlan"}'), facts(k, tmp_path), kernel=k,  # type: ignore[arg-type]
                     csum_workaround=False)
    c = b.prepare()
    b.activate(own_lease("vxlan"))
    v4, v6 = k.links["flannel.1"], k.links["flannel-v6.1"]
    assert (v4.mtu, v6.mtu, c.mtu) == (1450, 1430, 1430)  # pods fit both devices
    assert v6.local == pub6(1) and v6.addrs == (IPv6Interface(f"{OWN6.network_address}/128"),)
    assert c.backend_v6_data == canonical_json({"VNI": 1, "VtepMAC": v6.mac})
    assert (tmp_path / "flannel-v6.1.mac").read_text().strip() == v6.mac != v4.mac
    peers = {sub(i): dual_lease(i) for i in (2, 3)}
    first = b.sync(peers)
    assert first.added == 12 and first.failed == 0 and first.skipped == {}
    k.clear_log()
    assert b.sync(peers).changes == 0 and k.log == []
    # a hand-deleted IPv6 route comes back on the next full sync
    del k.routes[(254, sub6(3), IPV6_DEFAULT_METRIC)]
    assert b.sync(peers).added == 1
    # the IPv6 device recreated under us: its entries are reprogrammed, the IPv4 ones kept
    k.delete_link(k.links["flannel-v6.1"].index)
    k.clear_log()
    rep = b.sync(peers)
    assert rep.failed == 0 and {e.dst.version for _, e in k.log if _ != "link"} == {6}
    # teardown (live switch away): both devices and every entry go
    b.teardown()
    assert "flannel.1" not in k.links and "flannel-v6.1" not in k.links and k.routes == {}


def test_hostgw_backend_dual_stack(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    eth = k.links["eth0"].index
    for i in (2, 3):
        k.lookups[pub(i)] = RouteLookup(None, eth)
        k.lookups[pub6(i)] = RouteLookup(None, eth)
    b = HostGwBackend(dual_config('{"Type":"host-gw"}'), facts(k, tmp_path), kernel=k)  # type: ignore[arg-type]
    b.prepare()
    b.activate(own_lease("host-gw"))
    peers = {sub(i): dual_lease(i, "host-gw") for i in (2, 3)}
    assert b.sync(peers).added == 4
    assert k.routes[(254, sub6(2), IPV6_DEFAULT_METRIC)].gateway == pub6(2)
    assert b.sync(peers).changes == 0
    del peers[sub(3)]
    assert b.sync(peers, frozenset({sub(3)})).removed == 2


def test_no_public_ipv6_is_a_clear_error(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    eth = k.links["eth0"]
    host = HostFacts("eth0", eth.index, 1500, pub(1), pub(1), tmp_path)
    for cls, btype in ((VxlanBackend, "vxlan"), (HostGwBackend, "host-gw")):
        with pytest.raises(RuntimeError, match="PublicIPv6"):
            cls(dual_config(f'{{"Type":"{btype}"}}'), host, kernel=k).prepare()  # type: ignore[arg-type]
