"""Every kernel call of the wireguard backend, in one place.

Links, addresses and route read-backs go through :mod:`netagent.dataplane` (its ``Kernel``);
the two things it has no call for are here: creating a link of kind ``wireguard`` (the kernel
module's device) and writing the Network route with scope link. When ``netagent.dataplane``
moves (the ``netagent/kernel/`` package), only the imports of this module change.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from ipaddress import IPv4Network, IPv6Network

from netagent.kernel import (
    RT_TABLE_MAIN,
    RTPROT_NETAGENT,
    IPInterface,
    Kernel,
    KernelError,
    LinkInfo,
    Route,
)

__all__ = ["IPInterface", "Kernel", "KernelError", "LinkInfo", "Route", "RT_TABLE_MAIN",
           "RTPROT_NETAGENT", "create_kernel_wireguard", "new_kernel", "replace_link_route"]

_RT_SCOPE_LINK = 253


def new_kernel() -> Kernel:
    from netagent.kernel import NetlinkKernel

    return NetlinkKernel()


def create_kernel_wireguard(name: str) -> str:
    """``ip link add NAME type wireguard``: "" when it worked, else the kernel's answer
    ("Unknown device type" / "Operation not supported" where the module is missing)."""
    try:
        proc = subprocess.run(["ip", "link", "add", name, "type", "wireguard"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_RTM_NEWROUTE, _RTM_DELROUTE, _NLMSG_ERROR = 24, 25, 2
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_RTN_UNICAST = 1
_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")


def _rta(kind: int, data: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(data), kind)
    return head + data + b"\0" * (-(4 + len(data)) % 4)


def _route_request(mtype: int, flags: int, dst: IPv4Network | IPv6Network, oif: int | None,
                   scope: int, rtype: int) -> None:
    """One rtnetlink route request and its ack, on a socket of its own (raw netlink: no
    pyroute2 import, which costs most of a second on a loaded host, in the middle of a live
    switch)."""
    family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
    body = (_RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_NETAGENT, scope,
                        rtype, 0)
            + _rta(_RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN))
            + _rta(_RTA_DST, dst.network_address.packed))
    if oif is not None:
        body += _rta(_RTA_OIF, struct.pack("=I", oif))
    seq = 1
    msg = _HDR.pack(_HDR.size + len(body), mtype, flags | _NLM_F_REQUEST | _NLM_F_ACK, seq, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(msg + body)
        while True:
            data = sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, mt, _fl, rseq, _pid = _HDR.unpack_from(data, off)
                if mt == _NLMSG_ERROR and rseq == seq:
                    (err,) = struct.unpack_from("=i", data, off + _HDR.size)
                    if err:
                        raise KernelError(-err, f"route {dst} dev {oif}: {os.strerror(-err)}")
                    return
                off += max(length, _HDR.size)


def replace_link_route(dst: IPv4Network | IPv6Network, oif: int) -> None:
    """``ip route replace DST dev OIF scope link proto 111``: the whole Network on the device
    (flannel's one route; scope link like ``ip route`` gives a route with no gateway)."""
    _route_request(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, dst, oif, _RT_SCOPE_LINK,
                   _RTN_UNICAST)

