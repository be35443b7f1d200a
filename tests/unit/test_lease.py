"""Lease key/value codec (byte-compatible with flannel) and the allocation plan."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from netagent.config import parse_network_config
from netagent.lease import (
    Lease,
    LeaseAttrs,
    LeaseError,
    OutOfSubnets,
    canonical_json,
    choose_subnet,
    decode_attrs,
    decode_lease,
    encode_attrs,
    parse_subnet_key,
    plan_lease,
    subnet_key,
)
from netagent.lease import _ipv4 as _ipv4  # the C fast path, tested against ipaddress

CFG = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')


def test_vxlan_value_matches_flannel_literally() -> None:
    attrs = LeaseAttrs(
        IPv4Address("192.168.64.3"),
        backend_type="vxlan",
        backend_data=canonical_json({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}),
    )
    assert encode_attrs(attrs) == (
        '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )


def test_hostgw_and_udp_values_match_flannel_literally() -> None:
    assert encode_attrs(LeaseAttrs(IPv4Address("10.0.0.7"), backend_type="host-gw")) == (
        '{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"host-gw"}'
    )
    assert encode_attrs(LeaseAttrs(IPv4Address("10.0.0.7"))) == (
        '{"PublicIP":"10.0.0.7","PublicIPv6":null}'
    )


def test_flannel_values_round_trip_byte_for_byte() -> None:
    for raw in (
        '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        '{"PublicIP":"10.0.0.7","PublicIPv6":null}',
        '{"PublicIP":"10.0.0.7","PublicIPv6":"fc00::7","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}',
    ):
        assert encode_attrs(decode_attrs(raw)) == raw


def test_reader_is_tolerant() -> None:
    a = decode_attrs('{"publicip":"10.0.0.9","Extra":[1],"BackendData":{}}')
    assert a.public_ip == IPv4Address("10.0.0.9") and a.public_ipv6 is None
    assert a.backend_data == "" and a.backend_type == ""


@pytest.mark.parametrize(
    "raw, words",
    [
        ("nope", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"PublicIPv6":null}', "no PublicIP"),
        ('{"PublicIP":"10.0.0.300"}', "not an IPv4"),
        ('{"PublicIP":"10.0.0.1","PublicIPv6":"zz"}', "not an IPv6"),
        ('{"PublicIP":"10.0.0.1","BackendData":"x"}', "BackendData"),
        ('{"PublicIP":"10.0.0.1","BackendType":5}', "BackendType"),
    ],
)
def test_bad_values_are_errors(raw: str, words: str) -> None:
    with pytest.raises(LeaseError, match=words):
        decode_attrs(raw)


def test_key_grammar() -> None:
    assert subnet_key(IPv4Network("10.5.52.0/24")) == "10.5.52.0-24"
    assert subnet_key(IPv4Network("10.5.1.0/24"), IPv6Network("fc00::/64")) == \
        "10.5.1.0-24&fc00::-64"
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == (
        IPv4Network("10.12.13.0/24"), IPv6Network("fd00:12:13::/56"))
    for bad in ("10.5.52.0/24", "10.5.52.1-24", "x-24", "10.5.52.0-24&", "10.5.52.0-40",
                "../10.5.52.0-24"):
        with pytest.raises(LeaseError):
            parse_subnet_key(bad)


@pytest.mark.parametrize("text", ["10.0.0.9", "0.0.0.0", "255.255.255.255", "010.0.0.9",
                                  "10.0.0.09", "10.0.0", "10.0.0.256", " 10.0.0.9", "10.0.0.9\n",
                                  "10.0.0.9\x00", "1e1.0.0.1", "١٠.0.0.1", ""])
def test_fast_ipv4_parser_agrees_with_ipaddress(text: str) -> None:
    """The start-up's C parser of PublicIP and key addresses accepts exactly what ipaddress
    accepts, with the same value, and refuses the rest with ipaddress's own error."""
    try:
        want: IPv4Address | str = IPv4Address(text)
    except ValueError as exc:
        want = str(exc)
    try:
        got: IPv4Address | str = _ipv4(text)
    except ValueError as exc:
        got = str(exc)
    assert got == want


def test_key_and_value_decode_to_the_same_objects() -> None:
    lease = decode_lease("10.12.13.0-24", '{"PublicIP":"172.20.0.10"}', 7, 9)
    assert lease.subnet == IPv4Network("10.12.13.0/24")
    assert str(lease.subnet) == "10.12.13.0/24" and lease.subnet.prefixlen == 24
    assert lease.attrs.public_ip == IPv4Address("172.20.0.10")
    assert hash(lease.subnet) == hash(IPv4Network("10.12.13.0/24"))
    with pytest.raises(LeaseError, match="host bits"):
        parse_subnet_key("10.12.13.1-24")
    with pytest.raises(LeaseError, match="Leading zeros"):
        parse_subnet_key("010.12.13.0-24")


def _lease(subnet: str, ip: str, lease_id: int = 5) -> Lease:
    return decode_lease(subnet.replace("/", "-"), f'{{"PublicIP":"{ip}"}}', lease_id)


def test_plan_reuses_by_public_ip_first() -> None:
    existing = {x.key: x for x in (_lease("10.5.7.0/24", "1.1.1.1"),
                                  _lease("10.5.9.0/24", "2.2.2.2"))}
    plan = plan_lease(CFG, existing, IPv4Address("1.1.1.1"), IPv4Network("10.5.20.0/24"))
    assert plan.subnet == IPv4Network("10.5.7.0/24") and plan.reuse is not None


def test_plan_then_previous_subnet_then_random() -> None:
    existing = {x.key: x for x in (_lease("10.5.9.0/24", "2.2.2.2"),)}
    me = IPv4Address("1.1.1.1")
    assert plan_lease(CFG, existing, me, IPv4Network("10.5.20.0/24")).subnet == \
        IPv4Network("10.5.20.0/24")
    # previous subnet held by someone else: allocate instead
    plan = plan_lease(CFG, existing, me, IPv4Network("10.5.9.0/24"), rng=random.Random(1))
    assert plan.subnet != IPv4Network("10.5.9.0/24") and plan.reuse is None
    # previous subnet outside the config's range: ignored
    plan = plan_lease(CFG, existing, me, IPv4Network("10.5.0.0/24"), rng=random.Random(1))
    assert plan.subnet != IPv4Network("10.5.0.0/24")


def test_plan_deletes_own_incompatible_lease_but_not_reservations() -> None:
    cfg = parse_network_config('{"Network":"10.5.0.0/16","SubnetLen":25}')
    old = _lease("10.5.7.0/24", "1.1.1.1")
    plan = plan_lease(cfg, {old.key: old}, IPv4Address("1.1.1.1"), None, rng=random.Random(0))
    assert plan.delete == (old,)
    assert plan.subnet.prefixlen == 25
    reserved = _lease("10.5.8.0/24", "1.1.1.1", lease_id=0)
    plan = plan_lease(cfg, {reserved.key: reserved}, IPv4Address("1.1.1.1"), None,
                      rng=random.Random(0))
    assert plan.delete == () and not plan.subnet.overlaps(reserved.subnet)


def test_random_choice_among_first_hundred_free() -> None:
    taken = [IPv4Network(f"10.5.{i}.0/24") for i in range(1, 50)]
    seen = {choose_subnet(CFG, taken, rng=random.Random(seed)) for seed in range(300)}
    assert all(50 <= int(s.network_address.packed[2]) < 150 for s in seen)
    assert len(seen) > 50


def test_out_of_subnets() -> None:
    cfg = parse_network_config('{"Network":"10.5.0.0/24"}')  # three leasable /26
    taken = cfg.candidate_subnets()
    with pytest.raises(OutOfSubnets, match="out of subnets"):
        choose_subnet(cfg, taken)
    # a reservation counts as taken too
    reserved = {s.key: s for s in (_lease(str(n), "9.9.9.9", lease_id=0) for n in taken)}
    with pytest.raises(OutOfSubnets):
        plan_lease(cfg, reserved, IPv4Address("1.1.1.1"), None)


CFG6 = parse_network_config('{"Network":"10.5.0.0/16","EnableIPv6":true,'
                            '"IPv6Network":"fc00:5::/48","Backend":{"Type":"vxlan"}}')


def test_dual_stack_plan_allocates_both_families() -> None:
    plan = plan_lease(CFG6, {}, IPv4Address("1.1.1.1"), None, rng=random.Random(2))
    assert plan.ipv6_subnet is not None and plan.ipv6_subnet.prefixlen == 64
    assert CFG6.contains_ipv6_subnet(plan.ipv6_subnet)
    assert subnet_key(plan.subnet, plan.ipv6_subnet).count("&") == 1


def test_dual_stack_reuse_and_previous_subnets() -> None:
    own = decode_lease("10.5.7.0-24&fc00:5:0:7::-64", '{"PublicIP":"1.1.1.1"}', 9)
    plan = plan_lease(CFG6, {own.key: own}, IPv4Address("1.1.1.1"), None)
    assert plan.reuse == own and plan.ipv6_subnet == IPv6Network("fc00:5:0:7::/64")
    # a v4-only lease of ours is not compatible with a dual-stack config: replaced
    old = decode_lease("10.5.8.0-24", '{"PublicIP":"1.1.1.1"}', 9)
    plan = plan_lease(CFG6, {old.key: old}, IPv4Address("1.1.1.1"), None, rng=random.Random(1))
    assert plan.delete == (old,) and plan.ipv6_subnet is not None
    # previous subnets from subnet.env, both free: both reused
    plan = plan_lease(CFG6, {}, IPv4Address("1.1.1.1"), IPv4Network("10.5.9.0/24"),
                      previous_subnet6=IPv6Network("fc00:5:0:9::/64"))
    assert (plan.subnet, plan.ipv6_subnet) == (IPv4Network("10.5.9.0/24"),
                                               IPv6Network("fc00:5:0:9::/64"))
    # previous v6 taken by someone else: allocate afresh
    other = decode_lease("10.5.3.0-24&fc00:5:0:9::-64", '{"PublicIP":"2.2.2.2"}', 9)
    plan = plan_lease(CFG6, {other.key: other}, IPv4Address("1.1.1.1"),
                      IPv4Network("10.5.9.0/24"), previous_subnet6=IPv6Network("fc00:5:0:9::/64"),
                      rng=random.Random(3))
    assert plan.ipv6_subnet != IPv6Network("fc00:5:0:9::/64")
