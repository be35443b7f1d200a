"""What each peer costs in memory (issue 18: RSS at 20,000 peers): the shapes that keep it
small. Each test fails if the per-peer objects grow back (a ``__dict__`` per lease, a cached
address per subnet, a string per lease where one shared one does)."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest

from netagent.kernel import Route, route_owner
from netagent.lease import (
    decode_attrs,
    decode_lease,
    subnet_within,
    subnets_overlap,
)
from netagent.peers import PeerTable, RawLease

NETS = [ip_network(n) for n in (
    "10.0.0.0/8", "10.5.0.0/16", "10.5.1.0/24", "10.5.1.128/25", "10.5.2.0/24", "10.6.0.0/16",
    "0.0.0.0/1", "255.255.255.255/32", "10.5.1.0/32", "fd00::/48", "fd00:0:0:1::/64",
    "fd00:0:0:1::/128", "fd00:1::/64", "::/1")]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(NETS, NETS)))
def test_int_subnet_checks_agree_with_ipaddress(a: IPv4Network | IPv6Network,
                                                b: IPv4Network | IPv6Network) -> None:
    same = a.version == b.version
    assert subnet_within(a, b) == (same and a.subnet_of(b))  # type: ignore[arg-type]
    assert subnets_overlap(a, b) == (same and a.overlaps(b))  # type: ignore[arg-type]


def raw(n: int) -> RawLease:
    value = (f'{{"PublicIP":"192.168.0.{n}","BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:{n:02x}"}}}}')
    return RawLease(f"10.5.{n}.0-24", value.encode(), 7, n)


def test_leases_have_no_instance_dict() -> None:
    lease = decode_lease("10.5.2.0-24", raw(2).value)
    assert not hasattr(lease, "__dict__") and not hasattr(lease.attrs, "__dict__")


def test_backend_type_is_one_string_for_all_leases() -> None:
    a, b = decode_attrs(raw(2).value), decode_attrs(raw(3).value)
    assert a.backend_type == "vxlan" and a.backend_type is b.backend_type


def test_peer_table_caches_nothing_on_lease_subnets() -> None:
    """``IPv4Network.subnet_of`` caches broadcast_address (a dict entry and an address object)
    on the lease's subnet; the table's inside-the-network check must not."""
    table = PeerTable(IPv4Network("10.5.1.0/24"), IPv4Network("10.5.0.0/16"))
    table.reset([raw(n) for n in range(2, 6)])
    table.put(raw(7))
    assert len(table.peers) == 5
    for subnet in table.peers:
        assert "broadcast_address" not in vars(subnet), subnet


def test_route_owner_caches_nothing_on_route_destinations() -> None:
    own = IPv4Network("10.5.1.0/24")
    is_ours = route_owner(IPv4Network("10.5.0.0/16"), lambda: own)
    dst = IPv4Network("10.5.2.0/24")
    assert is_ours(Route(dst, None, 3, proto=111))
    assert not is_ours(Route(IPv4Network("10.5.1.0/25"), None, 3, proto=111))  # inside own
    assert vars(dst) == vars(IPv4Network("10.5.2.0/24"))  # nothing added by the check
