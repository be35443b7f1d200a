"""udp backend without root: pure helpers, table rendering, and the real packet loop.

The loop runs against a SOCK_SEQPACKET socketpair standing in for the TUN fd (one read = one
packet, like a TUN) and real UDP sockets on loopback addresses (127.0.0.x are all local), so
the same code that forwards in production is exercised here, counters included.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from support.harness import wait_for

from netagent.backends.udp import render_udp_peers
from netagent.backends.udpfast import FastForwarder, fast_path_binary
from netagent.backends.udpfwd import Forwarder
from netagent.backends.udpoffload import Coalescer, complete_checksum
from netagent.backends.udprun import SliceCache, numpy_payload_sums, payload_sums_python, segment_tso
from netagent.backends.udpstats import DROP_REASONS
from netagent.backends.udptrust import (
    build_forwarding_table,
    decrement_ttl,
    header_ok,
    ip_checksum,
    net_unreachable,
)
from netagent.backends.udptun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_LEN
from netagent.lease import Lease, LeaseAttrs, decode_attrs, encode_attrs

NET = IPv4Network("10.60.0.0/16")
OWN = IPv4Network("10.60.1.0/24")
PEER = IPv4Network("10.60.2.0/24")


def slow_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, payload: bytes = b"x" * 20, ttl: int = 64, proto: int = 17,
         frag: int = 0) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, frag, ttl,
                                proto, 0, IPv4Address(src).packed, IPv4Address(dst).packed))
    struct.pack_into("!H", hdr, 10, slow_checksum(bytes(hdr)))
    return bytes(hdr) + payload


# --------------------------------------------------------------------------- pure helpers


def test_checksum_matches_the_word_loop_on_random_data() -> None:
    rng = random.Random(4)
    cases = [b"", b"\0\0", b"\xff\xff", b"\x01", b"\xff\xff\xff\xff"]
    cases += [rng.randbytes(rng.randrange(0, 1600)) for _ in range(500)]
    for data in cases:
        assert ip_checksum(data) == slow_checksum(data), data.hex()


def test_header_check_and_ttl_decrement_keep_the_checksum_valid() -> None:
    for ttl in range(2, 256):
        pkt = bytearray(ipv4("10.60.2.5", "10.60.1.9", ttl=ttl))
        assert header_ok(pkt[:20])
        assert decrement_ttl(pkt)
        assert pkt[8] == ttl - 1
        assert header_ok(pkt[:20]) and slow_checksum(bytes(pkt[:20])) == 0
    bad = bytearray(ipv4("10.60.2.5", "10.60.1.9"))
    bad[11] ^= 1
    assert not header_ok(bad[:20])
    one = bytearray(ipv4("10.60.2.5", "10.60.1.9", ttl=1))
    assert not decrement_ttl(one) and one[8] == 1  # left untouched, caller drops it


def test_net_unreachable_like_flannel() -> None:
    from scapy.layers.inet import ICMP, IP

    orig = ipv4("10.60.1.7", "10.99.0.1", b"\x12\x34\x00\x35" + b"q" * 40)
    reply = net_unreachable(orig, OWN.network_address)
    assert reply is not None
    pkt = IP(reply)
    assert (pkt.src, pkt.dst, pkt.ttl) == ("10.60.1.0", "10.60.1.7", 8)
    assert pkt[ICMP].type == 3 and pkt[ICMP].code == 0
    assert slow_checksum(reply[:20]) == 0 and slow_checksum(reply[20:]) == 0
    assert bytes(pkt[ICMP].payload)[:28] == orig[:28]
    # never for ICMP, non-first fragments, or garbage
    assert net_unreachable(ipv4("10.60.1.7", "10.99.0.1", proto=1), OWN.network_address) is None
    assert net_unreachable(ipv4("10.60.1.7", "10.99.0.1", frag=5), OWN.network_address) is None
    assert net_unreachable(b"\x60" + bytes(39), OWN.network_address) is None


def test_longest_prefix_match_with_thousands_of_peers() -> None:
    peers = [(IPv4Network(f"10.{i // 256}.{i % 256}.0/24"), IPv4Address(f"192.168.{i // 250}."
                                                                        f"{i % 250 + 1}"))
             for i in range(5000)]
    peers.append((IPv4Network("10.1.2.128/25"), IPv4Address("172.16.0.9")))  # more specific
    peers.append((IPv4Network("10.3.0.0/16"), IPv4Address("172.16.0.10")))  # less specific
    table = build_forwarding_table(peers, own_subnet=OWN, port=8285)
    assert table.peers == 5002
    assert [bin(m).count("1") for m, _ in table.routes] == [25, 24, 16]
    assert table.lookup(IPv4Address("10.1.2.200")) == ("172.16.0.9", 8285)
    assert table.lookup(IPv4Address("10.1.2.100")) == (str(peers[258][1]), 8285)
    assert table.lookup(IPv4Address("10.19.135.7")) == (str(peers[19 * 256 + 135][1]), 8285)
    assert table.lookup(IPv4Address("10.200.0.1")) is None


def lease(subnet: IPv4Network, ip: str, btype: str = "") -> Lease:
    return Lease(subnet, LeaseAttrs(public_ip=IPv4Address(ip), backend_type=btype))


def test_render_accepts_udp_leases_and_skips_others() -> None:
    peers = {
        PEER: lease(PEER, "192.0.2.2"),  # flannel's udp lease: no BackendType
        IPv4Network("10.60.3.0/24"): lease(IPv4Network("10.60.3.0/24"), "192.0.2.3", "udp"),
        IPv4Network("10.60.4.0/24"): lease(IPv4Network("10.60.4.0/24"), "192.0.2.4", "vxlan"),
        IPv4Network("10.60.5.0/24"): lease(IPv4Network("10.60.5.0/24"), "192.0.2.1"),  # our IP
        IPv4Network("10.60.1.0/25"): lease(IPv4Network("10.60.1.0/25"), "192.0.2.6"),  # overlap
    }
    table, skipped = render_udp_peers(peers, own_subnet=OWN, own_ip=IPv4Address("192.0.2.1"),
                                      port=9000)
    assert table.peers == 2
    assert table.lookup(IPv4Address("10.60.2.9")) == ("192.0.2.2", 9000)
    assert table.lookup(IPv4Address("10.60.3.9")) == ("192.0.2.3", 9000)
    assert set(skipped) == {IPv4Network("10.60.4.0/24"), IPv4Network("10.60.5.0/24"),
                            IPv4Network("10.60.1.0/25")}
    assert "vxlan" in skipped[IPv4Network("10.60.4.0/24")]
    assert table.sources[int(IPv4Address("192.0.2.2"))] == ((int(PEER.network_address),
                                                             0xFFFFFF00),)


def test_lease_value_is_flannels_udp_value() -> None:
    """No BackendType, no BackendData: byte-identical to what flanneld's udp backend writes."""
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.0.7"), backend_type="", backend_data="")
    assert encode_attrs(attrs) == '{"PublicIP":"10.0.0.7","PublicIPv6":null}'
    assert decode_attrs(encode_attrs(attrs)) == attrs
    from netagent.backends import backend_class

    assert backend_class("udp").__name__ == "UdpBackend"


# --------------------------------------------------------------------------- the loop


def fast_binary() -> Any:
    """The compiled loop (backends/udpfast.c), built as the backend builds it."""
    binary, why = fast_path_binary()
    if binary is None:
        pytest.skip(f"compiled udp loop unavailable: {why}")
    return binary


class LoopRig:
    """A Forwarder on a socketpair "TUN" and 127.0.0.1:<port>, with peer sockets around it.

    With ``vnet`` every TUN read/write carries the 10-byte virtio header, as on flannel0.
    ``threads`` 0: the compiled loop (:class:`~backends.udpfast.FastForwarder`, always vnet)
    instead of the Python one, so every loop test checks both against the same verdicts.
    """

    def __init__(self, vnet: bool, threads: int = 1) -> None:
        self.h = VNET_LEN if vnet else 0
        self.tun_agent, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_blocking(self.tun_agent.fileno(), False)
        self.tun.settimeout(5)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the known peer
        self.peer.bind(("127.0.0.2", self.port))
        self.peer.settimeout(5)
        self.stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stranger.bind(("127.0.0.3", 0))
        self.fwd: Forwarder | FastForwarder
        if threads == 0:
            assert vnet
            self.fwd = FastForwarder(fast_binary(), self.tun_agent.fileno(), self.sock, tso=False)
        else:
            self.fwd = Forwarder(self.tun_agent.fileno(), self.sock, vnet=vnet, gro=vnet,
                                 tso=False, threads=threads)
        self.fwd.table = build_forwarding_table([(PEER, IPv4Address("127.0.0.2"))],
                                                own_subnet=OWN, port=self.port, subnet_len=24)
        self.fwd.start()

    def close(self) -> None:
        self.fwd.stop()
        for s in (self.tun_agent, self.tun, self.sock, self.peer, self.stranger):
            s.close()

    def send(self, packet: bytes) -> None:
        """As if the kernel routed `packet` into flannel0."""
        self.tun.send(bytes(self.h) + packet)

    def recv(self) -> bytes:
        """What the loop wrote into flannel0 (virtio header checked and removed)."""
        data = self.tun.recv(65536 + self.h)
        if self.h:
            assert data[:2] in (b"\0\0", bytes([VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4]))
        return data[self.h:]

    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.fwd.stats["drops"].items() if v}


def drain(sock: socket.socket) -> None:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(timeout)


@pytest.fixture(params=[(True, 1), (True, 2), (False, 1), (False, 2), (True, 0)],
                ids=["vnet", "vnet-2threads", "plain", "plain-2threads", "c"])
def rig(request: pytest.FixtureRequest) -> Iterator[LoopRig]:
    r = LoopRig(*request.param)
    try:
        yield r
    finally:
        r.close()


def test_tun_to_udp_forwards_with_ttl_decrement(rig: LoopRig) -> None:
    pkts = [ipv4("10.60.1.5", f"10.60.2.{i}", bytes([i]) * (20 + i), ttl=10) for i in range(1, 200)]
    for p in pkts:
        rig.send(p)
    for p in pkts:
        data, addr = rig.peer.recvfrom(65536)
        assert addr == ("127.0.0.1", rig.port)
        assert data[8] == 9 and slow_checksum(data[:20]) == 0
        assert data[:8] + data[9:10] + data[12:] == p[:8] + p[9:10] + p[12:]
    wait_for(lambda: rig.fwd.stats["tx_packets"] == len(pkts), what="tx counter")
    assert rig.fwd.stats["tx_bytes"] == sum(len(p) for p in pkts)


def test_tun_to_udp_no_route_answers_net_unreachable(rig: LoopRig) -> None:
    rig.send(ipv4("10.60.1.5", "10.61.0.1"))
    reply = rig.recv()
    assert reply[9] == 1 and reply[20] == 3 and reply[21] == 0
    assert reply[12:16] == IPv4Address("10.61.0.0").packed  # the would-be subnet, not local
    rig.send(ipv4("10.60.1.5", "10.60.2.1", ttl=1))
    rig.send(b"\x60" + bytes(50))  # IPv6 from the kernel
    wait_for(lambda: rig.drops() == {"no_route": 1, "ttl_expired": 1, "not_ipv4": 1},
             what="tx drops")


def test_udp_to_tun_accepts_only_what_the_lease_vouches_for(rig: LoopRig) -> None:
    to = ("127.0.0.1", rig.port)
    good = ipv4("10.60.2.7", "10.60.1.9", b"hello" * 10, ttl=5)
    rig.peer.sendto(good, to)
    got = rig.recv()
    assert got[8] == 4 and got[12:] == good[12:] and slow_checksum(got[:20]) == 0
    bad_csum = bytearray(good)
    bad_csum[10] ^= 0xFF
    sent = {
        "unknown_source": [(rig.stranger, good)],
        "malformed": [(rig.peer, b""), (rig.peer, b"\x45"), (rig.peer, good[:-1]),
                      (rig.peer, good + b"z"), (rig.peer, b"\x65" + good[1:]),
                      (rig.peer, b"\x44" + good[1:]), (rig.peer, b"\x4f" + good[1:]),
                      (rig.peer, bytes(bad_csum)), (rig.peer, bytes(40))],
        "spoofed_inner_source": [(rig.peer, ipv4("10.60.3.7", "10.60.1.9")),
                                 (rig.peer, ipv4("10.60.1.7", "10.60.1.9"))],
        "not_for_us": [(rig.peer, ipv4("10.60.2.7", "10.60.5.9")),
                       (rig.peer, ipv4("10.60.2.7", "8.8.8.8"))],
        "ttl_expired": [(rig.peer, ipv4("10.60.2.7", "10.60.1.9", ttl=1))],
    }
    for items in sent.values():
        for s, data in items:
            s.sendto(data, to)
    rig.peer.sendto(good, to)  # still forwarding after all that
    assert rig.recv()[12:] == good[12:]
    want = {k: len(v) for k, v in sent.items()}
    wait_for(lambda: rig.drops() == want, what=f"drops {want}")
    assert rig.fwd.stats["rx_packets"] == 2
    rig.tun.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rig.tun.recv(65536)  # nothing else reached the "TUN"


def test_random_garbage_never_kills_the_loop(rig: LoopRig) -> None:
    rng = random.Random(7)
    to = ("127.0.0.1", rig.port)
    good = ipv4("10.60.2.7", "10.60.1.9")
    for i in range(2000):
        data = bytearray(good if i % 2 else rng.randbytes(rng.randrange(0, 120)))
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        rig.peer.sendto(bytes(data), to)  # from a known peer: the receive checks
        rig.send(bytes(data))  # from the "kernel": the send side
        if i % 50 == 0:
            drain(rig.tun)
    rig.peer.sendto(good, to)

    def accounted() -> bool:
        drain(rig.tun)
        st = rig.fwd.stats
        return st["rx_packets"] + st["tx_packets"] + sum(st["drops"].values()) >= 3900

    wait_for(accounted, timeout=20, what="the datagrams to be forwarded or counted as drops")
    assert rig.fwd.running
    assert set(rig.fwd.stats["drops"]) == set(DROP_REASONS)


def test_table_swap_while_running(rig: LoopRig) -> None:
    rig.send(ipv4("10.60.1.5", "10.60.2.1"))
    rig.peer.recvfrom(65536)
    # the peer moves to another address: the new table takes effect for the next packet
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.4", rig.port))
    other.settimeout(5)
    try:
        rig.fwd.table = build_forwarding_table([(PEER, IPv4Address("127.0.0.4"))],
                                               own_subnet=OWN, port=rig.port)
        rig.send(ipv4("10.60.1.5", "10.60.2.1"))
        assert other.recvfrom(65536)[1][0] == "127.0.0.1"
        # ...and the old address is no longer trusted
        rig.peer.sendto(ipv4("10.60.2.7", "10.60.1.9"), ("127.0.0.1", rig.port))
        wait_for(lambda: rig.drops().get("unknown_source") == 1, what="old peer untrusted")
    finally:
        other.close()


def test_stop_is_prompt_and_idle_loop_sleeps(rig: LoopRig) -> None:
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.2  # idle: both threads are parked in poll()
    rig.fwd.stop()
    assert not rig.fwd.running
    json.dumps(rig.fwd.stats)  # plain data for the metrics collector


# --------------------------------------------------------------------------- offloads


def tcp_segments(count: int, mss: int = 1000, seq: int = 5000, flags: str = "A",
                 last_flags: str = "PA", short_last: int = 0) -> list[bytes]:
    from scapy.layers.inet import IP, TCP

    out = []
    for i in range(count):
        size = short_last if short_last and i == count - 1 else mss
        f = last_flags if i == count - 1 else flags
        out.append(bytes(IP(src="10.60.2.7", dst="10.60.1.9", ttl=63, id=100 + i, flags="DF")
                         / TCP(sport=40000, dport=80, seq=seq + i * mss, ack=777, flags=f,
                               window=500, options=[("NOP", None), ("NOP", None),
                                                    ("Timestamp", (1, 2))])
                         / (bytes([65 + i % 26]) * size)))
    return out


def feed(packets: list[bytes]) -> list[bytes]:
    """Run packets through a Coalescer the way the loop does; return the TUN writes."""
    written: list[bytes] = []
    gro = Coalescer(lambda view: written.append(bytes(view)))
    for p in packets:
        slot = memoryview(bytearray(VNET_LEN + len(p)))
        slot[VNET_LEN:] = p
        gro.add(slot[VNET_LEN:], len(p), slot if len(p) % 2 else None)  # both write paths
    gro.flush()
    return written


def finish(write: bytes) -> bytes:
    """What the kernel would do with a GSO write: complete the partial TCP checksum."""
    hdr, pkt = write[:VNET_LEN], bytearray(write[VNET_LEN:])
    if hdr[0] & VNET_F_NEEDS_CSUM:
        start, off = struct.unpack_from("<HH", hdr, 6)
        assert complete_checksum(memoryview(pkt), len(pkt), start, off)
    return bytes(pkt)


def test_coalescer_merges_a_flow_into_one_valid_super_packet() -> None:
    from scapy.layers.inet import IP, TCP

    segs = tcp_segments(40)
    writes = feed(segs)
    assert len(writes) == 1
    hdr = struct.unpack("<BBHHHH", writes[0][:VNET_LEN])
    assert hdr == (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1000, 20, 16)
    pkt = IP(finish(writes[0]))
    assert pkt.len == 52 + 40 * 1000 and pkt[TCP].seq == 5000 and "P" in str(pkt[TCP].flags)
    assert bytes(pkt[TCP].payload) == b"".join(s[52:] for s in segs)
    # checksums as a receiver would verify them
    raw = bytes(pkt)
    assert slow_checksum(raw[:20]) == 0
    pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(raw) - 20)
    assert slow_checksum(pseudo + raw[20:]) == 0


def test_coalescer_keeps_order_and_splits_where_linux_gro_would() -> None:
    a = tcp_segments(3, flags="A", last_flags="A")
    gap = tcp_segments(2, seq=5000 + 3 * 1000 + 1, flags="A", last_flags="A")  # seq hole
    psh = tcp_segments(3, seq=20000, flags="A", last_flags="PA")
    after_psh = tcp_segments(1, seq=23000, flags="A", last_flags="A")
    short = tcp_segments(3, seq=30000, short_last=10, flags="A", last_flags="A")
    pure_ack = tcp_segments(1, mss=0, seq=40000, flags="A", last_flags="A")
    writes = feed(a + gap + psh + after_psh + short + pure_ack)
    sizes = [len(w) - VNET_LEN for w in writes]
    assert sizes == [52 + 3000, 52 + 2000, 52 + 3000, 52 + 1000, 52 + 2010, 52]
    # every write is a valid packet, in the original byte order
    stream = b"".join(finish(w)[52:] for w in writes)
    assert stream == b"".join(p[52:] for p in a + gap + psh + after_psh + short + pure_ack)
    # a single segment goes out untouched, with an all-zero virtio header
    assert writes[3][:VNET_LEN] == bytes(VNET_LEN) and writes[3][VNET_LEN:] == after_psh[0]


@pytest.mark.parametrize(("seq", "size", "mss", "flags"), [
    (0xFFFFF000, 10_003, 1400, "PA"),  # wraps the sequence space, short last segment
    (5000, 63_900, 1420, "FPA"),  # 45 full segments; FIN and PSH only on the last
    (77, 3 * 1421, 1421, "A"),  # odd MSS: payload sums padded per segment
    (1, 3000, 1500, "CA"),  # CWR only on the first
    (5, 4000, 1400, "CPA"),  # CWR on the first, PSH on the short last
    (9, 100, 1400, "PA"),  # one segment: the packet itself
])
def test_segment_tso_cuts_valid_wire_packets(seq: int, size: int, mss: int, flags: str) -> None:
    from scapy.layers.inet import IP, TCP

    (big,) = tcp_segments(1, mss=size, seq=seq, last_flags=flags)
    src = memoryview(bytearray(big))
    hdrs = memoryview(bytearray(80 * 100))
    cache = SliceCache()
    impls = _sum_impls()
    for sums, views in [(s, v) for s in impls for v in (None, cache, cache)]:
        iov, seg, count = segment_tso(src, len(big), mss, hdrs, sums, views)
        assert seg == 52 + mss and count == -(-size // mss) and len(iov) == 2 * count
        wire = b"".join(bytes(v) for v in iov)  # what UDP_SEGMENT cuts at `seg` bytes
        parts = [wire[i:i + seg] for i in range(0, len(wire), seg)]
        assert len(parts) == count
        payload = b""
        for k, raw in enumerate(parts):
            pkt = IP(raw)
            assert pkt.len == len(raw) and pkt.id == 100 + k and pkt.ttl == 63
            assert slow_checksum(raw[:20]) == 0
            pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(raw) - 20)
            assert slow_checksum(pseudo + raw[20:]) == 0
            assert pkt[TCP].seq == (seq + k * mss) & 0xFFFFFFFF
            got = str(pkt[TCP].flags)
            last, first = k == count - 1, k == 0
            assert ("P" in got, "F" in got, "C" in got) == \
                ("P" in flags and last, "F" in flags and last, "C" in flags and first)
            # scapy's own view: the checksums it computes are the ones on the wire
            fresh = IP(raw)
            del fresh.chksum, fresh[TCP].chksum
            again = IP(bytes(fresh))
            assert (again.chksum, again[TCP].chksum) == (pkt.chksum, pkt[TCP].chksum)
            payload += bytes(pkt[TCP].payload)
        assert payload == big[52:]


def _sum_impls() -> list[Any]:
    """Both payload-sum implementations: numpy is a declared dependency, so its absence is a
    broken install, not a reason to test less."""
    fast = numpy_payload_sums()
    assert fast is not None, "numpy is a dependency of netagent (pyproject.toml)"
    return [payload_sums_python, fast]


def test_payload_sums_match_the_word_loop() -> None:
    rng = random.Random(9)
    impls = _sum_impls()
    for mss in (1, 2, 3, 7, 100, 1420, 1421, 8999):
        data = memoryview(bytearray(rng.randbytes(5 * mss)))
        for sums in impls:
            lanes = sums(data, mss, 5).to_bytes(20, "big")
            for k in range(5):
                chunk = bytes(data[k * mss:(k + 1) * mss])
                want = (~slow_checksum(chunk) & 0xFFFF) % 0xFFFF
                assert int.from_bytes(lanes[4 * k:4 * k + 4], "big") % 0xFFFF == want


def test_udp_gso_runs_go_out_as_one_datagram_per_packet(rig: LoopRig) -> None:
    """Equal packets for one peer leave as a GSO run; the wire still sees one packet each."""
    pkts = [ipv4("10.60.1.5", "10.60.2.9", bytes([i]) * 300) for i in range(40)]
    pkts.append(ipv4("10.60.1.5", "10.60.2.9", b"tail"))  # a shorter last one joins the run
    for p in pkts:
        rig.send(p)
    got = [rig.peer.recvfrom(65536)[0] for _ in pkts]
    assert [g[12:] for g in got] == [p[12:] for p in pkts]


def test_udp_gro_runs_are_split_and_checked_packet_by_packet(rig: LoopRig) -> None:
    """A peer sending with UDP_SEGMENT arrives (UDP_GRO) as one buffer: every packet in it is
    checked on its own, good ones forwarded in order, bad ones counted."""
    good = [ipv4("10.60.2.7", "10.60.1.9", bytes([i]) * 80) for i in range(8)]
    bad = bytearray(ipv4("10.60.2.7", "10.60.1.9", b"\xee" * 80))
    bad[10] ^= 0x0F
    spoofed = ipv4("10.60.9.7", "10.60.1.9", b"\xdd" * 80)
    last = ipv4("10.60.2.7", "10.60.1.9", b"end")
    run = [*good[:4], bytes(bad), spoofed, *good[4:], last]
    seg = len(good[0])
    rig.peer.sendmsg([b"".join(run)], [(socket.SOL_UDP, 103, struct.pack("=H", seg))], 0,
                     ("127.0.0.1", rig.port))
    out = [rig.recv() for _ in range(len(good) + 1)]
    assert [o[12:] for o in out] == [p[12:] for p in [*good, last]]
    wait_for(lambda: rig.drops() == {"malformed": 1, "spoofed_inner_source": 1},
             what="per-packet drops inside a GRO run")
