"""The prober's per-round choice of addresses and its precomputed checksums (pure parts)."""

from __future__ import annotations

import socket
import threading

from netagent.probe import Prober, _echo_sum, echo_request, fast_echo_request

V4 = socket.AF_INET
V6 = socket.AF_INET6


def test_fast_echo_request_is_echo_request() -> None:
    for ident in (0, 1, 0x1234, 0xFFFF):
        base = _echo_sum(ident)
        for seq in range(0, 0x10000, 7):
            assert fast_echo_request(ident, seq, V4, base) == echo_request(ident, seq)
        assert fast_echo_request(ident, 9, V6, base) == echo_request(ident, 9, V6)


def test_first_round_tries_every_address_then_one_per_family() -> None:
    p = Prober(lambda: {}, threading.Event())
    addrs = ("10.5.2.1", "10.5.2.0", "fd00:2::1", "fd00:2::")
    assert p._choose("a", addrs) == [("10.5.2.1", V4), ("10.5.2.0", V4),
                                     ("fd00:2::1", V6), ("fd00:2::", V6)]
    # IPv4 answered on the network address, IPv6 on nothing
    p._last = {("a", V4): "10.5.2.0", ("a", V6): None}
    for rounds in range(4):
        p.rounds = rounds
        got = p._choose("a", addrs)
        assert got[0] == ("10.5.2.0", V4)  # sticks to the one that answers
        assert got[1] == (("fd00:2::1", "fd00:2::")[rounds % 2], V6)  # in turn while silent
        assert len(got) == 2
    p._last = {("a", V4): "10.5.9.9"}  # an address the peer no longer has: in turn
    assert p._choose("a", addrs[:2]) == [(addrs[p.rounds % 2], V4)]
