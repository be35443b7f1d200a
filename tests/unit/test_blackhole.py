"""``--ip-blackhole-route``: the plan, the controller on the fake kernel, and the encoding.

The plan must leave exactly one route per subnet, delete only blackholes of ours (proto 111,
our metric) and never a peer route or another tool's blackhole; the peer sweep must never
claim the blackhole (it is proto 111 inside the Network, like a peer route). flannel's first
versions never installed the route (their existence check was inverted, flannel #2328): the
controller tests check it is really written, and put back after someone deletes it.
"""

from __future__ import annotations

import logging
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from support.fakekernel import FakeKernel

from netagent.blackhole import (
    BLACKHOLE_METRIC,
    BlackholeRoutes,
    blackhole_route,
    is_our_blackhole,
    plan_blackholes,
)
from netagent.kernel import RTN_BLACKHOLE, RTN_UNICAST, Op, Route, encode_op, route_owner

OWN = IPv4Network("10.70.3.0/24")
OWN6 = IPv6Network("fd70:0:0:3::/64")
#: rtmsg after the 16-byte nlmsghdr: family, dst_len, src_len, tos, table, proto, scope, type
TYPE_AT = 16 + 7


def test_blackhole_route_encodes_type_blackhole_without_gateway_or_device() -> None:
    msg = encode_op(Op("replace", blackhole_route(OWN)), 1)
    assert struct.unpack_from("=B", msg, TYPE_AT)[0] == RTN_BLACKHOLE
    assert struct.unpack_from("=B", msg, 16 + 5)[0] == 111  # proto
    peer = Route(IPv4Network("10.70.2.0/24"), IPv4Address("10.70.2.0"), 7, onlink=True)
    assert struct.unpack_from("=B", encode_op(Op("replace", peer), 1), TYPE_AT)[0] == RTN_UNICAST
    # the kernel keys a blackhole like any route: a unicast read-back at its key is a difference
    bh = blackhole_route(OWN)
    assert bh.key == Route(OWN, None, None, metric=BLACKHOLE_METRIC).key
    assert bh != Route(OWN, None, None, metric=BLACKHOLE_METRIC)


def test_plan_adds_missing_replaces_changed_and_deletes_only_our_stale_ones() -> None:
    old = blackhole_route(IPv4Network("10.70.9.0/24"))  # from an earlier lease
    foreign = Route(IPv4Network("10.70.8.0/24"), None, None, proto=3, rtype=RTN_BLACKHOLE)
    other_metric = Route(OWN, None, None, metric=5, rtype=RTN_BLACKHOLE)  # proto 111, not ours
    peer = Route(IPv4Network("10.70.2.0/24"), IPv4Address("10.70.2.0"), 7, onlink=True)
    have = [old, foreign, other_metric, peer]
    ops = plan_blackholes(have, [OWN, OWN6])
    assert ops == [Op("delete", old), Op("replace", blackhole_route(OWN)),
                   Op("replace", blackhole_route(OWN6))]
    assert plan_blackholes([blackhole_route(OWN), foreign, peer], [OWN]) == []
    assert plan_blackholes([blackhole_route(OWN), foreign], []) == [
        Op("delete", blackhole_route(OWN))]
    assert not is_our_blackhole(foreign) and not is_our_blackhole(other_metric)


def test_peer_sweep_never_claims_the_blackhole_even_of_an_old_subnet() -> None:
    is_ours = route_owner(IPv4Network("10.70.0.0/16"), lambda: OWN,
                          IPv6Network("fd70::/48"), lambda: OWN6)
    assert not is_ours(blackhole_route(OWN))
    assert not is_ours(blackhole_route(IPv4Network("10.70.9.0/24")))
    assert not is_ours(blackhole_route(IPv6Network("fd70:0:0:9::/64")))
    assert is_ours(Route(IPv4Network("10.70.9.0/24"), IPv4Address("10.70.9.0"), 7))


def test_controller_installs_repairs_follows_the_lease_and_removes_when_off() -> None:
    k = FakeKernel()
    bh = BlackholeRoutes(True, lambda: k)
    bh.reconcile([OWN, None])
    assert list(k.routes.values()) == [blackhole_route(OWN)]
    writes = k.writes()
    bh.reconcile([OWN, None])
    assert k.writes() == writes, "in place: a re-check writes nothing"
    k.routes.clear()  # someone ran `ip route del blackhole ...`
    bh.reconcile([OWN, None])
    assert list(k.routes.values()) == [blackhole_route(OWN)] and bh.repairs == 1
    new = IPv4Network("10.70.4.0/24")  # renumbered
    bh.reconcile([new, OWN6])
    assert set(k.routes.values()) == {blackhole_route(new), blackhole_route(OWN6)}
    off = BlackholeRoutes(False, lambda: k)  # the agent restarted without the flag
    off.reconcile([new, OWN6])
    assert k.routes == {}
    # its kernel (which remembers the main table it dumped, every peer route) is let go,
    # whether the sweep deleted something or found nothing
    assert off._kernel is None
    clean = BlackholeRoutes(False, lambda: k)
    clean.reconcile([new, OWN6])
    assert clean._kernel is None
    k.routes[blackhole_route(new).key] = blackhole_route(new)
    off.reconcile([new, OWN6])
    assert len(k.routes) == 1, "with the flag off the sweep runs once, at start"


def test_controller_failure_is_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    k = FakeKernel()
    k.fail(lambda op: True, times=2)
    bh = BlackholeRoutes(True, lambda: k)
    bh.reconcile([OWN])
    bh.reconcile([OWN])
    assert k.routes == {}
    bh.reconcile([OWN])
    assert list(k.routes.values()) == [blackhole_route(OWN)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "blackhole route replace 10.70.3.0/24" in errors[0].getMessage()
