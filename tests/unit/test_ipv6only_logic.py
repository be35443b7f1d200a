"""IPv6-only networks without root (issue 9, ``"EnableIPv4": false``): the lease key and value,
the lease plan (found by PublicIPv6), the peer table keyed by IPv6 subnet, the vxlan and host-gw
renders without an IPv4 side, and both backends against the in-memory kernel."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

import pytest
from support.fakekernel import FakeKernel, mac6, pub6, sub6

from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend, render_hostgw_peers
from netagent.backends.vxlan import VxlanBackend, render_vxlan_peers
from netagent.config import parse_network_config
from netagent.files import SubnetEnv, render_subnet_env
from netagent.kernel import IPV6_DEFAULT_METRIC, Fdb, Neigh, Route, RouteLookup
from netagent.lease import (
    NO_PUBLIC_IP,
    Lease,
    LeaseAttrs,
    LeaseError,
    canonical_json,
    decode_lease,
    encode_attrs,
    parse_subnet_key,
    plan_lease,
    subnet_key,
)
from netagent.peers import PeerTable, RawLease

DEV6, IFACE = 8, 3
NET6 = IPv6Network("fd42::/48")
CONFIG6 = parse_network_config(json.dumps({
    "EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(NET6),
    "Backend": {"Type": "vxlan"}}))


def lease6(i: int, btype: str = "vxlan", v6data: str | None = None) -> Lease:
    d6 = canonical_json({"VNI": 1, "VtepMAC": mac6(i)}) if btype == "vxlan" else ""
    return Lease(None, LeaseAttrs(public_ip=NO_PUBLIC_IP, public_ipv6=pub6(i),
                                  backend_type=btype,
                                  backend_v6_data=d6 if v6data is None else v6data), sub6(i))


def raw(lz: Lease, lease_id: int = 7) -> RawLease:
    return RawLease(lz.key, encode_attrs(lz.attrs).encode(), lease_id)


# --------------------------------------------------------------------------- lease codec


def test_ipv6_only_key_and_value_round_trip() -> None:
    lz = lease6(2)
    assert lz.key == "0.0.0.0-0&fd42:0:0:2::-64"
    assert lz.ident == sub6(2) and lz.label == "fd42:0:0:2::/64"
    assert encode_attrs(lz.attrs) == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::2","BackendType":"vxlan",'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:02"}}')
    back = decode_lease(lz.key, encode_attrs(lz.attrs), 7)
    assert back == Lease(None, lz.attrs, sub6(2), 7)
    assert back.attrs.host_ip == pub6(2)
    # a dual-stack lease is still known by its IPv4 subnet, and its host by PublicIP
    dual = decode_lease("10.5.2.0-24&fd42:0:0:2::-64",
                        '{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2"}')
    assert dual.ident == IPv4Network("10.5.2.0/24") and str(dual.attrs.host_ip) == "10.0.0.2"
    assert dual.label == "10.5.2.0/24 + fd42:0:0:2::/64"


@pytest.mark.parametrize(("name", "value", "why"), [
    ("0.0.0.0-0", '{"PublicIP":"10.0.0.1"}', "neither an IPv4 nor an IPv6"),
    ("0.0.0.0-0&fd42:0:0:2::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":null}', "no PublicIPv6"),
    ("10.5.2.0-24", '{"PublicIP":"0.0.0.0"}', "PublicIP 0.0.0.0"),
    ("0.0.0.0-8&fd42::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::2"}', "/8"),
])
def test_malformed_ipv6_only_leases_are_rejected(name: str, value: str, why: str) -> None:
    with pytest.raises(LeaseError, match=why.replace("/", ".")):
        decode_lease(name, value)


def test_subnet_key_needs_a_subnet() -> None:
    with pytest.raises(ValueError):
        subnet_key(None, None)
    assert parse_subnet_key("0.0.0.0-0&fd42::-64") == (None, IPv6Network("fd42::/64"))


def test_subnet_env_has_only_ipv6_lines() -> None:
    text = render_subnet_env(SubnetEnv(None, None, 1430, False, NET6, sub6(2)))
    assert text == ("FLANNEL_IPV6_NETWORK=fd42::/48\nFLANNEL_IPV6_SUBNET=fd42:0:0:2::1/64\n"
                    "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n")


# --------------------------------------------------------------------------- lease plan


def test_plan_reuses_our_lease_by_public_ipv6_not_by_0000() -> None:
    existing = {lz.key: lz for lz in (lease6(2), lease6(3), lease6(4))}
    plan = plan_lease(CONFIG6, existing, pub6(3), None)
    assert plan.reuse == lease6(3) and plan.subnet is None and plan.ipv6_subnet == sub6(3)


def test_plan_allocates_ipv6_only_and_honours_the_subnet_file() -> None:
    existing = {lz.key: lz for lz in (lease6(2), lease6(3))}
    plan = plan_lease(CONFIG6, existing, pub6(9), None, rng=random.Random(1))
    assert plan.subnet is None and plan.ipv6_subnet is not None
    assert plan.ipv6_subnet.subnet_of(NET6) and plan.ipv6_subnet not in (sub6(2), sub6(3))
    again = plan_lease(CONFIG6, existing, pub6(9), None, previous_subnet6=sub6(7))
    assert (again.subnet, again.ipv6_subnet, again.reuse) == (None, sub6(7), None)
    taken = plan_lease(CONFIG6, existing, pub6(9), None, previous_subnet6=sub6(2),
                       rng=random.Random(1))
    assert taken.ipv6_subnet != sub6(2)


def test_plan_after_a_switch_to_ipv6_only_drops_our_dual_stack_lease() -> None:
    """Our old dual-stack lease has PublicIP set, so the IPv6-only host (known by PublicIPv6)
    does not match it: a new IPv6-only lease is allocated and the old key expires or is
    released by the daemon's renumbering."""
    dual = decode_lease("10.5.2.0-24&fd42:0:0:2::-64",
                        '{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2"}', 5)
    plan = plan_lease(CONFIG6, {dual.key: dual}, pub6(2), IPv4Network("10.5.2.0/24"),
                      previous_subnet6=sub6(2))
    assert plan.reuse is None and plan.subnet is None
    assert plan.ipv6_subnet != sub6(2)  # still held by the old key until it is released


# --------------------------------------------------------------------------- peer table


def test_peer_table_keys_ipv6_only_peers_by_ipv6_subnet() -> None:
    t = PeerTable(sub6(1), NET6)
    dual = RawLease("10.5.2.0-24&fd42:0:0:9::-64",
                    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::9"}', 3)
    elsewhere = RawLease("10.5.3.0-24&fd43:0:0:9::-64",
                         b'{"PublicIP":"10.0.0.3","PublicIPv6":"fd00::3"}', 3)
    changes = t.reset([raw(lease6(1)), raw(lease6(2)), raw(lease6(3)), dual, elsewhere])
    # a dual-stack lease whose IPv6 subnet is in the network is a peer (a host that has not
    # followed the switch to IPv6-only yet), still known by its IPv4 subnet
    v4 = IPv4Network("10.5.2.0/24")
    assert set(t.peers) == {sub6(2), sub6(3), v4} and changes.added == {sub6(2), sub6(3), v4}
    assert set(t.outside) == {IPv4Network("10.5.3.0/24")}  # its IPv6 side is elsewhere
    assert t.delete(lease6(2).key).removed == {sub6(2)}
    assert t.put(raw(lease6(4))).added == {sub6(4)}
    # a network switch to IPv4 only: the IPv6-only leases leave, the dual-stack one stays
    back = t.set_network(IPv4Network("10.5.0.0/16"))
    assert back.added == {IPv4Network("10.5.3.0/24")} and back.removed == {sub6(3), sub6(4)}
    assert set(t.peers) == {v4, IPv4Network("10.5.3.0/24")}


# --------------------------------------------------------------------------- renders


def test_vxlan_render_without_an_ipv4_device() -> None:
    peers = {sub6(2): lease6(2), sub6(3): lease6(3, v6data=""), sub6(4): lease6(4, "host-gw")}
    out = render_vxlan_peers(peers, vni=1, device_index=None, own_ip=NO_PUBLIC_IP,  # type: ignore[arg-type]
                             device6_index=DEV6, own_ip6=pub6(0x99))
    gw6 = sub6(2).network_address
    assert out.entries == {sub6(2): (Neigh(DEV6, gw6, mac6(2)), Fdb(DEV6, mac6(2), pub6(2)),
                                     Route(sub6(2), gateway=gw6, oif=DEV6, onlink=True))}
    assert out.skipped[sub6(3)] == "the lease has no BackendV6Data"
    assert "not vxlan" in out.skipped[sub6(4)]


def test_hostgw_render_without_ipv4() -> None:
    lookups = {pub6(2): RouteLookup(None, IFACE), pub6(3): RouteLookup(pub6(1), IFACE)}
    peers = {sub6(2): lease6(2, "host-gw"), sub6(3): lease6(3, "host-gw")}
    out = render_hostgw_peers(peers, iface_index=IFACE, own_ip=NO_PUBLIC_IP, lookups=lookups,  # type: ignore[arg-type]
                              ipv6=True, own_ip6=pub6(0x99), ipv4=False)
    assert out.entries == {sub6(2): (Route(sub6(2), gateway=pub6(2), oif=IFACE),)}
    assert "gateway" in out.skipped[sub6(3)] and "IPv6 side" not in out.skipped[sub6(3)]


# --------------------------------------------------------------------------- backends


def facts6(k: FakeKernel, tmp: Path) -> HostFacts:
    eth = k.links["eth0"]
    return HostFacts("eth0", eth.index, 1500, NO_PUBLIC_IP, NO_PUBLIC_IP, tmp, pub6(1),
                     iface_addr6=pub6(1))


def config6(backend: str) -> object:
    return parse_network_config(json.dumps({
        "EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(NET6),
        "Backend": json.loads(backend)}))


def test_vxlan_backend_ipv6_only(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    b = VxlanBackend(config6('{"Type":"vxlan"}'), facts6(k, tmp_path), kernel=k,  # type: ignore[arg-type]
                     csum_workaround=False)
    c = b.prepare()
    assert "flannel.1" not in k.links and c.backend_data == "" and c.mtu == 1430
    v6 = k.links["flannel-v6.1"]
    assert c.backend_v6_data == canonical_json({"VNI": 1, "VtepMAC": v6.mac})
    b.activate(lease6(1))
    assert k.links["flannel-v6.1"].addrs == (IPv6Interface(f"{sub6(1).network_address}/128"),)
    peers = {sub6(i): lease6(i) for i in (2, 3)}
    assert b.sync(peers).added == 6
    k.clear_log()
    assert b.sync(peers).changes == 0 and k.log == []
    del k.routes[(254, sub6(3), IPV6_DEFAULT_METRIC)]
    assert b.sync(peers).added == 1
    assert b.sync({sub6(2): peers[sub6(2)]}, frozenset({sub6(3)})).removed == 3
    # restart: a new instance reuses the device and its MAC, and changes nothing
    b2 = VxlanBackend(config6('{"Type":"vxlan"}'), facts6(k, tmp_path), kernel=k,  # type: ignore[arg-type]
                      csum_workaround=False)
    k.clear_log()
    assert b2.prepare() == c
    b2.activate(lease6(1))
    assert b2.sync({sub6(2): peers[sub6(2)]}).changes == 0 and k.log == []
    b2.teardown()
    assert "flannel-v6.1" not in k.links and k.routes == {}


def test_hostgw_backend_ipv6_only(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    eth = k.links["eth0"].index
    for i in (2, 3):
        k.lookups[pub6(i)] = RouteLookup(None, eth)
    b = HostGwBackend(config6('{"Type":"host-gw"}'), facts6(k, tmp_path), kernel=k)  # type: ignore[arg-type]
    assert b.prepare().mtu == 1500
    b.activate(lease6(1, "host-gw"))
    peers = {sub6(i): lease6(i, "host-gw") for i in (2, 3)}
    assert b.sync(peers).added == 2
    assert k.routes[(254, sub6(2), IPV6_DEFAULT_METRIC)].gateway == pub6(2)
    assert all(dst.version == 6 for _, dst, _ in k.routes)


def test_hostgw_ipv6_only_behind_nat_is_refused(tmp_path: Path) -> None:
    k = FakeKernel()
    k.add_plain_link("eth0")
    eth = k.links["eth0"]
    nat = HostFacts("eth0", eth.index, 1500, NO_PUBLIC_IP, NO_PUBLIC_IP, tmp_path, pub6(1),
                    iface_addr6=pub6(5))
    with pytest.raises(RuntimeError, match="NAT"):
        HostGwBackend(config6('{"Type":"host-gw"}'), nat, kernel=k).prepare()  # type: ignore[arg-type]

