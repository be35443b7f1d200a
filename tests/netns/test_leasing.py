"""LeaseManager against a real etcd 3.4: IPv6-only acquisition and reuse by PublicIPv6, and the
key change of a live address-family switch (new key first, old key and etcd lease after)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest
from support.harness import Etcd

from netagent.config import parse_network_config
from netagent.lease import NO_PUBLIC_IP, LeaseAttrs, decode_lease
from netagent.leasing import LeaseManager
from netagent.registry import EtcdSettings, Registry, WatchEvent

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network/"
V4 = {"Network": "10.46.0.0/16"}
DUAL = {**V4, "EnableIPv6": True, "IPv6Network": "fd46::/48"}
V6 = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd46::/48"}


def manager(reg: Registry, doc: dict[str, object], attrs: LeaseAttrs) -> LeaseManager:
    return LeaseManager(reg, parse_network_config(json.dumps(doc)), attrs, ttl=60,
                        rng=random.Random(7))


def v4_attrs(i: int) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}"), backend_type="host-gw")


def v6_attrs(i: int, with_v4: bool = False) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}") if with_v4 else NO_PUBLIC_IP,
                      public_ipv6=IPv6Address(f"2001:db8::{i}"), backend_type="host-gw")


@pytest.fixture
def reg(etcd: Etcd) -> Iterator[Registry]:
    r = Registry(EtcdSettings(endpoints=(etcd.endpoint,)))
    yield r
    r.close()


def test_ipv6_only_hosts_lease_and_find_their_lease_by_public_ipv6(reg: Registry,
                                                                  etcd: Etcd) -> None:
    a = manager(reg, V6, v6_attrs(1)).acquire()
    b = manager(reg, V6, v6_attrs(2)).acquire()
    assert a.subnet is None and b.subnet is None and a.ipv6_subnet != b.ipv6_subnet
    keys = {k[len(PREFIX) + len("subnets/"):] for k in etcd.get_prefix(PREFIX + "subnets/")}
    assert keys == {a.key, b.key} and all(k.startswith("0.0.0.0-0&fd46:") for k in keys)
    # a restart without a subnet file finds host 2's lease by its PublicIPv6 (both leases have
    # PublicIP 0.0.0.0): same key, same etcd lease, nothing written
    _, rev = reg.list_prefix(PREFIX)
    again = manager(reg, V6, v6_attrs(2)).acquire()
    assert (again.key, again.lease_id) == (b.key, b.lease_id)
    _, rev2 = reg.list_prefix(PREFIX)
    assert rev2 == rev


@pytest.mark.parametrize(("old", "new", "kept"), [
    (V4, DUAL, "v4"), (DUAL, V4, "v4"), (DUAL, V6, "v6")], ids=["enable6", "disable6", "only6"])
def test_family_switch_writes_the_new_key_before_deleting_the_old(
        reg: Registry, old: dict[str, object], new: dict[str, object], kept: str) -> None:
    mgr = manager(reg, old, v6_attrs(3, with_v4=True) if old is not V4 else v4_attrs(3))
    first = mgr.acquire()
    other = manager(reg, old, v6_attrs(4, with_v4=True) if old is not V4 else v4_attrs(4))
    other.acquire()
    _, rev = reg.list_prefix(PREFIX)
    stop = threading.Event()
    events: list[WatchEvent] = []

    def watch() -> None:
        for ev in reg.watch_prefix(PREFIX + "subnets/", rev + 1, stop):
            if isinstance(ev, WatchEvent):
                events.append(ev)
            if len(events) >= 2:
                stop.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    mgr.config = parse_network_config(json.dumps(new))
    mgr.attrs = v6_attrs(3, with_v4="Network" in new) if "IPv6Network" in new else v4_attrs(3)
    mgr.previous_subnet = first.subnet if "Network" in new else None
    mgr.previous_subnet6 = first.ipv6_subnet if "IPv6Network" in new else None
    second = mgr.acquire(replacing=first)
    t.join(10)
    stop.set()
    assert [(e.kind, e.key) for e in events] == [
        ("put", PREFIX + "subnets/" + second.key), ("delete", PREFIX + "subnets/" + first.key)]
    if kept == "v4":
        assert second.subnet == first.subnet
    else:
        assert second.ipv6_subnet == first.ipv6_subnet and second.subnet is None
    assert reg.keepalive(first.lease_id) == 0, "the old key's etcd lease is revoked"
    names = [kv.key[len(PREFIX + "subnets/"):] for kv in reg.list_prefix(PREFIX + "subnets/")[0]]
    assert len(names) == 2 and second.key in names
    assert decode_lease(second.key, reg.get(PREFIX + "subnets/" + second.key).value).attrs \
        == mgr.attrs  # type: ignore[union-attr]
