"""rtnetlink on a raw socket: message encoding, batched writes, dumps, and requests.

The bulk paths (writes and the three table dumps) speak rtnetlink directly over one socket:
pyroute2 spends ~100 µs of Python per message encoding and parsing, which at 15,000 entries is
seconds; packing with precompiled ``struct`` formats costs ~2 µs. Writes go out many messages
per ``send``: the kernel walks every message of one buffer in order, answers only failures
(no NLM_F_ACK) and acknowledges the last message of each buffer, whose answer therefore means
"everything before me was processed". Links, addresses and route lookups use the same socket
(one request each; lookups batched too), so the agent does not import pyroute2 at all
(``tests/support/pyroute2kernel.py`` is the pyroute2 reference the tests compare against).

This module knows messages and sockets only; :mod:`netagent.kernel.netlink` turns them into
entries, and :mod:`netagent.kernel.host` into host read-outs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from netagent.kernel.entries import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    NTF_SELF,
    NUD_PERMANENT,
    RTNH_F_ONLINK,
    Fdb,
    IPAddress,
    IPNetwork,
    KernelError,
    Neigh,
    Op,
)

_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE, _NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_RTM_NEWNEIGH, _RTM_DELNEIGH, _RTM_GETNEIGH = 28, 29, 30
_NDA_DST, _NDA_LLADDR, _NDA_IFINDEX = 1, 2, 8
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_MULTIPATH, _RTA_TABLE = 1, 4, 5, 6, 9, 15
_RTA_PREFSRC = 7
_RTN_UNICAST = 1
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_RTM_NEWADDR, _RTM_DELADDR, _RTM_GETADDR = 20, 21, 22
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_LINKINFO = 1, 3, 4, 18
_IFLA_MASTER = 10
_IFLA_INFO_KIND, _IFLA_INFO_DATA = 1, 2
_IFLA_VXLAN_ID, _IFLA_VXLAN_LINK, _IFLA_VXLAN_LOCAL, _IFLA_VXLAN_LEARNING = 1, 3, 4, 7
_IFLA_VXLAN_PORT, _IFLA_VXLAN_LOCAL6, _IFLA_VXLAN_GBP = 15, 17, 23
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
#: no duplicate address detection: our /128 on the IPv6 vxlan device is unique by lease, and
#: DAD would keep it "tentative" (unusable as a source) for a second after every start
_IFA_F_NODAD = 0x02
_RT_SCOPE_NOWHERE = 255
#: one send: well under the default socket send buffer (212,992 bytes)
_BATCH_BYTES = 64 * 1024
#: receive buffer we ask for: a whole batch of failures (~1 KiB of skb each) must fit
_RCVBUF = 8 * 1024 * 1024

_HDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")
_ACTION_FLAGS = {
    "replace": _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_REPLACE,
    "create": _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_EXCL,
    "delete": _NLM_F_REQUEST,
}


def _rta(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return _RTA.pack(n, kind) + data + b"\0" * (-n % 4)


# whole messages of the common shapes in one ``pack`` each (header, body, attributes)
_NEIGH_SET = struct.Struct("=IHHII BxxxiHBB HH4s HH6sxx")
_FDB_MSG = struct.Struct("=IHHII BxxxiHBB HH6sxx HH4s")
_ROUTE_SET = struct.Struct("=IHHII BBBBBBBBI HHI HH4s HHI HH4s HHI")
#: where a neighbour's NDA_DST and NDA_LLADDR headers sit, and an FDB entry's NDA_LLADDR and
#: NDA_DST (the kernel's fill order), for IPv4 and IPv6 addresses: (offset, header, offset,
#: header, length); the bytes up to that length identify the entry
_Sig = tuple[int, bytes, int, bytes, int]
_NEIGH_SIGS: tuple[_Sig, ...] = (
    (12, _RTA.pack(8, _NDA_DST), 20, _RTA.pack(10, _NDA_LLADDR), 32),
    (12, _RTA.pack(20, _NDA_DST), 32, _RTA.pack(10, _NDA_LLADDR), 44),
)
_FDB_SIGS: tuple[_Sig, ...] = (
    (12, _RTA.pack(10, _NDA_LLADDR), 24, _RTA.pack(8, _NDA_DST), 32),
    (12, _RTA.pack(10, _NDA_LLADDR), 24, _RTA.pack(20, _NDA_DST), 44),
)
_UNSEEN = object()
_GET_ROUTE = struct.Struct("=IHHII BBBBBBBBI HH4s")
_GET_ROUTE6 = struct.Struct("=IHHII BBBBBBBBI HH16s")
_mac_cache: dict[str, bytes] = {}


def _mac_bytes(mac: str) -> bytes:
    raw = _mac_cache.get(mac)
    if raw is None:
        if len(_mac_cache) > 100_000:
            _mac_cache.clear()
        raw = _mac_cache[mac] = bytes.fromhex(mac.replace(":", ""))
    return raw


def encode_op(op: Op, seq: int) -> bytes:
    """One rtnetlink request for ``op``, with what ``ip``/``bridge`` send for it.

    Neighbour: RTM_NEWNEIGH/DELNEIGH, AF_INET(6), state PERMANENT. FDB: the same on AF_BRIDGE
    with flag NTF_SELF (the vxlan device's own table) and the remote as NDA_DST. Route: unicast,
    the entry's type (unicast, or blackhole), scope (universe unless a device route asks for
    link) and proto; a delete names
    the proto (the kernel then refuses to delete a route of another proto) and scope NOWHERE,
    as ``ip route del`` does. "replace" is CREATE|REPLACE, "create" is CREATE|EXCL. IPv4 messages of the
    common shapes are packed whole; IPv6 ones (rare) are assembled attribute by attribute.
    """
    e = op.entry
    flags = _ACTION_FLAGS[op.action]
    delete = op.action == "delete"
    if isinstance(e, Neigh):
        v6 = e.dst.version == 6
        if not delete and not v6:
            return _NEIGH_SET.pack(_NEIGH_SET.size, _RTM_NEWNEIGH, flags, seq, 0,
                                   AF_INET, e.ifindex, NUD_PERMANENT, 0, 0,
                                   8, _NDA_DST, e.dst.packed, 10, _NDA_LLADDR,
                                   _mac_bytes(e.lladdr))
        body = (_NDMSG.pack(AF_INET6 if v6 else AF_INET, e.ifindex, NUD_PERMANENT, 0, 0)
                + _rta(_NDA_DST, e.dst.packed))
        if not delete:
            body += _rta(_NDA_LLADDR, _mac_bytes(e.lladdr))
        return (_HDR.pack(_HDR.size + len(body), _RTM_DELNEIGH if delete else _RTM_NEWNEIGH,
                          flags, seq, 0) + body)
    if isinstance(e, Fdb):
        mtype = _RTM_DELNEIGH if delete else _RTM_NEWNEIGH
        if e.dst.version == 4:
            return _FDB_MSG.pack(_FDB_MSG.size, mtype, flags, seq, 0, AF_BRIDGE, e.ifindex,
                                 NUD_PERMANENT, NTF_SELF, 0, 10, _NDA_LLADDR,
                                 _mac_bytes(e.lladdr), 8, _NDA_DST, e.dst.packed)
        body = (_NDMSG.pack(AF_BRIDGE, e.ifindex, NUD_PERMANENT, NTF_SELF, 0)
                + _rta(_NDA_LLADDR, _mac_bytes(e.lladdr)) + _rta(_NDA_DST, e.dst.packed))
        return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body
    table = e.table if e.table < 256 else 0
    v6 = e.dst.version == 6
    if (not delete and not v6 and e.gateway is not None and e.oif is not None
            and e.rtype == _RTN_UNICAST):
        return _ROUTE_SET.pack(_ROUTE_SET.size, _RTM_NEWROUTE, flags, seq, 0,
                               AF_INET, e.dst.prefixlen, 0, 0, table, e.proto,
                               e.scope, _RTN_UNICAST, RTNH_F_ONLINK if e.onlink else 0,
                               8, _RTA_TABLE, e.table, 8, _RTA_DST, e.dst.network_address.packed,
                               8, _RTA_PRIORITY, e.metric, 8, _RTA_GATEWAY, e.gateway.packed,
                               8, _RTA_OIF, e.oif)
    family = AF_INET6 if v6 else AF_INET
    if delete:
        mtype = _RTM_DELROUTE
        head = _RTMSG.pack(family, e.dst.prefixlen, 0, 0, table, e.proto, _RT_SCOPE_NOWHERE,
                           0, 0)
    else:
        mtype = _RTM_NEWROUTE
        head = _RTMSG.pack(family, e.dst.prefixlen, 0, 0, table, e.proto,
                           e.scope, e.rtype, RTNH_F_ONLINK if e.onlink else 0)
    body = (head + _rta(_RTA_TABLE, _U32.pack(e.table))
            + _rta(_RTA_DST, e.dst.network_address.packed)
            + _rta(_RTA_PRIORITY, _U32.pack(e.metric)))
    if not delete:
        if e.gateway is not None:
            body += _rta(_RTA_GATEWAY, e.gateway.packed)
        if e.oif is not None:
            body += _rta(_RTA_OIF, _U32.pack(e.oif))
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """A message's top-level attributes (type without flag bits → payload)."""
    out: dict[int, bytes] = {}
    unpack = _RTA.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _open_netlink(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket; with ``netns``, created inside that namespace.

    A socket keeps the namespace it was created in, so this thread enters the namespace only
    for the ``socket()`` call (``setns`` changes the calling thread only) and comes back.
    """
    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)

    if netns is None:
        return make()
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(exc.errno, f"network namespace {netns}: {exc.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(err, f"setns {netns}: {os.strerror(err)}")
        try:
            return make()
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise SystemExit("cannot return to the original network namespace")
    finally:
        os.close(home)
        os.close(target)


class RtNetlink:
    """One raw NETLINK_ROUTE socket for batched writes and table dumps."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = _open_netlink(netns)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self.sock.bind((0, 0))
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        #: messages per send, so that a batch in which every message fails still fits the
        #: receive buffer (each error is a small skb of ~1 KiB true size)
        self.max_batch = max(16, min(4096, rcvbuf // 1536))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self, count: int) -> int:
        """Reserve ``count`` sequence numbers; returns the first."""
        first = self.seq + 1
        self.seq = (self.seq + count) & 0x7FFFFFFF
        if self.seq < first:  # wrapped: start again from 1
            first, self.seq = 1, count
        return first

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """Send ``ops`` in as few buffers as fit; return one result per op, in order."""
        results: list[Exception | None] = [None] * len(ops)
        i = 0
        while i < len(ops):
            first = self._next_seq(min(self.max_batch, len(ops) - i))
            chunk: list[bytes] = []
            size = 0
            while i + len(chunk) < len(ops) and len(chunk) < self.max_batch and size < _BATCH_BYTES:
                msg = encode_op(ops[i + len(chunk)], first + len(chunk))
                chunk.append(msg)
                size += len(msg)
            # ask for an ACK on the last message only: its answer closes the batch
            last = bytearray(chunk[-1])
            flags = _HDR.unpack_from(last)[2] | _NLM_F_ACK
            struct.pack_into("=H", last, 6, flags)
            chunk[-1] = bytes(last)
            self.sock.sendall(b"".join(chunk))
            for seq, code in self._collect(first, first + len(chunk) - 1):
                results[i + seq - first] = KernelError(code, os.strerror(code))
            i += len(chunk)
        return results

    def _collect(self, first: int, last: int) -> list[tuple[int, int]]:
        """Read answers until the one for ``last``; return (seq, errno) of the failures."""
        failed: list[tuple[int, int]] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _f, seq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if mtype == _NLMSG_ERROR and first <= seq <= last:
                    code = -_ERR.unpack_from(data, off + 16)[0]
                    if code:
                        failed.append((seq, code))
                    if seq == last:
                        return failed
                off += (length + 3) & ~3

    def dump(self, mtype: int, body: bytes) -> Iterator[tuple[bytes, int, int]]:
        """One dump request; yields (buffer, start of the message body, end) per answer."""
        seq = self._next_seq(1)
        self.sock.sendall(_HDR.pack(16 + len(body), mtype, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
                          + body)
        while True:
            data = self.sock.recv(1 << 18)
            off = 0
            while off + 16 <= len(data):
                length, rtype, _f, rseq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if rseq == seq:
                    if rtype == _NLMSG_DONE:
                        return
                    if rtype == _NLMSG_ERROR:
                        code = -_ERR.unpack_from(data, off + 16)[0]
                        if code:
                            raise KernelError(code, f"dump: {os.strerror(code)}")
                        return
                    yield data, off + 16, off + length
                off += (length + 3) & ~3


    def request(self, mtype: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """One request with an ACK; returns the answers (type, body) before the ACK.

        For the handful of link and address calls: KernelError carries the kernel's errno."""
        seq = self._next_seq(1)
        self.sock.sendall(_HDR.pack(16 + len(body), mtype, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                                    seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, rtype, _f, rseq, _pid = _HDR.unpack_from(data, off)
                if length < 16:
                    raise KernelError(errno.EIO, "truncated netlink message")
                if rseq == seq:
                    if rtype == _NLMSG_ERROR:
                        code = -_ERR.unpack_from(data, off + 16)[0]
                        if code:
                            raise KernelError(code, os.strerror(code))
                        return out
                    out.append((rtype, data[off + 16:off + length]))
                off += (length + 3) & ~3

    def lookup_routes(self, dsts: Sequence[IPAddress]) -> list[tuple[int, bytes]]:
        """``ip route get`` for each address, many per send: (errno, answer body) per address.

        A get without NLM_F_ACK is answered by exactly one message (the route or an error),
        so each batch is complete when every one of its sequence numbers has been answered."""
        out: list[tuple[int, bytes]] = [(0, b"")] * len(dsts)
        i = 0
        while i < len(dsts):
            count = min(self.max_batch, len(dsts) - i)
            first = self._next_seq(count)
            self.sock.sendall(b"".join(
                _GET_ROUTE.pack(_GET_ROUTE.size, _RTM_GETROUTE, _NLM_F_REQUEST, first + j, 0,
                                AF_INET, 32, 0, 0, 0, 0, 0, 0, 0, 8, _RTA_DST,
                                dsts[i + j].packed)
                if dsts[i + j].version == 4 else
                _GET_ROUTE6.pack(_GET_ROUTE6.size, _RTM_GETROUTE, _NLM_F_REQUEST, first + j, 0,
                                 AF_INET6, 128, 0, 0, 0, 0, 0, 0, 0, 20, _RTA_DST,
                                 dsts[i + j].packed)
                for j in range(count)))
            pending = count
            while pending:
                data = self.sock.recv(1 << 18)
                off = 0
                while off + 16 <= len(data):
                    length, rtype, _f, seq, _pid = _HDR.unpack_from(data, off)
                    if length < 16:
                        raise KernelError(errno.EIO, "truncated netlink message")
                    if first <= seq < first + count:
                        body = data[off + 16:off + length]
                        code = -_ERR.unpack_from(body)[0] if rtype == _NLMSG_ERROR else 0
                        out[i + seq - first] = (code, body)
                        pending -= 1
                    off += (length + 3) & ~3
            i += count
        return out


class _Interned:
    """Address objects by their packed bytes, so a dump of 5,000 routes does not parse 5,000
    strings (``IPv4Network("a.b.c.d/n")`` costs ~4 µs; a dict hit ~0.1 µs). 16-byte values
    are IPv6; ``v6`` says which family a network of a short (or empty) prefix belongs to.
    Cleared after each dump (a peer's gateway is shared by its neighbour and route within one)."""

    def __init__(self) -> None:
        self.addrs: dict[bytes, IPAddress] = {}
        self.nets: dict[tuple[bytes, int, bool], IPNetwork] = {}

    def clear(self) -> None:
        """Forget every object (new dicts: a cleared dict keeps its grown table)."""
        self.addrs, self.nets = {}, {}

    def addr(self, raw: bytes) -> IPAddress:
        a = self.addrs.get(raw)
        if a is None:
            if len(self.addrs) > 200_000:
                self.addrs.clear()
            a = self.addrs[raw] = IPv6Address(raw) if len(raw) == 16 else IPv4Address(raw)
        return a

    def net(self, raw: bytes, plen: int, v6: bool = False) -> IPNetwork:
        key = (raw, plen, v6)
        n = self.nets.get(key)
        if n is None:
            if len(self.nets) > 200_000:
                self.nets.clear()
            if v6:
                n = IPv6Network((int.from_bytes(raw.ljust(16, b"\0"), "big"), plen))
            else:
                n = IPv4Network((int.from_bytes(raw.ljust(4, b"\0"), "big"), plen))
            self.nets[key] = n
        return n

