"""The bgp backend's only direct kernel access: BIRD's routes (``proto bird``) in the Network.

BIRD programs the kernel itself; netagent only needs to *read* whether a BIRD that died left
routes behind (then a new BIRD starts in graceful-restart recovery and keeps them until its
sessions are back) and to *remove* leftovers when the backend is switched away from bgp.
Kept in one place so it can follow the kernel package (netlink) wherever it moves.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Network

from netagent.backends.bgp.render import RTPROT_BIRD

_MAIN_TABLE = 254


def bird_routes(network: IPv4Network) -> list[tuple[IPv4Network, int]]:
    """(dst, metric) of every main-table IPv4 route with proto bird strictly inside
    `network` (never the Network itself nor anything outside it)."""
    from pyroute2 import IPRoute

    out: list[tuple[IPv4Network, int]] = []
    with IPRoute() as ipr:
        for msg in ipr.get_routes(family=socket.AF_INET, table=_MAIN_TABLE):
            if msg["proto"] != RTPROT_BIRD:
                continue
            dst = msg.get_attr("RTA_DST")
            if dst is None:
                continue
            net = IPv4Network(f"{dst}/{msg['dst_len']}")
            if net.subnet_of(network) and net.prefixlen > network.prefixlen:
                out.append((net, int(msg.get_attr("RTA_PRIORITY") or 0)))
    return out


def remove_bird_routes(network: IPv4Network) -> int:
    """Delete what :func:`bird_routes` finds (a delete names proto bird, so the kernel refuses
    to remove anybody else's route); returns how many went."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    gone = 0
    with IPRoute() as ipr:
        for net, metric in bird_routes(network):
            try:
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                          table=_MAIN_TABLE, proto=RTPROT_BIRD, priority=metric)
                gone += 1
            except NetlinkError:  # already gone (BIRD removed it meanwhile)
                continue
    return gone
