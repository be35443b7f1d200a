"""The netlink kernel: :class:`~netagent.kernel.entries.Kernel` over raw rtnetlink.

Entry writes go out batched (see :mod:`netagent.kernel.rtnetlink`), each table is read with one
dump, links and addresses take one request each. There is one path: the pyroute2 reference the
tests compare it with lives in ``tests/support/pyroute2kernel.py``.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

from netagent.kernel import ethtool
from netagent.kernel.entries import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    NUD_PERMANENT,
    RTN_BLACKHOLE,
    RTNH_F_ONLINK,
    Entry,
    Fdb,
    IPAddress,
    IPInterface,
    KernelError,
    LinkInfo,
    LinkSummary,
    Neigh,
    Op,
    Route,
    RouteLookup,
    VxlanSpec,
)
from netagent.kernel.rtnetlink import (
    _FDB_SIGS,
    _IFA_ADDRESS,
    _IFA_F_NODAD,
    _IFA_LOCAL,
    _IFADDR,
    _IFINFO,
    _IFLA_ADDRESS,
    _IFLA_IFNAME,
    _IFLA_INFO_DATA,
    _IFLA_INFO_KIND,
    _IFLA_LINKINFO,
    _IFLA_MASTER,
    _IFLA_MTU,
    _IFLA_VXLAN_GBP,
    _IFLA_VXLAN_ID,
    _IFLA_VXLAN_LEARNING,
    _IFLA_VXLAN_LINK,
    _IFLA_VXLAN_LOCAL,
    _IFLA_VXLAN_LOCAL6,
    _IFLA_VXLAN_PORT,
    _NDA_DST,
    _NDA_IFINDEX,
    _NDA_LLADDR,
    _NDMSG,
    _NEIGH_SIGS,
    _NLM_F_CREATE,
    _NLM_F_EXCL,
    _RTA_DST,
    _RTA_GATEWAY,
    _RTA_MULTIPATH,
    _RTA_OIF,
    _RTA_PRIORITY,
    _RTA_TABLE,
    _RTM_DELADDR,
    _RTM_DELLINK,
    _RTM_GETADDR,
    _RTM_GETLINK,
    _RTM_GETNEIGH,
    _RTM_GETROUTE,
    _RTM_NEWADDR,
    _RTM_NEWLINK,
    _RTMSG,
    _RTN_UNICAST,
    _U32,
    _UNSEEN,
    RtNetlink,
    _attrs,
    _Interned,
    _mac_bytes,
    _rta,
    _Sig,
)


class NetlinkKernel:
    """:class:`~netagent.kernel.entries.Kernel` over netlink. ``netns`` is for tests and tools;
    the agent runs in its own namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._rt: RtNetlink | None = None
        self._interned = _Interned()
        #: (kind, ifindex or table) -> message bytes -> entry (None: not one of ours)
        self._remembered: dict[tuple[Any, ...], dict[bytes, Any]] = {}

    @property
    def rt(self) -> RtNetlink:
        if self._rt is None:
            self._rt = RtNetlink(self.netns)
        return self._rt

    def close(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None

    # links and addresses: a few raw requests (no pyroute2 import in the agent: ~10 MB of RSS
    # and ~150 ms of start-up)

    def link(self, name: str) -> LinkInfo | None:
        try:
            answers = self.rt.request(_RTM_GETLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0)
                                      + _rta(_IFLA_IFNAME, name.encode() + b"\0"))
        except KernelError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        msg = next((body for t, body in answers if t == _RTM_NEWLINK), None)
        if msg is None:
            return None
        _fam, _type, index, flags, _change = _IFINFO.unpack_from(msg)
        a = _attrs(msg, _IFINFO.size, len(msg))
        kind, vx = "", {}
        info = a.get(_IFLA_LINKINFO)
        if info is not None:
            li = _attrs(info, 0, len(info))
            kind = li.get(_IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
            data = li.get(_IFLA_INFO_DATA)
            if kind == "vxlan" and data is not None:
                d = _attrs(data, 0, len(data))
                local = d.get(_IFLA_VXLAN_LOCAL) or d.get(_IFLA_VXLAN_LOCAL6)
                vx = dict(
                    vni=_U32.unpack(d[_IFLA_VXLAN_ID])[0] if _IFLA_VXLAN_ID in d else None,
                    port=struct.unpack("!H", d[_IFLA_VXLAN_PORT])[0]
                    if _IFLA_VXLAN_PORT in d else None,
                    local=self._interned.addr(local) if local else None,
                    underlay_index=_U32.unpack(d[_IFLA_VXLAN_LINK])[0]
                    if _IFLA_VXLAN_LINK in d else None,
                    learning=bool(d.get(_IFLA_VXLAN_LEARNING, b"\0")[0]),
                    gbp=_IFLA_VXLAN_GBP in d,
                )
        addrs: list[IPInterface] = []
        for data, off, end in self.rt.dump(_RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, index)):
            family, plen, _fl, scope, aindex = _IFADDR.unpack_from(data, off)
            # IPv6: global addresses only (every link has a link-local one nobody configured)
            if aindex != index or not (family == AF_INET or (family == AF_INET6 and scope == 0)):
                continue
            ad = _attrs(data, off + _IFADDR.size, end)
            raw = ad.get(_IFA_LOCAL) or ad.get(_IFA_ADDRESS)
            if raw and family == AF_INET:
                addrs.append(IPv4Interface((IPv4Address(raw), plen)))
            elif raw:
                addrs.append(IPv6Interface((IPv6Address(raw), plen)))
        mtu = a.get(_IFLA_MTU)
        return LinkInfo(
            index=index, name=name, kind=kind, mac=a.get(_IFLA_ADDRESS, b"").hex(":"),
            mtu=_U32.unpack(mtu)[0] if mtu else 0, up=bool(flags & 1), addrs=tuple(addrs),
            **vx,  # type: ignore[arg-type]
        )

    def links(self) -> list[LinkSummary]:
        """Every link (one dump): ``netagent cleanup`` finds our devices and a bridge's
        ports with it."""
        out = []
        for data, off, end in self.rt.dump(_RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0)):
            _fam, _type, index, _flags, _change = _IFINFO.unpack_from(data, off)
            a = _attrs(data, off + _IFINFO.size, end)
            kind = ""
            info = a.get(_IFLA_LINKINFO)
            if info is not None:
                kind = _attrs(info, 0, len(info)).get(_IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
            master = a.get(_IFLA_MASTER)
            out.append(LinkSummary(index, a.get(_IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                                   kind, _U32.unpack(master)[0] if master else None))
        return out

    def create_vxlan(self, spec: VxlanSpec, mac: str) -> None:
        data = (_rta(_IFLA_VXLAN_ID, _U32.pack(spec.vni))
                + _rta(_IFLA_VXLAN_LINK, _U32.pack(spec.underlay_index))
                + _rta(_IFLA_VXLAN_LOCAL6 if spec.local.version == 6 else _IFLA_VXLAN_LOCAL,
                       spec.local.packed)
                + _rta(_IFLA_VXLAN_PORT, struct.pack("!H", spec.port))
                + _rta(_IFLA_VXLAN_LEARNING, bytes([1 if spec.learning else 0])))
        if spec.gbp:
            data += _rta(_IFLA_VXLAN_GBP, b"")
        linkinfo = _rta(_IFLA_INFO_KIND, b"vxlan") + _rta(_IFLA_INFO_DATA, data)
        body = (_IFINFO.pack(0, 0, 0, 0, 0) + _rta(_IFLA_IFNAME, spec.name.encode() + b"\0")
                + _rta(_IFLA_ADDRESS, _mac_bytes(mac)) + _rta(_IFLA_MTU, _U32.pack(spec.mtu))
                + _rta(_IFLA_LINKINFO, linkinfo))
        self.rt.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def create_link(self, name: str, kind: str, *, mtu: int | None = None) -> None:
        linkinfo = _rta(_IFLA_INFO_KIND, kind.encode())
        body = (_IFINFO.pack(0, 0, 0, 0, 0) + _rta(_IFLA_IFNAME, name.encode() + b"\0")
                + (_rta(_IFLA_MTU, _U32.pack(mtu)) if mtu is not None else b"")
                + _rta(_IFLA_LINKINFO, linkinfo))
        self.rt.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def delete_link(self, index: int) -> None:
        self.rt.request(_RTM_DELLINK, 0, _IFINFO.pack(0, 0, index, 0, 0))

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None:
        attrs = b""
        if mtu is not None:
            attrs += _rta(_IFLA_MTU, _U32.pack(mtu))
        if mac is not None:
            attrs += _rta(_IFLA_ADDRESS, _mac_bytes(mac))
        flags, change = (0, 0) if up is None else (1 if up else 0, 1)  # IFF_UP
        if attrs or change:
            self.rt.request(_RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, flags, change) + attrs)

    def _addr(self, mtype: int, flags: int, index: int, addr: IPInterface) -> None:
        raw = addr.ip.packed
        if addr.version == 6:
            head = _IFADDR.pack(AF_INET6, addr.network.prefixlen, _IFA_F_NODAD, 0, index)
        else:
            head = _IFADDR.pack(AF_INET, addr.network.prefixlen, 0, 0, index)
        self.rt.request(mtype, flags, head + _rta(_IFA_LOCAL, raw) + _rta(_IFA_ADDRESS, raw))

    def add_addr(self, index: int, addr: IPInterface) -> None:
        self._addr(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, index, addr)

    def del_addr(self, index: int, addr: IPInterface) -> None:
        self._addr(_RTM_DELADDR, 0, index, addr)

    # Dumps remember each answer by its bytes (only the stable part for neighbours and FDB
    # entries: their cache-info timestamps change all the time): a drift repair that finds the
    # kernel as it was parses nothing and returns the very objects the reconciler wants, so its
    # compare is an identity check (at 5,000 peers ~130 ms → ~40 ms per repair). Only the last
    # dump's answers are remembered, so the memory is bounded by the table, and it holds the
    # wanted objects rather than copies (a dump with no ``want`` keeps its own parsed copies:
    # a kernel that dumps peer routes without one should not live long). The address objects
    # a dump interned are let go after it: what stays in use is held by the entries themselves.

    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Neigh]:
        return list(self.iter_neighs(ifindex, want, family))

    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> list[Fdb]:
        return list(self.iter_fdb(ifindex, want))

    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> list[Route]:
        return list(self.iter_routes(table, want, family))

    # the same dumps as generators: the drift repair reads back in slices between events
    # (netagent.kernel.reconciler.Reconciler.read_back_steps), on a socket of its own

    def iter_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterator[Neigh]:
        af = AF_INET6 if family == 6 else AF_INET
        body = _NDMSG.pack(af, 0, 0, 0, 0) + _rta(_NDA_IFINDEX, _U32.pack(ifindex))
        return self._dump_remembered(("neigh", ifindex, af), _RTM_GETNEIGH, body, _NEIGH_SIGS,
                                     lambda d, o, e: self._parse_neigh(ifindex, af, d, o, e),
                                     want)

    def iter_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> Iterator[Fdb]:
        # an ifinfomsg (not an ndmsg) is what makes the kernel filter by bridge port/device
        body = _IFINFO.pack(AF_BRIDGE, 0, ifindex, 0, 0)
        return self._dump_remembered(("fdb", ifindex, AF_BRIDGE), _RTM_GETNEIGH, body, _FDB_SIGS,
                                     lambda d, o, e: self._parse_fdb(ifindex, d, o, e), want)

    def iter_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterator[Route]:
        af = AF_INET6 if family == 6 else AF_INET
        body = _RTMSG.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)
        return self._dump_remembered(("route", table, af), _RTM_GETROUTE, body, (),
                                     lambda d, o, e: self._parse_route(table, af, d, o, e), want)

    def sliced_dumps(self) -> SlicedDumps:
        """The three dumps as generators on a netlink socket of their own (the main loop keeps
        writing on this one between two slices), sharing this kernel's parse caches."""
        return SlicedDumps(self)

    def _dump_remembered(self, what: tuple[Any, ...], mtype: int, body: bytes,
                         sigs: tuple[_Sig, ...],
                         parse: Callable[[bytes, int, int], Any],
                         want: Mapping[Any, Entry] | None) -> Iterator[Any]:
        """One dump; answers seen in the previous dump of ``what`` are not parsed again.

        ``sigs``: (offset, attribute header, offset, attribute header, length) alternatives:
        when both headers of one are where the kernel puts them, the first ``length`` bytes are
        the message's identity; otherwise the message is parsed afresh. Without ``sigs``
        (routes) the whole message is the identity. The remembered answers are replaced only
        when the dump ran to its end."""
        before = self._remembered.get(what, {})
        now: dict[bytes, Any] = {}
        for data, off, end in self.rt.dump(mtype, body):
            if not sigs:
                key = data[off:end]
            else:
                for o1, h1, o2, h2, n in sigs:
                    if (end - off >= n and data[off + o1:off + o1 + 4] == h1
                            and data[off + o2:off + o2 + 4] == h2):
                        key = data[off:off + n]
                        break
                else:
                    e = parse(data, off, end)
                    if e is not None:
                        yield e
                    continue
            e = before.get(key, _UNSEEN)
            if e is _UNSEEN:
                e = parse(data, off, end)
                if e is not None and want is not None:
                    w = want.get(e.key)
                    if w is not None and w == e:
                        e = w
            now[key] = e
            if e is not None:
                yield e
        self._remembered[what] = now
        self._interned.clear()

    def _parse_neigh(self, ifindex: int, af: int, data: bytes, off: int, end: int
                     ) -> Neigh | None:
        family, index, state, _fl, _t = _NDMSG.unpack_from(data, off)
        if family != af or index != ifindex or not state & NUD_PERMANENT:
            return None  # kernel-learnt cache entries are not ours
        a = _attrs(data, off + _NDMSG.size, end)
        dst, lladdr = a.get(_NDA_DST), a.get(_NDA_LLADDR)
        if dst and lladdr and len(dst) == (16 if af == AF_INET6 else 4):
            return Neigh(ifindex, self._interned.addr(dst), lladdr.hex(":"))
        return None

    def _parse_fdb(self, ifindex: int, data: bytes, off: int, end: int) -> Fdb | None:
        family, index, state, _fl, _t = _NDMSG.unpack_from(data, off)
        if family != AF_BRIDGE or index != ifindex or not state & NUD_PERMANENT:
            return None
        a = _attrs(data, off + _NDMSG.size, end)
        dst, lladdr = a.get(_NDA_DST), a.get(_NDA_LLADDR)
        if dst and lladdr and len(dst) in (4, 16):
            return Fdb(ifindex, lladdr.hex(":"), self._interned.addr(dst))
        return None

    def _parse_route(self, table: int, af: int, data: bytes, off: int, end: int
                     ) -> Route | None:
        family, dst_len, _s, _tos, rtable, proto, scope, rtype, flags = \
            _RTMSG.unpack_from(data, off)
        if family != af or rtype not in (_RTN_UNICAST, RTN_BLACKHOLE):
            return None  # local/broadcast/unreachable/prohibit are never ours
        a = _attrs(data, off + _RTMSG.size, end)
        u32 = _U32.unpack
        if _RTA_TABLE in a:
            rtable = u32(a[_RTA_TABLE])[0]
        if rtable != table or _RTA_MULTIPATH in a:
            return None
        gw, oif, prio = a.get(_RTA_GATEWAY), a.get(_RTA_OIF), a.get(_RTA_PRIORITY)
        if rtype == RTN_BLACKHOLE:
            oif = None  # IPv6 reports a blackhole route on "lo"; it is no device's route
        return Route(
            dst=self._interned.net(a.get(_RTA_DST, b""), dst_len, af == AF_INET6),
            gateway=self._interned.addr(gw) if gw else None,
            oif=u32(oif)[0] if oif else None,
            onlink=bool(flags & RTNH_F_ONLINK),
            table=table,
            metric=u32(prio)[0] if prio else 0,
            proto=proto,
            scope=scope,
            rtype=rtype,
        )

    # lookups and writes

    def lookup_routes(self, dsts: Iterable[IPAddress]) -> dict[IPAddress, RouteLookup | None]:
        """``ip route get`` for many addresses in a few sends (host-gw asks one per peer)."""
        todo = list(dict.fromkeys(dsts))
        out: dict[IPAddress, RouteLookup | None] = {}
        for ip, (code, body) in zip(todo, self.rt.lookup_routes(todo), strict=True):
            if code:
                out[ip] = None  # unreachable
                continue
            a = _attrs(body, _RTMSG.size, len(body))
            gw, oif = a.get(_RTA_GATEWAY), a.get(_RTA_OIF)
            out[ip] = RouteLookup(self._interned.addr(gw) if gw else None,
                                  _U32.unpack(oif)[0] if oif else None)
        return out

    def write(self, ops: Sequence[Op]) -> list[Exception | None]:
        """All ops in as few netlink buffers as fit (see :class:`RtNetlink`); one result per op."""
        return self.rt.write(ops) if ops else []

    def disable_tx_checksum(self, ifname: str) -> str:
        """See :func:`netagent.kernel.ethtool.disable_tx_checksum`."""
        return ethtool.disable_tx_checksum(ifname, self.netns)


class SlicedDumps:
    """Neighbour, FDB and route dumps as generators, on a netlink socket of their own.

    For the drift repair's read-back in slices: between two slices the main loop handles
    events and writes on the agent's own socket, so a dump left half-read must not sit on that
    socket (a write's acknowledgement would queue behind the dump's remaining answers). A dump
    abandoned half-way (:meth:`abandon`) closes this socket too, so its unread answers are not
    left for the next dump to wade through; the next dump opens a new one. The parse caches
    are the agent kernel's, so a repair that finds the kernel unchanged still parses nothing."""

    def __init__(self, kernel: NetlinkKernel) -> None:
        self._kernel = kernel
        self._own = NetlinkKernel(kernel.netns)
        self._own._interned = kernel._interned
        self._own._remembered = kernel._remembered

    def dump_neighs(self, ifindex: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterator[Neigh]:
        return self._own.iter_neighs(ifindex, want, family)

    def dump_fdb(self, ifindex: int, want: Mapping[Any, Entry] | None = None) -> Iterator[Fdb]:
        return self._own.iter_fdb(ifindex, want)

    def dump_routes(self, table: int, want: Mapping[Any, Entry] | None = None,
                    family: int = 4) -> Iterator[Route]:
        return self._own.iter_routes(table, want, family)

    def abandon(self) -> None:
        """A read-back was abandoned half-way: drop the socket with its unread answers."""
        self._own.close()

    def close(self) -> None:
        self._own.close()
