"""Peer reachability: a low-rate ICMP echo to each peer's overlay addresses.

Why ICMP to overlay addresses: it exercises exactly the path pods use (our routes/FDB/neighbour
entries, the encapsulation, the peer's forwarding), unlike a check of the peer's public IP. Each
of the peer's subnets (IPv4, IPv6 or both) is probed at two addresses: the first address of the
subnet (the pod gateway of FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET, present once the peer has a pod
bridge) and the subnet's network address (flannel's vxlan device address, present on any vxlan
host). A peer counts as reachable when any of its addresses answers, whatever the family: one
working path is enough for its pods to be reached, and the status entry also says per family
(``reachable_v4``/``reachable_v6``) so a half-broken dual-stack peer still shows.

One round every `interval` seconds (default 5 s, one echo per address per round), answers
awaited for `timeout`. Echoes are paced at `rate` per second (default 200), so a large cluster
is probed at a low, flat rate (a round over 5,000 peers takes ~50 s) instead of in bursts.
Each family has its own socket (raw, else the unprivileged ping socket), opened the first time
a target of that family shows up, so an IPv4-only agent never opens an ICMPv6 socket and an
IPv6-only one never an IPv4 socket. Replies are matched by sequence number, one counter for both.
A thread of its own that keeps its results to itself: it writes no
daemon state and never touches the kernel beyond sending packets (DESIGN.md single writer).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: no import of the lease codec at run time
    from netagent.lease import PeerId

log = logging.getLogger("netagent.probe")

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
#: setsockopt(IPPROTO_ICMPV6, ICMP6_FILTER) (linux/icmpv6.h); Python has no constant for it
ICMP6_FILTER = 1


@dataclass(frozen=True, slots=True)
class PeerProbe:
    """One peer's last probe result (slots: one per peer lives between rounds)."""

    public_ip: str
    reachable: bool  # any address of any family answered
    rtt: float | None  # seconds, of the fastest answer
    when: float  # unix time of the round
    #: per family: None when the peer has no subnet of that family or it could not be probed
    reachable_v4: bool | None = None
    reachable_v6: bool | None = None


def _subnets(ident: PeerId, lease: Any) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The peer's IPv4 and IPv6 subnets. The ident is the subnet of its own family (the IPv4
    subnet, or the IPv6 subnet in an IPv6-only network); only the IPv6 subnet of a dual-stack
    peer comes from the lease (read leniently: stand-in leases may not carry it)."""
    if isinstance(ident, IPv6Network):
        return None, ident
    return ident, getattr(lease, "ipv6_subnet", None)


def _host_ip(attrs: Any) -> str:
    """PublicIP, or PublicIPv6 for an IPv6-only host (:attr:`LeaseAttrs.host_ip`)."""
    return str(getattr(attrs, "host_ip", attrs.public_ip))


def probe_targets(peers: Mapping[PeerId, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """ident -> (host IP, addresses to ping) for a peer table of leases (pure).

    The addresses are the first and network address of the IPv4 subnet, then of the IPv6
    subnet, for whichever the lease has.

    Runs in the probe thread while the main loop may change the table: the one-step dict copy
    happens under the GIL, so the loop below never sees the table change size.
    """
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for ident, lease in dict(peers).items():
        addrs: list[str] = []
        for subnet in _subnets(ident, lease):
            if subnet is not None:
                addrs += (str(subnet.network_address + 1), str(subnet.network_address))
        out[str(ident)] = (_host_ip(lease.attrs), tuple(addrs))
    return out


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int, family: int = socket.AF_INET) -> bytes:
    """An ICMP echo request; for ICMPv6 the checksum is left 0: it covers a pseudo-header with
    the source address, which only the kernel knows, and the kernel fills it in on both raw
    ICMPv6 and ping sockets."""
    payload = b"netagent-probe"
    if family == socket.AF_INET6:
        return struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + payload
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def parse_reply(packet: bytes, raw: bool, family: int = socket.AF_INET) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply. Raw IPv4 sockets deliver the IP header too; ICMPv6 sockets,
    raw or not, deliver the ICMPv6 message alone (the kernel strips the IPv6 header)."""
    want = ICMP_ECHO_REPLY
    if family == socket.AF_INET6:
        want = ICMP6_ECHO_REPLY
    elif raw:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4:]
    if len(packet) < 8:
        return None
    typ, _code, _csum, ident, seq = struct.unpack("!BBHHH", packet[:8])
    if typ != want:
        return None
    return ident, seq


@dataclass(frozen=True)
class IcmpSocket:
    """One family's echo socket; `raw` sockets see every ICMP message, so replies are also
    checked for our identifier (a ping socket's identifier is the kernel's and only its own
    replies arrive)."""

    sock: socket.socket
    family: int
    raw: bool


def open_icmp_socket(family: int) -> IcmpSocket:
    """A raw ICMP/ICMPv6 socket, else an unprivileged ping socket (net.ipv4.ping_group_range,
    which governs both families). Raises OSError when neither may be opened."""
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        return IcmpSocket(socket.socket(family, socket.SOCK_DGRAM, proto), family, False)
    if family == socket.AF_INET6:
        # a raw ICMPv6 socket also gets every neighbour/router message: let only replies in
        # (a set bit blocks a type)
        words = [0xFFFFFFFF] * 8
        words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31))
        try:
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
        except OSError:
            pass  # only an optimisation: parse_reply filters by type anyway
    return IcmpSocket(sock, family, True)


_FAMILY_NAME: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


class Prober:
    def __init__(self, targets: Callable[[], Mapping[str, tuple[str, tuple[str, ...]]]],
                 stop: threading.Event, interval: float = 5.0, timeout: float = 1.0,
                 rate: float = 200.0, on_round: Callable[[], None] | None = None) -> None:
        #: told after each round (the daemon queues a status refresh: it stays the writer)
        self.on_round = on_round
        self.targets = targets
        self.stop = stop
        self.interval = interval
        self.timeout = timeout
        self.rate = rate
        #: ident -> last result; replaced as a whole each round (readers need no lock)
        self.results: dict[str, PeerProbe] = {}
        self.rounds = 0
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        #: family -> its socket, or None once opening it failed (that family stays unprobed)
        self._sockets: dict[int, IcmpSocket | None] = {}
        self._thread = threading.Thread(target=self._run, name="netagent-probe", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def close(self) -> None:
        for s in self._sockets.values():
            if s is not None:
                s.sock.close()
        self._sockets.clear()

    def _socket(self, family: int) -> IcmpSocket | None:
        """The family's socket, opened on first use; a failure is logged once, not retried."""
        if family not in self._sockets:
            try:
                self._sockets[family] = open_icmp_socket(family)
            except OSError as exc:
                log.warning("%s peer probes disabled: cannot open an ICMP socket: %s",
                            _FAMILY_NAME[family], exc)
                self._sockets[family] = None
        return self._sockets[family]

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self.round()
                except OSError as exc:
                    log.debug("probe round failed: %s", exc)
                self.stop.wait(self.interval)
        finally:
            self.close()

    def round(self) -> None:
        targets = dict(self.targets())
        # (ident, family) pairs with a socket to probe them; a peer with none stays unprobed.
        # The echoes are generated chunk by chunk, not listed up front: at 20,000 peers a list
        # of every (peer, address) and a set of every (peer, family) held ~6 MB for the whole
        # round (rounds are paced, so that is most of the time).
        wanted = 0
        for _pub, addrs in targets.values():
            wanted += len({s.family for s in map(self._socket, map(_family, addrs))
                           if s is not None})
        open_families = {f for f, s in self._sockets.items() if s is not None}

        def echoes() -> Iterator[tuple[str, str, IcmpSocket]]:
            for ident, (_pub, addrs) in targets.items():
                for addr in addrs:
                    s = self._sockets.get(_family(addr))
                    if s is not None:
                        yield ident, addr, s

        sent: dict[int, tuple[str, int, float]] = {}
        best: dict[tuple[str, int], float] = {}
        chunk = 20
        todo = echoes()
        batch = list(islice(todo, chunk))
        while batch:
            for ident, addr, s in batch:
                self._seq = (self._seq + 1) & 0xFFFF
                try:
                    s.sock.sendto(echo_request(self._ident, self._seq, s.family), (addr, 0))
                    sent[self._seq] = (ident, s.family, time.monotonic())
                except OSError:
                    pass  # no route: counts as unreachable
            batch = list(islice(todo, chunk))
            if batch:  # pace: read answers while the next chunk waits
                self._collect(sent, best, wanted, time.monotonic() + chunk / self.rate)
            if self.stop.is_set():
                return
        self._collect(sent, best, wanted, time.monotonic() + self.timeout)
        now = time.time()
        results: dict[str, PeerProbe] = {}
        for ident, (pub, addrs) in targets.items():
            probed = {f for f in map(_family, addrs) if f in open_families}
            fams = {f: (ident, f) in best if f in probed else None
                    for f in (socket.AF_INET, socket.AF_INET6)}
            if fams[socket.AF_INET] is None and fams[socket.AF_INET6] is None:
                continue
            rtts = [best[(ident, f)] for f in fams if (ident, f) in best]
            results[ident] = PeerProbe(pub, bool(rtts), min(rtts) if rtts else None, now,
                                       fams[socket.AF_INET], fams[socket.AF_INET6])
        self.results = results
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()

    def _collect(self, sent: dict[int, tuple[str, int, float]],
                 best: dict[tuple[str, int], float], wanted: int, deadline: float) -> None:
        """Read echo replies on every open socket until `deadline` (or every (peer, family)
        answered)."""
        socks = {s.sock: s for s in self._sockets.values() if s is not None}
        while sent and len(best) < wanted:
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.is_set():
                return
            ready, _, _ = select.select(list(socks), [], [], left)
            if not ready:
                return
            for sock in ready:
                s = socks[sock]
                got = parse_reply(sock.recv(2048), s.raw, s.family)
                if got is None or (s.raw and got[0] != self._ident):
                    continue
                match = sent.get(got[1])
                if match is None or match[1] != s.family:
                    continue
                del sent[got[1]]
                ident, family, t0 = match
                rtt = time.monotonic() - t0
                best[(ident, family)] = min(rtt, best.get((ident, family), rtt))


def _order(item: tuple[PeerId, Any]) -> tuple[int, int, int]:
    net = item[0]
    return (net.version, int(net.network_address), net.prefixlen)


def peer_list(peers: Mapping[PeerId, Any], results: Mapping[str, PeerProbe] | None
              ) -> dict[str, dict[str, Any]]:
    """The peer table for status.json: lease facts plus the last probe result (pure).

    "public_ip" names the host: PublicIP, or PublicIPv6 for an IPv6-only peer. "reachable" is
    true when any address of any family answered; "reachable_v4"/"reachable_v6" tell the
    families apart (None: no subnet of that family, or not probed)."""
    out: dict[str, dict[str, Any]] = {}
    results = results or {}
    # the order of (version, subnet) by plain ints: IPv4Network's own comparisons and str()
    # made this ~50 ms at 5,000 peers, and it runs after every probe round
    for ident, lease in sorted(peers.items(), key=_order):
        name = str(ident)
        r = results.get(name)
        out[name] = {
            "public_ip": _host_ip(lease.attrs),
            "backend": lease.attrs.backend_type,
            "reachable": None if r is None else r.reachable,
            "rtt_ms": None if r is None or r.rtt is None else round(r.rtt * 1000, 3),
            "probed_at": None if r is None else r.when,
            "reachable_v4": None if r is None else r.reachable_v4,
            "reachable_v6": None if r is None else r.reachable_v6,
        }
    return out
