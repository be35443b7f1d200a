"""The udp backend's data path: a forwarding table (pure) and the packet loop (TUN ⇄ UDP).

Wire format (flannel-compatible, reference §13): the raw inner IPv4 packet is the whole UDP
payload. No header means no authentication, so the receive side trusts only what the lease
table vouches for (flannel trusts anything that reaches the port):

* the datagram's source address must be the PublicIP of a current udp lease,
* the payload must be a well-formed IPv4 packet (version, header length, total length equal to
  the datagram length, valid header checksum),
* its inner source must lie inside that peer's subnet, and its destination inside ours.

Everything else is dropped and counted by reason in :attr:`Forwarder.stats`, never logged per
packet.

**Lookup.** :class:`ForwardingTable` is built by a pure function from the peer leases and swapped
in with one attribute assignment, so the reconcile core updates it while the loop runs (no lock:
the loop reads the reference once per packet and sees either the old or the new table). Longest
prefix match is a dict per distinct prefix length, longest first: O(distinct lengths), which is
one dict lookup when every lease has the network's SubnetLen, however many peers there are.

**Loop.** Each direction is a generator that does non-blocking reads, one batch per step,
and says when the kernel answered EAGAIN. By default one thread steps both in turn while they
have work and ``poll()``-s both fds and a wake pipe when neither has (an idle loop sleeps, a busy
one makes no poll calls); two busy threads in one process spent ~20 % of their time handing the
GIL to each other. Buffers are allocated once and packets are edited in place (TTL decrement
with the RFC 1624 incremental checksum fix). Counters are plain local integers, flushed into
``stats`` every :data:`FLUSH_EVERY` packets or, when idle, at most every
:data:`FLUSH_INTERVAL`.

**Batching.** On Linux the UDP side uses ``recvmmsg``/``sendmmsg`` through ctypes (one syscall for
up to :data:`BATCH` datagrams) when libc has them, and UDP GSO/GRO where the kernel has them. The
TUN side has no batched read: with TSO (``TUN_F_TSO4``) one read returns a TCP super-packet of up
to 64 kB, which :func:`backends.udprun.segment_tso` cuts into wire packets sent with one
``UDP_SEGMENT`` ``sendmsg`` per 44; other packets are one ``read`` each.

**Runs.** A UDP_GRO buffer holding a run of one TCP flow (what a GSO-sending peer produces) is
checked as a whole by :func:`backends.udprun.tcp_run` and written to the TUN as one GSO
super-packet straight from the receive buffer (``writev``); the packets a run cannot take go
through the per-packet body, so drops are counted by reason exactly as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import io
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from netagent.backends.udprun import (
    PSH_ACK,
    SliceCache,
    continues_run,
    payload_sums_python,
    segment_tso,
    super_header,
    tcp_run,
)

log = logging.getLogger(__name__)

DEFAULT_UDP_PORT = 8285
#: outer IPv4 20 + UDP 8
UDP_OVERHEAD = 28
#: largest IPv4 packet; buffers are this big so nothing is ever truncated
BUF_SIZE = 65536
#: datagrams per recvmmsg/sendmmsg call
BATCH = 64
#: packets between counter flushes while a burst lasts (so a scrape is never far behind)
FLUSH_EVERY = 1024
#: seconds: an idle loop flushes its counters at most this often (and at least this late)
FLUSH_INTERVAL = 0.05

DROP_REASONS = ("unknown_source", "spoofed_inner_source", "malformed", "not_for_us",
                "no_route", "ttl_expired", "not_ipv4", "send_error", "tun_write_error")

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
# linux/virtio_net.h: struct virtio_net_hdr (10 bytes, little-endian on the TUN)
VNET_LEN = 10
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
# linux/udp.h
UDP_SEGMENT = 103
UDP_GRO = 104
#: largest UDP payload one UDP_SEGMENT send may carry
GSO_SEND_LIMIT = 65000


# --------------------------------------------------------------------------- pure helpers


def ip_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`.

    The one's-complement sum of 16-bit big-endian words is congruent to the whole buffer read
    as one big-endian integer modulo 0xFFFF (2^16 ≡ 1), so the sum runs in C inside
    ``int.from_bytes`` instead of a Python loop.
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    value = int.from_bytes(raw, "big")
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF  # one's-complement sum of non-zero data is 0xFFFF, never 0
    return ~total & 0xFFFF


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


def new_stats() -> dict[str, Any]:
    """The shape the metrics collector reads (``daemon.backend.stats``)."""
    return {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0,
            # offload effect: TCP segments merged into super-packets on receive, super-packets
            # segmented on send (each send is several tx_packets)
            "rx_gro_merged": 0, "tx_tso_packets": 0,
            "drops": dict.fromkeys(DROP_REASONS, 0)}


# --------------------------------------------------------------------------- TUN device


def open_tun(name: str, *, persist: bool = True, vnet: bool = True) -> int:
    """Open (creating if needed) the TUN device `name`, IFF_NO_PI; return a non-blocking fd.

    ``vnet`` adds a 10-byte virtio-net header to every read and write (``IFF_VNET_HDR``): it is
    how the loop hands the kernel coalesced TCP super-packets and receives TSO ones; the
    device itself (what flannel and peers see) is the same.

    ``persist`` makes the device outlive this process, so a restart re-attaches to the same
    device (same index, address and route: no kernel writes, no interruption beyond the loop's
    own down time). EBUSY means another process still holds it.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def set_tun_offload(fd: int, tso: bool) -> None:
    """Let the kernel hand us TCP super-packets with partial checksums (we segment them)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 if tso else 0)


def _tun_offload(fd: int, tso: bool) -> bool:
    """:func:`set_tun_offload`; False where the fd is no TUN or the kernel refuses."""
    try:
        set_tun_offload(fd, tso)
    except OSError:
        return False
    return True


def _sockopt_supported(sock: socket.socket, option: int, value: int | None = None) -> bool:
    """Whether the kernel knows the SOL_UDP `option` (set it to `value`, or just read it)."""
    try:
        if value is None:
            sock.getsockopt(socket.SOL_UDP, option)
        else:
            sock.setsockopt(socket.SOL_UDP, option, value)
    except OSError:
        return False
    return True


SIOCGIFTXQLEN = 0x8942
SIOCSIFTXQLEN = 0x8943


def tun_txqueuelen(name: str, want: int | None = None) -> int:
    """Read (and with `want`, set) the device's transmit queue length, by ioctl.

    The queue is what absorbs bursts while the loop is descheduled (a GIL hand-off alone can
    take 5 ms); the TUN default of 500 packets is ~4 ms at 130 kpps, and every overflow is a
    TCP retransmit.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16si20x", name.encode(), 0)
        have = struct.unpack_from("16si", fcntl.ioctl(s.fileno(), SIOCGIFTXQLEN, ifr))[1]
        if want is not None and want != have:
            fcntl.ioctl(s.fileno(), SIOCSIFTXQLEN, struct.pack("16si20x", name.encode(), want))
            return want
        return int(have)


# --------------------------------------------------------------------------- batched UDP I/O


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int))


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    if not (hasattr(lib, "recvmmsg") and hasattr(lib, "sendmmsg")):
        return None
    lib.recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_void_p)
    lib.recvmmsg.restype = ctypes.c_int
    lib.sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    lib.sendmmsg.restype = ctypes.c_int
    return lib


class MmsgBatch:
    """`count` preallocated datagram slots (buffer + sockaddr_in) for recvmmsg/sendmmsg.

    Each slot starts with ``headroom`` bytes the kernel never touches (the iovec begins after
    them): room for the TUN's virtio-net header in front of a received packet, so a packet is
    written to the TUN from where it was received, without a copy. Everything lives in ctypes
    arrays made once; the loop reaches the length fields through memoryviews made once.
    """

    SOCKADDR_LEN = 16

    def __init__(self, count: int, size: int, headroom: int = 0, control: bool = False) -> None:
        self.count, self.size = count, size
        self.data = (ctypes.c_char * (count * size))()
        self.names = (ctypes.c_char * (count * self.SOCKADDR_LEN))()
        self.iov = (_Iovec * count)()
        self.msgs = (_Mmsghdr * count)()
        base, nbase = ctypes.addressof(self.data), ctypes.addressof(self.names)
        self.room = size - headroom
        for i in range(count):
            self.iov[i].iov_base = base + i * size + headroom
            self.iov[i].iov_len = self.room
            h = self.msgs[i].msg_hdr
            h.msg_name = nbase + i * self.SOCKADDR_LEN
            h.msg_namelen = self.SOCKADDR_LEN
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
        view = memoryview(self.data).cast("B")
        #: whole slots (headroom included) and the packet part of each
        self.slots = [view[i * size:(i + 1) * size] for i in range(count)]
        self.packets = [view[i * size + headroom:(i + 1) * size] for i in range(count)]
        names = memoryview(self.names).cast("B")
        self.name_slots = [names[i * 16:(i + 1) * 16] for i in range(count)]
        self.addr_slots = [names[i * 16 + 4:i * 16 + 8] for i in range(count)]
        stride = ctypes.sizeof(_Mmsghdr)
        assert stride % 4 == 0 and ctypes.sizeof(_Iovec) == 16
        self.words = memoryview(self.msgs).cast("B").cast("I")
        len_off = _Mmsghdr.msg_len.offset // 4
        namelen_off = _Msghdr.msg_namelen.offset // 4
        self.len_index = [i * (stride // 4) + len_off for i in range(count)]
        self.namelen_index = [i * (stride // 4) + namelen_off for i in range(count)]
        self.iov_lens = memoryview(self.iov).cast("B").cast("Q")  # [2i+1] = iov_len of slot i
        self.msgs_addr = ctypes.addressof(self.msgs)
        self.stride = stride
        #: with `control`: one CMSG_SPACE(2) buffer per slot for the UDP_GRO segment size;
        #: ``ctl_index[i]`` indexes the slot's msg_controllen (low half) in ``words``, reset
        #: after each use; ``ctl_words[6 i + 2..4]`` = level, type, data of its cmsghdr
        self.ctl_index: list[int] = []
        self.ctl_words = memoryview(b"")
        if control:
            space = GsoGroups.CMSG_SPACE
            self.control = (ctypes.c_char * (count * space))()
            caddr = ctypes.addressof(self.control)
            for i in range(count):
                self.msgs[i].msg_hdr.msg_control = caddr + i * space
                self.msgs[i].msg_hdr.msg_controllen = space
            ctl_off = _Msghdr.msg_controllen.offset // 4
            self.ctl_index = [i * (stride // 4) + ctl_off for i in range(count)]
            self.ctl_words = memoryview(self.control).cast("B").cast("I")


class GsoGroups:
    """Send a filled :class:`MmsgBatch` as UDP GSO messages in one ``sendmmsg``.

    Consecutive packets for the same peer with the same length (the last of a run may be
    shorter) become one message whose iovecs are those packets' slots, with a UDP_SEGMENT
    control message: the kernel then builds one skb per run and cuts it into datagrams as late
    as it can (on veth, at the receiving socket), instead of running its output path once per
    datagram. Each datagram on the wire is still exactly one inner packet.
    """

    CMSG_SPACE = 24  # CMSG_SPACE(sizeof(uint16_t)) on 64-bit Linux
    MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS is 64 on older kernels, 128 on newer
    MAX_BYTES = 65000  # one UDP send carries at most 64 kB

    def __init__(self, batch: MmsgBatch) -> None:
        n = batch.count
        self.batch = batch
        self.msgs = (_Mmsghdr * n)()
        self.cmsgs = (ctypes.c_char * (n * self.CMSG_SPACE))()
        self.words = memoryview(self.msgs).cast("B").cast("Q")  # 8 words per mmsghdr
        assert ctypes.sizeof(_Mmsghdr) == 64
        iov, names = ctypes.addressof(batch.iov), ctypes.addressof(batch.names)
        cm = ctypes.addressof(self.cmsgs)
        self.iov_addr = [iov + 16 * i for i in range(n)]
        self.name_addr = [names + 16 * i for i in range(n)]
        self.cmsg_addr = [cm + self.CMSG_SPACE * g for g in range(n)]
        for g in range(n):
            # cmsghdr: len = CMSG_LEN(2) = 18, SOL_UDP, UDP_SEGMENT; data (u16) at +16
            struct.pack_into("=QiiH", self.cmsgs, self.CMSG_SPACE * g, 18, socket.SOL_UDP,
                             UDP_SEGMENT, 0)
            self.words[8 * g + 1] = MmsgBatch.SOCKADDR_LEN
        self.sizes = memoryview(self.cmsgs).cast("B").cast("H")  # [12 g + 8] = segment size
        self.addr = ctypes.addressof(self.msgs)

    def build(self, nq: int) -> tuple[int, list[int]]:
        """Group the first `nq` queued packets; (messages, packets per message)."""
        b = self.batch
        lens, names, w = b.iov_lens, b.name_slots, self.words
        per: list[int] = []
        g = i = 0
        while i < nq:
            size = lens[2 * i + 1]
            name = names[i]
            j, total = i + 1, size
            while j < nq and j - i < self.MAX_SEGMENTS and total + size <= self.MAX_BYTES \
                    and lens[2 * j + 1] == size and names[j] == name:
                total += size
                j += 1
            if j < nq and j - i < self.MAX_SEGMENTS and lens[2 * j + 1] < size \
                    and total + lens[2 * j + 1] <= self.MAX_BYTES and names[j] == name:
                j += 1  # a shorter last segment is allowed
            base = 8 * g
            w[base] = self.name_addr[i]
            w[base + 2] = self.iov_addr[i]
            w[base + 3] = j - i
            if j - i > 1:
                w[base + 4] = self.cmsg_addr[g]
                w[base + 5] = self.CMSG_SPACE
                self.sizes[12 * g + 8] = size
            else:
                w[base + 4] = w[base + 5] = 0
            per.append(j - i)
            g += 1
            i = j
        return g, per


# --------------------------------------------------------------------------- offload helpers


def _fold(value: int) -> int:
    """One's-complement sum of a big-endian buffer read as one int (see ip_checksum)."""
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value else total


_NO_VNET = bytes(VNET_LEN)


class Coalescer:
    """User-space GRO: consecutive in-order TCP segments of one flow → one TUN write.

    The kernel receives one super-packet (virtio-net GSO TCPV4, checksum left partial) and
    forwards it as a single skb to the pod, instead of running its forwarding path once per
    1.4 kB segment; that per-segment cost, not Python, was most of the receiver's CPU.
    The rules are Linux GRO's: same addresses, ports, TOS, ACK number, window and TCP options,
    sequence numbers contiguous, every segment but the last exactly the first one's size,
    flags ACK or ACK|PSH only (PSH or a short segment ends the super-packet), at most ~64 kB.
    Only packets that already passed every receive check get here.
    """

    LIMIT = 65535 - 20 - 60

    def __init__(self, write: Any) -> None:
        self.write = write
        self.buf = memoryview(bytearray(VNET_LEN + 65535 + 2048))
        self.size = 0  # bytes of IP packet held (0 = nothing pending)
        self.count = 0
        self.hlen = self.mss = self.next_seq = 0
        self.closed = False
        self.packets = 0  # TUN writes saved, for stats
        self.writes = 0

    def add(self, pkt: memoryview, n: int, slot: memoryview | None) -> None:
        """`pkt[:n]` is IPv4 (no options) + TCP with flags ACK/ACK|PSH, possibly without data;
        `slot` is the same packet with the (zero) virtio header in front, to write it alone
        (None: the packet is inside a UDP GRO run, with no room in front; it is copied)."""
        thl = (pkt[32] >> 4) << 2
        hlen = 20 + thl
        plen = n - hlen
        if thl < 20 or plen <= 0:
            self.flush()  # pure ACKs and odd headers go out alone, after what came before
            self.writes += 1
            if slot is None:
                b = self.buf
                b[0:VNET_LEN] = _NO_VNET
                b[VNET_LEN:VNET_LEN + n] = pkt[:n]
                self.write(b[:VNET_LEN + n])
            else:
                self.write(slot[:VNET_LEN + n])
            return
        b = self.buf
        seq = int.from_bytes(pkt[24:28], "big")
        if self.size and not self.closed and seq == self.next_seq and hlen == self.hlen \
                and plen <= self.mss and self.size + plen <= self.LIMIT \
                and pkt[12:24] == b[22:34] and pkt[1] == b[11] and pkt[28:33] == b[38:43] \
                and pkt[34:36] == b[44:46] and pkt[40:hlen] == b[50:VNET_LEN + hlen]:
            end = VNET_LEN + self.size
            b[end:end + plen] = pkt[hlen:n]
            self.size += plen
            self.count += 1
            self.next_seq = (seq + plen) & 0xFFFFFFFF
            if pkt[33] & 0x08:  # PSH: deliver now, and keep the flag
                b[43] |= 0x08
                self.closed = True
            elif plen < self.mss:
                self.closed = True
            return
        self.flush()
        b[VNET_LEN:VNET_LEN + n] = pkt[:n]
        self.size, self.count, self.hlen, self.mss = n, 1, hlen, plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.closed = bool(pkt[33] & 0x08)

    def flush(self) -> None:
        if not self.size:
            return
        b, size = self.buf, self.size
        if self.count == 1:
            b[0:VNET_LEN] = _NO_VNET
        else:
            ip = VNET_LEN
            b[ip + 2] = size >> 8
            b[ip + 3] = size & 0xFF
            b[ip + 10] = b[ip + 11] = 0
            csum = ~_fold(int.from_bytes(b[ip:ip + 20], "big")) & 0xFFFF
            b[ip + 10] = csum >> 8
            b[ip + 11] = csum & 0xFF
            # partial TCP checksum: the pseudo-header sum, not inverted (CHECKSUM_PARTIAL)
            pseudo = _fold(int.from_bytes(b[ip + 12:ip + 20], "big") + 6 + size - 20)
            b[ip + 36] = pseudo >> 8
            b[ip + 37] = pseudo & 0xFF
            struct.pack_into("<BBHHHH", b, 0, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, self.hlen,
                             self.mss, 20, 16)
            self.packets += self.count - 1
        self.writes += 1
        self.write(b[:VNET_LEN + size])
        self.size = self.count = 0


def complete_checksum(pkt: memoryview, n: int, start: int, offset: int) -> bool:
    """Finish a CHECKSUM_PARTIAL packet: the field already holds the pseudo-header sum."""
    if start + offset + 2 > n or start >= n:
        return False
    # the sum mod 0xFFFF (the folds of payload_sums_python: cheaper than % on 1.4 kB); a sum
    # of 0 gives 0xFFFF, which is valid for every protocol (and required for UDP)
    c = ~payload_sums_python(pkt[start:n], n - start, 1) & 0xFFFF
    pkt[start + offset] = c >> 8
    pkt[start + offset + 1] = c & 0xFF
    return True


# --------------------------------------------------------------------------- the loop


class RunWriter:
    """Runs of one TCP flow (:func:`~backends.udprun.tcp_run`) → GSO super-packets on the TUN,
    the payloads handed to ``writev`` straight from the receive buffers.

    A TSO packet of the sender (45 segments of 1420 bytes) does not fit one UDP GSO send
    (64 kB), so it arrives as a run of 44 and one more datagram with the last segment. The
    last run stays pending while the next datagram from the same peer may continue it, so the
    receiver still writes one super-packet per TSO packet. Whoever writes anything else to
    the TUN calls :meth:`flush` first (order is kept), and the loop flushes before the next
    ``recvmmsg`` reuses the buffers.
    """

    LIMIT = 65535

    def __init__(self, write: Any) -> None:
        self.writev = write
        self.iov: list[memoryview] = []
        self.hdr = memoryview(bytearray(VNET_LEN + 80))  # IPv4 20 + TCP up to 60
        self.first: memoryview | None = None  # first packet of the pending run
        self.source = self.hlen = self.mss = self.size = self.next_seq = self.merged = 0
        self.psh = False
        self.errors = 0
        self.saved = 0  # TUN writes saved (packets merged into another's write), for stats
        self._slices = SliceCache()

    def start(self, whole: memoryview, seg: int, k: int, total: int, hlen: int,
              source: int, stable: bool = False) -> tuple[int, int]:
        """Take the `k` checked packets of a run at the start of ``whole[:total]`` (appended
        to the pending run if they continue it), and the short packet after them if it
        continues the flow. Returns (bytes taken, packets); what is left is for the
        packet-by-packet path."""
        mss = seg - hlen
        if self.first is not None and not (
                source == self.source and hlen == self.hlen and mss == self.mss and
                not self.psh and self.size + k * mss <= self.LIMIT and
                continues_run(self.first, whole, seg, hlen, self.next_seq, mss)):
            self.flush()
        iov = self.iov
        if self.first is None:
            iov.append(self.hdr)
            self.first, self.source, self.hlen, self.mss = whole, source, hlen, mss
            self.size, self.merged = hlen, 0
            self.next_seq = int.from_bytes(whole[24:28], "big")
        end = k * seg
        if stable:  # a receive slot: the same slices as for the last run in it
            iov.extend(self._slices.slices(whole, hlen, mss, seg)[:k])
        else:
            iov.extend([whole[o:o + mss] for o in range(hlen, end, seg)])
        self.size += k * mss
        self.next_seq = (self.next_seq + k * mss) & 0xFFFFFFFF
        self.psh = whole[end - seg + 33] == PSH_ACK
        self.merged += k
        rest = total - end
        if not rest:
            if self.psh:
                self.flush()
            return end, k
        if rest < seg and self.extend(whole[end:total], rest, source):
            return total, k + 1
        self.flush()  # the packet-by-packet path writes what follows
        return end, k

    def extend(self, pkt: memoryview, n: int, source: int) -> bool:
        """Append `pkt` to the pending run if it continues it (same peer, next sequence number,
        the receive checks: :func:`~backends.udprun.continues_run`); a short packet or PSH ends
        the run and writes it."""
        first = self.first
        if first is None or self.psh or source != self.source or \
                self.size + n - self.hlen > self.LIMIT or \
                not continues_run(first, pkt, n, self.hlen, self.next_seq, self.mss):
            return False
        plen = n - self.hlen
        self.iov.append(pkt[self.hlen:n])
        self.size += plen
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        self.merged += 1
        self.psh = pkt[33] == PSH_ACK
        if self.psh or plen < self.mss:
            self.flush()
        return True

    def flush(self) -> None:
        first = self.first
        if first is None:
            return
        iov = self.iov
        iov[0] = self.hdr[:super_header(self.hdr, first, self.hlen, self.size, self.mss,
                                        self.psh)]
        try:
            self.writev(iov)
        except OSError:
            self.errors += self.merged
        self.saved += self.merged - 1
        iov.clear()
        self.first = None


class Forwarder:
    """The running data path of one udp backend: TUN fd + UDP socket + one thread (both
    directions in turn) or two (one each).

    ``vnet``: the TUN fd carries virtio-net headers (IFF_VNET_HDR), which ``gro`` (coalesce
    received TCP into super-packets) and ``tso`` (take super-packets from the kernel, segment
    them, send with UDP_SEGMENT) need. Without vnet the loop is one packet per TUN read/write.

    What the kernel cannot do is found out here, before the loop starts, and switched off:
    ``gso`` without ``UDP_SEGMENT`` (Linux < 4.18), ``udp_gro`` without ``UDP_GRO`` (< 5.0),
    ``tso`` without ``TUNSETOFFLOAD`` or without UDP GSO to send the segments with. The flags
    left on say which path runs (the backend logs them).
    """

    def __init__(self, tun_fd: int, sock: socket.socket, *, vnet: bool = False,
                 gro: bool | None = None, tso: bool | None = None, gso: bool = True,
                 udp_gro: bool = True, stats: dict[str, Any] | None = None,
                 threads: int = 2) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        #: swapped whole by the backend's sync; the loop reads it once per batch
        self.table = ForwardingTable()
        #: counters, updated in place (the backend and the metrics collector hold this dict)
        self.stats: dict[str, Any] = stats if stats is not None else new_stats()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._libc = _libc()
        if self._libc is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg not available in libc")
        self.vnet = vnet
        self.gro = vnet if gro is None else (gro and vnet)
        #: UDP GSO for runs of equal packets; switched off for good if the kernel refuses it
        self.gso = gso and _sockopt_supported(sock, UDP_SEGMENT)
        #: receive runs of datagrams as one buffer (UDP_GRO), split here
        self.udp_gro = udp_gro and _sockopt_supported(sock, UDP_GRO, 1)
        want_tso = vnet if tso is None else (tso and vnet)
        self.tso = want_tso and self.gso and _tun_offload(tun_fd, True)
        if vnet and not self.tso:
            _tun_offload(tun_fd, False)  # a persistent device may still have it from before
        #: one's-complement sums of a TSO packet's payload chunks (see udprun)
        self.payload_sums: Any = payload_sums_python
        #: 1: both directions in one thread; 2: a thread each
        self.threads = threads
        self._slices = SliceCache()  # for the TSO path (one thread sends)
        self._flush_at = 0.0  # counters are flushed when idle at most this often
        self._dirty = False  # a loop went idle with counts not flushed yet

    # -- control

    def start(self) -> None:
        self.sock.setblocking(True)  # sends block (back-pressure); reads use MSG_DONTWAIT
        if self.threads == 1:
            loops: list[tuple[str, Any]] = [("udp", self._run_both)]
        else:
            loops = [("tun-udp", lambda: self._run_one(self._tun_to_udp, self.tun_fd)),
                     ("udp-tun", lambda: self._run_one(self._udp_to_tun, self.sock.fileno()))]
        for name, target in loops:
            t = threading.Thread(target=self._guard, args=(target,), name=f"netagent-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _run_one(self, loop: Any, fd: int) -> None:
        """One direction in its own thread, sleeping in poll() on its fd when idle."""
        poller = self._poller(fd)
        stopping = self._stop.is_set
        for idle in loop():
            if idle and self._wait(poller) is None or stopping():
                return

    def _run_both(self) -> None:
        """Both directions in one thread, a batch of each in turn while it has work; poll() on
        both fds when neither has, and step only the ones poll() found readable. No GIL
        hand-offs between two busy threads (a futex wake and a context switch each time one
        blocks in a syscall), no reads just to learn that an fd is empty."""
        poller = self._poller(self.tun_fd)
        sock_fd = self.sock.fileno()
        poller.register(sock_fd, select.POLLIN)
        tun_udp, udp_tun = self._tun_to_udp(), self._udp_to_tun()
        tun_busy = udp_busy = True
        stopping = self._stop.is_set
        while True:
            if stopping():  # a loop that never idles must still stop
                return
            if tun_busy:
                tun_busy = not next(tun_udp)
            if udp_busy:
                udp_busy = not next(udp_tun)
            if tun_busy or udp_busy:
                continue
            events = self._wait(poller)
            if events is None:
                return
            if not events:  # the flush timeout: let both flush their counters
                tun_busy = udp_busy = True
            for fd, _ in events:
                if fd == sock_fd:
                    udp_busy = True
                elif fd != self._wake_r:
                    tun_busy = True

    def stop(self) -> None:
        """Stop the loop threads (each finishes its batch in hand); the caller closes the fds.
        A second call does nothing (the wake pipe's fd numbers may belong to others by then)."""
        if self._wake_w < 0:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _guard(self, target: Any) -> None:
        """Never let a loop die: an error (a deleted device: EBADFD) is logged once per kind
        and the loop restarts after a pause, so a broken fd cannot turn into a busy loop."""
        last = ""
        while not self._stop.is_set():
            try:
                target()
                return
            except Exception as exc:  # noqa: BLE001 - the data path must survive anything
                what = f"{type(exc).__name__}: {exc}"
                if what != last:
                    log.error("udp packet loop (%s) failed: %s; restarting it every second",
                              threading.current_thread().name, what, exc_info=True)
                    last = what
                self._stop.wait(1.0)

    def _flush(self, counts: dict[str, int], drops: dict[str, int]) -> None:
        """Move a thread's local counters into ``stats`` (the only place both threads write)."""
        self._flush_at = time.monotonic() + FLUSH_INTERVAL
        with self._stats_lock:
            st = self.stats
            for k, v in counts.items():
                if v:
                    st[k] = st.get(k, 0) + v
                    counts[k] = 0
            d = st["drops"]
            for k, v in drops.items():
                if v:
                    d[k] += v
                    drops[k] = 0

    def _flush_now(self, pending: int) -> bool:
        """Whether an idle loop with `pending` unflushed packets should flush its counters now.

        Flushing (a lock and two small dicts) on every idle moment cost more than forwarding
        when the loop wakes up once per ACK; so at most every :data:`FLUSH_INTERVAL`, and a
        loop that leaves counts behind sleeps with that timeout, then flushes."""
        if not pending:
            return False
        if time.monotonic() >= self._flush_at:
            return True
        self._dirty = True
        return False

    def _wait(self, poller: select.poll) -> list[tuple[int, int]] | None:
        """Sleep until an fd is readable (or unflushed counters are due); the poll events, or
        None when asked to stop."""
        if self._stop.is_set():
            return None
        if self._dirty:
            self._dirty = False
            events = poller.poll(FLUSH_INTERVAL * 1000)
        else:
            events = poller.poll()
        return None if self._stop.is_set() else events

    def _poller(self, fd: int) -> select.poll:
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        return p

    # -- TUN → UDP

    def _tun_to_udp(self) -> Iterator[bool]:
        """TUN → UDP, one batch per step; yields True when the TUN had nothing more to read."""
        tun = io.FileIO(self.tun_fd, "r+b", closefd=False)
        readinto, write_tun = tun.readinto, tun.write
        sock = self.sock
        fileno = sock.fileno()
        libc = self._libc
        h = VNET_LEN if self.vnet else 0
        batch = MmsgBatch(BATCH, BUF_SIZE + h, headroom=h)
        slots, packets = batch.slots, batch.packets
        name_slots, iov_lens = batch.name_slots, batch.iov_lens
        msgs_addr, stride, limit = batch.msgs_addr, batch.stride, batch.count
        # the segment headers of one TSO packet: 64 kB in segments of TCP's smallest MSS (48)
        gso_hdrs = memoryview(bytearray(80 * (BUF_SIZE // 48 + 1)))
        groups = GsoGroups(batch) if self.gso else None
        sendmsg = sock.sendmsg
        counts = {"tx_packets": 0, "tx_bytes": 0, "tx_tso_packets": 0}
        drops = dict.fromkeys(DROP_REASONS, 0)
        from_bytes = int.from_bytes
        unpack_vnet = struct.Struct("<BBHHHH").unpack_from
        since_flush = 0
        while True:
            nq = 0  # packets queued in the batch
            nbytes = 0
            idle = False
            table = self.table
            routes = table.routes
            budget = limit  # packets per step, a TSO packet counting as its segments
            while nq < limit and budget > 0:
                n = readinto(slots[nq])
                if not n:  # None: EAGAIN
                    idle = True
                    break
                budget -= 1
                buf = packets[nq]
                n -= h
                if n < 20 or buf[0] >> 4 != 4:
                    drops["not_ipv4"] += 1
                    continue
                dst = from_bytes(buf[16:20], "big")
                peer = None
                for mask, nets in routes:
                    peer = nets.get(dst & mask)
                    if peer is not None:
                        break
                if peer is None:
                    drops["no_route"] += 1
                    reply = net_unreachable(buf[:n], table.unreachable_source(dst))
                    if reply is not None:
                        with contextlib.suppress(OSError):
                            write_tun(bytes(h) + reply)
                    continue
                ttl = buf[8]
                if ttl <= 1:
                    drops["ttl_expired"] += 1
                    continue
                buf[8] = ttl - 1
                csum = ((buf[10] << 8) | buf[11]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                buf[10] = csum >> 8
                buf[11] = csum & 0xFF
                if h:
                    vflags, gso, _, gso_size, cstart, coff = unpack_vnet(slots[nq])
                    if gso & 0x7F == VNET_GSO_TCPV4 and gso_size and buf[9] == 6:
                        # flush what is queued first: packets leave in the order they came
                        if nq:
                            sent, sbytes = self._sendmmsg(libc, fileno, msgs_addr, stride, nq,
                                                          iov_lens, drops)
                            counts["tx_packets"] += sent
                            nbytes += sbytes
                            nq = 0
                        budget -= self._send_gso(sendmsg, buf, n, gso_hdrs, gso_size, peer[0],
                                                 counts, drops) - 1
                        continue
                    if vflags & VNET_F_NEEDS_CSUM and not complete_checksum(buf, n, cstart,
                                                                             coff):
                        drops["not_ipv4"] += 1
                        continue
                iov_lens[2 * nq + 1] = n
                name_slots[nq][:] = peer[1]
                nq += 1
            if nq:
                if groups is not None and self.gso and nq > 1:
                    sent, sbytes = self._send_groups(libc, fileno, groups, nq, drops)
                    if sent < 0:  # the kernel has no UDP GSO: plain datagrams from now on
                        log.warning("UDP GSO refused (%s); sending datagram by datagram",
                                    os.strerror(-sent))
                        self.gso = False
                        sent, sbytes = self._sendmmsg(libc, fileno, msgs_addr, stride, nq,
                                                      iov_lens, drops)
                else:
                    sent, sbytes = self._sendmmsg(libc, fileno, msgs_addr, stride, nq,
                                                  iov_lens, drops)
                counts["tx_packets"] += sent
                nbytes += sbytes
            counts["tx_bytes"] += nbytes
            since_flush += limit - budget  # packets read (a TSO packet: its segments)
            if since_flush >= FLUSH_EVERY or idle and self._flush_now(since_flush):
                since_flush = 0
                self._flush(counts, drops)
            yield idle

    @staticmethod
    def _sendmmsg(libc: Any, fileno: int, msgs_addr: int, stride: int, nq: int,
                  iov_lens: memoryview, drops: dict[str, int]) -> tuple[int, int]:
        """Send the first `nq` queued datagrams; (datagrams sent, bytes sent)."""
        done = 0
        while done < nq:
            r = libc.sendmmsg(fileno, msgs_addr + done * stride, nq - done, 0)
            if r <= 0:
                drops["send_error"] += nq - done  # the rest of this batch is lost
                break
            done += r
        nbytes = sum(iov_lens[2 * i + 1] for i in range(done))
        return done, nbytes

    @staticmethod
    def _send_groups(libc: Any, fileno: int, groups: GsoGroups, nq: int,
                     drops: dict[str, int]) -> tuple[int, int]:
        """Send the queued packets as GSO runs; (packets sent, bytes), or (-errno, 0) when the
        kernel rejects UDP_SEGMENT itself before anything was sent."""
        count, per = groups.build(nq)
        lens = groups.batch.iov_lens
        done = 0
        while done < count:
            r = libc.sendmmsg(fileno, groups.addr + done * 64, count - done, 0)
            if r <= 0:
                err = ctypes.get_errno()
                if done == 0 and err in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT,
                                         errno.EOPNOTSUPP):
                    return -err, 0
                drops["send_error"] += sum(per[done:])
                break
            done += r
        sent = sum(per[:done])
        return sent, sum(lens[2 * i + 1] for i in range(sent))

    def _send_gso(self, sendmsg: Any, buf: memoryview, n: int, hdrs: memoryview, mss: int,
                  addr: tuple[str, int], counts: dict[str, int], drops: dict[str, int]) -> int:
        """Segment one TSO super-packet (:func:`~backends.udprun.segment_tso`) and send it in as
        few ``UDP_SEGMENT`` calls as fit (64 kB and 64 segments per call); returns the number
        of segments."""
        ihl = (buf[0] & 0x0F) << 2
        thl = (buf[ihl + 12] >> 4) << 2
        hlen = ihl + thl
        if ihl < 20 or thl < 20 or hlen >= n or mss < 48:
            drops["not_ipv4"] += 1
            return 1
        iov, seg, count = segment_tso(buf, n, mss, hdrs, self.payload_sums, self._slices)
        per_call = max(1, min(GsoGroups.MAX_SEGMENTS, GSO_SEND_LIMIT // seg))
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))]
        for a in range(0, count, per_call):
            b = min(count, a + per_call)
            part = iov[2 * a:2 * b]
            try:
                sent = sendmsg(part, cmsg, 0, addr)
            except OSError:
                drops["send_error"] += b - a
            else:
                counts["tx_packets"] += b - a
                counts["tx_bytes"] += sent
                counts["tx_tso_packets"] += 1
        return count

    # -- UDP → TUN

    def _udp_to_tun(self) -> Iterator[bool]:
        """UDP → TUN, one batch per step; yields True when the socket had nothing more."""
        tun_fd = self.tun_fd
        os_write = os.write
        sock = self.sock
        fileno = sock.fileno()
        counts = {"rx_packets": 0, "rx_bytes": 0, "rx_gro_merged": 0}
        drops = dict.fromkeys(DROP_REASONS, 0)
        from_bytes = int.from_bytes
        libc = self._libc
        h = VNET_LEN if self.vnet else 0
        batch = MmsgBatch(BATCH, BUF_SIZE + h, headroom=h, control=self.udp_gro)
        ctl_index, ctl_words = batch.ctl_index, batch.ctl_words
        dontwait = socket.MSG_DONTWAIT
        slots, packets, addr_slots, words = batch.slots, batch.packets, batch.addr_slots, \
            batch.words
        len_index, namelen_index = batch.len_index, batch.namelen_index
        msgs_addr, count = batch.msgs_addr, batch.count
        scratch = memoryview(bytearray(BUF_SIZE + h))
        errors = [0]

        def write(view: memoryview) -> None:
            try:
                os_write(tun_fd, view)
            except OSError:
                errors[0] += 1

        gro = Coalescer(write) if self.gro else None
        runs = RunWriter(lambda iov: os.writev(tun_fd, iov))
        since_flush = 0
        while True:
            got = libc.recvmmsg(fileno, msgs_addr, count, dontwait, None)
            if got <= 0:  # EAGAIN (or a transient error): flush, then sleep
                if self._flush_now(since_flush):
                    since_flush = 0
                    self._flush(counts, drops)
                yield True
                continue
            table = self.table
            sources = table.sources
            own_net, own_mask = table.own
            for i in range(got):
                total = words[len_index[i]]
                words[namelen_index[i]] = 16
                seg = total
                if ctl_index:
                    # UDP_GRO: one buffer may hold a run of datagrams of `seg` bytes each
                    c = ctl_index[i]
                    if words[c] and ctl_words[6 * i + 2] == socket.SOL_UDP and \
                            ctl_words[6 * i + 3] == UDP_GRO:
                        seg = (ctl_words[6 * i + 4] & 0xFFFF) or total
                    words[c] = GsoGroups.CMSG_SPACE
                source = from_bytes(addr_slots[i], "big")
                nets = sources.get(source)
                if nets is None:
                    drops["unknown_source"] += -(-total // seg) if seg else 1
                    continue
                whole = packets[i]
                single = seg >= total
                off = 0
                while True:
                    stop = total
                    if gro is not None and not single and total - off >= seg << 1:
                        # a run of one TCP flow: checked and merged as a whole (udprun)
                        view = whole[off:total] if off else whole
                        m, hlen = tcp_run(view, seg, (total - off) // seg, nets, own_net,
                                          own_mask)
                        if m >= 2:
                            gro.flush()
                            used, merged = runs.start(view, seg, m, total - off, hlen, source,
                                                      not off)
                            counts["rx_packets"] += merged
                            counts["rx_bytes"] += used
                            off += used
                            if off >= total:
                                break
                            continue
                        stop = off + seg  # one packet the slow way, then look for a run again
                    for pos in range(off, stop or 1, seg or 1):
                        if single:
                            buf, n = whole, total
                        else:
                            n = min(seg, total - pos)
                            buf = whole[pos:pos + n]
                        if runs.first is not None:
                            if runs.extend(buf, n, source):  # the rest of a TSO packet
                                counts["rx_packets"] += 1
                                counts["rx_bytes"] += n
                                continue
                            runs.flush()
                        if n < 20:
                            drops["malformed"] += 1
                            continue
                        b0 = buf[0]
                        ihl = (b0 & 0x0F) << 2
                        if b0 >> 4 != 4 or ihl < 20 or ihl > n or (buf[2] << 8 | buf[3]) != n or \
                                from_bytes(buf[:ihl], "big") % 0xFFFF:
                            drops["malformed"] += 1
                            continue
                        inner_src = from_bytes(buf[12:16], "big")
                        for net, mask in nets:
                            if inner_src & mask == net:
                                break
                        else:
                            drops["spoofed_inner_source"] += 1
                            continue
                        if from_bytes(buf[16:20], "big") & own_mask != own_net:
                            drops["not_for_us"] += 1
                            continue
                        ttl = buf[8]
                        if ttl <= 1:
                            drops["ttl_expired"] += 1
                            continue
                        buf[8] = ttl - 1
                        csum = ((buf[10] << 8) | buf[11]) + 0x0100
                        csum = (csum & 0xFFFF) + (csum >> 16)
                        buf[10] = csum >> 8
                        buf[11] = csum & 0xFF
                        counts["rx_packets"] += 1
                        counts["rx_bytes"] += n
                        if gro is not None:
                            # TCP, no IP options, not a fragment (DF allowed), flags ACK or
                            # ACK|PSH
                            if buf[9] == 6 and ihl == 20 and not (buf[6] & 0x3F or buf[7]) and \
                                    n >= 40 and buf[33] in (0x10, 0x18):
                                gro.add(buf, n, slots[i] if single else None)
                                continue
                            gro.flush()
                        try:
                            if single:
                                os_write(tun_fd, slots[i][:n + h])
                            else:  # no headroom in front of a packet inside a run: copy it out
                                scratch[h:h + n] = buf
                                os_write(tun_fd, scratch[:h + n])
                        except OSError:
                            drops["tun_write_error"] += 1
                    off = stop
                    if off >= total:
                        break
            runs.flush()  # before recvmmsg reuses the buffers
            if runs.errors:
                drops["tun_write_error"] += runs.errors
                runs.errors = 0
            counts["rx_gro_merged"] += runs.saved
            runs.saved = 0
            if gro is not None:
                gro.flush()
                if gro.packets:
                    counts["rx_gro_merged"] += gro.packets
                    gro.packets = 0
            if errors[0]:
                drops["tun_write_error"] += errors[0]
                errors[0] = 0
            since_flush += got
            if since_flush >= FLUSH_EVERY:
                since_flush = 0
                self._flush(counts, drops)
            yield False
