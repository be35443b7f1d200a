"""Privileged: the kernel's own notifications through `KernelMonitor`, in one namespace.

What the unit tests (tests/unit/test_kernel_monitor.py) cannot show: the kernel's messages
parse into keys equal to our entries' keys, and the in-kernel BPF filter passes exactly the
deletions we care about (links, neighbours, FDB entries with a remote, routes with proto 111)
while additions and other protocols' routes never reach the process.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from support.harness import RUN_ID, add_netns, del_netns, need_root, sh

from netagent.kernel import Fdb, Neigh, NetlinkKernel, Op, Route
from netagent.kernel.monitor import OVERFLOW, KernelChange, KernelMonitor

pytestmark = pytest.mark.privileged


@pytest.fixture
def ns() -> Iterator[str]:
    need_root()
    name = f"na{RUN_ID}-kmon"
    add_netns(name)
    try:
        sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", ns=name)
        sh("ip", "link", "add", "vx0", "type", "vxlan", "id", "9", "dstport", "8472", "dev", "v0",
           "nolearning", ns=name)
        for dev in ("v0", "v1", "vx0"):
            sh("ip", "link", "set", dev, "up", ns=name)
        sh("ip", "addr", "add", "192.168.7.1/24", "dev", "v0", ns=name)
        sh("ip", "-6", "addr", "add", "fd77::1/64", "dev", "v0", "nodad", ns=name)
        yield name
    finally:
        del_netns(name)


def settle(mon: KernelMonitor) -> list[KernelChange]:
    time.sleep(0.2)
    return mon.read()


def test_kernel_deletions_arrive_keyed_like_our_entries_and_nothing_else(ns: str) -> None:
    k = NetlinkKernel(ns)
    v0, vx = k.link("v0"), k.link("vx0")
    assert v0 is not None and vx is not None
    mon = KernelMonitor(ns)
    try:
        route = Route(IPv4Network("10.9.2.0/24"), IPv4Address("192.168.7.2"), v0.index)
        route6 = Route(IPv6Network("fd09:2::/64"), IPv6Address("fd77::2"), v0.index)
        neigh = Neigh(vx.index, IPv4Address("10.9.2.0"), "02:00:00:00:09:02")
        fdb = Fdb(vx.index, "02:00:00:00:09:02", IPv4Address("192.168.7.2"))
        ops = [Op("replace", e) for e in (neigh, fdb, route, route6)]
        assert k.write(ops) == [None] * 4
        sh("ip", "route", "add", "10.9.3.0/24", "via", "192.168.7.3", "proto", "12", ns=ns)
        assert settle(mon) == [], "additions are filtered out"
        sh("ip", "route", "del", "10.9.3.0/24", ns=ns)
        assert settle(mon) == [], "a route of another protocol (BIRD's 12) is not ours"
        sh("ip", "route", "del", "10.9.2.0/24", ns=ns)
        sh("ip", "-6", "route", "del", "fd09:2::/64", ns=ns)
        sh("ip", "neigh", "del", "10.9.2.0", "dev", "vx0", ns=ns)
        sh("bridge", "fdb", "del", "02:00:00:00:09:02", "dev", "vx0", "dst", "192.168.7.2", ns=ns)
        got = settle(mon)
        assert got == [KernelChange("route", route.key), KernelChange("route", route6.key),
                       KernelChange("neigh", neigh.key), KernelChange("fdb", fdb.key)], got
        sh("ip", "link", "del", "vx0", ns=ns)
        assert KernelChange("link", (vx.index,), "vx0") in settle(mon)
    finally:
        mon.close()
        k.close()


def datagrams(mon: KernelMonitor) -> int:
    """Raw datagrams waiting on the socket (what the process would have to read)."""
    n = 0
    while True:
        try:
            mon.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return n
        n += 1


def test_first_sync_echoes_never_reach_the_process(ns: str) -> None:
    """5,000 route additions (a first sync's worth) cost the monitor nothing and overflow
    nothing; their 5,000 deletions all arrive."""
    k = NetlinkKernel(ns)
    v0 = k.link("v0")
    assert v0 is not None
    mon = KernelMonitor(ns)
    try:
        routes = [Route(IPv4Network(f"10.{i // 256}.{i % 256}.0/24"),
                        IPv4Address("192.168.7.2"), v0.index) for i in range(5000)]
        assert not any(k.write([Op("replace", r) for r in routes]))
        time.sleep(0.2)
        assert datagrams(mon) == 0, "the in-kernel filter drops every addition's echo"
        assert not any(k.write([Op("delete", r) for r in routes]))
        got = settle(mon)
        assert OVERFLOW not in got
        assert {c.key for c in got} == {r.key for r in routes}
    finally:
        mon.close()
        k.close()
