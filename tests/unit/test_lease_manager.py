"""LeaseManager on the in-memory store (tests/support/fakestore.py): acquisition, reuse by
PublicIP, own-key loss, recovery after an etcd outage, TTL expiry and an exhausted network —
the paths the real-etcd tests (tests/netns/test_leasing.py, tests/netns/test_registry.py) cover
only in part, here in milliseconds and with failures injected where etcd cannot be made to
fail on cue. The fake itself is checked first, against the etcd behaviour the agent relies on.
"""

from __future__ import annotations

import json
import random
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from support.fakestore import FakeClock, FakeStore

from netagent.config import parse_network_config
from netagent.lease import LeaseAttrs, OutOfSubnets, decode_lease
from netagent.leasing import LeaseLost, LeaseManager
from netagent.store import RegistryError, WatchEvent, WatchResync

SUBNETS = "/coreos.com/network/subnets/"
NET = {"Network": "10.60.0.0/16", "Backend": {"Type": "host-gw"}}


def attrs(i: int, backend: str = "host-gw") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}"), backend_type=backend)


def manager(store: FakeStore, i: int, doc: dict[str, object] | None = None,
            backend: str = "host-gw", ttl: int = 60, **kw: object) -> LeaseManager:
    cfg = parse_network_config(json.dumps(doc or NET))
    return LeaseManager(store, cfg, attrs(i, backend), ttl=ttl, rng=random.Random(i),
                        **kw)  # type: ignore[arg-type]


def held_by(store: FakeStore) -> dict[str, str]:
    """lease key -> PublicIP of its holder, as etcd has them."""
    items, _ = store.list_prefix(SUBNETS)
    return {kv.key[len(SUBNETS):]: str(decode_lease(kv.key[len(SUBNETS):], kv.value)
                                       .attrs.public_ip) for kv in items}


# --------------------------------------------------------------------------- the fake itself


def test_fake_store_create_if_absent_ttl_expiry_and_watch_from_a_revision() -> None:
    clock = FakeClock()
    s = FakeStore(clock=clock)
    ok, lid, _ = s.create(SUBNETS + "a", "1", ttl=10)
    assert ok and lid
    ok2, lid2, existing = s.create(SUBNETS + "a", "2", ttl=10)
    assert not ok2 and lid2 == 0 and existing is not None and existing.value == b"1"
    assert len(s.leases) == 1, "a failed create leaves no lease behind"
    rev_after_create = s.revision
    clock.advance(9)
    assert s.keepalive(lid) == 10  # renewed: expires 10 s from now
    clock.advance(9)
    assert s.expire() == []
    clock.advance(2)
    assert s.expire() == [SUBNETS + "a"] and s.get(SUBNETS + "a") is None
    assert s.keepalive(lid) == 0, "an expired lease answers TTL 0"
    stop = threading.Event()
    seen = []
    for ev in s.watch_prefix(SUBNETS, rev_after_create, stop):
        seen.append(ev)
        if len(seen) == 2:
            stop.set()
    assert [(e.kind, e.key) for e in seen if isinstance(e, WatchEvent)] == [
        ("put", SUBNETS + "a"), ("delete", SUBNETS + "a")]


def test_fake_store_watch_from_a_compacted_revision_resyncs_and_failures_change_nothing() -> None:
    s = FakeStore()
    s.put(SUBNETS + "a", "1")
    s.put(SUBNETS + "b", "2")
    s.delete(SUBNETS + "a")
    s.compact(s.revision)
    with pytest.raises(RegistryError) as compacted:
        s.events_since(SUBNETS, 2)
    assert compacted.value.kind == "compacted"
    assert s.events_since(SUBNETS, s.revision + 1) == []
    stop = threading.Event()
    first = next(iter(s.watch_prefix(SUBNETS, 2, stop)))
    assert isinstance(first, WatchResync)
    assert [kv.key for kv in first.items] == [SUBNETS + "b"] and first.revision == s.revision
    s.fail("put", "timeout", times=1)
    before = s.revision
    with pytest.raises(RegistryError) as err:
        s.put(SUBNETS + "c", "3")
    assert err.value.kind == "timeout" and s.revision == before and s.get(SUBNETS + "c") is None
    s.put(SUBNETS + "c", "3")  # the failure was for one call only
    assert s.stats.errors == {"compacted": 2, "timeout": 1}


# --------------------------------------------------------------------------- LeaseManager


def test_acquire_creates_a_key_on_a_ttl_lease_and_hosts_get_distinct_subnets() -> None:
    s = FakeStore()
    a = manager(s, 1).acquire()
    b = manager(s, 2).acquire()
    assert a.subnet != b.subnet and a.lease_id and b.lease_id and a.lease_id != b.lease_id
    assert held_by(s) == {a.key: "192.0.2.1", b.key: "192.0.2.2"}
    assert s.leases[a.lease_id].ttl == 60


def test_restart_reuses_the_key_found_by_public_ip_without_a_write() -> None:
    """A restart (no subnet file) finds our lease by PublicIP: same key, same etcd lease, no
    write, so peers see no watch event."""
    s = FakeStore()
    first = manager(s, 1).acquire()
    writes = s.writes()
    again = manager(s, 1).acquire()
    assert (again.key, again.lease_id) == (first.key, first.lease_id)
    assert s.writes() == writes


def test_restart_with_new_backend_data_rewrites_the_value_on_the_same_lease() -> None:
    s = FakeStore()
    first = manager(s, 1).acquire()
    again = manager(s, 1, backend="vxlan").acquire()
    assert (again.key, again.lease_id) == (first.key, first.lease_id)
    kv = s.get(SUBNETS + first.key)
    assert kv is not None and json.loads(kv.value)["BackendType"] == "vxlan"
    assert kv.lease_id == first.lease_id


def test_acquire_plans_from_a_given_listing_and_lists_again_only_after_a_lost_race(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At start-up the daemon's one listing serves the lease choice (issue 18: a second listing
    of 5,000 leases cost ~0.3 s). A stale listing is safe: the subnet it planned was taken
    meanwhile, so the create-if-absent loses and the next attempt lists afresh."""
    s = FakeStore()
    lists: list[str] = []
    real = s.list_prefix
    monkeypatch.setattr(s, "list_prefix", lambda prefix: (lists.append(prefix), real(prefix))[1])
    listing, _ = real("/coreos.com/network/")
    got = manager(s, 1, previous_subnet=IPv4Network("10.60.9.0/24")).acquire(listing=listing)
    assert got.subnet == IPv4Network("10.60.9.0/24") and lists == [], "no second listing"
    # the listing is stale: host 3 took 10.60.7.0/24 after it was made
    listing, _ = real("/coreos.com/network/")
    s.put(SUBNETS + "10.60.7.0-24", json.dumps({"PublicIP": "192.0.2.3"}))
    late = manager(s, 2, previous_subnet=IPv4Network("10.60.7.0/24")).acquire(listing=listing)
    assert late.subnet not in (IPv4Network("10.60.7.0/24"), got.subnet)
    assert lists == [SUBNETS], "the lost race listed once, afresh"
    assert held_by(s)["10.60.7.0-24"] == "192.0.2.3", "the other host's key is untouched"


def test_acquire_reports_the_stale_own_keys_it_deleted() -> None:
    """A caller that listed before acquiring must not take our own deleted key for a peer."""
    s = FakeStore()
    s.create(SUBNETS + "10.60.0.0-24", json.dumps({"PublicIP": "192.0.2.1"}), ttl=60)  # < SubnetMin
    m = manager(s, 1)
    listing, _ = s.list_prefix(SUBNETS)
    lease = m.acquire(listing=listing)
    assert m.dropped == ["10.60.0.0-24"]
    assert list(m.listed) == ["10.60.0.0-24"], "the listing as decoded, for the peer table"
    assert list(held_by(s)) == [lease.key]
    assert manager(s, 1).acquire() == lease and m.acquire().key == lease.key
    assert m.dropped == [] and m.listed == {}, "reset on every call"


def test_previous_subnet_from_the_subnet_file_is_kept_when_free() -> None:
    s = FakeStore()
    want = IPv4Network("10.60.77.0/24")
    got = manager(s, 1, previous_subnet=want).acquire()
    assert got.subnet == want


def test_own_key_deleted_recreates_the_same_subnet_on_the_same_etcd_lease() -> None:
    s = FakeStore()
    m = manager(s, 1)
    lease = m.acquire()
    s.delete(SUBNETS + lease.key)
    again = m.reacquire()
    assert (again.subnet, again.lease_id) == (lease.subnet, lease.lease_id)
    assert m.state is not None and m.state.reacquired == 1
    assert held_by(s) == {lease.key: "192.0.2.1"}


def test_expired_etcd_lease_recreates_the_same_subnet_on_a_new_lease() -> None:
    clock = FakeClock()
    s = FakeStore(clock=clock)
    m = manager(s, 1, ttl=30)
    lease = m.acquire()
    clock.advance(31)
    assert s.expire() == [SUBNETS + lease.key]
    assert m.renew() is False, "a keepalive answered with TTL 0 is lease loss"
    again = m.reacquire()
    assert again.subnet == lease.subnet and again.lease_id != lease.lease_id
    assert again.lease_id in s.leases


def test_subnet_taken_by_another_host_renumbers_loudly() -> None:
    s = FakeStore()
    m = manager(s, 1)
    lease = m.acquire()
    s.delete(SUBNETS + lease.key)
    other = json.dumps({"PublicIP": "192.0.2.9", "BackendType": "host-gw"})
    s.put(SUBNETS + lease.key, other)
    with pytest.raises(LeaseLost):
        m.reacquire()
    assert m.lease.subnet != lease.subnet
    assert held_by(s) == {lease.key: "192.0.2.9", m.lease.key: "192.0.2.1"}


def test_keepalives_during_an_outage_count_failures_and_keep_the_lease() -> None:
    s = FakeStore()
    m = manager(s, 1)
    lease = m.acquire()
    s.fail("keepalive", "unavailable", times=3)
    assert [m.renew() for _ in range(3)] == [True, True, True]
    assert m.state is not None and m.state.renew_failures == 3 and m.state.renewals == 0
    assert m.renew() is True and m.state.renewals == 1
    assert m.lease.lease_id == lease.lease_id


def test_acquire_during_an_outage_raises_and_succeeds_once_etcd_is_back() -> None:
    """The daemon retries acquire() with backoff on RegistryError; nothing is half-written."""
    s = FakeStore()
    s.fail("create", "unavailable", times=1)
    m = manager(s, 1)
    with pytest.raises(RegistryError) as err:
        m.acquire()
    assert err.value.kind == "unavailable" and held_by(s) == {}
    # the lease granted for the failed create is known (not leaked) and ends once etcd answers
    assert set(s.leases) <= m.granted and len(s.leases) == 1
    lease = m.acquire()
    assert held_by(s) == {lease.key: "192.0.2.1"}
    assert s.live_leases() == {lease.lease_id: {SUBNETS + lease.key}}


def test_out_of_subnets_when_every_subnet_is_held_by_others() -> None:
    small: dict[str, object] = {"Network": "10.61.0.0/16", "SubnetMin": "10.61.1.0", "SubnetMax": "10.61.2.0",
             "Backend": {"Type": "host-gw"}}
    s = FakeStore()
    manager(s, 1, small).acquire()
    manager(s, 2, small).acquire()
    writes = s.writes()
    with pytest.raises(OutOfSubnets):
        manager(s, 3, small).acquire()
    assert s.writes() == writes, "nothing is written when no subnet is free"


def test_two_hosts_picking_one_ipv6_subnet_at_once_end_with_distinct_subnets() -> None:
    """Dual-stack keys name both subnets, so two hosts that choose the same free IPv6 subnet
    beside different IPv4 subnets both pass create-if-absent (seen in CI when three hosts
    turned IPv6 on at once). The later key lets go, chooses again, and its etcd lease goes."""
    store = FakeStore()
    cfg = parse_network_config(json.dumps({**NET, "EnableIPv6": True,
                                           "IPv6Network": "fd60::/48"}))

    def host(i: int) -> LeaseManager:
        dual = LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}"),
                          public_ipv6=IPv6Address(f"fd00::{i}"), backend_type="host-gw")
        # the same draws on both hosts: the same free IPv6 subnet comes first for each
        return LeaseManager(store, cfg, dual, ttl=60, rng=random.Random(7),
                            previous_subnet=IPv4Network(f"10.60.{i}.0/24"))

    a, b = host(1), host(2)
    before, _ = store.list_prefix(SUBNETS)  # b plans from a listing taken before a's create
    la = a.acquire()
    lb = b.acquire(listing=before)
    assert (la.subnet, lb.subnet) == (IPv4Network("10.60.1.0/24"), IPv4Network("10.60.2.0/24"))
    assert la.ipv6_subnet != lb.ipv6_subnet, "two hosts hold one IPv6 subnet"
    assert set(held_by(store)) == {la.key, lb.key}
    assert set(store.live_leases()) == {la.lease_id, lb.lease_id}, "the let-go lease is revoked"


def test_ipv6_only_host_turning_ipv4_on_keeps_its_ipv6_subnet() -> None:
    """Its old key (0.0.0.0-0&X, found by PublicIPv6) holds the same IPv6 subnet with a lower
    revision: that is itself, not a clash, so the new dual-stack key keeps X."""
    store = FakeStore()
    v6 = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd60::/48",
          "Backend": {"Type": "host-gw"}}
    six = LeaseAttrs(public_ip=IPv4Address("0.0.0.0"), public_ipv6=IPv6Address("fd00::1"),
                     backend_type="host-gw")
    old = LeaseManager(store, parse_network_config(json.dumps(v6)), six, ttl=60,
                       rng=random.Random(3)).acquire()
    dual = LeaseManager(store, parse_network_config(json.dumps(
        {**v6, "EnableIPv4": True, "Network": "10.60.0.0/16"})),
        LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), public_ipv6=IPv6Address("fd00::1"),
                   backend_type="host-gw"), ttl=60, rng=random.Random(3),
        previous_subnet6=old.ipv6_subnet)
    new = dual.acquire(replacing=old)
    assert new.ipv6_subnet == old.ipv6_subnet and new.subnet is not None
    assert set(held_by_any(store)) == {new.key}, "the old key goes once the new one exists"


def held_by_any(store: FakeStore) -> list[str]:
    items, _ = store.list_prefix(SUBNETS)
    return [kv.key[len(SUBNETS):] for kv in items]
