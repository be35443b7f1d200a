"""Peer reachability: a low-rate ICMP echo to each peer's overlay addresses.

Why ICMP to overlay addresses: it exercises exactly the path pods use (our routes/FDB/neighbour
entries, the encapsulation, the peer's forwarding), unlike a check of the peer's public IP. Each
peer is probed at two addresses and counts as reachable when either answers: the first address
of its subnet (the pod gateway of FLANNEL_SUBNET, present once the peer has a pod bridge) and the
subnet's network address (flannel's vxlan device address, present on any vxlan host).

One round every `interval` seconds (default 5 s, one echo per address per round), answers
awaited for `timeout`. Echoes are paced at `rate` per second (default 200), so a large cluster
is probed at a low, flat rate (a round over 5,000 peers takes ~50 s) instead of in bursts.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

log = logging.getLogger("netagent.probe")

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


@dataclass(frozen=True)
class PeerProbe:
    public_ip: str
    reachable: bool
    rtt: float | None  # seconds, of the fastest answer
    when: float  # unix time of the round


def probe_targets(peers: Mapping[IPv4Network, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """subnet -> (public IP, addresses to ping) for a peer table of leases (pure).

    Runs in the probe thread while the main loop may change the table: the one-step dict copy
    happens under the GIL, so the loop below never sees the table change size.
    """
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for subnet, lease in dict(peers).items():
        base = int(subnet.network_address)
        addrs = (str(subnet.network_address.__class__(base + 1)), str(subnet.network_address))
        out[str(subnet)] = (str(lease.attrs.public_ip), addrs)
    return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"netagent-probe"
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def parse_reply(packet: bytes, raw: bool) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply; raw sockets deliver the IP header too."""
    if raw:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4:]
    if len(packet) < 8:
        return None
    typ, _code, _csum, ident, seq = struct.unpack("!BBHHH", packet[:8])
    if typ != ICMP_ECHO_REPLY:
        return None
    return ident, seq


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
        #: subnet -> last result; replaced as a whole each round (readers need no lock)
        self.results: dict[str, PeerProbe] = {}
        self.rounds = 0
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="netagent-probe", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def _socket(self) -> tuple[socket.socket, bool]:
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True
        except PermissionError:
            # unprivileged ICMP (net.ipv4.ping_group_range); the kernel picks the identifier
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False

    def _run(self) -> None:
        try:
            sock, raw = self._socket()
        except OSError as exc:
            log.warning("peer probes disabled: cannot open an ICMP socket: %s", exc)
            return
        with sock:
            while not self.stop.is_set():
                try:
                    self.round(sock, raw)
                except OSError as exc:
                    log.debug("probe round failed: %s", exc)
                self.stop.wait(self.interval)

    def round(self, sock: socket.socket, raw: bool) -> None:
        targets = dict(self.targets())
        sent: dict[int, tuple[str, float]] = {}
        best: dict[str, float] = {}
        pending = [(subnet, addr) for subnet, (_pub, addrs) in targets.items() for addr in addrs]
        chunk = 20
        for i in range(0, len(pending), chunk):
            for subnet, addr in pending[i:i + chunk]:
                self._seq = (self._seq + 1) & 0xFFFF
                try:
                    sock.sendto(echo_request(self._ident, self._seq), (addr, 0))
                    sent[self._seq] = (subnet, time.monotonic())
                except OSError:
                    pass  # no route: counts as unreachable
            if i + chunk < len(pending):  # pace: read answers while the next chunk waits
                self._collect(sock, raw, sent, best, len(targets),
                              time.monotonic() + chunk / self.rate)
            if self.stop.is_set():
                return
        self._collect(sock, raw, sent, best, len(targets), time.monotonic() + self.timeout)
        now = time.time()
        self.results = {
            subnet: PeerProbe(pub, subnet in best, best.get(subnet), now)
            for subnet, (pub, _addrs) in targets.items()
        }
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()


    def _collect(self, sock: socket.socket, raw: bool, sent: dict[int, tuple[str, float]],
                 best: dict[str, float], wanted: int, deadline: float) -> None:
        """Read echo replies until `deadline` (or every target answered)."""
        while sent and len(best) < wanted:
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.is_set():
                return
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                return
            got = parse_reply(sock.recv(2048), raw)
            if got is None or got[1] not in sent or (raw and got[0] != self._ident):
                continue
            subnet, t0 = sent.pop(got[1])
            rtt = time.monotonic() - t0
            best[subnet] = min(rtt, best.get(subnet, rtt))


def peer_list(peers: Mapping[IPv4Network, Any], results: Mapping[str, PeerProbe] | None
              ) -> dict[str, dict[str, Any]]:
    """The peer table for status.json: lease facts plus the last probe result (pure)."""
    out: dict[str, dict[str, Any]] = {}
    for subnet, lease in sorted(peers.items()):
        r = (results or {}).get(str(subnet))
        out[str(subnet)] = {
            "public_ip": str(lease.attrs.public_ip),
            "backend": lease.attrs.backend_type,
            "reachable": None if r is None else r.reachable,
            "rtt_ms": None if r is None or r.rtt is None else round(r.rtt * 1000, 3),
            "probed_at": None if r is None else r.when,
        }
    return out
