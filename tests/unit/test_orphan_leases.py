"""No orphan etcd lease (issue 19 item 8): a lease granted for a create that failed, lost its
answer or was cut by a crash is revoked once etcd answers, or by the next process at start.

The chaos run that found it left 4 etcd leases for 3 hosts. The sequence: `Registry.create`
granted a lease inside the operation `Registry.call` retries, so a transaction whose answer was
lost (etcd killed) granted a second lease on the retry, and the first one's revoke failed on the
dead connection. These tests drive that sequence against the fake store (`lose_answer`, `fail`
between grant and transaction) and check etcd's view: every live lease carries our key.
"""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from support.fakestore import FakeStore

from netagent.config import parse_network_config
from netagent.files import read_lease_ids, write_lease_ids
from netagent.lease import LeaseAttrs
from netagent.leasing import LeaseManager
from netagent.store import RegistryError

SUBNETS = "/coreos.com/network/subnets/"
NET = {"Network": "10.60.0.0/16", "Backend": {"Type": "host-gw"}}


def manager(store: FakeStore, lease_file: Path | None, i: int = 1) -> LeaseManager:
    cfg = parse_network_config(json.dumps(NET))
    attrs = LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}"), backend_type="host-gw")
    return LeaseManager(store, cfg, attrs, ttl=60, rng=random.Random(i), lease_file=lease_file)


def only_our_lease(store: FakeStore, m: LeaseManager) -> None:
    """etcd holds exactly one lease and it carries exactly our key."""
    assert store.live_leases() == {m.lease.lease_id: {m.key}}


def test_a_create_whose_answer_is_lost_keeps_one_lease(tmp_path: Path) -> None:
    """The transaction landed, the answer did not: the retry finds our key on that very lease
    and adopts it; no second lease is granted."""
    s = FakeStore()
    m = manager(s, tmp_path / "etcd-leases")
    s.lose_answer("create")
    with pytest.raises(RegistryError):
        m.acquire()
    [(lid, keys)] = s.live_leases().items()
    assert len(keys) == 1 and lid in m.granted
    lease = m.acquire()
    assert lease.lease_id == lid
    only_our_lease(s, m)
    assert read_lease_ids(tmp_path / "etcd-leases") == {lid}


def test_a_grant_whose_answer_is_lost_is_retried_with_the_same_id(tmp_path: Path) -> None:
    """The grant itself answered nothing: the ID was ours (chosen and written down first), so
    the next attempt's new lease leaves the old one to be revoked, not leaked."""
    s = FakeStore()
    m = manager(s, tmp_path / "etcd-leases")
    s.lose_answer("grant")
    with pytest.raises(RegistryError):
        m.acquire()
    assert len(s.live_leases()) == 1 and set(s.live_leases()) <= m.granted
    m.acquire()
    only_our_lease(s, m)


def test_etcd_dying_between_grant_and_transaction_leaks_nothing(tmp_path: Path) -> None:
    """Grant answered, the transaction and the revoke fail (etcd gone): the lease stays in
    memory and in the file, and goes once etcd answers again."""
    s = FakeStore()
    m = manager(s, tmp_path / "etcd-leases")
    s.fail("create", times=1)
    s.fail("revoke", times=5)
    with pytest.raises(RegistryError):
        m.acquire()
    stale = set(s.live_leases())
    assert len(stale) == 1 and stale <= read_lease_ids(tmp_path / "etcd-leases")
    m.acquire()  # revoking the stale one still fails: kept for the keepalive to retry
    assert m.unused == stale and stale <= set(s.live_leases())
    for _ in range(6):
        m.renew()
    only_our_lease(s, m)
    assert m.unused == set() and read_lease_ids(tmp_path / "etcd-leases") == {m.lease.lease_id}


def test_a_crash_between_grant_and_transaction_is_cleaned_by_the_next_process(
        tmp_path: Path) -> None:
    """kill -9 right after the grant: the next process reads the ID from the state dir and
    revokes it once it holds its own lease."""
    s = FakeStore()
    first = manager(s, tmp_path / "etcd-leases")
    s.fail("create", times=1)
    with pytest.raises(RegistryError):
        first.acquire()  # the process "dies" here: nothing of it but the file survives
    orphan = set(s.live_leases())
    assert len(orphan) == 1
    second = manager(s, tmp_path / "etcd-leases")
    assert second.granted == orphan
    second.acquire()
    only_our_lease(s, second)


def test_a_restart_reuses_the_held_lease_and_revokes_nothing_else(tmp_path: Path) -> None:
    """The file lists the held lease too: a plain restart keeps it (no write), revokes none."""
    s = FakeStore()
    first = manager(s, tmp_path / "etcd-leases")
    lease = first.acquire()
    writes = s.writes()
    second = manager(s, tmp_path / "etcd-leases")
    assert second.acquire().lease_id == lease.lease_id
    assert s.writes() == writes and ("revoke", "") not in s.calls
    only_our_lease(s, second)


def test_a_lost_lease_re_created_on_a_new_one_revokes_the_old(tmp_path: Path) -> None:
    """Keepalive unreachable during reacquire: the old lease may still be alive in etcd; once
    the key is back on a new lease the old one is revoked, not left to run out its TTL."""
    s = FakeStore()
    m = manager(s, tmp_path / "etcd-leases")
    old = m.acquire()
    s.delete(SUBNETS + old.key)
    s.fail("keepalive", times=1)
    new = m.reacquire()
    assert new.subnet == old.subnet and new.lease_id != old.lease_id
    only_our_lease(s, m)


def test_the_lease_file_skips_garbage_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "etcd-leases"
    write_lease_ids(path, {1, 0x7FFF_FFFF_FFFF_FFFF})
    assert read_lease_ids(path) == {1, 0x7FFF_FFFF_FFFF_FFFF}
    path.write_text("zz\n0\n-5\nffffffffffffffffff\n00000000000000ab # kept\n")
    assert read_lease_ids(path) == {0xAB}
    assert read_lease_ids(tmp_path / "absent") == set()
