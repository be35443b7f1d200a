"""The compiled udp loop's control side (backends/udpfast.py), without root.

The per-packet verdicts of the compiled loop are checked by the loop tests in test_udp.py and
test_udp_run.py (their ``c`` variants run every crafted packet through it and compare with the
same expectations, counters by reason). Here: its table lookup against the Python
ForwardingTable with thousands of peers of mixed prefix lengths, a dead child replaced, repeated
crashes handed over to the Python loop, and the build refusing what it must.
"""

from __future__ import annotations

import os
import random
import signal
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from support.harness import wait_for
from test_udp import OWN, LoopRig, fast_binary, ipv4

from netagent.backends import udpfast
from netagent.backends.udpfast import FastForwarder, fast_path_binary
from netagent.backends.udpfwd import Forwarder
from netagent.backends.udptrust import build_forwarding_table


@pytest.fixture
def crig() -> Iterator[LoopRig]:
    r = LoopRig(True, 0)
    try:
        yield r
    finally:
        r.close()


def test_longest_prefix_match_agrees_with_the_python_table() -> None:
    """2,000 subnets of /16 to /28 (nested ones too) spread over 8 peer sockets: every
    destination reaches the socket the Python table names, or gets net-unreachable."""
    rng = random.Random(18)
    r = LoopRig(True, 0)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    try:
        for p in peers:
            p.bind(("127.0.0.5", 0))
            p.settimeout(5)
        ports = [p.getsockname()[1] for p in peers]
        subnets: dict[IPv4Network, int] = {}
        while len(subnets) < 2000:
            plen = rng.choice((16, 20, 24, 24, 24, 26, 28))
            net = IPv4Network((rng.randrange(0x0A000000, 0x0A400000) & ~((1 << (32 - plen)) - 1),
                               plen))
            if not net.overlaps(OWN):
                subnets[net] = rng.randrange(len(peers))
        # one table per port: build_forwarding_table takes one port, so merge the routes
        tables = [build_forwarding_table([(n, IPv4Address("127.0.0.5")) for n, i in
                                          subnets.items() if i == k], own_subnet=OWN,
                                         port=ports[k], subnet_len=24) for k in range(len(peers))]
        merged: dict[int, dict[int, tuple[tuple[str, int], bytes]]] = {}
        for t in tables:
            for mask, nets in t.routes:
                merged.setdefault(mask, {}).update(nets)
        table = tables[0].__class__(tuple(sorted(merged.items(), reverse=True)), {}, tables[0].own,
                                    tables[0].own_address, len(subnets), tables[0].subnet_mask)
        r.fwd.table = table
        for _ in range(400):
            net = rng.choice(list(subnets))
            dst = IPv4Address(int(net.network_address) + rng.randrange(net.num_addresses)) \
                if rng.random() < 0.8 else IPv4Address(rng.randrange(0x0A000000, 0x0A400000))
            if dst in OWN:
                continue
            pkt = ipv4(str(OWN.network_address + 5), str(dst), b"lpm!" * 5)
            r.send(pkt)
            want = table.lookup(dst)
            if want is None:
                reply = r.recv()
                assert reply[9] == 1 and reply[20] == 3, dst  # ICMP net unreachable
            else:
                data = peers[ports.index(want[1])].recv(65536)
                assert data[16:20] == dst.packed
    finally:
        r.close()
        for p in peers:
            p.close()


def test_a_killed_child_is_replaced_and_forwarding_resumes(crig: LoopRig) -> None:
    fwd = crig.fwd
    assert isinstance(fwd, FastForwarder)
    crig.send(ipv4("10.60.1.5", "10.60.2.1"))
    crig.peer.recvfrom(65536)
    wait_for(lambda: fwd.stats["tx_packets"] == 1, what="tx counter")
    first = fwd.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: fwd.pid not in (None, first) and fwd.running, timeout=10,
             what="a new child")
    crig.send(ipv4("10.60.1.5", "10.60.2.1"))
    crig.peer.recvfrom(65536)  # the table was pushed to the new child
    wait_for(lambda: fwd.stats["tx_packets"] == 2, what="counters carry on from the old child")
    assert fwd.restarts == 1 and fwd.data_path == "c" and fwd.fallback is None


def test_repeated_crashes_hand_over_to_the_python_loop() -> None:
    r = LoopRig(True, 0)
    old = r.fwd
    old.stop()
    fwd = FastForwarder(fast_binary(), r.tun_agent.fileno(), r.sock, tso=False,
                        fallback=lambda: Forwarder(r.tun_agent.fileno(), r.sock, vnet=True,
                                                   tso=False, threads=1, stats=fwd.stats))
    fwd.table = old.table
    fwd.start()
    r.fwd = fwd
    try:
        for _ in range(udpfast.CRASH_LIMIT):
            wait_for(lambda: fwd.pid is not None or fwd.fallback is not None, timeout=10,
                     what="a child")
            pid = fwd.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: fwd.pid != pid, timeout=10, what="the child gone")
        wait_for(lambda: fwd.fallback is not None and fwd.running, timeout=10,
                 what="the Python loop")
        assert fwd.data_path.startswith("python (the compiled loop exited 3 times")
        r.send(ipv4("10.60.1.5", "10.60.2.1"))
        assert r.peer.recvfrom(65536)[0][16:20] == IPv4Address("10.60.2.1").packed
        r.peer.sendto(ipv4("10.60.2.7", "10.60.1.9"), ("127.0.0.1", r.port))
        assert r.recv()[12:16] == IPv4Address("10.60.2.7").packed
        wait_for(lambda: fwd.stats["rx_packets"] == 1, what="the Python loop's counters")
    finally:
        r.close()
        assert not fwd.running


def test_stop_ends_the_child(crig: LoopRig) -> None:
    fwd = crig.fwd
    assert isinstance(fwd, FastForwarder)
    pid = fwd.pid
    fwd.stop()
    assert not fwd.running
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_no_compiler_no_binary_and_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(udpfast.shutil, "which", lambda name: None)
    binary, why = fast_path_binary()
    assert binary is None and "no C compiler" in why


def test_a_failing_compiler_is_reported(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "cache"
    monkeypatch.setenv("NETAGENT_UDP_FASTPATH_DIR", str(d))
    binary, why = fast_path_binary(cc="false")
    assert binary is None and "false failed" in why
    assert not [p for p in d.iterdir()]  # no half-written file left


def test_the_build_refuses_a_directory_others_may_write(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("NETAGENT_UDP_FASTPATH_DIR", str(d))
    binary, why = fast_path_binary()
    assert binary is None and "no private cache directory" in why
    d.chmod(0o700)
    binary, why = fast_path_binary()
    assert binary is not None and binary.parent == d and why == ""
    assert fast_path_binary() == (binary, "")  # built once, reused
