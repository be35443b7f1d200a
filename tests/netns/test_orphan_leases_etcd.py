"""No orphan etcd lease against a real etcd 3.4 (issue 19 item 8): chosen lease IDs, a retried
grant, a revoke of a lease already gone, and the two sequences that leaked a lease — a create
whose answer is lost and a crash between grant and transaction — checked with `etcdctl lease
list` (every live lease must carry our key)."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from support.harness import Etcd

from netagent.config import parse_network_config
from netagent.lease import LeaseAttrs
from netagent.leasing import LeaseManager
from netagent.registry import EtcdSettings, Registry, RegistryError

pytestmark = pytest.mark.privileged


def live_leases(etcd: Etcd) -> dict[int, list[str]]:
    """`etcdctl lease list` + `lease timetolive --keys`: lease ID -> attached keys."""
    out = etcd.ctl("lease", "list").stdout.split()
    ids = [int(tok, 16) for tok in out[3:]]  # "found N leases" then one hex ID a line
    leases: dict[int, list[str]] = {}
    for lid in ids:
        info = json.loads(etcd.ctl("lease", "timetolive", f"{lid:x}", "--keys", "-w",
                                   "json").stdout)
        leases[lid] = sorted(_b64(k)
                             for k in info.get("keys") or [])
    return leases


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


@pytest.fixture
def reg(etcd: Etcd) -> Iterator[Registry]:
    r = Registry(EtcdSettings(endpoints=(etcd.endpoint,)))
    yield r
    r.close()


def manager(reg: Registry, lease_file: Path, i: int) -> LeaseManager:
    cfg = parse_network_config(json.dumps({"Network": "10.47.0.0/16"}))
    attrs = LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{i}"), backend_type="host-gw")
    return LeaseManager(reg, cfg, attrs, ttl=60, rng=random.Random(i), lease_file=lease_file)


def test_grant_takes_our_id_twice_and_revoke_of_a_gone_lease_is_quiet(reg: Registry) -> None:
    lid = random.getrandbits(62) | 1
    assert reg.grant(30, lid) == lid
    assert reg.grant(30, lid) == lid, "a retried grant of our own ID is not an error"
    assert reg.lease_ttl(lid) > 0
    reg.revoke(lid)
    reg.revoke(lid)  # already gone: not an error (etcd answers NOT_FOUND)
    assert reg.lease_ttl(lid) == -1


class LoseAnswer:
    """Wraps the registry: the next create runs in etcd, then its answer is 'lost'."""

    def __init__(self, reg: Registry, run_it: bool) -> None:
        self.reg, self.run_it, self.armed = reg, run_it, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reg, name)

    def create(self, *args: Any, **kw: Any) -> Any:
        if self.armed:
            self.armed = False
            if self.run_it:
                self.reg.create(*args, **kw)
            raise RegistryError("create: connection lost (test)", "unavailable")
        return self.reg.create(*args, **kw)


@pytest.mark.parametrize("landed", [True, False], ids=["answer-lost", "crash-before-txn"])
def test_a_failed_create_leaves_one_lease_with_our_key(
        reg: Registry, etcd: Etcd, tmp_path: Path, landed: bool) -> None:
    before = set(live_leases(etcd))
    lossy = LoseAnswer(reg, run_it=landed)
    first = manager(lossy, tmp_path / "etcd-leases", 1)  # type: ignore[arg-type]
    with pytest.raises(RegistryError):
        first.acquire()
    assert len(set(live_leases(etcd)) - before) == 1, "the grant happened"
    # a new process (kill -9 of the first): only the state dir's file carries the ID over
    second = manager(reg, tmp_path / "etcd-leases", 1)
    lease = second.acquire()
    ours = {lid: keys for lid, keys in live_leases(etcd).items() if lid not in before}
    assert ours == {lease.lease_id: ["/coreos.com/network/subnets/" + lease.key]}
    reg.revoke(lease.lease_id)
