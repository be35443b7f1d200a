"""Per-container masquerade (``ipMasq``) like the reference bridge plugin: a chain per pod.

``POSTROUTING -s <pod>/32 -j NA-<hash>``; the chain accepts traffic to the overlay network
(pod-to-pod across hosts keeps its source address) and masquerades the rest except multicast.
Only imported when ipMasq is in effect: it needs ``subprocess`` (12 ms to import) and
``iptables-restore`` (one exec per change; the nft transaction makes each change atomic).
"""

from __future__ import annotations

import subprocess

from netagent.cni.errors import INTERNAL, CniError
from netagent.cni.fast import digest


def chain_name(network: str, container_id: str, ifname: str) -> str:
    """Deterministic, ≤ 28 chars (the xtables limit), so DEL and GC find it without state."""
    return "NA-" + digest(f"{network}/{container_id}/{ifname}")[:24]


def _comment(network: str, container_id: str) -> str:
    return f"netagent: {network} id: {container_id}"[:250]


def _restore(rules: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables-restore", "-w", "5", "--noflush"], input=rules,
                          capture_output=True, text=True, timeout=timeout, check=False)


def add(network: str, container_id: str, ifname: str, ip: str, overlay_cidr: str,
        timeout: float = 10) -> None:
    chain = chain_name(network, container_id, ifname)
    rules = (
        "*nat\n"
        f":{chain} - [0:0]\n"
        f"-F {chain}\n"
        f"-A {chain} -d {overlay_cidr} -j ACCEPT\n"
        f"-A {chain} ! -d 224.0.0.0/4 -j MASQUERADE\n"
        f"-A POSTROUTING -s {ip}/32 -m comment --comment \"{_comment(network, container_id)}\""
        f" -j {chain}\n"
        "COMMIT\n"
    )
    proc = _restore(rules, timeout)
    if proc.returncode != 0:
        raise CniError(INTERNAL, "failed to install masquerade rules", proc.stderr.strip())


def delete(network: str, container_id: str, ifname: str, timeout: float = 10) -> None:
    """Remove the jump(s) to the attachment's chain and the chain; silent when absent.

    The jump is found by listing POSTROUTING, so DEL works without knowing the pod address.
    """
    chain = chain_name(network, container_id, ifname)
    listing = subprocess.run(["iptables", "-w", "5", "-t", "nat", "-S", "POSTROUTING"],
                             capture_output=True, text=True, timeout=timeout, check=False)
    jumps = [line for line in listing.stdout.splitlines()
             if line.startswith("-A POSTROUTING ") and line.endswith(f"-j {chain}")]
    has_chain = subprocess.run(["iptables", "-w", "5", "-t", "nat", "-S", chain],
                               capture_output=True, text=True, timeout=timeout,
                               check=False).returncode == 0
    if not jumps and not has_chain:
        return
    rules = "*nat\n"
    rules += "".join("-D" + line[2:] + "\n" for line in jumps)
    if has_chain:
        rules += f"-F {chain}\n-X {chain}\n"
    rules += "COMMIT\n"
    proc = _restore(rules, timeout)
    if proc.returncode != 0:
        raise CniError(INTERNAL, "failed to remove masquerade rules", proc.stderr.strip())
