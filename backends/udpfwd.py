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

**Loop.** Two threads, one per direction, each doing non-blocking reads until the kernel says
EAGAIN and only then ``poll()``-ing its fd and a wake pipe (so an idle loop sleeps and a busy one
makes no poll calls). Buffers are allocated once per thread and packets are edited in place (TTL
decrement with the RFC 1624 incremental checksum fix). Counters are plain local integers,
flushed into ``stats`` when a burst ends or every :data:`FLUSH_EVERY` packets. Blocking
syscalls release the GIL, so the two directions overlap on two cores.

**Batching.** On Linux the UDP side uses ``recvmmsg``/``sendmmsg`` through ctypes (one syscall for
up to :data:`BATCH` datagrams) when libc has them; the TUN side has no batched read or write, so
it is one ``read``/``write`` per packet. Both paths share one per-packet body.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

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

DROP_REASONS = ("unknown_source", "spoofed_inner_source", "malformed", "not_for_us",
                "no_route", "ttl_expired", "not_ipv4", "send_error", "tun_write_error")

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


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
            "drops": dict.fromkeys(DROP_REASONS, 0)}


# --------------------------------------------------------------------------- TUN device


def open_tun(name: str, *, persist: bool = True) -> int:
    """Open (creating if needed) the TUN device `name`, IFF_NO_PI; return a non-blocking fd.

    ``persist`` makes the device outlive this process, so a restart re-attaches to the same
    device (same index, address and route: no kernel writes, no interruption beyond the loop's
    own down time). EBUSY means another process still holds it.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def drop_tun_persistence(fd: int) -> None:
    """Clear the persist flag (tests' cleanup: the device then goes with the last fd)."""
    fcntl.ioctl(fd, TUNSETPERSIST, 0)


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

    Everything the kernel reads or writes lives in ctypes arrays made once; the loop reads and
    writes them through memoryviews made once (``lens``/``namelens``/``iov_lens`` index the
    length fields directly), so a batch costs one syscall and no per-packet objects.
    """

    SOCKADDR_LEN = 16

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size
        self.data = (ctypes.c_char * (count * size))()
        self.names = (ctypes.c_char * (count * self.SOCKADDR_LEN))()
        self.iov = (_Iovec * count)()
        self.msgs = (_Mmsghdr * count)()
        base, nbase = ctypes.addressof(self.data), ctypes.addressof(self.names)
        for i in range(count):
            self.iov[i].iov_base = base + i * size
            self.iov[i].iov_len = size
            h = self.msgs[i].msg_hdr
            h.msg_name = nbase + i * self.SOCKADDR_LEN
            h.msg_namelen = self.SOCKADDR_LEN
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
        view = memoryview(self.data).cast("B")
        self.slots = [view[i * size:(i + 1) * size] for i in range(count)]
        names = memoryview(self.names).cast("B")
        #: each slot's sockaddr_in, and its 4 address bytes
        self.name_slots = [names[i * 16:(i + 1) * 16] for i in range(count)]
        self.addr_slots = [names[i * 16 + 4:i * 16 + 8] for i in range(count)]
        stride = ctypes.sizeof(_Mmsghdr)
        assert stride % 4 == 0 and ctypes.sizeof(_Iovec) == 16
        words = memoryview(self.msgs).cast("B").cast("I")
        len_off = (_Mmsghdr.msg_len.offset) // 4
        namelen_off = (_Msghdr.msg_namelen.offset) // 4
        self.stride_words = stride // 4
        self.words = words
        self.len_index = [i * self.stride_words + len_off for i in range(count)]
        self.namelen_index = [i * self.stride_words + namelen_off for i in range(count)]
        self.iov_lens = memoryview(self.iov).cast("B").cast("Q")  # [2i+1] = iov_len of slot i
        self.msgs_addr = ctypes.addressof(self.msgs)
        self.stride = stride


# --------------------------------------------------------------------------- the loop


class Forwarder:
    """The running data path of one udp backend: TUN fd + UDP socket + two threads."""

    def __init__(self, tun_fd: int, sock: socket.socket, *, batched: bool | None = None,
                 stats: dict[str, Any] | None = None) -> None:
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
        self._libc = _libc() if batched in (None, True) else None
        if batched and self._libc is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg not available")
        #: each direction's batching can be switched off on its own (bench: measure each step)
        self.batch_tx = self._libc is not None
        self.batch_rx = self._libc is not None

    # -- control

    def start(self) -> None:
        self.sock.setblocking(True)  # sends block (back-pressure); reads use MSG_DONTWAIT
        self._stop.clear()
        for name, target in (("tun-udp", self._tun_to_udp), ("udp-tun", self._udp_to_tun)):
            t = threading.Thread(target=self._guard, args=(target,), name=f"netagent-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop both threads (each finishes its batch in hand); the caller closes the fds."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

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
        with self._stats_lock:
            st = self.stats
            for k, v in counts.items():
                if v:
                    st[k] += v
                    counts[k] = 0
            d = st["drops"]
            for k, v in drops.items():
                if v:
                    d[k] += v
                    drops[k] = 0

    def _wait(self, poller: select.poll) -> bool:
        """Sleep until the fd is readable; False when asked to stop."""
        if self._stop.is_set():
            return False
        poller.poll()
        return not self._stop.is_set()

    def _poller(self, fd: int) -> select.poll:
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        return p

    # -- TUN → UDP

    def _tun_to_udp(self) -> None:
        tun = io.FileIO(self.tun_fd, "r+b", closefd=False)
        readinto, write_tun = tun.readinto, tun.write
        poller = self._poller(self.tun_fd)
        sock = self.sock
        fileno = sock.fileno()
        sendto = sock.sendto
        libc = self._libc if self.batch_tx else None
        batch = MmsgBatch(BATCH, BUF_SIZE) if libc is not None else None
        if batch is not None:
            slots, name_slots, iov_lens = batch.slots, batch.name_slots, batch.iov_lens
            msgs_addr, stride, limit = batch.msgs_addr, batch.stride, batch.count
        else:
            slots, limit = [memoryview(bytearray(BUF_SIZE))], 1
        counts = {"tx_packets": 0, "tx_bytes": 0}
        drops = dict.fromkeys(DROP_REASONS, 0)
        from_bytes = int.from_bytes
        since_flush = 0
        while True:
            nq = 0  # packets queued in the batch
            nbytes = 0
            idle = False
            table = self.table
            routes = table.routes
            while nq < limit:
                buf = slots[nq]
                n = readinto(buf)
                if not n:  # None: EAGAIN
                    idle = True
                    break
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
                            write_tun(reply)
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
                if batch is None:
                    try:
                        sendto(buf[:n], peer[0])
                    except OSError:
                        drops["send_error"] += 1
                        continue
                    counts["tx_packets"] += 1
                    nbytes += n
                    continue
                iov_lens[2 * nq + 1] = n
                name_slots[nq][:] = peer[1]
                nbytes += n
                nq += 1
            if nq:
                done = 0
                while done < nq:
                    r = libc.sendmmsg(fileno, msgs_addr + done * stride, nq - done, 0)
                    if r <= 0:
                        drops["send_error"] += nq - done  # the rest of this batch is lost
                        for i in range(done, nq):
                            nbytes -= iov_lens[2 * i + 1]
                        break
                    done += r
                counts["tx_packets"] += done
                for i in range(nq):
                    iov_lens[2 * i + 1] = BUF_SIZE
            counts["tx_bytes"] += nbytes
            since_flush += nq or 1
            if idle or since_flush >= FLUSH_EVERY:
                since_flush = 0
                self._flush(counts, drops)
            if idle and not self._wait(poller):
                return

    # -- UDP → TUN

    def _udp_to_tun(self) -> None:
        tun = io.FileIO(self.tun_fd, "r+b", closefd=False)
        write_tun = tun.write
        sock = self.sock
        fileno = sock.fileno()
        poller = self._poller(fileno)
        counts = {"rx_packets": 0, "rx_bytes": 0}
        drops = dict.fromkeys(DROP_REASONS, 0)
        from_bytes = int.from_bytes
        inet_aton = socket.inet_aton
        libc = self._libc if self.batch_rx else None
        batch = MmsgBatch(BATCH, BUF_SIZE) if libc is not None else None
        single = memoryview(bytearray(BUF_SIZE))
        recvfrom_into = sock.recvfrom_into
        dontwait = socket.MSG_DONTWAIT
        if batch is not None:
            slots, addr_slots, words = batch.slots, batch.addr_slots, batch.words
            len_index, namelen_index = batch.len_index, batch.namelen_index
            msgs_addr, count = batch.msgs_addr, batch.count
        since_flush = 0
        while True:
            if batch is not None:
                got = libc.recvmmsg(fileno, msgs_addr, count, dontwait, None)
                if got <= 0:  # EAGAIN (or a transient error): flush, then sleep
                    self._flush(counts, drops)
                    if not self._wait(poller):
                        return
                    continue
            else:
                try:
                    n, addr = recvfrom_into(single, 0, dontwait)
                except BlockingIOError:
                    self._flush(counts, drops)
                    if not self._wait(poller):
                        return
                    continue
                except OSError:
                    continue  # e.g. ICMP-induced ECONNREFUSED: nothing to read, try again
                got = 1
            table = self.table
            sources = table.sources
            own_net, own_mask = table.own
            for i in range(got):
                if batch is not None:
                    n = words[len_index[i]]
                    words[namelen_index[i]] = 16
                    buf = slots[i]
                    nets = sources.get(from_bytes(addr_slots[i], "big"))
                else:
                    buf = single
                    nets = sources.get(from_bytes(inet_aton(addr[0]), "big"))
                if nets is None:
                    drops["unknown_source"] += 1
                    continue
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
                try:
                    write_tun(buf[:n])
                except OSError:
                    drops["tun_write_error"] += 1
                    continue
                counts["rx_packets"] += 1
                counts["rx_bytes"] += n
            since_flush += got
            if since_flush >= FLUSH_EVERY:
                since_flush = 0
                self._flush(counts, drops)
