"""The wireguard backend's kernel calls beyond :mod:`netagent.kernel`'s ``Kernel``: creating a
link of kind ``wireguard`` (the kernel module's device), which only ``ip`` does for us here
(the module's netlink attributes are not ours to encode), and the kernel constructor.
"""

from __future__ import annotations

import subprocess

from netagent.kernel import Kernel

__all__ = ["create_kernel_wireguard", "new_kernel"]


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
