"""Every kernel call of the wireguard backend, in one place.

Links, addresses and route read-backs go through :mod:`netagent.dataplane` (its ``Kernel``);
the two things it has no call for are here: creating a link of kind ``wireguard`` (the kernel
module's device) and writing the Network route with scope link. When ``netagent.dataplane``
moves (the ``netagent/kernel/`` package), only the imports of this module change.
"""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Network, IPv6Network

from netagent.dataplane import (
    RT_TABLE_MAIN,
    RTPROT_NETAGENT,
    IPInterface,
    Kernel,
    KernelError,
    LinkInfo,
    Route,
)

__all__ = ["IPInterface", "Kernel", "KernelError", "LinkInfo", "Route", "RT_TABLE_MAIN",
           "RTPROT_NETAGENT", "create_kernel_wireguard", "new_kernel", "replace_link_route",
           "delete_link_route"]

_RT_SCOPE_LINK = 253


def new_kernel() -> Kernel:
    from netagent.dataplane import NetlinkKernel

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


def replace_link_route(dst: IPv4Network | IPv6Network, oif: int) -> None:
    """``ip route replace DST dev OIF scope link proto 111``: the whole Network on the device
    (flannel's one route; scope link like ``ip route`` gives a route with no gateway)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            ipr.route("replace", dst=str(dst), oif=oif, scope=_RT_SCOPE_LINK,
                      proto=RTPROT_NETAGENT, table=RT_TABLE_MAIN,
                      family=10 if dst.version == 6 else 2)
        except Exception as exc:  # pyroute2's NetlinkError and friends
            raise KernelError(getattr(exc, "code", 0) or 0, f"route {dst} dev {oif}: {exc}"
                              ) from None


def delete_link_route(dst: IPv4Network | IPv6Network, oif: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=str(dst), oif=oif, proto=RTPROT_NETAGENT,
                      table=RT_TABLE_MAIN, family=10 if dst.version == 6 else 2)
        except Exception as exc:
            raise KernelError(getattr(exc, "code", 0) or 0, f"route {dst} dev {oif}: {exc}"
                              ) from None
