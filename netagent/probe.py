"""Peer reachability: a low-rate ICMP echo to each peer's overlay addresses.

Why ICMP to overlay addresses: it exercises exactly the path pods use (our routes/FDB/neighbour
entries, the encapsulation, the peer's forwarding), unlike a check of the peer's public IP. Each
of the peer's subnets (IPv4, IPv6 or both) is probed at two addresses: the first address of the
subnet (the pod gateway of FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET, present once the peer has a pod
bridge) and the subnet's network address (flannel's vxlan device address, present on any vxlan
host). A peer counts as reachable when any of its addresses answers, whatever the family: one
working path is enough for its pods to be reached, and the status entry also says per family
(``reachable_v4``/``reachable_v6``) so a half-broken dual-stack peer still shows.

One round every `interval` seconds (default 5 s), answers awaited for `timeout`. A peer's
first round probes every address of each family; after that one echo per family and round is
enough: to the address that answered last, or, while none does, to the next address in turn
(so a peer that is down costs one echo per round, and one that answers again is found within a
round or two). Echoes are paced at `rate` per second (default 50), so a large cluster is probed
at a low, flat rate (a round over 5,000 peers takes ~100 s) instead of in bursts: the rate is
the prober's CPU (each echo costs ~30 µs of the agent's time, kernel encapsulation included;
at the earlier 200 echoes a second with both addresses every round the prober was ~0.45 % of
a core, most of the agent's idle CPU at 5,000 peers, issue 18).
Each family has its own socket (raw, else the unprivileged ping socket), opened the first time
a target of that family shows up, so an IPv4-only agent never opens an ICMPv6 socket and an
IPv6-only one never an IPv4 socket. Replies are matched by sequence number, one counter for both.
A thread of its own that keeps its results to itself: it writes no
daemon state and never touches the kernel beyond sending packets (DESIGN.md single writer).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
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
#: setsockopt(SOL_RAW, ICMP_FILTER) (linux/icmp.h, linux/socket.h): no Python constants either
SOL_RAW = 255
ICMP_FILTER = 1


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


_PAYLOAD = b"netagent-probe"
_ECHO = struct.Struct("!BBHHH")


def echo_request(ident: int, seq: int, family: int = socket.AF_INET) -> bytes:
    """An ICMP echo request; for ICMPv6 the checksum is left 0: it covers a pseudo-header with
    the source address, which only the kernel knows, and the kernel fills it in on both raw
    ICMPv6 and ping sockets."""
    if family == socket.AF_INET6:
        return _ECHO.pack(ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + _PAYLOAD
    csum = _checksum(_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + _PAYLOAD)
    return _ECHO.pack(ICMP_ECHO_REQUEST, 0, csum, ident, seq) + _PAYLOAD


def _echo_sum(ident: int) -> int:
    """The one's-complement sum of an IPv4 echo request of ``ident`` without its sequence
    number: the checksum of any sequence number follows from it in two additions."""
    return sum(struct.unpack(f"!{(8 + len(_PAYLOAD)) // 2}H",
                             _ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, 0) + _PAYLOAD))


def fast_echo_request(ident: int, seq: int, family: int, base: int) -> bytes:
    """:func:`echo_request` with the checksum from ``base`` (:func:`_echo_sum`)."""
    if family == socket.AF_INET6:
        return _ECHO.pack(ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + _PAYLOAD
    s = base + seq
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return _ECHO.pack(ICMP_ECHO_REQUEST, 0, ~s & 0xFFFF, ident, seq) + _PAYLOAD


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
    try:
        if family == socket.AF_INET6:
            # a raw ICMPv6 socket also gets every neighbour/router message: let only replies
            # in (a set bit blocks a type)
            words = [0xFFFFFFFF] * 8
            words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
        else:
            # a raw ICMP socket gets every ICMP message the host receives, among them the
            # "host unreachable" the kernel sends itself for each echo to a peer that is down:
            # let only echo replies wake the prober (linux/icmp.h ICMP_FILTER on SOL_RAW)
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~(1 << ICMP_ECHO_REPLY)
                                                              & 0xFFFFFFFF))
    except OSError:
        pass  # only an optimisation: parse_reply filters by type anyway
    return IcmpSocket(sock, family, True)


_FAMILY_NAME: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


class Prober:
    def __init__(self, targets: Callable[[], Mapping[str, tuple[str, tuple[str, ...]]]],
                 stop: threading.Event, interval: float = 5.0, timeout: float = 1.0,
                 rate: float = 50.0, on_round: Callable[[], None] | None = None) -> None:
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
        self._sum = _echo_sum(self._ident)
        self._seq = 0
        #: (ident, family) -> the address that answered in its last round (None: none did);
        #: absent: never probed, so every address of the family is tried
        self._last: dict[tuple[str, int], str | None] = {}
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

    def _choose(self, ident: str, addrs: tuple[str, ...]) -> list[tuple[str, int]]:
        """(address, family) to probe this round: per family, the one that answered last, else
        the next in turn, or all of them the first time."""
        out: list[tuple[str, int]] = []
        by_family: dict[int, list[str]] = {}
        for addr in addrs:
            by_family.setdefault(_family(addr), []).append(addr)
        for family, some in by_family.items():
            key = (ident, family)
            if key not in self._last:
                out += ((a, family) for a in some)
                continue
            last = self._last[key]
            if last is None or last not in some:
                last = some[self.rounds % len(some)]
            out.append((last, family))
        return out

    def round(self) -> None:
        targets = dict(self.targets())
        # (ident, family) pairs with a socket to probe them; a peer with none stays unprobed
        pending: list[tuple[str, str, IcmpSocket]] = []
        probed: set[tuple[str, int]] = set()
        for ident, (_pub, addrs) in targets.items():
            for addr, family in self._choose(ident, addrs):
                s = self._socket(family)
                if s is not None:
                    pending.append((ident, addr, s))
                    probed.add((ident, s.family))
        sent: dict[int, tuple[str, int, float, str]] = {}
        best: dict[tuple[str, int], float] = {}
        answered: dict[tuple[str, int], str] = {}
        chunk = max(1, min(20, round(self.rate / 5)))  # a few wake-ups a second
        echo, me, base = fast_echo_request, self._ident, self._sum
        for i in range(0, len(pending), chunk):
            for ident, addr, s in pending[i:i + chunk]:
                seq = self._seq = (self._seq + 1) & 0xFFFF
                try:
                    s.sock.sendto(echo(me, seq, s.family, base), (addr, 0))
                    sent[seq] = (ident, s.family, time.monotonic(), addr)
                except OSError:
                    pass  # no route: counts as unreachable
            if i + chunk < len(pending):  # pace: read answers while the next chunk waits
                self._collect(sent, best, answered, len(probed),
                              time.monotonic() + chunk / self.rate)
            if self.stop.is_set():
                return
        self._collect(sent, best, answered, len(probed), time.monotonic() + self.timeout)
        self._last = {key: answered.get(key) for key in probed}
        now = time.time()
        results: dict[str, PeerProbe] = {}
        for ident, (pub, _addrs) in targets.items():
            fams = {f: (ident, f) in best if (ident, f) in probed else None
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

    def _collect(self, sent: dict[int, tuple[str, int, float, str]],
                 best: dict[tuple[str, int], float], answered: dict[tuple[str, int], str],
                 wanted: int, deadline: float) -> None:
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
                ident, family, t0, addr = match
                rtt = time.monotonic() - t0
                if rtt < best.get((ident, family), math.inf):
                    best[(ident, family)] = rtt
                    answered[(ident, family)] = addr


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
        out[name] = _row(lease, results.get(name))
    return out


def _row(lease: Any, r: PeerProbe | None) -> dict[str, Any]:
    return {
        "public_ip": _host_ip(lease.attrs),
        "backend": lease.attrs.backend_type,
        "reachable": None if r is None else r.reachable,
        "rtt_ms": None if r is None or r.rtt is None else round(r.rtt * 1000, 3),
        "probed_at": None if r is None else r.when,
        "reachable_v4": None if r is None else r.reachable_v4,
        "reachable_v6": None if r is None else r.reachable_v6,
    }


class PeerRows:
    """status.json's peer list kept row by row, each row with its JSON text, so a status write
    costs O(changed rows) and not O(peers): at 20,000 peers rebuilding and encoding the whole
    list took ~120-190 ms of the main loop per write, and every event that arrived meanwhile
    waited (the event p99 of issue 18).

    :meth:`update` redoes the rows of the peers a sync changed; a probe round changes every
    row, so :meth:`new_round` only marks them and :meth:`refresh` redoes them a slice at a time
    between events. :meth:`text` is the list as ``json.dumps(rows, sort_keys=True)`` writes it.
    """

    def __init__(self) -> None:
        #: name -> row (the main loop's own dict; status.json is its only reader)
        self.rows: dict[str, dict[str, Any]] = {}
        self._text: dict[str, str] = {}
        self._basis: dict[PeerId, tuple[Any, PeerProbe | None]] = {}
        self._names: list[str] = []  # sorted as json's sort_keys sorts them
        self._joined: str | None = "{}"
        self._results: Mapping[str, PeerProbe] = {}
        self._stale: list[PeerId] = []

    @property
    def pending(self) -> bool:
        """A probe round's rows are still being redone."""
        return bool(self._stale)

    def update(self, peers: Mapping[PeerId, Any], changed: Iterable[PeerId] | None) -> None:
        """Redo the rows of ``changed`` (None: every peer, and drop rows of peers gone)."""
        if changed is None:
            changed = set(peers) | set(self._basis)
        for ident in changed:
            self._redo(ident, peers.get(ident))

    def new_round(self, peers: Mapping[PeerId, Any], results: Mapping[str, PeerProbe]) -> None:
        self._results = results
        self._stale = list(peers)

    def refresh(self, peers: Mapping[PeerId, Any], rows: int = 500) -> None:
        """Redo up to ``rows`` rows of the last probe round."""
        part, self._stale = self._stale[-rows:], self._stale[:-rows]
        for ident in part:
            self._redo(ident, peers.get(ident))

    def _redo(self, ident: PeerId, lease: Any) -> None:
        name = str(ident)
        if lease is None:
            if self._basis.pop(ident, None) is not None:
                del self.rows[name], self._text[name]
                del self._names[bisect.bisect_left(self._names, name)]
                self._joined = None
            return
        r = self._results.get(name)
        basis = (lease, r)
        if self._basis.get(ident) == basis:
            return
        if ident not in self._basis:
            bisect.insort(self._names, name)
        self._basis[ident] = basis
        row = self.rows[name] = _row(lease, r)
        self._text[name] = f"{json.dumps(name)}: {json.dumps(row, sort_keys=True)}"
        self._joined = None

    def text(self) -> str:
        if self._joined is None:
            self._joined = "{" + ", ".join(map(self._text.__getitem__, self._names)) + "}"
        return self._joined
