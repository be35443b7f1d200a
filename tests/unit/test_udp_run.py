"""Whole-run receive checks (backends/udprun.py) against a packet-by-packet reference.

The fast path may only accept a run in which every packet passes the per-packet receive checks
and the packets coalesce; the reference below says the same thing one packet and one field at
a time, and random corruptions of real (scapy-built) TCP runs must get the same answer from
both. The loop tests send runs with UDP_SEGMENT through the real Forwarder.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest
from support.harness import wait_for
from test_udp import OWN, PEER, LoopRig, finish, slow_checksum, tcp_segments

from netagent.backends.udpoffload import RunWriter
from netagent.backends.udprun import continues_run, super_header, tcp_run
from netagent.backends.udptun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_LEN

NETS = ((int(PEER.network_address), 0xFFFFFF00),)
OWN_NET = (int(OWN.network_address), 0xFFFFFF00)


def in_net(addr: bytes, net: IPv4Network) -> bool:
    return int.from_bytes(addr, "big") & int(net.netmask) == int(net.network_address)


def passes_receive_checks(p: bytes) -> bool:
    """The per-packet checks of Forwarder._udp_to_tun, written out plainly."""
    if len(p) < 20 or p[0] >> 4 != 4:
        return False
    ihl = (p[0] & 15) * 4
    if ihl < 20 or ihl > len(p) or struct.unpack("!H", p[2:4])[0] != len(p):
        return False
    if slow_checksum(p[:ihl]) != 0:
        return False
    return in_net(p[12:16], PEER) and in_net(p[16:20], OWN) and p[8] > 1


def reference_run(pkts: list[bytes]) -> int:
    """How many leading packets the fast path may merge, decided packet by packet."""
    first = pkts[0]
    stride = len(first)
    if not passes_receive_checks(first) or first[0] != 0x45 or first[9] != 6 \
            or first[6] & 0x3F or first[7] or first[33] != 0x10:
        return 0
    hlen = 20 + (first[32] >> 4) * 4
    if hlen < 40 or hlen >= stride:
        return 0
    seq0 = struct.unpack("!I", first[24:28])[0]
    plen = stride - hlen
    m = len(pkts)
    for i, p in enumerate(pkts):
        same = (p[0:4] == first[0:4] and p[6:10] == first[6:10] and p[12:24] == first[12:24]
                and p[28:33] == first[28:33] and p[34:36] == first[34:36]
                and p[40:hlen] == first[40:hlen])
        if not (same and passes_receive_checks(p) and
                struct.unpack("!I", p[24:28])[0] == seq0 + i * plen):
            m = i
            break
    for i in range(m):
        if pkts[i][33] != 0x10:
            return i + 1 if pkts[i][33] == 0x18 else i
    return m


def run_of(pkts: list[bytes]) -> int:
    buf = memoryview(bytearray(b"".join(pkts)))
    return tcp_run(buf, len(pkts[0]), len(pkts), NETS, *OWN_NET)[0]


def test_a_clean_run_is_taken_whole() -> None:
    segs = tcp_segments(44, last_flags="A")
    assert run_of(segs) == 44
    assert run_of(tcp_segments(44)) == 44  # PSH on the last one ends it, inside the run
    assert run_of(tcp_segments(2)) == 2


def test_runs_end_where_a_rule_breaks() -> None:
    a = tcp_segments(10, flags="A", last_flags="PA")
    b = tcp_segments(10, seq=5000 + 10 * 1000)
    assert run_of(a + b) == 10  # PSH ends the first super-packet
    gap = tcp_segments(5, last_flags="A") + tcp_segments(5, seq=5000 + 6 * 1000)
    assert run_of(gap) == 5
    # a packet of another flow (other source port) in the middle
    run = tcp_segments(8, last_flags="A")
    p = bytearray(run[3])
    p[20:22] = struct.pack("!H", 40001)  # TCP source port (checksum is not checked here)
    run[3] = bytes(p)
    assert run_of(run) == 3
    assert run_of(tcp_segments(8, flags="PA")) == 0  # PSH on every packet: no run


def test_random_corruption_matches_the_packet_by_packet_reference() -> None:
    rng = random.Random(1234)
    base = tcp_segments(30, last_flags="A")
    stride = len(base[0])
    checked = 0
    for trial in range(1500):
        pkts = [bytearray(p) for p in base]
        for _ in range(rng.choice((1, 1, 2, 3))):
            p = pkts[rng.randrange(len(pkts))]
            where = rng.choice((rng.randrange(stride), rng.randrange(40)))
            p[where] = rng.randrange(256) if trial % 3 else p[where] ^ (1 << rng.randrange(8))
        if trial % 5 == 0:  # a valid header checksum over the corrupted header
            p[10:12] = b"\0\0"
            p[10:12] = struct.pack("!H", slow_checksum(bytes(p[:20])))
        raw = [bytes(p) for p in pkts]
        want = reference_run(raw)
        got = run_of(raw)
        # ID + checksum ≡ 0 makes the lane check ambiguous; the fast path then merges nothing
        ambiguous = (struct.unpack("!H", raw[0][4:6])[0] +
                     struct.unpack("!H", raw[0][10:12])[0]) % 0xFFFF == 0
        if ambiguous and want:
            assert got in (0, 1)
            continue
        assert got == want, (trial, got, want)
        for p in raw[:got]:
            assert passes_receive_checks(p)
        checked += 1
    assert checked > 1000


def test_spoofed_or_misdirected_runs_are_refused_from_the_first_packet() -> None:
    run = tcp_segments(6, last_flags="A")
    for offset, value in ((12, 11), (14, 3), (16, 11), (18, 7)):  # src/dst outside the subnets
        pkts = [bytearray(p) for p in run]
        for p in pkts:
            p[offset] = value
            p[10:12] = b"\0\0"
            p[10:12] = struct.pack("!H", slow_checksum(bytes(p[:20])))
        assert run_of([bytes(p) for p in pkts]) == 0


def check_super_packet(write: bytes, segs: list[bytes]) -> None:
    """`write` is one valid GSO super-packet carrying exactly the payloads of `segs`."""
    from scapy.layers.inet import IP, TCP

    assert struct.unpack("<BBHHHH", write[:VNET_LEN]) == (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52,
                                                          1000, 20, 16)
    raw = finish(write)
    pkt = IP(raw)
    assert pkt.len == len(raw) == 52 + sum(len(s) - 52 for s in segs)
    assert pkt.ttl == segs[0][8] - 1 and pkt[TCP].seq == IP(segs[0])[TCP].seq
    assert ("P" in str(pkt[TCP].flags)) == ("P" in str(IP(segs[-1])[TCP].flags))
    assert bytes(pkt[TCP].payload) == b"".join(s[52:] for s in segs)
    assert slow_checksum(raw[:20]) == 0
    pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(raw) - 20)
    assert slow_checksum(pseudo + raw[20:]) == 0


def writer() -> tuple[RunWriter, list[bytes]]:
    written: list[bytes] = []
    return RunWriter(lambda iov: written.append(b"".join(bytes(v) for v in iov))), written


def test_a_run_and_its_short_tail_make_one_valid_packet() -> None:
    segs = tcp_segments(20, last_flags="A") + tcp_segments(1, seq=5000 + 20 * 1000,
                                                           mss=300, short_last=300)
    whole = memoryview(bytearray(b"".join(segs)))
    w, written = writer()
    assert w.start(whole, 1052, 20, len(whole), 52, source=7) == (len(whole), 21)
    (write,) = written  # the short tail ended the run: written at once
    check_super_packet(write, segs)


def test_a_run_waits_for_the_rest_of_its_tso_packet_in_the_next_datagram() -> None:
    """44 segments in one GSO datagram, the 45th in the next one: one super-packet."""
    segs = tcp_segments(45, last_flags="PA")
    run = memoryview(bytearray(b"".join(segs[:44])))
    last = memoryview(bytearray(segs[44]))
    w, written = writer()
    assert w.start(run, 1052, 44, len(run), 52, source=7) == (len(run), 44)
    assert not written  # pending: the next datagram may continue it
    assert not w.extend(last, len(last), source=8)  # another peer cannot
    assert w.extend(last, len(last), source=7) and len(written) == 1
    check_super_packet(written[0], segs)
    # a pending run that nothing continues is written by flush(), alone
    w.start(run, 1052, 44, len(run), 52, source=7)
    assert not w.extend(memoryview(bytearray(tcp_segments(1, seq=1)[0])), 1052, source=7)
    w.flush()
    assert len(written) == 2
    check_super_packet(written[1], segs[:44])
    # the rest as a run of two (a TSO packet of 46 segments is sent as 44 + 2)
    w.start(run, 1052, 44, len(run), 52, source=7)
    segs46 = tcp_segments(46, last_flags="PA")
    two = memoryview(bytearray(b"".join(segs46[44:])))
    assert w.start(two, 1052, 2, len(two), 52, source=7) == (len(two), 2)
    assert len(written) == 3
    check_super_packet(written[2], segs46)
    # ...but not a run from another peer, nor one that does not continue the sequence
    for source, seq in ((8, 5000 + 44 * 1000), (7, 5000 + 45 * 1000)):
        w.start(run, 1052, 44, len(run), 52, source=7)
        other = memoryview(bytearray(b"".join(tcp_segments(2, seq=seq))))
        w.start(other, 1052, 2, len(other), 52, source=source)
        assert len(written) == 5 and w.first is None  # the 44 alone, then the 2 (PSH)
        check_super_packet(written[3], segs[:44])
        del written[3:]
    # a PSH inside the datagram ends the run there and writes it at once
    w.start(memoryview(bytearray(b"".join(segs[34:45]))), 1052, 11, 11 * 1052, 52, source=7)
    assert len(written) == 4 and w.first is None


def test_a_tail_that_does_not_continue_is_left_for_the_slow_path() -> None:
    run = tcp_segments(5, last_flags="A")
    first = memoryview(run[0])
    ok = tcp_segments(1, seq=5000 + 5 * 1000, mss=10, short_last=10)[0]
    assert continues_run(first, memoryview(ok), len(ok), 52, 10000, 1000)
    assert not continues_run(first, memoryview(ok), len(ok), 52, 10001, 1000)  # seq
    bad = bytearray(ok)
    bad[10] ^= 1
    assert not continues_run(first, memoryview(bytes(bad)), len(bad), 52, 10000, 1000)
    assert not continues_run(first, memoryview(ok), len(ok), 52, 10000, 5)  # longer than mss
    other = bytearray(ok)
    other[15] ^= 1  # another source address (in the subnet or not, it is another flow)
    assert not continues_run(first, memoryview(bytes(other)), len(ok), 52, 10000, 1000)


def test_super_header_decrements_ttl_once_and_sets_push() -> None:
    (p,) = tcp_segments(1, last_flags="A")
    out = memoryview(bytearray(VNET_LEN + 80))
    n = super_header(out, memoryview(p), 52, 52 + 3000, 1000, True)
    hdr = bytes(out[VNET_LEN:n])
    assert hdr[8] == p[8] - 1 and hdr[33] == 0x18 and slow_checksum(hdr[:20]) == 0


# --------------------------------------------------------------------------- through the loop


@pytest.fixture(params=[1, 0], ids=["python", "c"])
def rig(request: pytest.FixtureRequest) -> Iterator[LoopRig]:
    r = LoopRig(True, request.param)
    try:
        yield r
    finally:
        r.close()


def send_run(rig: LoopRig, pkts: list[bytes]) -> None:
    rig.peer.sendmsg([b"".join(pkts)], [(socket.SOL_UDP, 103, struct.pack("=H", len(pkts[0])))],
                     0, ("127.0.0.1", rig.port))


def test_loop_merges_a_gso_run_into_one_tun_write(rig: LoopRig) -> None:
    segs = tcp_segments(30, last_flags="A") + tcp_segments(1, seq=5000 + 30 * 1000, mss=400,
                                                           short_last=400)
    send_run(rig, segs)
    from scapy.layers.inet import IP, TCP

    data = rig.tun.recv(65536 + VNET_LEN)
    assert data[1] == VNET_GSO_TCPV4
    pkt = IP(finish(data))
    assert bytes(pkt[TCP].payload) == b"".join(s[52:] for s in segs)
    wait_for(lambda: rig.fwd.stats["rx_packets"] == 31, what="rx counter")
    assert rig.fwd.stats["rx_bytes"] == sum(len(s) for s in segs)
    assert rig.fwd.stats["rx_gro_merged"] == 30 and not rig.drops()


def test_loop_splits_a_run_at_a_bad_packet_and_counts_it(rig: LoopRig) -> None:
    segs = tcp_segments(12, last_flags="A")
    bad = bytearray(segs[5])
    bad[11] ^= 0x40  # header checksum
    spoof = bytearray(segs[8])
    spoof[14] = 9  # inner source 10.60.9.x: outside the peer's subnet
    spoof[10:12] = b"\0\0"
    spoof[10:12] = struct.pack("!H", slow_checksum(bytes(spoof[:20])))
    run = [*segs[:5], bytes(bad), *segs[6:8], bytes(spoof), *segs[9:]]
    send_run(rig, run)
    from scapy.layers.inet import IP, TCP

    got = b""
    while len(got) < 10 * 1000:
        got += bytes(IP(finish(rig.tun.recv(65536 + VNET_LEN)))[TCP].payload)
    keep = [s for i, s in enumerate(segs) if i not in (5, 8)]
    assert got == b"".join(s[52:] for s in keep)
    wait_for(lambda: rig.drops() == {"malformed": 1, "spoofed_inner_source": 1},
             what="the two bad packets counted")
    assert rig.fwd.stats["rx_packets"] == 10


def test_loop_joins_a_tso_packet_split_over_two_datagrams(rig: LoopRig) -> None:
    from scapy.layers.inet import IP, TCP

    segs = tcp_segments(45)
    send_run(rig, segs[:44])
    rig.peer.sendto(segs[44], ("127.0.0.1", rig.port))
    got, writes = b"", 0
    while len(got) < 45 * 1000:
        got += bytes(IP(finish(rig.tun.recv(65536 + VNET_LEN)))[TCP].payload)
        writes += 1
    assert got == b"".join(s[52:] for s in segs)
    assert writes <= 2  # one, unless the second datagram came after the loop's next poll
    wait_for(lambda: rig.fwd.stats["rx_packets"] == 45, what="rx counter")


@pytest.mark.parametrize("threads", [1, 2, 0], ids=["1", "2", "c"])
def test_loop_sends_a_tso_packet_as_single_valid_datagrams(threads: int) -> None:
    """A TCP super-packet from the TUN (virtio GSO header, partial checksum) leaves as one
    complete IPv4 packet per datagram, as a flannel peer must receive it."""
    from scapy.layers.inet import IP, TCP

    r = LoopRig(True, threads)
    try:
        (big,) = tcp_segments(1, mss=20 * 1000 + 123, seq=777)
        pkt = bytearray(ipv4_swap(big, "10.60.1.5", "10.60.2.9"))
        # what the kernel hands over with TUN_F_TSO4: the TCP checksum field holds the
        # pseudo-header sum only (CHECKSUM_PARTIAL)
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(pkt) - 20)
        pkt[36:38] = struct.pack("!H", ~slow_checksum(bytes(pseudo)) & 0xFFFF)
        vnet = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1000, 20, 16)
        r.tun.send(vnet + bytes(pkt))
        got = [r.peer.recvfrom(65536)[0] for _ in range(21)]
        payload = b""
        for k, raw in enumerate(got):
            assert len(raw) == IP(raw).len <= 1052 and slow_checksum(raw[:20]) == 0
            tcp_pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(raw) - 20)
            assert slow_checksum(tcp_pseudo + raw[20:]) == 0
            assert IP(raw)[TCP].seq == 777 + 1000 * k and IP(raw).ttl == 62
            payload += raw[52:]
        assert payload == big[52:]
        wait_for(lambda: r.fwd.stats["tx_packets"] == 21, what="tx counter")
        assert r.fwd.stats["tx_tso_packets"] >= 1 and not r.drops()
    finally:
        r.close()


def ipv4_swap(pkt: bytes, src: str, dst: str) -> bytes:
    """`pkt` with other addresses and a fresh IP header checksum."""
    p = bytearray(pkt)
    p[12:16] = socket.inet_aton(src)
    p[16:20] = socket.inet_aton(dst)
    p[10:12] = b"\0\0"
    p[10:12] = struct.pack("!H", slow_checksum(bytes(p[:20])))
    return bytes(p)


def test_a_kernel_without_udp_gso_or_gro_gets_the_plain_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """UDP_SEGMENT / UDP_GRO unknown (Linux < 4.18 / 5.0): found out at start, switched off
    (and with them TSO, which needs UDP GSO to send its segments), and traffic still flows."""
    import netagent.backends.udpfwd as udpfwd

    monkeypatch.setattr(udpfwd, "sockopt_supported", lambda *a: False)
    r = LoopRig(True, 1)
    try:
        assert not (r.fwd.gso or r.fwd.udp_gro or r.fwd.tso)
        segs = tcp_segments(3, last_flags="A")
        for s in segs:
            r.peer.sendto(s, ("127.0.0.1", r.port))
        from scapy.layers.inet import IP, TCP

        got = b""
        while len(got) < 3000:
            got += bytes(IP(finish(r.tun.recv(65536 + VNET_LEN)))[TCP].payload)
        assert got == b"".join(s[52:] for s in segs)
        r.send(ipv4_swap(segs[0], "10.60.1.5", "10.60.2.9"))
        assert len(r.peer.recvfrom(65536)[0]) == len(segs[0])
    finally:
        r.close()


@pytest.mark.parametrize("threads", [1, 2, 0], ids=["1", "2", "c"])
def test_stop_is_prompt_while_the_loop_never_idles(threads: int) -> None:
    import threading
    import time

    from test_udp import ipv4

    r = LoopRig(True, threads)
    done = threading.Event()
    pkt = ipv4("10.60.2.7", "10.60.1.9", b"x" * 1000)

    def flood() -> None:
        while not done.is_set():
            try:
                r.peer.sendto(pkt, ("127.0.0.1", r.port))
            except OSError:
                pass

    t = threading.Thread(target=flood)
    t.start()
    try:
        wait_for(lambda: r.fwd.stats["rx_packets"] > 1000, what="the loop busy")
        t0 = time.monotonic()
        r.fwd.stop()
        assert not r.fwd.running and time.monotonic() - t0 < 2
    finally:
        done.set()
        t.join()
        r.close()
