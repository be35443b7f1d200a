"""Whole-run packet work for the udp data path: one Python step per run, not per packet.

A peer that sends with UDP GSO (``UDP_SEGMENT``) hands the wire a run of datagrams of one size,
and ``UDP_GRO`` gives the receiver that run back as one buffer: for a TCP stream, up to 45
consecutive segments of one flow, laid end to end at a fixed stride. Checking them one by one
costs ~3 µs of interpreted Python each, which was most of the receiving agent's CPU. Here the
same checks run over the whole run at once, at C speed:

* ``memoryview(run).cast("I")[j::stride // 4]`` picks the j-th 32-bit word of every packet in
  one slice, so "every packet has the first one's version, length, TOS, TTL, protocol,
  addresses, ports, ACK number, window and TCP options" is a handful of ``bytes`` comparisons;
* the fields that legitimately differ (IP ID and header checksum, TCP sequence) are read the
  same way into one big integer with a 32-bit lane per packet, and lane arithmetic (adds,
  shifts and masks that cannot carry from one lane into the next) checks every header checksum
  and that the sequence numbers are contiguous.

Anything unusual (IP options, a fragment, a flag other than ACK, a hole, a bad checksum, a
stride not a multiple of 4) makes the check answer "no", and the caller falls back to the
packet-by-packet path, which counts each drop by reason exactly as before. So the trust checks
hold for every inner packet either way: the fast path only ever accepts a run in which every
packet would have passed them.

The send side does the same in reverse (:func:`segment_tso`): a TCP super-packet from the TUN
becomes all its wire packets' headers at once (lane arithmetic again, stored with strided slice
assignments), their payloads stay where they were read, and the payload sums every TCP checksum
needs come from :func:`payload_sums_python` or, when numpy is installed, one numpy reduction.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from netagent.backends.udptrust import fold, header_ok

#: TCP flag bytes a run may carry: ACK on every packet, PSH|ACK allowed on the last one only
ACK, PSH_ACK = 0x10, 0x18


@lru_cache(maxsize=256)
def lanes(count: int) -> tuple[int, int, int]:
    """(ONES, M16, RAMP) for `count` 32-bit lanes, packet 0 in the most significant lane:
    every lane 1; every lane 0xFFFF; lane i holding i."""
    ones = int.from_bytes(b"\0\0\0\1" * count, "big")
    ramp = int.from_bytes(b"".join(i.to_bytes(4, "big") for i in range(count)), "big")
    return ones, ones * 0xFFFF, ramp


def tcp_run(buf: memoryview, stride: int, count: int, nets: tuple[tuple[int, int], ...],
            own_net: int, own_mask: int) -> tuple[int, int]:
    """(m, header length): the first `m` of the `count` packets of exactly `stride` bytes laid
    end to end in `buf` all pass the receive checks and coalesce into one super-packet; (0, 0)
    when packet 0 itself does not qualify.

    Receive checks (as :meth:`~backends.udpfwd.Forwarder._udp_to_tun` makes them per packet):
    IPv4, total length = datagram length, valid header checksum, inner source inside one of
    `nets` (the sending peer's subnets), destination inside ours, TTL > 1. Coalescing (Linux
    GRO's rules): same 5-tuple, TOS, TTL, DF, ACK number, window and TCP options; no IP options
    and no fragment; sequence numbers contiguous; flags ACK, and the last packet may add PSH.
    The run ends before the first packet that breaks a rule, so a run that straddles two TCP
    super-packets of the sender (the first ends with PSH, the next has a new timestamp) is
    merged as two.
    """
    if count < 2 or stride % 4 or stride < 41 or len(buf) < count * stride:
        return 0, 0
    fb = int.from_bytes
    # packet 0 on its own: the scalar checks, once
    if buf[0] != 0x45 or (buf[2] << 8 | buf[3]) != stride or buf[9] != 6 or buf[8] <= 1 \
            or buf[6] & 0x3F or buf[7] or buf[33] != ACK or not header_ok(buf[:20]):
        return 0, 0
    src = fb(buf[12:16], "big")
    for net, mask in nets:
        if src & mask == net:
            break
    else:
        return 0, 0
    if fb(buf[16:20], "big") & own_mask != own_net:
        return 0, 0
    hlen = 20 + ((buf[32] >> 4) << 2)
    if hlen < 40 or hlen >= stride:
        return 0, 0
    seq0 = fb(buf[24:28], "big")
    plen = stride - hlen
    count = min(count, (0xFFFFFFFF - seq0) // plen + 1)  # no sequence wrap inside a run
    if count < 2:
        return 1, hlen
    # every packet against packet 0, a 32-bit word at a time: `bad` collects, per lane, the
    # bits in which packet i differs from what it must be
    q = stride >> 2
    words = buf[:count * stride].cast("I")
    ones, m16, ramp = lanes(count)
    bad = 0
    for j in (0, 3, 4, 5, 7, *range(10, hlen >> 2)):
        column, want_column = bytes(words[j::q]), bytes(words[j:j + 1]) * count
        if column != want_column:  # rare: only then find where
            bad |= fb(column, "big") ^ fb(want_column, "big")
    # doff, window (the flags byte apart)
    bad |= (fb(bytes(words[8::q]), "big") ^ fb(words[8:9], "big") * ones) & ones * 0xFF00FFFF
    id_frag = fb(bytes(words[1::q]), "big")  # lanes: IP ID << 16 | flags+offset
    ttl_sum = fb(bytes(words[2::q]), "big")  # lanes: TTL << 24 | proto << 16 | checksum
    bad |= (id_frag ^ (buf[6] << 8 | buf[7]) * ones) & m16
    bad |= ((ttl_sum >> 16) ^ (buf[8] << 8 | buf[9]) * ones) & m16
    # the header words other than ID and checksum are equal in every packet so far, so each
    # header checksum is valid iff ID + checksum ≡ packet 0's (mod 0xFFFF): the 17-bit lane
    # sums folded once are in [0, 0xFFFF] and must equal it (0 is ambiguous: left to the slow
    # path)
    want = ((buf[4] << 8 | buf[5]) + (buf[10] << 8 | buf[11])) % 0xFFFF
    if not want:
        return 1, hlen
    s = ((id_frag >> 16) & m16) + (ttl_sum & m16)
    bad |= ((s & m16) + ((s >> 16) & ones)) ^ want * ones
    # packet i starts at seq0 + i * payload
    bad |= fb(bytes(words[6::q]), "big") ^ (seq0 * ones + plen * ramp)
    m = count - 1 - (bad.bit_length() - 1) // 32 if bad else count
    # flags: ACK, or PSH|ACK on the packet that ends the run
    flags = bytes(buf[33:m * stride:stride])
    acks = len(flags) - len(flags.lstrip(b"\x10"))
    if acks < m:
        m = acks + 1 if flags[acks] == PSH_ACK else acks
    return m, hlen


def continues_run(first: memoryview, pkt: memoryview, n: int, hlen: int, next_seq: int,
                  mss: int) -> bool:
    """Whether `pkt[:n]` (the short packet after a run whose first packet is `first`) passes the
    receive checks and continues the run: the same invariant header bytes as `first` (so the
    same addresses, TTL and flow), its own valid header checksum and length, the next sequence
    number, flags ACK or PSH|ACK, and no more payload than the run's packets carry."""
    if n <= hlen or n - hlen > mss or (pkt[2] << 8 | pkt[3]) != n:
        return False
    if pkt[0:2] != first[0:2] or pkt[6:10] != first[6:10] or pkt[12:24] != first[12:24] or \
            pkt[28:33] != first[28:33] or pkt[34:36] != first[34:36] or \
            pkt[40:hlen] != first[40:hlen] or pkt[33] not in (ACK, PSH_ACK):
        return False
    if not header_ok(pkt[:20]):
        return False
    return int.from_bytes(pkt[24:28], "big") == next_seq


def super_header(out: memoryview, first: memoryview, hlen: int, size: int, mss: int,
                 psh: bool) -> int:
    """Write into `out` the virtio-net header and IPv4/TCP header of the super-packet made of a
    run (first packet `first`, `size` bytes in all, `mss` payload bytes per packet); return the
    bytes written. TTL is decremented once (the forwarding hop); the TCP checksum is left
    partial (pseudo-header sum, ``VIRTIO_NET_HDR_F_NEEDS_CSUM``), so the kernel completes it
    for each segment it cuts from the super-packet."""
    v = 10  # VNET_LEN
    out[v:v + hlen] = first[:hlen]
    out[v + 2] = size >> 8
    out[v + 3] = size & 0xFF
    out[v + 8] -= 1
    out[v + 10] = out[v + 11] = 0
    csum = ~fold(int.from_bytes(out[v:v + 20], "big")) & 0xFFFF
    out[v + 10] = csum >> 8
    out[v + 11] = csum & 0xFF
    if psh:
        out[v + 33] |= 0x08
    pseudo = fold(int.from_bytes(out[v + 12:v + 20], "big") + 6 + size - 20)
    out[v + 36] = pseudo >> 8
    out[v + 37] = pseudo & 0xFF
    # struct virtio_net_hdr: flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start/offset
    out[0:v] = bytes((1, 1, hlen & 0xFF, hlen >> 8, mss & 0xFF, mss >> 8, 20, 0, 16, 0))
    return v + hlen


# --------------------------------------------------------------------------- send: TSO


FIN, PSH, CWR = 0x01, 0x08, 0x80


@lru_cache(maxsize=64)
def _fold_plan(mss: int) -> tuple[tuple[int, int], ...]:
    """(width, mask) of each fold step for a chunk of `mss` bytes, widest first."""
    plan = []
    b = ((8 * mss + 63) >> 7) << 6
    while b:
        plan.append((b, (1 << b) - 1))
        b = ((b + 63) >> 7) << 6
    return tuple(plan)


def payload_sums_python(payload: memoryview, mss: int, count: int) -> int:
    """The one's-complement sums of the `count` chunks of `mss` bytes at the start of
    `payload`, as 32-bit lanes (chunk 0 most significant), each lane ≤ 0xFFFF.

    ``int.from_bytes`` reads a chunk at C speed; the reduction mod 0xFFFF is a fold at 64-bit
    boundaries (2^64 ≡ 1), halving the width each step: cheaper than ``%`` on a 1.4 kB integer
    (one machine division per 30-bit digit). ~2.4 µs per 1.4 kB chunk."""
    fb = int.from_bytes
    out = bytearray(4 * count)
    plan = _fold_plan(mss)
    pos = 2
    for o in range(0, count * mss, mss):
        v = fb(payload[o:o + mss], "big")
        if mss & 1:
            v <<= 8
        for b, mask in plan:
            v = (v >> b) + (v & mask)
        v %= 0xFFFF
        out[pos] = v >> 8
        out[pos + 1] = v & 0xFF
        pos += 4
    return fb(out, "big")


def numpy_payload_sums() -> Any:
    """:func:`payload_sums_python` done by numpy (~0.3 µs instead of ~2.4 µs per 1.4 kB chunk),
    or None when numpy is not installed. numpy is optional: the agent runs without it."""
    try:
        import numpy as np
    except ImportError:
        return None

    def payload_sums_numpy(payload: memoryview, mss: int, count: int) -> int:
        # Native (little-endian) words: the one's-complement sum of byte-swapped words is the
        # byte-swapped sum (RFC 1071), and no conversion pass is needed; 32-bit words where the
        # chunk allows (2^32 ≡ 1 mod 0xFFFF too), so half as many additions.
        if count <= 0 or mss & 1:  # odd chunks do not split into 16-bit words
            return payload_sums_python(payload, mss, count)
        width = 4 if mss & 3 == 0 else 2
        words = np.frombuffer(payload, dtype=f"<u{width}", count=count * mss // width)
        sums = words.reshape(count, mss // width).sum(axis=1, dtype=np.uint64) % 0xFFFF
        lanes_le = int.from_bytes(sums.astype(">u4").tobytes(), "big")
        low = lanes(count)[0] * 0xFF
        return ((lanes_le & low) << 8) | ((lanes_le >> 8) & low)  # byte-swap each lane

    return payload_sums_numpy


def _put16(hdrs: memoryview, at: int, stride: int, values: int, count: int) -> None:
    """Store the low 16 bits of each 32-bit lane of `values` at `at` in each header."""
    raw = values.to_bytes(4 * count, "big")
    hdrs[at::stride] = raw[2::4]
    hdrs[at + 1::stride] = raw[3::4]


class SliceCache:
    """Slices of the loop's fixed buffers at a fixed step, made once per (buffer, offset,
    size, step) and reused: building ~90 memoryview slices per TSO packet cost as much as
    computing its headers. Keyed by the buffer object itself (the loop's receive slots and
    header buffer live as long as the loop), so a slice never outlives what it points into."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[memoryview, int, int, int, list[memoryview]]] = {}

    def slices(self, buf: memoryview, start: int, size: int, step: int) -> list[memoryview]:
        """``[buf[o:o + size] for o in range(start, len(buf) - size + 1, step)]``."""
        hit = self._cache.get(id(buf))
        if hit is not None and hit[0] is buf and hit[1:4] == (start, size, step):
            return hit[4]
        views = [buf[o:o + size] for o in range(start, len(buf) - size + 1, step)]
        self._cache[id(buf)] = (buf, start, size, step, views)
        return views


def segment_tso(pkt: memoryview, n: int, mss: int, hdrs: memoryview,
                payload_sums: Any = payload_sums_python,
                views: SliceCache | None = None) -> tuple[list[memoryview], int, int]:
    """TSO in user space: cut the IPv4/TCP super-packet ``pkt[:n]`` into wire packets of
    ``mss`` payload bytes, the way Linux's ``tcp_gso_segment`` does.

    Returns (iovec list: header, payload, header, payload, ..., segment size, count). The
    headers are built in `hdrs` (at least count × header length bytes), the payloads are
    slices of `pkt`, so the caller hands the list to one ``sendmsg`` with ``UDP_SEGMENT`` and
    the kernel cuts the datagrams at segment-size boundaries: each datagram is one complete,
    checksummed IPv4 packet, as flannel's wire format wants.

    Per segment: IP total length, ID (+1 each), header checksum; TCP sequence, flags (CWR only
    on the first, FIN and PSH only on the last) and checksum; everything else (TTL included) is
    the super-packet's. Header fields are computed for all segments at
    once, as 32-bit lanes of one integer, and stored with strided slice assignments; the
    payload sums come from `payload_sums` (:func:`payload_sums_python`, or a numpy one).
    """
    t = (pkt[0] & 0x0F) << 2
    thl = (pkt[t + 12] >> 4) << 2
    hlen = t + thl
    payload = n - hlen
    count = -(-payload // mss)
    last_len = payload - (count - 1) * mss
    fb = int.from_bytes
    flags = pkt[t + 13]
    # a middle segment, with ID, sequence number and both checksums zero
    tmpl = bytearray(pkt[:hlen])
    tmpl[2] = (hlen + mss) >> 8
    tmpl[3] = (hlen + mss) & 0xFF
    tmpl[4] = tmpl[5] = tmpl[10] = tmpl[11] = 0
    tmpl[t + 4:t + 8] = b"\0\0\0\0"
    tmpl[t + 13] = flags & ~(FIN | PSH | CWR)
    tmpl[t + 16] = tmpl[t + 17] = 0
    h = hdrs[:count * hlen]
    h[:] = bytes(tmpl) * count
    ones, m16, ramp = lanes(count)
    ids = ((pkt[4] << 8 | pkt[5]) * ones + ramp) & m16
    x = fold(fb(tmpl[:t], "big")) * ones + ids
    _put16(h, 4, hlen, ids, count)
    _put16(h, 10, hlen, m16 - ((x & m16) + ((x >> 16) & ones)), count)
    seq0 = fb(pkt[t + 4:t + 8], "big")
    if seq0 + (count - 1) * mss <= 0xFFFFFFFF:
        seq = seq0 * ones + mss * ramp
    else:  # the sequence space wraps inside this packet
        seq = fb(b"".join(((seq0 + k * mss) & 0xFFFFFFFF).to_bytes(4, "big")
                          for k in range(count)), "big")
    raw = seq.to_bytes(4 * count, "big")
    for i in range(4):
        h[t + 4 + i::hlen] = raw[i::4]
    # TCP checksums: pseudo-header and template header (the same for all), sequence number
    # words and payload sum per lane; lanes stay below 2^28, so two folds bring them to 16 bits
    pay = pkt[hlen:n]
    full = payload // mss
    sums = payload_sums(pay, mss, full)
    last_sum = sums & 0xFFFF
    if full < count:  # a short last chunk
        last_sum = payload_sums_python(pay[full * mss:], last_len, 1)
        sums <<= 32
    base = fold(fb(pkt[12:20], "big") + 6 + thl + mss + fb(tmpl[t:hlen], "big"))
    x = base * ones + ((seq >> 16) & m16) + (seq & m16) + sums
    x = (x & m16) + ((x >> 16) & m16)
    x = (x & m16) + ((x >> 16) & m16)
    _put16(h, t + 16, hlen, m16 - x, count)
    # first segment keeps CWR, last keeps FIN/PSH and may be short: redone one by one
    if count > 1 and flags & CWR:
        h[t + 13] = flags & ~(FIN | PSH)
        _tcp_checksum(h, 0, t, hlen, pkt, mss, sums >> (32 * (count - 1)))
    end = (count - 1) * hlen
    size = hlen + last_len
    h[end + 2] = size >> 8
    h[end + 3] = size & 0xFF
    h[end + t + 13] = flags & ~CWR if count > 1 else flags
    h[end + 10] = h[end + 11] = 0
    c = ~fold(fb(h[end:end + t], "big")) & 0xFFFF
    h[end + 10] = c >> 8
    h[end + 11] = c & 0xFF
    _tcp_checksum(h, end, t, hlen, pkt, last_len, last_sum)
    iov: list[memoryview] = [h] * (2 * count)
    if views is None:
        iov[0::2] = [h[o:o + hlen] for o in range(0, count * hlen, hlen)]
        iov[1::2] = [pay[o:o + mss] for o in range(0, payload, mss)]
    else:  # the same slices of the same buffers as last time
        iov[0::2] = views.slices(hdrs, 0, hlen, hlen)[:count]
        chunks = views.slices(pkt, hlen, mss, mss)[:full]
        if full < count:
            chunks = [*chunks, pay[full * mss:]]
        iov[1::2] = chunks
    return iov, hlen + mss, count


def _tcp_checksum(h: memoryview, off: int, t: int, hlen: int, pkt: memoryview, size: int,
                  payload_sum: int) -> None:
    """The TCP checksum of the header at ``h[off:off + hlen]`` followed by `size` payload
    bytes whose one's-complement sum is `payload_sum`."""
    h[off + t + 16] = h[off + t + 17] = 0
    total = int.from_bytes(pkt[12:20], "big") + 6 + hlen - t + size + \
        int.from_bytes(h[off + t:off + hlen], "big") + payload_sum
    c = ~fold(total) & 0xFFFF
    h[off + t + 16] = c >> 8
    h[off + t + 17] = c & 0xFF
