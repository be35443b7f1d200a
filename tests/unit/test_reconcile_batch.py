"""The scale paths without root: message encoding, the cheap full compare, render and lookup caches.

The batched reconciler must end in the same kernel state as the small, sorted steps it replaces;
a full sync with nothing changed must render nothing, look nothing up and write nothing; cached
route lookups must be dropped when the underlay routes change.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from support.fakekernel import FakeKernel, hg_lease, mac, pub, sub, vx_lease

from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend
from netagent.backends.render import LOOKUP_REFRESH, Rendered
from netagent.backends.vxlan import VxlanBackend
from netagent.config import parse_network_config
from netagent.kernel import (
    RTPROT_NETAGENT,
    Fdb,
    Neigh,
    Op,
    Route,
    RouteLookup,
    encode_op,
)
from netagent.kernel.entries import AF_BRIDGE, AF_INET, NTF_SELF, NUD_PERMANENT
from netagent.kernel.reconciler import _SORT_LIMIT
from netagent.lease import Lease, LeaseAttrs

OWN = IPv4Network("10.5.1.0/24")


def wide_sub(i: int) -> IPv4Network:
    return IPv4Network((int(IPv4Address("10.5.0.0")) + i * 256, 24))


def wide_lease(i: int) -> Lease:
    from netagent.lease import canonical_json

    data = canonical_json({"VNI": 1, "VtepMAC": f"0e:00:00:00:{i // 256:02x}:{i % 256:02x}"})
    return Lease(wide_sub(i), LeaseAttrs(public_ip=IPv4Address(int(pub(1)) + i),
                                         backend_type="vxlan", backend_data=data))


# --------------------------------------------------------------------------- encoding


def attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * (-n % 4)


def message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


REPLACE, CREATE, DELETE = 0x1 | 0x400 | 0x100, 0x1 | 0x400 | 0x200, 0x1
GW = IPv4Address("10.5.2.0")
REMOTE = IPv4Address("192.168.1.2")
MAC_RAW = bytes.fromhex("0e0000000002")


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (Op("replace", Neigh(7, GW, mac(2))),
         message(28, REPLACE, 5, struct.pack("=BxxxiHBB", AF_INET, 7, NUD_PERMANENT, 0, 0)
                 + attr(1, GW.packed) + attr(2, MAC_RAW))),
        (Op("delete", Neigh(7, GW, mac(2))),
         message(29, DELETE, 5, struct.pack("=BxxxiHBB", AF_INET, 7, NUD_PERMANENT, 0, 0)
                 + attr(1, GW.packed))),
        (Op("replace", Fdb(7, mac(2), REMOTE)),
         message(28, REPLACE, 5, struct.pack("=BxxxiHBB", AF_BRIDGE, 7, NUD_PERMANENT, NTF_SELF,
                                             0) + attr(2, MAC_RAW) + attr(1, REMOTE.packed))),
        (Op("delete", Fdb(7, mac(2), REMOTE)),
         message(29, DELETE, 5, struct.pack("=BxxxiHBB", AF_BRIDGE, 7, NUD_PERMANENT, NTF_SELF,
                                             0) + attr(2, MAC_RAW) + attr(1, REMOTE.packed))),
        # route: family, dst_len, src_len, tos, table, proto, scope, type, flags
        (Op("create", Route(sub(2), GW, 7, onlink=True)),
         message(24, CREATE, 5, struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 254,
                                            RTPROT_NETAGENT, 0, 1, 0x04)
                 + attr(15, struct.pack("=I", 254)) + attr(1, GW.packed)
                 + attr(6, struct.pack("=I", 0)) + attr(5, GW.packed)
                 + attr(4, struct.pack("=I", 7)))),
        (Op("replace", Route(sub(2), REMOTE, 3, metric=9)),
         message(24, REPLACE, 5, struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 254,
                                             RTPROT_NETAGENT, 0, 1, 0)
                 + attr(15, struct.pack("=I", 254)) + attr(1, GW.packed)
                 + attr(6, struct.pack("=I", 9)) + attr(5, REMOTE.packed)
                 + attr(4, struct.pack("=I", 3)))),
        # delete: scope NOWHERE, type unspecified, our proto so nobody else's route matches
        (Op("delete", Route(sub(2), REMOTE, 3)),
         message(25, DELETE, 5, struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 254,
                                            RTPROT_NETAGENT, 255, 0, 0)
                 + attr(15, struct.pack("=I", 254)) + attr(1, GW.packed)
                 + attr(6, struct.pack("=I", 0)))),
        # a table above 255 goes in RTA_TABLE only
        (Op("replace", Route(sub(2), None, 3, table=1000)),
         message(24, REPLACE, 5, struct.pack("=BBBBBBBBI", AF_INET, 24, 0, 0, 0,
                                             RTPROT_NETAGENT, 0, 1, 0)
                 + attr(15, struct.pack("=I", 1000)) + attr(1, GW.packed)
                 + attr(6, struct.pack("=I", 0)) + attr(4, struct.pack("=I", 3)))),
    ],
)
def test_encoded_messages(op: Op, expected: bytes) -> None:
    assert encode_op(op, 5) == expected


# --------------------------------------------------------------------------- backends


def facts(k: FakeKernel, state: Path) -> HostFacts:
    eth = k.links["eth0"]
    return HostFacts("eth0", eth.index, 1500, pub(1), pub(1), state)


@pytest.fixture
def kern() -> FakeKernel:
    k = FakeKernel()
    k.add_plain_link("eth0")
    return k


class CountingVxlan(VxlanBackend):
    """Counts the peers handed to the pure render."""

    rendered: Counter[IPv4Network]

    def render(self, peers: Mapping[IPv4Network, Lease],
               lookups: Mapping[IPv4Address, RouteLookup | None]) -> Rendered:
        self.rendered.update(list(peers))
        return super().render(peers, lookups)


def up_vxlan(k: FakeKernel, state: Path, backend: str = '{"Type":"vxlan"}') -> CountingVxlan:
    cfg = parse_network_config(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')
    b = CountingVxlan(cfg, facts(k, state), kernel=k, csum_workaround=False)  # type: ignore[arg-type]
    b.rendered = Counter()
    b.prepare()
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1), backend_type="vxlan")))
    return b


def test_one_big_batch_ends_like_many_small_steps(kern: FakeKernel, tmp_path: Path) -> None:
    """Above _SORT_LIMIT pending keys the apply skips sorting; the result must not change."""
    n = 3 * _SORT_LIMIT
    peers = {wide_sub(i): wide_lease(i) for i in range(2, 2 + n)}
    big = up_vxlan(kern, tmp_path / "a")
    rep = big.sync(peers)
    assert (rep.added, rep.failed) == (3 * n, 0)

    small_kern = FakeKernel()
    small_kern.add_plain_link("eth0")
    small = up_vxlan(small_kern, tmp_path / "b")
    small.sync({})
    some: dict[IPv4Network, Lease] = {}
    for i, (s, lz) in enumerate(peers.items()):
        some[s] = lz
        if i % 50 == 0 or i == n - 1:
            small.sync(dict(some), frozenset(some))
    # same entries (device index and MAC aside, which differ by construction)
    def norm(k: FakeKernel) -> tuple[frozenset[object], ...]:
        neighs, fdb, routes = k.state()
        return (frozenset((n.dst, n.lladdr) for n in neighs),
                frozenset((f.lladdr, f.dst) for f in fdb),
                frozenset((r.dst, r.gateway, r.onlink, r.proto) for r in routes))

    assert norm(kern) == norm(small_kern)
    assert Counter(a for a, _ in kern.log if a != "link") == Counter(
        a for a, _ in small_kern.log if a != "link")


def test_full_sync_with_nothing_changed_renders_and_writes_nothing(kern: FakeKernel,
                                                                  tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx_lease(i) for i in range(2, 40)}
    b.sync(peers)
    assert set(b.rendered) == set(peers) and max(b.rendered.values()) == 1
    kern.clear_log()
    b.rendered.clear()
    rep = b.sync(peers)
    assert rep.changes == 0 and kern.log == [] and not b.rendered
    assert sorted(kern.dumps) == ["fdb", "neigh", "route"]
    # an equal but new lease object is not re-rendered either; a changed one is
    peers = {**peers, sub(5): vx_lease(5), sub(6): vx_lease(6, mac_of=66)}
    kern.clear_log()
    rep = b.sync(peers)
    assert set(b.rendered) == {sub(6)}
    assert sorted(type(e).__name__ for _, e in kern.log) == ["Fdb", "Fdb", "Neigh"]


def test_full_compare_writes_only_what_drifted(kern: FakeKernel, tmp_path: Path) -> None:
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx_lease(i) for i in range(2, 30)}
    b.sync(peers)
    dev = kern.links["flannel.1"].index
    kern.neighs[(dev, sub(7).network_address)] = Neigh(dev, sub(7).network_address, mac(99))
    del kern.routes[(254, sub(9), 0)]
    kern.clear_log()
    rep = b.sync(peers)
    assert (rep.added, rep.removed) == (2, 0)
    # the route's key is empty after the read-back: created, not replaced
    assert sorted((a, type(e).__name__) for a, e in kern.log) == [("create", "Route"),
                                                                  ("replace", "Neigh")]


def test_setting_the_same_entries_marks_nothing(kern: FakeKernel, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full sync hands every peer in again; unchanged ones must cost no per-key work."""
    b = up_vxlan(kern, tmp_path)
    b.sync({sub(2): vx_lease(2)})
    rec = b.reconciler
    assert rec is not None
    touched: list[object] = []
    monkeypatch.setattr(rec, "_claim", lambda *a: touched.append(a))
    monkeypatch.setattr(rec, "_release", lambda *a: touched.append(a))
    entries = rec.desired()
    rec.set_peer(sub(2), [entries["neigh"][(rec.device, sub(2).network_address)],
                          entries["fdb"][(rec.device, mac(2), pub(2))],
                          entries["route"][(254, sub(2), 0)]])
    assert touched == []
    assert all(t.in_sync() for t in rec._tables.values())


class CountingLookups(FakeKernel):
    asked: list[IPv4Address]

    def lookup_route(self, dst: IPv4Address) -> RouteLookup | None:
        self.asked.append(dst)
        return super().lookup_route(dst)


def test_route_lookups_cached_until_the_underlay_changes(tmp_path: Path) -> None:
    k = CountingLookups()
    k.asked = []
    eth = k.add_plain_link("eth0")
    for i in range(2, 12):
        k.lookups[pub(i)] = RouteLookup(None, eth)
    cfg = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
    b = HostGwBackend(cfg, facts(k, tmp_path), kernel=k)
    b.prepare()
    b.activate(Lease(OWN, LeaseAttrs(public_ip=pub(1), backend_type="host-gw")))
    peers = {sub(i): hg_lease(i) for i in range(2, 12)}
    assert b.sync(peers).added == 10
    assert sorted(k.asked) == sorted(pub(i) for i in range(2, 12))
    k.asked.clear()
    b.sync(peers)
    assert k.asked == []  # nothing changed: no lookups
    # an incremental change of one lease asks for that peer only
    b.sync(peers, frozenset({sub(3)}))
    assert k.asked == [pub(3)]
    k.asked.clear()
    # the underlay changes (peer 4 now behind a router): every lookup is asked again
    k.lookups[pub(4)] = RouteLookup(pub(254), eth)
    rep = b.sync(peers)
    assert len(k.asked) == 10 and sub(4) in rep.skipped and rep.removed == 1
    k.asked.clear()
    # with no change at all, the cache still expires after LOOKUP_REFRESH full syncs
    for _ in range(LOOKUP_REFRESH):
        b.sync(peers)
    assert k.asked == []
    b.sync(peers)
    assert len(k.asked) == 10


def test_device_recreated_rerenders_from_cache(kern: FakeKernel, tmp_path: Path) -> None:
    """The render cache must not keep entries that name a device index that is gone."""
    b = up_vxlan(kern, tmp_path)
    peers = {sub(i): vx_lease(i) for i in range(2, 6)}
    b.sync(peers)
    old = kern.links["flannel.1"].index
    kern.delete_link(old)
    b.rendered.clear()
    rep = b.sync(peers)
    new = kern.links["flannel.1"].index
    assert new != old and set(b.rendered) == set(peers) and rep.added == 12
    assert {n.ifindex for n in kern.neighs.values()} == {new}
