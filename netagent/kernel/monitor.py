"""Kernel change notifications: rtnetlink multicast groups → "one of ours was deleted".

The periodic full compare (drift repair) finds any change, but only every repair interval; a
deleted ``flannel.1`` or peer route cut traffic for seconds. This module listens where the
kernel announces changes (links, IPv4/IPv6 routes, neighbours and FDB entries) and reports the
deletions that can concern us, keyed exactly as :mod:`netagent.kernel.entries` keys entries,
so the main loop can repair the one entry (or device) that went away.

Only deletions are reported: our own writes are replaces, whose echoes (``RTM_NEW*``) a
classic BPF filter on the socket drops in the kernel (:func:`deletions_filter`; the parser
drops them again if the filter cannot be attached); the echo of our own deletes (a peer that left) is
filtered by the caller, which finds the key no longer desired. Routes are filtered here by our
``proto`` (:data:`~netagent.kernel.entries.RTPROT_NETAGENT`): BIRD's (12) or anyone else's
deletions are none of our business. Whether a neighbour/FDB entry or link is ours depends on
the device indexes the backend holds, so that filter is the backend's.

:func:`parse_changes` is pure (unit-tested with constructed bytes); :class:`KernelMonitor` is
the socket, and :class:`RepairBackoff` the per-entry exponential back-off that keeps a process
deleting one entry in a loop from making the agent spin.
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

from netagent.kernel.entries import AF_BRIDGE, AF_INET, AF_INET6, RTPROT_NETAGENT, KernelError
from netagent.kernel.rtnetlink import (
    _HDR,
    _NDA_DST,
    _NDA_LLADDR,
    _NDMSG,
    _RTA_DST,
    _RTA_PRIORITY,
    _RTA_TABLE,
    _RTM_DELLINK,
    _RTM_DELNEIGH,
    _RTM_DELROUTE,
    _RTMSG,
    _SO_RCVBUFFORCE,
    _attrs,
    _open_netlink,
)

_IFINFO_HDR = struct.Struct("=BxHiII")
_IFLA_IFNAME = 3
#: legacy group bits (1 << (RTNLGRP_x - 1)): LINK 1, NEIGH 3, IPV4_ROUTE 7, IPV6_ROUTE 11
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x4, 0x40, 0x400
GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
#: 4 MiB: a first sync of 5,000 peers echoes 15,000 messages (~1.5 MB of skb) at us; an
#: overflow is survivable (reported as :data:`OVERFLOW`: one full compare) but costs a compare
_RCVBUF = 4 * 1024 * 1024
_RECV = 256 * 1024
_SO_ATTACH_FILTER = 26


def _be16(value: int) -> int:
    """A host-order u16 as classic BPF's ``ldh`` (network order) reads it."""
    return int(struct.unpack(">H", struct.pack("=H", value))[0])


def deletions_filter() -> bytes:
    """A classic BPF program (``struct sock_filter[]``) that keeps, in the kernel, only
    ``RTM_DELLINK``, ``RTM_DELNEIGH`` and ``RTM_DELROUTE`` with our proto: every notification is
    one message per skb, so its type is at offset 4 and a route's proto at 16 + 5. Without it the
    echoes of a first sync (15,000 ``RTM_NEW*`` at 5,000 peers) would each cost a ``recv`` and a
    parse in this process (measured: ~0.17 s of Python for 5,000 route echoes)."""
    ld_h, ld_b, jeq, ret = 0x28, 0x30, 0x15, 0x06
    prog = [
        (ld_h, 0, 0, 4),                         # 0: A = nlmsg_type
        (jeq, 5, 0, _be16(_RTM_DELLINK)),        # 1: → 7 accept
        (jeq, 4, 0, _be16(_RTM_DELNEIGH)),       # 2: → 7 accept
        (jeq, 0, 2, _be16(_RTM_DELROUTE)),       # 3: → 4, else → 6 drop
        (ld_b, 0, 0, _HDR.size + 5),             # 4: A = rtm_protocol
        (jeq, 1, 0, RTPROT_NETAGENT),            # 5: → 7 accept, else → 6 drop
        (ret, 0, 0, 0),                          # 6: drop
        (ret, 0, 0, 0xFFFF),                     # 7: accept (whole message)
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)

ChangeKind = Literal["link", "route", "neigh", "fdb", "overflow"]


@dataclass(frozen=True)
class KernelChange:
    """One deletion the kernel announced. ``key`` is the entry's key as
    :mod:`netagent.kernel.entries` builds it (route: table + dst + metric; neighbour: ifindex +
    IP; FDB: ifindex + MAC + dst); a link's is ``(ifindex,)`` and ``name`` its name."""

    kind: ChangeKind
    key: tuple[Any, ...]
    name: str = ""


#: the socket dropped notifications (ENOBUFS): anything may have changed
OVERFLOW = KernelChange("overflow", ())


def _addr(raw: bytes) -> IPv4Address | IPv6Address | None:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    return None


def _route(data: bytes, off: int, end: int) -> KernelChange | None:
    family, dst_len, _src, _tos, table, proto, _scope, _type, _flags = _RTMSG.unpack_from(
        data, off)
    if proto != RTPROT_NETAGENT or family not in (AF_INET, AF_INET6):
        return None
    attrs = _attrs(data, off + _RTMSG.size, end)
    if _RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[_RTA_TABLE][:4])[0]
    metric = struct.unpack("=I", attrs[_RTA_PRIORITY][:4])[0] if _RTA_PRIORITY in attrs else 0
    raw = attrs.get(_RTA_DST, b"\0" * (4 if family == AF_INET else 16))
    try:
        dst: IPv4Network | IPv6Network = (
            IPv4Network((raw, dst_len)) if family == AF_INET else IPv6Network((raw, dst_len)))
    except ValueError:
        return None
    return KernelChange("route", (table, dst, metric))


def _neigh(data: bytes, off: int, end: int) -> KernelChange | None:
    family, ifindex, _state, _flags, _type = _NDMSG.unpack_from(data, off)
    attrs = _attrs(data, off + _NDMSG.size, end)
    dst = _addr(attrs.get(_NDA_DST, b""))
    if family in (AF_INET, AF_INET6):
        return None if dst is None else KernelChange("neigh", (ifindex, dst))
    if family == AF_BRIDGE:
        mac = attrs.get(_NDA_LLADDR, b"")
        if len(mac) != 6 or dst is None:
            return None  # the bridge's own FDB (no dst) is not a vxlan peer entry
        return KernelChange("fdb", (ifindex, ":".join(f"{b:02x}" for b in mac), dst))
    return None


def _link(data: bytes, off: int, end: int) -> KernelChange:
    _family, _type, ifindex, _flags, _change = _IFINFO_HDR.unpack_from(data, off)
    name = _attrs(data, off + _IFINFO_HDR.size, end).get(_IFLA_IFNAME, b"")
    return KernelChange("link", (ifindex,), name.split(b"\0", 1)[0].decode(errors="replace"))


def parse_changes(data: bytes) -> list[KernelChange]:
    """The deletions in one datagram of notifications that may be ours (see the module doc).
    Truncated or malformed messages end the parse; what came before is kept."""
    out: list[KernelChange] = []
    off, size = 0, len(data)
    while off + _HDR.size <= size:
        length, mtype, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size or off + length > size:
            break
        body, end = off + _HDR.size, off + length
        change: KernelChange | None = None
        try:
            if mtype == _RTM_DELROUTE and end - body >= _RTMSG.size:
                change = _route(data, body, end)
            elif mtype == _RTM_DELNEIGH and end - body >= _NDMSG.size:
                change = _neigh(data, body, end)
            elif mtype == _RTM_DELLINK and end - body >= _IFINFO_HDR.size:
                change = _link(data, body, end)
        except (struct.error, ValueError):
            change = None
        if change is not None:
            out.append(change)
        off += (length + 3) & ~3
    return out


class KernelMonitor:
    """A NETLINK_ROUTE socket subscribed to link, neighbour and route notifications.

    :meth:`run` (a thread's target) hands each batch of parsed deletions to ``deliver`` and
    returns when ``stop`` is set (it wakes at least every ``poll`` seconds to look)."""

    def __init__(self, netns: str | None = None, poll: float = 0.5) -> None:
        self.poll = poll
        self.sock = _open_netlink(netns)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except OSError:  # without CAP_NET_ADMIN: the default buffer, overflows reported
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        # the filter is an optimisation: without it parse_changes still drops what is not ours
        self._filter = ctypes.create_string_buffer(deletions_filter())
        fprog = struct.pack("HL", len(self._filter.raw) // 8, ctypes.addressof(self._filter))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        except OSError:
            pass
        try:
            self.sock.bind((0, GROUPS))
        except OSError as exc:
            self.sock.close()
            raise KernelError(exc.errno or errno.EIO, f"netlink monitor: {exc}") from None

    def close(self) -> None:
        self.sock.close()

    def read(self) -> list[KernelChange]:
        """Everything readable now, parsed (non-blocking)."""
        out: list[KernelChange] = []
        while True:
            try:
                data = self.sock.recv(_RECV, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    out.append(OVERFLOW)
                    continue
                raise
            if not data:
                return out
            out.extend(parse_changes(data))

    def run(self, stop: threading.Event, deliver: Callable[[list[KernelChange]], None]) -> None:
        while not stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], self.poll)
            if not ready:
                continue
            changes = self.read()
            if changes:
                deliver(changes)


class RepairBackoff:
    """Per-key exponential back-off for event-driven repairs (pure; time passed in).

    The first repair of a key is immediate; while the key keeps being deleted, each next repair
    waits twice as long (``start``, 2×``start``, … up to ``cap``, the repair interval, at which
    point the periodic full compare is as fast). A key not repaired for twice ``cap`` starts
    over (at the cap itself a key deleted in a loop keeps its streak).
    """

    def __init__(self, start: float = 0.1, cap: float = 10.0) -> None:
        self.start, self.cap = start, cap
        #: key -> (repairs in the current streak, time of the last repair)
        self._state: dict[Any, tuple[int, float]] = {}

    def due(self, key: Any, now: float) -> float:
        """When ``key`` may be repaired: ``now`` or later (a back-off)."""
        state = self._state.get(key)
        if state is None:
            return now
        streak, last = state
        if now - last >= 2 * self.cap:
            return now
        return max(now, last + min(self.start * 2 ** (streak - 1), self.cap))

    def repaired(self, key: Any, now: float) -> None:
        """Record a repair of ``key`` at ``now``."""
        state = self._state.get(key)
        streak = 1 if state is None or now - state[1] >= 2 * self.cap else state[0] + 1
        self._state[key] = (streak, now)
        if len(self._state) > 10_000:  # bounded: old streaks are over anyway
            self._state = {k: v for k, v in self._state.items() if now - v[1] < 2 * self.cap}
