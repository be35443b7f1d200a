"""The vxlan checksum-offload workaround: whether a kernel needs it, and turning it on.

Kept apart from netlink: ethtool speaks its own generic-netlink family (through pyroute2's
ethtool when it works) or falls back to the ``ethtool`` binary.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess

from netagent.kernel.entries import KernelError

log = logging.getLogger(__name__)


def kernel_needs_csum_workaround(release: str) -> bool:
    """Whether the vxlan tx-checksum bug (63 s delays through NAT'd vxlan) may bite this kernel.

    Same rule as Calico's Felix: kernels up to 5.7 are treated as affected (the fix, "netfilter:
    nat: never update the UDP checksum when it's 0", landed in 5.7/5.8 and stable trees are not
    reliably identifiable from the release string). Unparsable releases count as affected: the
    workaround costs a little CPU, the bug costs a minute of timeouts.
    """
    parts = release.split(".")
    try:
        major = int(parts[0])
        minor = int("".join(ch for ch in parts[1] if ch.isdigit()) or "0")
    except (IndexError, ValueError):
        return True
    return (major, minor) <= (5, 7)


def disable_tx_checksum(ifname: str, netns: str | None = None) -> str:
    """``ethtool -K <dev> tx-checksum-ip-generic off``: pyroute2's ethtool, else the binary.

    Returns how it was done (for the log line), "" when the feature was already off.
    pyroute2's ethtool works on the current namespace only, so with ``netns`` set the binary
    is run through ``ip netns exec``.
    """
    if netns is None:
        try:
            from pyroute2.ethtool import Ethtool

            eth = Ethtool()
            try:
                feats = eth.get_features(ifname)
                if not feats.features["tx-checksum-ip-generic"].enable:
                    return ""
                feats.features["tx-checksum-ip-generic"].enable = False
                eth.set_features(ifname, feats)
                if not eth.get_features(ifname).features["tx-checksum-ip-generic"].enable:
                    return "pyroute2 ethtool"
            finally:
                eth.close()
        except Exception as exc:  # noqa: BLE001 - fall back to the binary
            log.info("pyroute2 ethtool could not change %s (%s); trying ethtool", ifname, exc)
    binary = shutil.which("ethtool")
    if binary is None:
        raise KernelError(errno.ENOENT, "ethtool binary not found for the checksum workaround")
    pre = ["ip", "netns", "exec", netns] if netns is not None else []
    shown = subprocess.run([*pre, binary, "-k", ifname], capture_output=True, text=True,
                           timeout=10).stdout
    if "tx-checksum-ip-generic: off" in shown:
        return ""
    cmd = [*pre, binary, "-K", ifname, "tx-checksum-ip-generic", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise KernelError(errno.EIO, f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return "ethtool binary"
