"""The bgp backend's only direct kernel access: BIRD's routes (``proto bird``) in the Network.

BIRD programs the kernel itself; netagent only needs to *read* whether a BIRD that died left
routes behind (then a new BIRD starts in graceful-restart recovery and keeps them until its
sessions are back) and to *remove* leftovers when the backend is switched away from bgp.

Through iproute2's ``ip`` rather than pyroute2: importing pyroute2 costs ~0.8 s of a busy
agent's start of BIRD (measured here), which a live switch to bgp pays as lost packets, and the
agent otherwise never imports it. Kept in one place so it can follow the kernel package.
"""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Network

from netagent.backends.bgp.render import RTPROT_BIRD


class KernelRouteError(RuntimeError):
    """`ip` failed; the message is its stderr."""


def _ip(*args: str) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelRouteError(f"ip {' '.join(args)}: {exc}") from None
    if proc.returncode != 0:
        raise KernelRouteError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def bird_routes(network: IPv4Network) -> list[tuple[IPv4Network, int, str]]:
    """(dst, metric, type) of every main-table IPv4 route with proto bird strictly inside
    `network` (never the Network itself nor anything outside it)."""
    out: list[tuple[IPv4Network, int, str]] = []
    raw = _ip("-4", "-j", "route", "show", "table", "main", "proto", str(RTPROT_BIRD))
    for route in json.loads(raw or "[]"):
        dst = route.get("dst", "")
        if not dst or dst == "default":
            continue
        net = IPv4Network(dst if "/" in dst else f"{dst}/32")
        if net.subnet_of(network) and net.prefixlen > network.prefixlen:
            out.append((net, int(route.get("metric", 0)), str(route.get("type", "unicast"))))
    return out


def remove_bird_routes(network: IPv4Network) -> int:
    """Delete what :func:`bird_routes` finds (each delete names proto bird and the metric, so
    the kernel never removes anybody else's route); returns how many went."""
    gone = 0
    for net, metric, rtype in bird_routes(network):
        try:
            _ip("-4", "route", "del", rtype, str(net), "table", "main", "proto",
                str(RTPROT_BIRD), "metric", str(metric))
            gone += 1
        except KernelRouteError:  # already gone (BIRD removed it meanwhile)
            continue
    return gone
