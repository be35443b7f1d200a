"""The udp backend's packet loop: TUN ⇄ UDP, both directions, in one thread or two.

The parts it drives live beside it: the wire format, forwarding table and per-packet trust
checks in ``udptrust``, the TUN device's ioctls in ``udptun``, batched UDP I/O
(``recvmmsg``/``sendmmsg``, UDP GSO groups) in ``udpmmsg``, TUN-side offloads (user-space GRO,
GSO run writes) in ``udpoffload``, whole-run checks and TSO segmentation in ``udprun``, and
the counters in ``udpstats``. What is dropped is counted by reason, never logged per packet.

**Loop.** Each direction is a generator that does non-blocking reads, one batch per step,
and says when the kernel answered EAGAIN. By default one thread steps both in turn while they
have work and ``poll()``-s both fds and a wake pipe when neither has (an idle loop sleeps, a busy
one makes no poll calls); two busy threads in one process spent ~20 % of their time handing the
GIL to each other. Buffers are allocated once and packets are edited in place (TTL decrement
with the RFC 1624 incremental checksum fix). Counters are plain local integers, flushed into
``stats`` every :data:`~backends.udpstats.FLUSH_EVERY` packets or, when idle, at most every
:data:`~backends.udpstats.FLUSH_INTERVAL`.

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
import errno
import io
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from netagent.backends.udpmmsg import (
    GSO_SEND_LIMIT,
    UDP_GRO,
    UDP_SEGMENT,
    GsoGroups,
    MmsgBatch,
    load_libc,
    send_groups,
    sendmmsg_all,
    sockopt_supported,
)
from netagent.backends.udpoffload import Coalescer, RunWriter, complete_checksum
from netagent.backends.udprun import SliceCache, payload_sums_python, segment_tso, tcp_run
from netagent.backends.udpstats import DROP_REASONS, FLUSH_EVERY, FLUSH_INTERVAL, StatsFlusher, new_stats
from netagent.backends.udptrust import ForwardingTable, decrement_ttl, header_ok, net_unreachable
from netagent.backends.udptun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_LEN, tun_offload

log = logging.getLogger(__name__)

#: largest IPv4 packet; buffers are this big so nothing is ever truncated
BUF_SIZE = 65536
#: datagrams per recvmmsg/sendmmsg call
BATCH = 64


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
        self._counters = StatsFlusher(self.stats)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._libc = load_libc()
        if self._libc is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg not available in libc")
        self.vnet = vnet
        self.gro = vnet if gro is None else (gro and vnet)
        #: UDP GSO for runs of equal packets; switched off for good if the kernel refuses it
        self.gso = gso and sockopt_supported(sock, UDP_SEGMENT)
        #: receive runs of datagrams as one buffer (UDP_GRO), split here
        self.udp_gro = udp_gro and sockopt_supported(sock, UDP_GRO, 1)
        want_tso = vnet if tso is None else (tso and vnet)
        self.tso = want_tso and self.gso and tun_offload(tun_fd, True)
        if vnet and not self.tso:
            tun_offload(tun_fd, False)  # a persistent device may still have it from before
        #: one's-complement sums of a TSO packet's payload chunks (see udprun)
        self.payload_sums: Any = payload_sums_python
        #: 1: both directions in one thread; 2: a thread each
        self.threads = threads
        self._slices = SliceCache()  # for the TSO path (one thread sends)

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

    def _wait(self, poller: select.poll) -> list[tuple[int, int]] | None:
        """Sleep until an fd is readable (or unflushed counters are due); the poll events, or
        None when asked to stop."""
        if self._stop.is_set():
            return None
        if self._counters.dirty:
            self._counters.dirty = False
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
        flush, flush_due = self._counters.flush, self._counters.due
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
                if not decrement_ttl(buf):
                    drops["ttl_expired"] += 1
                    continue
                if h:
                    vflags, gso, _, gso_size, cstart, coff = unpack_vnet(slots[nq])
                    if gso & 0x7F == VNET_GSO_TCPV4 and gso_size and buf[9] == 6:
                        # flush what is queued first: packets leave in the order they came
                        if nq:
                            sent, sbytes = sendmmsg_all(libc, fileno, msgs_addr, stride, nq,
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
                    sent, sbytes = send_groups(libc, fileno, groups, nq, drops)
                    if sent < 0:  # the kernel has no UDP GSO: plain datagrams from now on
                        log.warning("UDP GSO refused (%s); sending datagram by datagram",
                                    os.strerror(-sent))
                        self.gso = False
                        sent, sbytes = sendmmsg_all(libc, fileno, msgs_addr, stride, nq,
                                                      iov_lens, drops)
                else:
                    sent, sbytes = sendmmsg_all(libc, fileno, msgs_addr, stride, nq,
                                                  iov_lens, drops)
                counts["tx_packets"] += sent
                nbytes += sbytes
            counts["tx_bytes"] += nbytes
            since_flush += limit - budget  # packets read (a TSO packet: its segments)
            if since_flush >= FLUSH_EVERY or idle and flush_due(since_flush):
                since_flush = 0
                flush(counts, drops)
            yield idle

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
        flush, flush_due = self._counters.flush, self._counters.due
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
                if flush_due(since_flush):
                    since_flush = 0
                    flush(counts, drops)
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
                                not header_ok(buf[:ihl]):
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
                        if not decrement_ttl(buf):
                            drops["ttl_expired"] += 1
                            continue
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
                flush(counts, drops)
            yield False
