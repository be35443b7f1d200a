"""The drift repair in slices (Backend.repair_steps) against the in-memory kernel: events that
arrive between two slices of the read-back are not undone by what the (older) dumps said, drift
is still repaired, and a repair dropped half-way changes nothing (DESIGN.md "No stall during
drift repair")."""

from __future__ import annotations

from collections.abc import Generator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from support.fakekernel import FakeKernel, pub, sub, vx_lease

from netagent.backends.base import HostFacts, SyncReport
from netagent.backends.vxlan import VxlanBackend
from netagent.config import parse_network_config
from netagent.kernel import Route, reconciler
from netagent.kernel.monitor import KernelChange
from netagent.lease import Lease, LeaseAttrs, PeerId

OWN = sub(1)


@pytest.fixture
def kern() -> FakeKernel:
    k = FakeKernel()
    k.add_plain_link("eth0")
    return k


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler, "SLICE_ENTRIES", 2)


def up(k: FakeKernel, state: Path) -> VxlanBackend:
    cfg = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    eth = k.links["eth0"]
    b = VxlanBackend(cfg, HostFacts("eth0", eth.index, 1500, pub(1), pub(1), state), kernel=k,
                     csum_workaround=False)
    b.prepare()
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1), backend_type="vxlan")))
    return b


def finish(gen: Generator[None, None, SyncReport]) -> SyncReport:
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def started(b: VxlanBackend, peers: dict[PeerId, Lease], kern: FakeKernel
            ) -> Generator[None, None, SyncReport]:
    """A repair whose read-back has begun: the neighbour dump is taken, two entries read."""
    gen = b.repair_steps(peers)
    next(gen)
    assert kern.dumps == ["neigh"]
    return gen


def test_events_during_the_read_back_are_not_undone(kern: FakeKernel, tmp_path: Path) -> None:
    b = up(kern, tmp_path)
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in range(2, 12)}
    b.sync(peers)
    kern.clear_log()
    gen = started(b, peers, kern)
    # events between two slices: a new peer, a peer's new MAC, a peer gone
    peers[sub(20)] = vx_lease(20)
    peers[sub(5)] = vx_lease(5, mac_of=0x55)
    del peers[sub(7)]
    rep = b.sync(peers, frozenset({sub(20), sub(5), sub(7)}))
    assert rep.added == 5 and rep.removed == 4
    want = kern.state()
    kern.clear_log()
    rep = finish(gen)
    # the neighbour dump was taken before the events: it shows peer 7 and not peer 20, and
    # peer 5's old MAC; none of that is newer than what the events wrote
    assert kern.log == [] and rep.changes == 0
    assert kern.state() == want
    assert rep.entries == {"neigh": 10, "fdb": 10, "route": 10}
    # and the trackers believe what the kernel holds: the next whole compare finds nothing
    assert b.sync(peers).changes == 0 and kern.log == []


def test_a_deletion_announced_during_the_read_back_is_repaired(kern: FakeKernel,
                                                              tmp_path: Path) -> None:
    """The route dump (taken before) still shows the entry; the kernel event that came after
    it is newer, so the entry is written again, not believed present."""
    b = up(kern, tmp_path)
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in range(2, 8)}
    b.sync(peers)
    kern.clear_log()
    gen = b.repair_steps(peers)
    for _ in range(7):  # 6 neighbours, 6 FDB entries, then the route dump is taken
        next(gen)
    assert kern.dumps == ["neigh", "fdb", "route"]
    key = (254, sub(3), 0)
    route = kern.routes.pop(key)  # someone deletes it; the event comes
    assert b.entries_gone([KernelChange("route", key, "x")])
    rep = finish(gen)
    assert kern.routes[key] == route
    assert rep.added == 1 and [(a, e.dst) for a, e in kern.log] == [("create", sub(3))]


def test_drift_found_by_a_sliced_repair(kern: FakeKernel, tmp_path: Path) -> None:
    b = up(kern, tmp_path)
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in range(2, 9)}
    b.sync(peers)
    want = kern.state()
    dev = kern.links["flannel.1"].index
    del kern.routes[(254, sub(3), 0)]
    del kern.neighs[(dev, IPv4Address("10.5.4.0"))]
    stale = Route(sub(40), IPv4Address("10.5.40.0"), dev, onlink=True, proto=111)
    kern.routes[(254, sub(40), 0)] = stale  # ours by its proto, no lease wants it
    rep = finish(b.repair_steps(peers))
    assert rep.added == 2 and rep.removed == 1
    assert kern.state() == want


def test_a_repair_dropped_half_way_changes_nothing(kern: FakeKernel, tmp_path: Path) -> None:
    b = up(kern, tmp_path)
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in range(2, 9)}
    b.sync(peers)
    del kern.routes[(254, sub(3), 0)]
    kern.clear_log()
    gen = started(b, peers, kern)
    gen.close()
    assert kern.log == []
    assert b.sync(peers, frozenset()).changes == 0  # nothing half-taken in
    rec = b.reconciler
    assert rec is not None and all(t.touched is None for t in rec._tables.values())
    assert finish(b.repair_steps(peers)).added == 1  # the next repair finds it


def test_backends_without_slices_repair_in_one_step(kern: FakeKernel, tmp_path: Path) -> None:
    """udp, wireguard, bgp and alloc inherit repair_steps: their whole sync, in one step."""
    from netagent.backends.alloc import AllocBackend

    cfg = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}')
    calls: list[object] = []

    class Counting(AllocBackend):
        def sync(self, peers, changed=None):  # type: ignore[no-untyped-def]
            calls.append(changed)
            return SyncReport(added=3)

    eth = kern.links["eth0"]
    b = Counting(cfg, HostFacts("eth0", eth.index, 1500, pub(1), pub(1), tmp_path))
    gen = b.repair_steps({})
    with pytest.raises(StopIteration) as done:
        next(gen)
    assert done.value.value == SyncReport(added=3) and calls == [None]
