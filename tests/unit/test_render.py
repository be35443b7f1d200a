"""Pure tests of the vxlan and host-gw render functions (no root, no kernel)."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from support.fakekernel import hg_lease, mac, pub, sub, vx_lease

from netagent.backends.hostgw import render_hostgw_peers
from netagent.backends.render import generate_vtep_mac, parse_unicast_mac
from netagent.backends.vxlan import render_vxlan_peers, vxlan_incompatibility
from netagent.kernel import (
    Fdb,
    LinkInfo,
    Neigh,
    Reconciler,
    Route,
    RouteLookup,
    VxlanSpec,
    kernel_needs_csum_workaround,
    route_owner,
)
from netagent.lease import Lease, canonical_json

DEV = 7
IFACE = 3
NET = IPv4Network("10.5.0.0/16")


def render(peers: dict[IPv4Network, Lease], **kw: object):  # type: ignore[no-untyped-def]
    return render_vxlan_peers(peers, vni=1, device_index=DEV, own_ip=pub(99), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- vxlan


def test_vxlan_peer_gets_neigh_fdb_route_in_that_order() -> None:
    out = render({sub(2): vx_lease(2), sub(3): vx_lease(3)})
    assert out.skipped == {}
    assert out.entries[sub(2)] == (
        Neigh(DEV, IPv4Address("10.5.2.0"), mac(2)),
        Fdb(DEV, mac(2), pub(2)),
        Route(sub(2), gateway=IPv4Address("10.5.2.0"), oif=DEV, onlink=True),
    )
    assert [e.kind for e in out.entries[sub(3)]] == ["neigh", "fdb", "route"]


def test_keys_follow_the_kernel() -> None:
    n = Neigh(DEV, IPv4Address("10.5.2.0"), mac(2))
    assert n.key == (DEV, IPv4Address("10.5.2.0"))
    assert Fdb(DEV, mac(2), pub(2)).key == (DEV, mac(2), pub(2))
    r = Route(sub(2), gateway=pub(2), oif=IFACE)
    assert r.key == (254, sub(2), 0)
    # same key, different value: a replace, never a second entry
    assert Route(sub(2), gateway=pub(3), oif=IFACE).key == r.key


@pytest.mark.parametrize(
    ("lease", "reason"),
    [
        (hg_lease(2), "not vxlan"),
        (hg_lease(2, btype=""), "not vxlan"),
        (vx_lease(2, data="{not json"), "not valid JSON"),
        (vx_lease(2, data='[1,2]'), "not a JSON object"),
        (vx_lease(2, data='{"VNI":1}'), "no VtepMAC"),
        (vx_lease(2, data='{"VNI":1,"VtepMAC":"zz:00:00:00:00:01"}'), "not a MAC"),
        (vx_lease(2, data='{"VNI":1,"VtepMAC":"0e:00:00:00:01"}'), "not a MAC"),
        (vx_lease(2, data='{"VNI":1,"VtepMAC":12}'), "must be a string"),
        (vx_lease(2, data='{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}'), "multicast"),
        (vx_lease(2, data='{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}'), "all zeros"),
        (vx_lease(2, data='{"VNI":2,"VtepMAC":"0e:00:00:00:00:02"}'), "VNI 2 differs"),
        (vx_lease(2, ip=99), "our own PublicIP"),
    ],
)
def test_vxlan_skips_with_a_reason(lease: Lease, reason: str) -> None:
    good = vx_lease(3)
    out = render({lease.subnet: lease, good.subnet: good})
    assert reason in out.skipped[lease.subnet]
    assert lease.subnet not in out.entries
    assert sub(3) in out.entries  # one bad peer never spoils the others


def test_vxlan_accepts_tolerant_backend_data() -> None:
    lease = vx_lease(2, data='{"vtepmac":"0E-00-00-00-00-02","Extra":true}')
    out = render({sub(2): lease})
    assert out.entries[sub(2)][1] == Fdb(DEV, mac(2), pub(2))


def test_direct_routing_choice() -> None:
    peers = {sub(i): vx_lease(i) for i in (2, 3, 4, 5)}
    lookups = {
        pub(2): RouteLookup(None, IFACE),  # same L2: direct
        pub(3): RouteLookup(IPv4Address("192.168.1.254"), IFACE),  # via a gateway
        pub(4): None,  # unreachable: keep vxlan (the kernel decides later)
        pub(5): RouteLookup(None, DEV),  # nonsense answer through our own device
    }
    out = render(peers, direct_routing=True, lookups=lookups)
    assert out.entries[sub(2)] == (Route(sub(2), gateway=pub(2), oif=IFACE),)
    for i in (3, 4, 5):
        assert [e.kind for e in out.entries[sub(i)]] == ["neigh", "fdb", "route"]
    # without DirectRouting the lookups do not matter
    plain = render(peers, direct_routing=False, lookups=lookups)
    assert all(len(e) == 3 for e in plain.entries.values())


# --------------------------------------------------------------------------- host-gw


def test_hostgw_routes_and_unreachable_peers() -> None:
    peers = {sub(i): hg_lease(i) for i in (2, 3, 4, 5)}
    peers[sub(6)] = vx_lease(6)
    lookups = {
        pub(2): RouteLookup(None, IFACE),
        pub(3): RouteLookup(IPv4Address("192.168.1.254"), IFACE),
        pub(4): RouteLookup(None, IFACE + 1),
    }
    out = render_hostgw_peers(peers, iface_index=IFACE, own_ip=pub(99), lookups=lookups)
    assert out.entries == {sub(2): (Route(sub(2), gateway=pub(2), oif=IFACE),)}
    assert "via gateway 192.168.1.254" in out.skipped[sub(3)]
    assert "another interface" in out.skipped[sub(4)]
    assert "no route" in out.skipped[sub(5)]
    assert "not host-gw" in out.skipped[sub(6)]
    assert all("not directly reachable" in out.skipped[sub(i)] for i in (3, 4, 5))


# --------------------------------------------------------------------------- helpers


def test_generated_macs_are_local_unicast() -> None:
    rng = random.Random(1)
    for first in (0x00, 0x01, 0xFF, 0xFE):
        m = generate_vtep_mac(lambda n, f=first: bytes([f]) + rng.randbytes(n - 1))
        assert m == m.lower() and parse_unicast_mac(m) == m
        assert int(m[:2], 16) & 0x02 and not int(m[:2], 16) & 0x01
    assert len({generate_vtep_mac() for _ in range(50)}) == 50


@pytest.mark.parametrize(
    ("release", "affected"),
    [("3.10.0-1160.el7.x86_64", True), ("4.19.0-18-amd64", True), ("5.4.0-150-generic", True),
     ("5.7.19", True), ("5.8.0", False), ("5.15.0-91-generic", False), ("6.18.44-fc", False),
     ("garbage", True)],
)
def test_checksum_workaround_decision(release: str, affected: bool) -> None:
    assert kernel_needs_csum_workaround(release) is affected


def test_device_compatibility() -> None:
    spec = VxlanSpec("flannel.1", 1, 8472, pub(1), IFACE, 1450)
    good = LinkInfo(5, "flannel.1", "vxlan", mac(1), 1400, True, (), 1, 8472, pub(1), IFACE,
                    False, False)
    assert vxlan_incompatibility(spec, good) == ""  # MTU alone is fixed in place
    from dataclasses import replace

    assert "port 4789" in vxlan_incompatibility(spec, replace(good, port=4789))
    assert "VNI" in vxlan_incompatibility(spec, replace(good, vni=2))
    assert "local address" in vxlan_incompatibility(spec, replace(good, local=pub(2)))
    assert "underlay" in vxlan_incompatibility(spec, replace(good, underlay_index=9))
    assert "learning" in vxlan_incompatibility(spec, replace(good, learning=True))
    assert "bridge" in vxlan_incompatibility(spec, replace(good, kind="bridge"))


def test_route_ownership() -> None:
    own = sub(1)
    is_ours = route_owner(NET, lambda: own)
    assert is_ours(Route(sub(2), pub(2), IFACE, proto=111))
    assert not is_ours(Route(sub(2), pub(2), IFACE, proto=3))  # flannel's / someone's
    assert not is_ours(Route(own, None, IFACE, proto=111))  # own subnet (blackhole etc.)
    assert not is_ours(Route(NET, None, IFACE, proto=111))  # whole-network route (udp)
    assert not is_ours(Route(IPv4Network("10.6.0.0/24"), pub(2), IFACE, proto=111))


# --------------------------------------------------------------------------- event orders

Event = tuple[str, int, int]  # (put|del, subnet index, lease variant)


def _lease_variant(i: int, v: int) -> Lease:
    if v == 0:
        return vx_lease(i)
    if v == 1:  # MAC changed (a peer rebooted with a new device)
        return vx_lease(i, data=canonical_json({"VNI": 1, "VtepMAC": mac(0x40 + i)}))
    if v == 2:
        return vx_lease(i, data='{"VNI":1}')  # malformed
    return vx_lease(i, ip=i + 20)  # host moved


def _apply_event(peers: dict[IPv4Network, Lease], event: Event) -> None:
    what, i, v = event
    if what == "put":
        peers[sub(i)] = _lease_variant(i, v)
    else:
        peers.pop(sub(i), None)


def _fold(events: list[Event]) -> dict[IPv4Network, Lease]:
    peers: dict[IPv4Network, Lease] = {}
    for event in events:
        _apply_event(peers, event)
    return peers


def _desired_after(events: list[Event]) -> dict[str, dict[object, object]]:
    """Feed events one by one (incremental render of the changed subnet) into a Reconciler."""
    rec = Reconciler(kernel=None, route_is_ours=lambda r: True, device=DEV)  # type: ignore[arg-type]
    peers: dict[IPv4Network, Lease] = {}
    for event in events:
        _apply_event(peers, event)
        i = event[1]
        out = render({sub(i): peers[sub(i)]} if sub(i) in peers else {})
        rec.set_peer(sub(i), out.entries.get(sub(i)))
    return rec.desired()  # type: ignore[return-value]


def test_event_sequences_reordered_repeated_squashed_agree() -> None:
    rng = random.Random(7)
    for _ in range(40):
        # the final state per subnet is what matters; build sequences ending in it
        finals = {i: rng.choice([("put", 0), ("put", 1), ("put", 2), ("put", 3), ("del", 0)])
                  for i in range(2, 7)}
        tails = [(w, i, v) for i, (w, v) in finals.items()]
        noise = [(rng.choice(["put", "del"]), rng.randrange(2, 7), rng.randrange(4))
                 for _ in range(12)]
        seq = noise + tails
        squashed = [("put", i, v) for i, (w, v) in finals.items() if w == "put"]
        snapshot = render(_fold(seq))
        want = _desired_after(squashed)
        # same final snapshot rendered at once
        flat: dict[str, dict[object, object]] = {"neigh": {}, "fdb": {}, "route": {}}
        for entries in snapshot.entries.values():
            for e in entries:
                flat[e.kind][e.key] = e
        assert want == flat
        assert _desired_after(seq) == want  # with history
        assert _desired_after(seq + tails) == want  # repeated
        for perm in itertools.islice(itertools.permutations(tails), 6):  # reordered
            assert _desired_after(noise + list(perm)) == want


def test_shared_key_survives_one_owner_and_conflicts_pick_the_lowest_subnet() -> None:
    # two leases of one host (same VtepMAC, same PublicIP) share the FDB entry
    a = vx_lease(2, data=canonical_json({"VNI": 1, "VtepMAC": mac(9)}), ip=9)
    b = vx_lease(3, data=canonical_json({"VNI": 1, "VtepMAC": mac(9)}), ip=9)
    rec = Reconciler(kernel=None, route_is_ours=lambda r: True, device=DEV)  # type: ignore[arg-type]
    for lz in (b, a):
        rec.set_peer(lz.subnet, render({lz.subnet: lz}).entries[lz.subnet])
    assert len(rec.desired()["fdb"]) == 1
    rec.set_peer(a.subnet, None)
    assert list(rec.desired()["fdb"].values()) == [Fdb(DEV, mac(9), pub(9))]
    rec.set_peer(b.subnet, None)
    assert rec.desired() == {"neigh": {}, "fdb": {}, "route": {}}
    # conflicting values at one key: the lowest subnet wins, whatever the order
    r1 = Route(sub(2), gateway=pub(1), oif=IFACE)
    r2 = Route(sub(2), gateway=pub(2), oif=IFACE)
    for order in ((sub(5), sub(4)), (sub(4), sub(5))):
        rec2 = Reconciler(kernel=None, route_is_ours=lambda r: True)  # type: ignore[arg-type]
        for s in order:
            rec2.set_peer(s, [r1 if s == sub(4) else r2])
        assert rec2.desired()["route"][r1.key] == r1
