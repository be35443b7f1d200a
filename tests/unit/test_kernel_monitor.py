"""Kernel change notifications without root: parsing constructed rtnetlink bytes, the
filtering that keeps echoes and foreign entries out, and the per-entry repair back-off.

The messages are built with the agent's own encoder (`encode_op`, the bytes `ip route del` and
`bridge fdb del` send) plus the attributes the kernel adds to a notification, because a
notification has the request's layout with more attributes; the privileged and e2e tests
(tests/e2e/test_kernel_events.py) see the real kernel's messages.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from netagent.kernel import Fdb, Neigh, Op, Route, encode_op
from netagent.kernel.monitor import KernelChange, RepairBackoff, parse_changes

_HDR = struct.Struct("=IHHII")
_RTM_NEWLINK, _RTM_DELLINK, _RTM_NEWROUTE = 16, 17, 24


def delete(entry: Neigh | Fdb | Route) -> bytes:
    return encode_op(Op("delete", entry), 1)


def link_msg(mtype: int, index: int, name: str) -> bytes:
    ifname = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(ifname), 3) + ifname + b"\0" * (-len(ifname) % 4)
    body = struct.pack("=BxHiII", 0, 1, index, 0, 0) + attr
    return _HDR.pack(_HDR.size + len(body), mtype, 0, 0, 0) + body


def test_deleted_route_of_ours_is_keyed_like_the_entry() -> None:
    r = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), 7, onlink=True)
    [change] = parse_changes(delete(r))
    assert change == KernelChange("route", r.key)


def test_deleted_ipv6_route_keeps_the_kernel_metric() -> None:
    r = Route(IPv6Network("fd00:5:2::/64"), IPv6Address("fd00:5:2::"), 8)
    [change] = parse_changes(delete(r))
    assert change.key == (254, IPv6Network("fd00:5:2::/64"), 1024) == r.key


def test_routes_of_other_protocols_and_additions_are_not_reported() -> None:
    bird = Route(IPv4Network("10.5.3.0/24"), IPv4Address("192.168.1.3"), 2, proto=12)
    ours = Route(IPv4Network("10.5.4.0/24"), IPv4Address("192.168.1.4"), 2)
    added = encode_op(Op("replace", ours), 2)
    assert struct.unpack_from("=H", added, 4)[0] == _RTM_NEWROUTE
    assert parse_changes(delete(bird)) == []
    assert parse_changes(added) == [], "the echo of our own write is not a deletion"


def test_neighbour_and_fdb_deletions_carry_device_and_address() -> None:
    n = Neigh(7, IPv4Address("10.5.2.0"), "02:aa:bb:cc:dd:02")
    f = Fdb(7, "02:aa:bb:cc:dd:02", IPv4Address("192.168.1.2"))
    f6 = Fdb(9, "02:aa:bb:cc:dd:03", IPv6Address("fd99::3"))
    changes = parse_changes(delete(n) + delete(f) + delete(f6))
    assert changes == [KernelChange("neigh", n.key), KernelChange("fdb", f.key),
                       KernelChange("fdb", f6.key)]


def test_bridge_fdb_entry_without_a_remote_is_not_a_peer_entry() -> None:
    body = struct.pack("=BxxxiHBB", 7, 3, 0x80, 2, 0) + struct.pack("=HH6sxx", 10, 2, b"\x02" * 6)
    msg = _HDR.pack(_HDR.size + len(body), 29, 0, 0, 0) + body
    assert parse_changes(msg) == []


def test_link_deletion_names_the_device_and_link_updates_are_ignored() -> None:
    data = link_msg(_RTM_NEWLINK, 7, "flannel.1") + link_msg(_RTM_DELLINK, 7, "flannel.1")
    assert parse_changes(data) == [KernelChange("link", (7,), "flannel.1")]


def test_truncated_or_garbage_bytes_keep_what_parsed_and_never_raise() -> None:
    r = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), 7, onlink=True)
    good = delete(r)
    assert parse_changes(good + good[:20]) == [KernelChange("route", r.key)]
    assert parse_changes(b"") == []
    bad_len = _HDR.pack(3, 25, 0, 0, 0) + good
    assert parse_changes(bad_len) == []
    # a route message with host bits set in the destination is dropped, not raised
    broken = bytearray(good)
    i = broken.index(IPv4Network("10.5.2.0/24").network_address.packed)
    broken[i + 3] = 1
    assert parse_changes(bytes(broken)) == []
    for n in range(len(good)):
        parse_changes(good[:n])  # no exception at any cut


def test_backoff_is_immediate_first_then_doubles_up_to_the_cap() -> None:
    b = RepairBackoff(start=0.1, cap=2.0)
    t = 100.0
    assert b.due("k", t) == t
    b.repaired("k", t)
    waits = []
    for _ in range(8):
        due = b.due("k", t)
        waits.append(round(due - t, 3))
        t = due
        b.repaired("k", t)
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert b.due("other", t) == t, "keys back off independently"


def test_backoff_forgets_a_key_left_alone_for_twice_the_cap() -> None:
    b = RepairBackoff(start=0.1, cap=2.0)
    for t in (0.0, 0.1, 0.3, 0.7):
        b.repaired("k", t)
    assert b.due("k", 0.8) == pytest.approx(0.7 + 0.8)
    assert b.due("k", 4.8) == 4.8
    b.repaired("k", 4.8)
    assert b.due("k", 4.85) == pytest.approx(4.9), "a new streak starts at `start`"


def test_backoff_state_stays_bounded() -> None:
    b = RepairBackoff(start=0.1, cap=1.0)
    for i in range(25_000):
        b.repaired(i, i * 0.001)
    assert len(b._state) <= 10_001, "streaks older than twice the cap are dropped"
