"""The reconciler and both backends against the in-memory kernel (no root).

The fake kernel fails on demand: a failed item must stay pending and be retried on the next
sync while everything else still applies, and deletes must only ever touch entries that are ours.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from support.fakekernel import FakeKernel, hg_lease, mac, pub, sub, vx_lease

from netagent.backends import backend_class
from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend
from netagent.backends.vxlan import VxlanBackend
from netagent.config import parse_network_config
from netagent.kernel import RTPROT_NETAGENT, Fdb, Neigh, Op, Route, RouteLookup
from netagent.lease import Lease, LeaseAttrs

NET = IPv4Network("10.5.0.0/16")
OWN = IPv4Network("10.5.1.0/24")


def vx(i: int, m: int | None = None) -> Lease:
    return vx_lease(i, mac_of=m)


def hg(i: int) -> Lease:
    return hg_lease(i)


def config(backend: str = '{"Type":"vxlan"}'):  # type: ignore[no-untyped-def]
    return parse_network_config(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')


@pytest.fixture
def kern() -> FakeKernel:
    k = FakeKernel()
    k.add_plain_link("eth0")
    return k


def facts(k: FakeKernel, state: Path, mtu: int = 1500) -> HostFacts:
    eth = k.links["eth0"]
    return HostFacts("eth0", eth.index, mtu, pub(1), pub(1), state)


def up_vxlan(k: FakeKernel, state: Path, backend: str = '{"Type":"vxlan"}',
             **kw: object) -> VxlanBackend:
    b = VxlanBackend(config(backend), facts(k, state), kernel=k, csum_workaround=False, **kw)  # type: ignore[arg-type]
    b.prepare()
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1), backend_type="vxlan")))
    return b


def ours(k: FakeKernel) -> tuple[frozenset[object], ...]:
    return k.state()


# --------------------------------------------------------------------------- vxlan device


def test_registered_in_the_table() -> None:
    assert backend_class("vxlan") is VxlanBackend
    assert backend_class("host-gw") is HostGwBackend


def test_prepare_creates_device_and_lease_data(kern: FakeKernel, tmp_path: Path) -> None:
    b = VxlanBackend(config(), facts(kern, tmp_path), kernel=kern, csum_workaround=False)
    contrib = b.prepare()
    link = kern.links["flannel.1"]
    assert (link.vni, link.port, link.local, link.underlay_index, link.learning, link.mtu) == (
        1, 8472, pub(1), kern.links["eth0"].index, False, 1450)
    assert contrib.backend_type == "vxlan" and contrib.mtu == 1450
    assert contrib.backend_data == f'{{"VNI":1,"VtepMAC":"{link.mac}"}}'
    assert link.mac == link.mac.lower() and int(link.mac[:2], 16) & 0x03 == 0x02
    assert (tmp_path / "flannel.1.mac").read_text().strip() == link.mac
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1))))
    link = kern.links["flannel.1"]
    assert link.addrs == (IPv4Interface("10.5.1.0/32"),) and link.up


def test_mtu_from_backend_config_and_vni_port(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path, '{"Type":"vxlan","VNI":42,"Port":4789,"MTU":9000}')
    link = kern.links["flannel.42"]
    assert (link.mtu, link.port, link.vni, b.mtu) == (8950, 4789, 42, 8950)


def test_restart_reuses_device_and_makes_no_kernel_writes(kern: FakeKernel,
                                                          tmp_path: Path) -> None:
    peers = {sub(i): vx(i) for i in range(2, 12)}
    b = up_vxlan(kern, tmp_path)
    assert b.sync(peers).added == 30
    before, mac_before = ours(kern), kern.links["flannel.1"].mac
    kern.clear_log()
    b2 = up_vxlan(kern, tmp_path)  # a new process: fresh objects, same kernel
    rep = b2.sync(peers)
    assert rep.changes == 0 and kern.log == []
    assert ours(kern) == before and kern.links["flannel.1"].mac == mac_before
    assert rep.entries == {"neigh": 10, "fdb": 10, "route": 10}


def test_reboot_keeps_mac_from_state_dir(kern: FakeKernel, tmp_path: Path) -> None:
    up_vxlan(kern, tmp_path)
    first = kern.links["flannel.1"].mac
    kern.delete_link(kern.links["flannel.1"].index)  # reboot: the device is gone
    up_vxlan(kern, tmp_path)
    assert kern.links["flannel.1"].mac == first


def test_incompatible_device_is_recreated_with_same_mac(kern: FakeKernel,
                                                        tmp_path: Path) -> None:
    up_vxlan(kern, tmp_path)
    first = kern.links["flannel.1"]
    up_vxlan(kern, tmp_path, '{"Type":"vxlan","Port":4789}')
    again = kern.links["flannel.1"]
    assert again.index != first.index and again.mac == first.mac and again.port == 4789


def test_stale_addresses_removed(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    kern.add_addr(kern.links["flannel.1"].index, IPv4Interface("10.5.77.0/32"))
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1))))
    assert kern.links["flannel.1"].addrs == (IPv4Interface("10.5.1.0/32"),)


def test_checksum_workaround_forced(kern: FakeKernel, tmp_path: Path) -> None:
    b = VxlanBackend(config(), facts(kern, tmp_path), kernel=kern, csum_workaround=True)
    b.prepare()
    assert kern.csum_off == {"flannel.1"}
    b2 = VxlanBackend(config(), facts(kern, tmp_path), kernel=kern, csum_workaround=False)
    b2.prepare()  # not asked: nothing done (the earlier setting stays)
    assert kern.csum_off == {"flannel.1"}


# --------------------------------------------------------------------------- vxlan peers


def test_program_order_and_values(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    kern.clear_log()
    b.sync({sub(2): vx(2), sub(3): vx(3)})
    kinds = [e.kind for a, e in kern.log]
    assert kinds == ["neigh", "neigh", "fdb", "fdb", "route", "route"]
    dev = kern.links["flannel.1"].index
    assert kern.routes[(254, sub(2), 0)] == Route(sub(2), IPv4Address("10.5.2.0"), dev,
                                                  onlink=True, proto=RTPROT_NETAGENT)
    kern.clear_log()
    b.sync({}, frozenset({sub(2), sub(3)}))
    assert [(a, e.kind) for a, e in kern.log] == [("delete", "route")] * 2 + [
        ("delete", "fdb")] * 2 + [("delete", "neigh")] * 2
    assert ours(kern) == (frozenset(), frozenset(), frozenset())


def test_incremental_touches_only_changed_peers(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx(i) for i in range(2, 22)}
    b.sync(peers)
    kern.clear_log()
    peers[sub(5)] = vx(5, m=0x55)  # new MAC
    rep = b.sync(peers, frozenset({sub(5)}))
    assert kern.dumps == []  # no read-back on an incremental sync
    touched = {e.dst if isinstance(e, Neigh) else e.lladdr if isinstance(e, Fdb) else e.dst
               for _, e in kern.log}
    assert touched == {IPv4Address("10.5.5.0"), mac(0x55), mac(5)}
    assert rep.added == 2 and rep.removed == 1  # neigh replaced, fdb added, old fdb deleted


def test_full_sync_reads_each_table_once(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    kern.clear_log()
    b.sync({sub(i): vx(i) for i in range(2, 50)})
    assert sorted(kern.dumps) == ["fdb", "neigh", "route"]


def test_failed_item_stays_pending_rest_applies(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx(i) for i in range(2, 6)}
    kern.fail(lambda op: isinstance(op.entry, Fdb) and op.entry.lladdr == mac(3))
    kern.fail(lambda op: isinstance(op.entry, Route) and op.entry.dst == sub(4))
    rep = b.sync(peers)
    assert rep.failed == 2
    assert (254, sub(3), 0) not in kern.routes  # held back: its FDB entry failed
    assert "fdb failed" in rep.skipped[sub(3)]
    assert (254, sub(4), 0) not in kern.routes
    assert (254, sub(2), 0) in kern.routes and (254, sub(5), 0) in kern.routes
    kern.clear_log()
    rep = b.sync(peers, frozenset())  # nothing changed: only the pending items are retried
    assert rep.failed == 0 and rep.skipped == {}
    assert sorted(e.kind for _, e in kern.log) == ["fdb", "route", "route"]
    assert len(kern.routes) == 4 and len(kern.fdb) == 4


def test_failed_delete_retried(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    b.sync({sub(2): vx(2)})
    kern.fail(lambda op: op.action == "delete" and isinstance(op.entry, Route), times=1)
    rep = b.sync({}, frozenset({sub(2)}))
    assert rep.failed == 1 and (254, sub(2), 0) in kern.routes
    assert len(kern.fdb) == 0 and len(kern.neighs) == 0  # the rest still went
    rep = b.sync({}, frozenset())
    assert rep.removed == 1 and kern.routes == {}


def test_hand_deleted_entries_restored_by_full_sync(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx(i) for i in range(2, 8)}
    b.sync(peers)
    want = ours(kern)
    dev = kern.links["flannel.1"].index
    del kern.routes[(254, sub(3), 0)]
    del kern.neighs[(dev, IPv4Address("10.5.4.0"))]
    del kern.fdb[(dev, mac(5))]
    kern.routes[(254, sub(6), 0)] = Route(sub(6), IPv4Address("10.5.9.9"), dev, onlink=True)
    assert b.sync(peers, frozenset()).changes == 0  # incremental trusts its cache
    rep = b.sync(peers)  # the repair timer
    assert rep.added == 4 and rep.removed == 0
    assert ours(kern) == want


def test_device_deleted_by_hand_is_recreated(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx(i) for i in range(2, 5)}
    b.sync(peers)
    first = kern.links["flannel.1"]
    kern.delete_link(first.index)
    rep = b.sync(peers)
    link = kern.links["flannel.1"]
    assert link.mac == first.mac and link.up and link.addrs == (IPv4Interface("10.5.1.0/32"),)
    assert rep.entries == {"neigh": 3, "fdb": 3, "route": 3}
    assert {r.oif for r in kern.routes.values()} == {link.index}


def test_sweep_only_our_stale_entries(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    dev = kern.links["flannel.1"].index
    eth = kern.links["eth0"].index
    # before the restart: stale entries of ours for peer 9 (no lease any more)
    kern.neighs[(dev, IPv4Address("10.5.9.0"))] = Neigh(dev, IPv4Address("10.5.9.0"), mac(9))
    kern.fdb[(dev, mac(9))] = Fdb(dev, mac(9), pub(9))
    stale = Route(sub(9), IPv4Address("10.5.9.0"), dev, onlink=True)
    kern.routes[stale.key] = stale  # type: ignore[index]
    stale_hg = Route(sub(8), pub(8), eth)
    kern.routes[stale_hg.key] = stale_hg  # type: ignore[index]
    # not ours: other protos, outside the network, own subnet, the whole network
    keep = [
        Route(sub(10), pub(10), eth, proto=3),  # flannel's (proto boot) or an operator's
        Route(IPv4Network("10.99.0.0/24"), pub(3), eth),
        Route(OWN, None, eth),
        Route(NET, None, dev),
        Route(IPv4Network("0.0.0.0/0"), pub(254), eth, proto=4),
    ]
    for r in keep:
        kern.routes[r.key] = r  # type: ignore[index]
    rep = b.sync({sub(2): vx(2)})
    assert rep.removed == 4
    for r in keep:
        assert kern.routes[r.key] == r  # type: ignore[index]
    assert stale.key not in kern.routes and stale_hg.key not in kern.routes
    assert (dev, mac(9)) not in kern.fdb and (dev, IPv4Address("10.5.9.0")) not in kern.neighs


def test_foreign_route_at_our_key_left_alone_and_reported(kern: FakeKernel,
                                                          tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    eth = kern.links["eth0"].index
    theirs = Route(sub(2), IPv4Address("192.168.1.250"), eth, proto=4)
    kern.routes[theirs.key] = theirs  # type: ignore[index]
    rep = b.sync({sub(2): vx(2), sub(3): vx(3)})
    assert kern.routes[theirs.key] == theirs  # type: ignore[index]
    assert "not ours" in rep.skipped[sub(2)]
    assert (254, sub(3), 0) in kern.routes
    # the owner removes it: the next full sync installs ours and clears the report
    del kern.routes[theirs.key]  # type: ignore[arg-type]
    rep = b.sync({sub(2): vx(2), sub(3): vx(3)})
    assert kern.routes[theirs.key].proto == RTPROT_NETAGENT  # type: ignore[index]
    assert rep.skipped == {}


def test_foreign_route_added_since_last_readback_not_clobbered(kern: FakeKernel,
                                                               tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    b.sync({sub(2): vx(2)})
    eth = kern.links["eth0"].index
    theirs = Route(sub(3), IPv4Address("192.168.1.250"), eth, proto=4)
    kern.routes[theirs.key] = theirs  # type: ignore[index]
    rep = b.sync({sub(2): vx(2), sub(3): vx(3)}, frozenset({sub(3)}))  # incremental: no dump
    assert kern.routes[theirs.key] == theirs  # type: ignore[index]
    assert "not ours" in rep.skipped[sub(3)]
    assert [a for a, e in kern.log if isinstance(e, Route)][-1] == "create"


def test_flannel_leftover_route_on_our_device_is_adopted(kern: FakeKernel,
                                                         tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    dev = kern.links["flannel.1"].index
    old = Route(sub(2), IPv4Address("10.5.2.0"), dev, onlink=True, proto=3)
    kern.routes[old.key] = old  # type: ignore[index]
    rep = b.sync({sub(2): vx(2)})
    assert kern.routes[old.key].proto == RTPROT_NETAGENT  # type: ignore[index]
    assert rep.skipped == {}


def test_skipped_peer_logged_once(kern: FakeKernel, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(2): vx(2), sub(3): hg(3)}
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            rep = b.sync(peers)
            b.sync(peers, frozenset({sub(3)}))
    lines = [r for r in caplog.records if "skipping peer 10.5.3.0/24" in r.getMessage()]
    assert len(lines) == 1 and "not vxlan" in rep.skipped[sub(3)]
    b.sync({sub(2): vx(2)}, frozenset({sub(3)}))
    assert b.sync({sub(2): vx(2)}).skipped == {}


def test_direct_routing_switches_in_place(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path, '{"Type":"vxlan","DirectRouting":true}')
    eth = kern.links["eth0"].index
    kern.lookups[pub(2)] = RouteLookup(None, eth)
    kern.lookups[pub(3)] = RouteLookup(pub(254), eth)
    rep = b.sync({sub(2): vx(2), sub(3): vx(3)})
    assert kern.routes[(254, sub(2), 0)] == Route(sub(2), pub(2), eth)
    assert rep.entries == {"neigh": 1, "fdb": 1, "route": 2}
    # peer 2 moves behind a router: vxlan entries appear, the route is replaced in place
    kern.lookups[pub(2)] = RouteLookup(pub(254), eth)
    kern.clear_log()
    rep = b.sync({sub(2): vx(2), sub(3): vx(3)})
    assert [(a, e.kind) for a, e in kern.log] == [("replace", "neigh"), ("replace", "fdb"),
                                                 ("replace", "route")]
    assert rep.entries == {"neigh": 2, "fdb": 2, "route": 2}


# --------------------------------------------------------------------------- host-gw


def up_hostgw(k: FakeKernel, state: Path) -> HostGwBackend:
    b = HostGwBackend(config('{"Type":"host-gw"}'), facts(k, state), kernel=k)
    contrib = b.prepare()
    assert (contrib.backend_type, contrib.backend_data, contrib.mtu) == ("host-gw", "", 1500)
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1), backend_type="host-gw")))
    return b


def test_hostgw_routes_skips_and_recovery(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_hostgw(kern, tmp_path)
    eth = kern.links["eth0"].index
    for i in (2, 3):
        kern.lookups[pub(i)] = RouteLookup(None, eth)
    kern.lookups[pub(4)] = RouteLookup(pub(254), eth)
    peers = {sub(i): hg(i) for i in (2, 3, 4)} | {sub(5): vx(5)}
    rep = b.sync(peers)
    assert set(kern.routes) == {(254, sub(2), 0), (254, sub(3), 0)}
    assert kern.routes[(254, sub(2), 0)] == Route(sub(2), pub(2), eth)
    assert "not directly reachable" in rep.skipped[sub(4)] and "not host-gw" in rep.skipped[sub(5)]
    assert rep.entries == {"route": 2}
    kern.lookups[pub(4)] = RouteLookup(None, eth)  # the network got fixed
    del kern.routes[(254, sub(3), 0)]  # and someone deleted a route by hand
    rep = b.sync(peers)
    assert rep.added == 2 and set(rep.skipped) == {sub(5)}
    kern.clear_log()
    assert b.sync(peers).changes == 0 and kern.log == []
    b.sync({}, frozenset(peers))
    assert kern.routes == {}


def test_hostgw_refuses_nat(kern: FakeKernel, tmp_path: Path) -> None:
    h = HostFacts("eth0", kern.links["eth0"].index, 1500, pub(1), pub(7), tmp_path)
    with pytest.raises(RuntimeError, match="NAT"):
        HostGwBackend(config('{"Type":"host-gw"}'), h, kernel=kern).prepare()


def test_switch_from_vxlan_to_hostgw_sweeps_vxlan_routes(kern: FakeKernel,
                                                         tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    b.sync({sub(2): vx(2)})
    h = up_hostgw(kern, tmp_path)
    kern.lookups[pub(2)] = RouteLookup(None, kern.links["eth0"].index)
    h.sync({sub(2): hg(2)})
    assert kern.routes[(254, sub(2), 0)].gateway == pub(2)


def test_op_is_plain_data() -> None:
    op = Op("replace", Route(sub(2), pub(2), 3))
    assert op == Op("replace", Route(sub(2), pub(2), 3)) and hash(op)
