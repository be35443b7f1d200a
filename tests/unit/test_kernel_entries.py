"""Route scope: encoded as asked for IPv4 (both message shapes), normalised away for IPv6.

A device route on a point-to-point device (WireGuard) is scope link, like ``ip route add X
dev D``; every route through a gateway stays scope universe, byte for byte what it was before
the field existed (the batch tests compare those bytes with pyroute2's). IPv6 routes have no
scope in the kernel, so one asked for with scope link must compare equal to its read-back.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from netagent.kernel import RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, Op, Route, encode_op

#: rtmsg follows the 16-byte nlmsghdr: family, dst_len, src_len, tos, table, proto, scope, ...
SCOPE_AT = 16 + 6


def scope_of(msg: bytes) -> int:
    return struct.unpack_from("=B", msg, SCOPE_AT)[0]


def test_ipv4_scope_is_encoded_in_both_message_shapes() -> None:
    net = IPv4Network("10.5.0.0/16")
    gw_route = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), 7, onlink=True)
    assert scope_of(encode_op(Op("replace", gw_route), 1)) == RT_SCOPE_UNIVERSE  # packed whole
    dev_route = Route(net, None, 7, scope=RT_SCOPE_LINK)
    assert scope_of(encode_op(Op("replace", dev_route), 1)) == RT_SCOPE_LINK  # attr by attr
    assert scope_of(encode_op(Op("delete", dev_route), 1)) == 255  # delete: scope NOWHERE
    assert dev_route != Route(net, None, 7)  # a universe read-back is a difference to repair
    assert dev_route.key == Route(net, None, 7).key


def test_ipv6_routes_are_stored_with_universe_scope() -> None:
    r = Route(IPv6Network("fd42::/48"), None, 7, scope=RT_SCOPE_LINK)
    assert r.scope == RT_SCOPE_UNIVERSE and r.metric == 1024
    assert r == Route(IPv6Network("fd42::/48"), None, 7, metric=1024)
