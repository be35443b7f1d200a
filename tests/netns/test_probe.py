"""Peer probes in IPv6-only and dual-stack networks: targets, ICMPv6 packets, the status entry,
and one real round per socket kind inside a network namespace."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys

import pytest
from support.harness import REPO, RUN_ID, need_root, netns, sh

from netagent.ctl import reach_label
from netagent.lease import Lease, decode_lease
from netagent.probe import (
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    PeerProbe,
    echo_request,
    parse_reply,
    peer_list,
    probe_targets,
)

V4_VALUE = ('{"PublicIP":"192.0.2.5","BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:05"}}')
DUAL_VALUE = ('{"PublicIP":"192.0.2.5","PublicIPv6":"fd00::5","BackendType":"vxlan",'
              '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:05"},'
              '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:05"}}')
V6_VALUE = ('{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::2","BackendType":"vxlan",'
            '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}')


def table(*leases: Lease) -> dict[object, Lease]:
    return {lease.ident: lease for lease in leases}


# --------------------------------------------------------------------------- pure


def test_targets_ipv4_lease_are_unchanged() -> None:
    peers = table(decode_lease("10.5.1.0-24", V4_VALUE))
    assert probe_targets(peers) == {"10.5.1.0/24": ("192.0.2.5", ("10.5.1.1", "10.5.1.0"))}


def test_targets_dual_stack_lease_probe_both_families_under_the_ipv4_key() -> None:
    peers = table(decode_lease("10.5.1.0-24&fd00:1::-64", DUAL_VALUE))
    assert probe_targets(peers) == {
        "10.5.1.0/24": ("192.0.2.5", ("10.5.1.1", "10.5.1.0", "fd00:1::1", "fd00:1::")),
    }


def test_targets_ipv6_only_lease_are_keyed_by_the_ipv6_subnet_and_name_the_ipv6_host() -> None:
    peers = table(decode_lease("0.0.0.0-0&fd00:1::-64", V6_VALUE),
                  decode_lease("0.0.0.0-0&fd00:2::-64",
                               V6_VALUE.replace("fd00::2", "fd00::3")))
    assert probe_targets(peers) == {
        "fd00:1::/64": ("fd00::2", ("fd00:1::1", "fd00:1::")),
        "fd00:2::/64": ("fd00::3", ("fd00:2::1", "fd00:2::")),
    }


def test_icmpv6_echo_request_and_reply() -> None:
    pkt = echo_request(0x1234, 7, socket.AF_INET6)
    typ, code, csum, ident, seq = struct.unpack("!BBHHH", pkt[:8])
    # the kernel owns the ICMPv6 checksum (it covers the source address in a pseudo-header)
    assert (typ, code, csum, ident, seq) == (ICMP6_ECHO_REQUEST, 0, 0, 0x1234, 7)
    reply = bytes([ICMP6_ECHO_REPLY, 0]) + pkt[2:]
    # raw or not, an ICMPv6 socket hands over the message without the IPv6 header
    assert parse_reply(reply, raw=True, family=socket.AF_INET6) == (0x1234, 7)
    assert parse_reply(reply, raw=False, family=socket.AF_INET6) == (0x1234, 7)
    # our own request (seen by a raw socket on lo) and other ICMPv6 types are not replies
    assert parse_reply(pkt, raw=True, family=socket.AF_INET6) is None
    assert parse_reply(bytes([135, 0]) + pkt[2:], raw=True, family=socket.AF_INET6) is None
    assert parse_reply(bytes([0, 0]) + pkt[2:], raw=False, family=socket.AF_INET6) is None
    assert parse_reply(reply[:7], raw=True, family=socket.AF_INET6) is None
    # an IPv4 echo reply is still read as before (raw: behind its IP header)
    v4 = bytes([0, 0]) + echo_request(0x1234, 8)[2:]
    assert parse_reply(bytes([0x45]) + bytes(19) + v4, raw=True) == (0x1234, 8)
    assert parse_reply(reply, raw=False) is None  # type 129 is no ICMPv4 echo reply


def test_peer_list_names_ipv6_only_hosts_by_public_ipv6_and_keeps_the_status_keys() -> None:
    v6 = table(decode_lease("0.0.0.0-0&fd00:1::-64", V6_VALUE))
    results = {"fd00:1::/64": PeerProbe("fd00::2", True, 0.0015, 1700000000.0, None, True)}
    assert peer_list(v6, results) == {"fd00:1::/64": {
        "public_ip": "fd00::2", "backend": "vxlan", "reachable": True, "rtt_ms": 1.5,
        "probed_at": 1700000000.0, "reachable_v4": None, "reachable_v6": True,
    }}
    dual = table(decode_lease("10.5.1.0-24&fd00:1::-64", DUAL_VALUE))
    half = {"10.5.1.0/24": PeerProbe("192.0.2.5", True, 0.002, 1.0, True, False)}
    entry = peer_list(dual, half)["10.5.1.0/24"]
    assert entry["public_ip"] == "192.0.2.5"  # a dual-stack host is still named by its PublicIP
    assert (entry["reachable"], entry["reachable_v4"], entry["reachable_v6"]) == (True, True, False)
    unprobed = peer_list(v6, None)["fd00:1::/64"]
    assert unprobed["reachable"] is None and unprobed["reachable_v6"] is None
    # `netagent status` names the family that does not answer instead of a plain "yes"
    assert reach_label(entry) == "IPv4 only (IPv6 NO)"
    assert reach_label({**entry, "reachable_v4": False, "reachable_v6": True}) == \
        "IPv6 only (IPv4 NO)"
    assert reach_label({**entry, "reachable_v6": True}) == "yes"
    assert reach_label(peer_list(v6, results)["fd00:1::/64"]) == "yes"
    assert reach_label({**entry, "reachable": False, "reachable_v4": False,
                        "reachable_v6": False}) == "NO"
    assert reach_label(unprobed) == "unprobed"


def test_peer_list_orders_a_table_of_both_families_without_comparing_across_them() -> None:
    peers = table(decode_lease("0.0.0.0-0&fd00:1::-64", V6_VALUE),
                  decode_lease("10.5.1.0-24", V4_VALUE))
    assert list(peer_list(peers, None)) == ["10.5.1.0/24", "fd00:1::/64"]


# --------------------------------------------------------------------------- privileged

ROUND = """
import dataclasses, json, socket, sys, threading
from netagent.lease import decode_lease
from netagent.probe import Prober, probe_targets

if sys.argv[1] == "dgram":  # as an unprivileged agent: no raw sockets, only ping sockets
    real = socket.socket
    def no_raw(family=-1, type=-1, proto=-1, fileno=None):
        if type == socket.SOCK_RAW:
            raise PermissionError(1, "Operation not permitted")
        return real(family, type, proto, fileno)
    socket.socket = no_raw

leases = [decode_lease(k, v) for k, v in json.loads(sys.argv[2])]
peers = {lz.ident: lz for lz in leases}
p = Prober(lambda: probe_targets(peers), threading.Event(), timeout=1.0)
try:
    p.round()
    kinds = {socket.AddressFamily(f).name: s.raw for f, s in p._sockets.items() if s}
finally:
    p.close()
print(json.dumps({"kinds": kinds, "results": {k: dataclasses.asdict(r) for k, r in p.results.items()}}))
"""


@pytest.mark.privileged
@pytest.mark.parametrize("kind", ["raw", "dgram"])
def test_one_round_in_a_namespace_tells_answering_from_silent_peers(kind: str) -> None:
    need_root()
    name = f"na{RUN_ID}-pr{random.randrange(16**4):04x}"
    with netns(name) as ns:
        # ping sockets are allowed per namespace by this sysctl (both families)
        sh("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647", ns=ns)
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0", ns=ns)
        sh("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=0", ns=ns)
        # answering peers: their gateway addresses are ours, on lo
        for addr in ("10.5.1.1/32", "fd00:1::1/128", "fd00:3::1/128"):
            sh("ip", "addr", "add", addr, "dev", "lo", ns=ns)
        # a silent peer: routed onto a veth whose other end nobody answers on, so the echoes
        # are sent and time out (ARP/neighbour discovery fails) rather than fail to send
        sh("ip", "link", "add", "pr0", "type", "veth", "peer", "name", "pr1", ns=ns)
        for dev in ("pr0", "pr1"):
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "10.5.2.0/24", "dev", "pr0", ns=ns)
        sh("ip", "-6", "route", "add", "fd00:2::/64", "dev", "pr0", ns=ns)
        leases = [
            ("10.5.1.0-24&fd00:1::-64", DUAL_VALUE),
            ("10.5.2.0-24&fd00:2::-64", DUAL_VALUE.replace(".5", ".6").replace("::5", "::6")),
            ("0.0.0.0-0&fd00:3::-64", V6_VALUE),
            ("0.0.0.0-0&fd00:4::-64", V6_VALUE.replace("fd00::2", "fd00::4")),
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = sh(sys.executable, "-c", ROUND, kind, json.dumps(leases), ns=ns, env=env).stdout
    got = json.loads(out)
    assert got["kinds"] == {"AF_INET": kind == "raw", "AF_INET6": kind == "raw"}
    res = got["results"]
    assert set(res) == {"10.5.1.0/24", "10.5.2.0/24", "fd00:3::/64", "fd00:4::/64"}

    up = res["10.5.1.0/24"]
    assert (up["reachable"], up["reachable_v4"], up["reachable_v6"]) == (True, True, True)
    assert 0 < up["rtt"] < 1.0 and up["public_ip"] == "192.0.2.5"
    down = res["10.5.2.0/24"]
    assert (down["reachable"], down["reachable_v4"], down["reachable_v6"]) == (False, False, False)
    assert down["rtt"] is None

    up6 = res["fd00:3::/64"]
    assert (up6["reachable"], up6["reachable_v4"], up6["reachable_v6"]) == (True, None, True)
    assert 0 < up6["rtt"] < 1.0 and up6["public_ip"] == "fd00::2"
    down6 = res["fd00:4::/64"]  # no route at all: the send fails, the peer is unreachable
    assert (down6["reachable"], down6["reachable_v6"], down6["rtt"]) == (False, False, None)


@pytest.mark.privileged
def test_an_ipv4_network_opens_no_icmpv6_socket() -> None:
    need_root()
    name = f"na{RUN_ID}-pr{random.randrange(16**4):04x}"
    with netns(name) as ns:
        sh("ip", "addr", "add", "10.5.1.1/32", "dev", "lo", ns=ns)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = sh(sys.executable, "-c", ROUND, "raw", json.dumps([("10.5.1.0-24", V4_VALUE)]),
                 ns=ns, env=env).stdout
    got = json.loads(out)
    assert got["kinds"] == {"AF_INET": True}
    r = got["results"]["10.5.1.0/24"]
    assert (r["reachable"], r["reachable_v4"], r["reachable_v6"]) == (True, True, None)
    assert r["rtt"] > 0
