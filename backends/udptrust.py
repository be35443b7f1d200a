"""The udp backend's wire format and what its packet loop trusts (pure: no I/O).

Wire format (flannel-compatible, reference §13): the raw inner IPv4 packet is the whole UDP
payload. No header means no authentication, so the receive side trusts only what the lease
table vouches for (flannel trusts anything that reaches the port):

* the datagram's source address must be the PublicIP of a current udp lease,
* the payload must be a well-formed IPv4 packet (version, header length, total length equal to
  the datagram length, valid header checksum: :func:`header_ok`),
* its inner source must lie inside that peer's subnet, and its destination inside ours,
* and it is forwarded only with TTL left (:func:`decrement_ttl`, both directions).

**Lookup.** :class:`ForwardingTable` is built by a pure function from the peer leases and swapped
into the loop with one attribute assignment, so the reconcile core updates it while the loop
runs (no lock: the loop reads the reference once per batch and sees either the old or the new
table). Longest prefix match is a dict per distinct prefix length, longest first:
O(distinct lengths), which is one dict lookup when every lease has the network's SubnetLen,
however many peers there are.

The per-packet helpers here are the ones the loops (``udpfwd``) and the run checks (``udprun``)
call: one implementation each, so what the tests check is what forwards.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

DEFAULT_UDP_PORT = 8285

#: outer IPv4 20 + UDP 8
UDP_OVERHEAD = 28


def fold(value: int) -> int:
    """One's-complement sum of a big-endian buffer read as one int `value`.

    The sum of 16-bit big-endian words is congruent to the whole buffer read as one big-endian
    integer modulo 0xFFFF (2^16 ≡ 1), so it runs in C inside ``int.from_bytes`` and ``%``
    instead of a Python loop; the one's-complement sum of non-zero data is 0xFFFF, never 0.
    """
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value else total


def ip_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data` (see :func:`fold`)."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    return ~fold(int.from_bytes(raw, "big")) & 0xFFFF


def header_ok(header: bytes | bytearray | memoryview) -> bool:
    """Whether an IPv4 header (options included) carries a valid checksum."""
    return int.from_bytes(header, "big") % 0xFFFF == 0


def decrement_ttl(buf: bytearray | memoryview) -> bool:
    """TTL − 1 in place with the RFC 1624 checksum update; False (untouched) when it hits 0."""
    ttl = buf[8]
    if ttl <= 1:
        return False
    buf[8] = ttl - 1
    # HC' = ~(~HC + ~m + m'); the TTL is the high byte of its word, so ~m + m' = ~0x0100
    csum = ((buf[10] << 8) | buf[11]) + 0x0100
    csum = (csum & 0xFFFF) + (csum >> 16)
    buf[10] = csum >> 8
    buf[11] = csum & 0xFF
    return True


def net_unreachable(packet: bytes | bytearray | memoryview, source: IPv4Address) -> bytes | None:
    """flannel's reply for a destination no lease covers: ICMP type 3 code 0 back to the sender.

    None for ICMP packets and non-first fragments (never answer those), and for anything too
    short to quote. TTL 8 as flannel; the source is the caller's choice (see
    :meth:`ForwardingTable.unreachable_source`).
    """
    data = bytes(packet)
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl or data[9] == 1:
        return None
    if int.from_bytes(data[6:8], "big") & 0x1FFF:
        return None  # not the first fragment
    quote = data[: ihl + 8]
    icmp = bytearray(struct.pack("!BBHI", 3, 0, 0, 0) + quote)
    struct.pack_into("!H", icmp, 2, ip_checksum(icmp))
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 8, 1, 0,
                                   source.packed, data[12:16]))
    struct.pack_into("!H", header, 10, ip_checksum(header))
    return bytes(header + icmp)


#: a peer as the loop needs it: the (ip, port) for sendto, and the packed sockaddr_in for sendmmsg
PeerAddress = tuple[tuple[str, int], bytes]


def sockaddr_in(ip: IPv4Address, port: int) -> bytes:
    """struct sockaddr_in (native-endian family, network-order port and address, zero pad)."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, ip.packed)


@dataclass(frozen=True)
class ForwardingTable:
    """Everything the packet loop looks up, as plain dicts and ints (no per-packet objects).

    ``routes`` holds (mask, {network: PeerAddress}) per prefix length, longest first;
    ``sources`` maps a peer's PublicIP (as an int) to the (network, mask) pairs its leases
    cover; ``own`` is our subnet as (network, mask) and ``own_address`` the flannel0 address
    (source of our ICMP errors).
    """

    routes: tuple[tuple[int, dict[int, PeerAddress]], ...] = ()
    sources: Mapping[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    own: tuple[int, int] = (0xFFFFFFFF, 0xFFFFFFFF)  # matches nothing until we have a lease
    own_address: IPv4Address = IPv4Address(0)
    peers: int = 0
    #: SubnetLen as a mask: which subnet an unmatched destination would belong to
    subnet_mask: int = 0xFFFFFFFF

    def unreachable_source(self, dst: int) -> IPv4Address:
        """Source of our net-unreachable: the network address of the subnet `dst` would be in.

        flannel uses its flannel0 address, but a packet written into the TUN with a local
        source address is dropped by Linux as a martian, so the sender never sees the error.
        The would-be subnet's network address (its gateway, were it leased) is not local
        and passes reverse-path filtering (the Network routes through flannel0).
        """
        source = IPv4Address(dst & self.subnet_mask)
        return IPv4Address(dst) if source == self.own_address else source

    def lookup(self, dst: IPv4Address) -> tuple[str, int] | None:
        """Longest-prefix match, as the loop does it inline (for tests and tools)."""
        value = int(dst)
        for mask, nets in self.routes:
            hit = nets.get(value & mask)
            if hit is not None:
                return hit[0]
        return None


def _mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def build_forwarding_table(peers: Iterable[tuple[IPv4Network, IPv4Address]], *,
                           own_subnet: IPv4Network | None, port: int,
                           subnet_len: int = 32) -> ForwardingTable:
    """The table for `peers` (subnet, PublicIP): pure, so the loop's view is testable.

    Which leases count as peers (backend type, our own PublicIP) is the backend's decision;
    here only the shape of the lookup matters.
    """
    by_len: dict[int, dict[int, PeerAddress]] = {}
    sources: dict[int, list[tuple[int, int]]] = {}
    count = 0
    for subnet, public in peers:
        net = int(subnet.network_address)
        by_len.setdefault(subnet.prefixlen, {})[net] = ((str(public), port),
                                                        sockaddr_in(public, port))
        sources.setdefault(int(public), []).append((net, _mask(subnet.prefixlen)))
        count += 1
    routes = tuple((_mask(plen), nets) for plen, nets in sorted(by_len.items(), reverse=True))
    by_ip = {ip: tuple(n) for ip, n in sources.items()}
    if own_subnet is None:
        return ForwardingTable(routes, by_ip, peers=count, subnet_mask=_mask(subnet_len))
    return ForwardingTable(routes, by_ip,
                           (int(own_subnet.network_address), _mask(own_subnet.prefixlen)),
                           own_subnet.network_address, count, _mask(subnet_len))
