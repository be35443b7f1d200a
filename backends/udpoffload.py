"""TUN-side offloads of the udp packet loop: received TCP into super-packets, partial
checksums completed.

* :class:`Coalescer` is user-space GRO for packets checked one by one: consecutive in-order
  segments of one flow become one TUN write with a virtio-net GSO header;
* :class:`RunWriter` writes the runs :func:`~backends.udprun.tcp_run` accepted (a UDP_GRO
  buffer of one TCP flow) as GSO super-packets, the payloads straight from the receive
  buffers (``writev``);
* :func:`complete_checksum` finishes a CHECKSUM_PARTIAL packet the TUN hands over.

Only packets that already passed every receive check (``udptrust``) get here.
"""

from __future__ import annotations

import struct
from typing import Any

from netagent.backends.udprun import (
    PSH_ACK,
    SliceCache,
    continues_run,
    payload_sums_python,
    super_header,
)
from netagent.backends.udptrust import fold
from netagent.backends.udptun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_LEN

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
            csum = ~fold(int.from_bytes(b[ip:ip + 20], "big")) & 0xFFFF
            b[ip + 10] = csum >> 8
            b[ip + 11] = csum & 0xFF
            # partial TCP checksum: the pseudo-header sum, not inverted (CHECKSUM_PARTIAL)
            pseudo = fold(int.from_bytes(b[ip + 12:ip + 20], "big") + 6 + size - 20)
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
