"""The peer table is a pure fold: reordered, repeated and squashed histories agree."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Network

from netagent.lease import decode_lease
from netagent.peers import PeerTable, RawLease

OWN = IPv4Network("10.5.1.0/24")


def put(n: int, ip: str = "") -> tuple[str, RawLease]:
    value = f'{{"PublicIP":"{ip or f"192.168.0.{n}"}","BackendType":"vxlan"}}'
    return "put", RawLease(f"10.5.{n}.0-24", value.encode(), 7, n)


def delete(n: int) -> tuple[str, str]:
    return "del", f"10.5.{n}.0-24"


def fold(events: list[tuple[str, object]]) -> PeerTable:
    table = PeerTable(OWN)
    for kind, arg in events:
        if kind == "put":
            table.put(arg)  # type: ignore[arg-type]
        else:
            table.delete(arg)  # type: ignore[arg-type]
    return table


def test_own_subnet_is_never_a_peer() -> None:
    t = PeerTable(OWN)
    assert not t.put(put(1)[1])
    assert t.peers == {}
    ch = t.reset([put(1)[1], put(2)[1]])
    assert set(t.peers) == {IPv4Network("10.5.2.0/24")} and ch.added == {IPv4Network("10.5.2.0/24")}


def test_independent_keys_commute() -> None:
    events = [put(2), put(3), delete(2), put(4), put(3, "192.168.9.9")]
    per_key: dict[str, list[tuple[str, object]]] = {}
    for ev in events:
        name = ev[1].name if ev[0] == "put" else ev[1]  # type: ignore[union-attr]
        per_key.setdefault(name, []).append(ev)  # type: ignore[arg-type]
    expected = fold(events).peers
    rng = random.Random(3)
    for _ in range(50):
        # any interleaving that keeps each key's own order gives the same table
        queues = [list(v) for v in per_key.values()]
        merged = []
        while any(queues):
            q = rng.choice([q for q in queues if q])
            merged.append(q.pop(0))
        assert fold(merged).peers == expected


def test_repeated_events_are_idempotent() -> None:
    events = [put(2), put(3), delete(3)]
    doubled = list(itertools.chain.from_iterable((e, e) for e in events))
    assert fold(doubled).peers == fold(events).peers
    t = fold(events)
    assert not t.put(put(2)[1])  # same value again: no change reported


def test_squashed_history_equals_snapshot() -> None:
    events = [put(2), put(3), put(4), delete(3), put(5), delete(5), put(3, "192.168.7.7")]
    folded = fold(events)
    snap = PeerTable(OWN)
    snap.reset([put(2)[1], put(4)[1], put(3, "192.168.7.7")[1]])
    assert snap.peers == folded.peers


def test_reset_reports_the_difference() -> None:
    t = fold([put(2), put(3)])
    ch = t.reset([put(3)[1], put(4)[1]])
    assert ch.added == {IPv4Network("10.5.4.0/24")}
    assert ch.removed == {IPv4Network("10.5.2.0/24")}


def test_reset_takes_already_decoded_leases_and_decodes_only_the_rest() -> None:
    """At start-up the lease choice already decoded the listing: reset reuses those Lease
    objects (no second decode of 5,000 values) and still decodes, and rejects, the others."""
    raws = [put(2)[1], put(3)[1], RawLease("10.5.4.0-24", b"{garbage", 7, 4)]
    pre = {raws[0].name: decode_lease(raws[0].name, raws[0].value, 7, 2)}
    t = PeerTable(OWN)
    ch = t.reset(raws, decoded=pre)
    assert t.peers[IPv4Network("10.5.2.0/24")] is pre["10.5.2.0-24"]
    assert t.peers[IPv4Network("10.5.3.0/24")] == decode_lease("10.5.3.0-24", raws[1].value, 7, 3)
    assert ch.added == {IPv4Network("10.5.2.0/24"), IPv4Network("10.5.3.0/24")}
    assert set(ch.rejected) == {"10.5.4.0-24"} and set(t.invalid) == {"10.5.4.0-24"}
    assert fold([put(2), put(3)]).peers == t.peers, "the same table as decoding everything"


def test_malformed_value_is_rejected_and_keeps_last_good() -> None:
    t = fold([put(2)])
    good = t.peers[IPv4Network("10.5.2.0/24")]
    ch = t.put(RawLease("10.5.2.0-24", b"{garbage", 7, 9))
    assert not ch and "10.5.2.0-24" in ch.rejected
    assert t.peers[IPv4Network("10.5.2.0/24")] == good
    assert "10.5.2.0-24" in t.invalid
    # the same after a re-list
    ch = t.reset([RawLease("10.5.2.0-24", b"{garbage", 7, 9)])
    assert t.peers[IPv4Network("10.5.2.0/24")] == good and not ch.removed
    # a delete removes it for real
    assert t.delete("10.5.2.0-24").removed == {IPv4Network("10.5.2.0/24")}
    assert t.invalid == {}


def test_keys_off_the_grammar_are_ignored() -> None:
    t = PeerTable(OWN)
    ch = t.put(RawLease("not-a-subnet", b'{"PublicIP":"1.2.3.4"}'))
    assert not ch and "not-a-subnet" in ch.rejected and t.peers == {}


def test_leases_outside_the_network_step_aside_and_come_back() -> None:
    t = PeerTable(OWN, IPv4Network("10.5.0.0/16"))
    t.reset([put(2)[1], RawLease("10.6.3.0-24", b'{"PublicIP":"1.2.3.4"}', 7, 1)])
    assert set(t.peers) == {IPv4Network("10.5.2.0/24")}
    assert set(t.outside) == {IPv4Network("10.6.3.0/24")}
    ch = t.set_network(IPv4Network("10.6.0.0/16"))
    assert ch.added == {IPv4Network("10.6.3.0/24")} and ch.removed == {IPv4Network("10.5.2.0/24")}
    ch = t.put(put(4)[1])  # a new lease in the old network: set aside, no change
    assert not ch and IPv4Network("10.5.4.0/24") in t.outside
    t.delete("10.5.4.0-24")
    assert IPv4Network("10.5.4.0/24") not in t.outside


def test_a_short_lived_key_naming_a_peers_subnet_does_not_hide_it_when_it_goes() -> None:
    """Two dual-stack hosts drew one IPv4 subnet at once: the later key (another IPv6 subnet)
    is put, then deleted when its host lets it go. The first host's key must stay a peer."""
    t = PeerTable(IPv4Network("10.5.9.0/24"))
    v = b'{"PublicIP":"192.0.2.1","BackendType":"host-gw"}'
    w = b'{"PublicIP":"192.0.2.3","BackendType":"host-gw"}'
    t.put(RawLease("10.5.1.0-24&fd00:0:0:1::-64", v, 7, 1))
    t.put(RawLease("10.5.1.0-24&fd00:0:0:2::-64", w, 8, 2))  # the loser's key, for a moment
    changes = t.delete("10.5.1.0-24&fd00:0:0:2::-64")
    lease = t.peers[IPv4Network("10.5.1.0/24")]
    assert lease.key == "10.5.1.0-24&fd00:0:0:1::-64" and str(lease.attrs.public_ip) == "192.0.2.1"
    assert IPv4Network("10.5.1.0/24") in changes.added and not changes.removed
    # the usual family switch still ends on the new key: old key put first, deleted last
    t.put(RawLease("10.5.4.0-24", v, 9, 3))
    t.put(RawLease("10.5.4.0-24&fd00:0:0:4::-64", v, 9, 4))
    t.delete("10.5.4.0-24")
    assert t.peers[IPv4Network("10.5.4.0/24")].key == "10.5.4.0-24&fd00:0:0:4::-64"
    t.delete("10.5.4.0-24&fd00:0:0:4::-64")
    assert IPv4Network("10.5.4.0/24") not in t.peers and not t.shadowed
