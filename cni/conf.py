"""The netagent plugin's network config (its ``NetConf``): stdin checked once, so the verbs
can trust it, plus the names DEL derives from nothing but the IDs.

Apart from the verbs so that a unit test, the CNI server and the strategies share one
reading of the config without importing any kernel code.
"""

from __future__ import annotations

from netagent.cni.errors import INVALID_CONFIG, CniError
from netagent.cni.fast import digest, format_ip, parse_ip_any
from netagent.cni.skel import check_version, valid_container_id, valid_ifname

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from netagent.cni.skel import Env
    from netagent.cni.subnet import SubnetEnv

DEFAULT_BRIDGE = "cni0"
MODES = ("bridge", "routed")
#: route protocol of a routed pod's host route: not the agent's 111 (RTPROT_NETAGENT), so the
#: agent's sweep of its own routes never touches these even when they fall outside its current
#: subnet; named by no iproute2 rt_protos entry (``echo "112 netagent-pod" >
#: /etc/iproute2/rt_protos.d/netagent-pod.conf`` names it for ``ip route``)
POD_ROUTE_PROTO = 112
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_TIMEOUT = 20.0
DEFAULT_SUBNET_WAIT = 3.0


def _bool(conf: dict[str, Any], key: str, default: bool | None) -> bool | None:
    value = conf.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise CniError(INVALID_CONFIG, f"{key} must be a boolean", repr(value))
    return value


def _str(conf: dict[str, Any], key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_CONFIG, f"{key} must be a non-empty string", repr(value))
    return value


class Config:
    """The network config on stdin, checked once so the verbs can trust it."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.version: str = check_version(raw)
        name = raw.get("name")
        if not isinstance(name, str) or not valid_container_id(name):
            raise CniError(INVALID_CONFIG, "name must be alphanumerics plus '_', '.', '-'",
                           repr(name))
        self.name = name
        mode = raw.get("mode", "bridge")
        if mode not in MODES:
            raise CniError(INVALID_CONFIG, 'mode must be "bridge" or "routed"', repr(mode))
        self.mode: str = mode
        self.bridge = _str(raw, "bridge", DEFAULT_BRIDGE)
        why = valid_ifname(self.bridge)
        if why:
            raise CniError(INVALID_CONFIG, f"bridge: {why}", self.bridge)
        self.subnet_file = _str(raw, "subnetFile", "/run/flannel/subnet.env")
        self.data_dir = _str(raw, "dataDir", f"{DEFAULT_DATA_DIR}/{name}")
        self.is_default_gateway = bool(_bool(raw, "isDefaultGateway", True))
        self.hairpin = bool(_bool(raw, "hairpinMode", False))
        self.ip_masq = _bool(raw, "ipMasq", None)  # None: the inverse of FLANNEL_IPMASQ
        mtu = raw.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool)
                                or not 68 <= mtu <= 65535):
            raise CniError(INVALID_CONFIG, "mtu must be an integer in 68..65535", repr(mtu))
        self.mtu: int | None = mtu
        self.timeout = float(raw.get("timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
        self.subnet_wait = float(raw.get("subnetFileWait", DEFAULT_SUBNET_WAIT))
        ipam = raw.get("ipam")
        if ipam is None:
            ipam = {}
        if not isinstance(ipam, dict):
            raise CniError(INVALID_CONFIG, "ipam must be an object")
        ipam_type = ipam.get("type", "")
        if not isinstance(ipam_type, str):
            raise CniError(INVALID_CONFIG, "ipam.type must be a string")
        self.ipam_type = ipam_type
        dns = raw.get("dns")
        self.dns: dict[str, Any] | None = dns if isinstance(dns, dict) and dns else None
        prev = raw.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(INVALID_CONFIG, "prevResult must be an object")
        self.prev: dict[str, Any] | None = prev
        rc = raw.get("runtimeConfig")
        self.runtime_config: dict[str, Any] = rc if isinstance(rc, dict) else {}

    def masq_enabled(self, sub: SubnetEnv | None) -> bool:
        """Explicit ipMasq wins; else do what the daemon does not (flannel's rule)."""
        if self.ip_masq is not None:
            return self.ip_masq
        return sub is None or not sub.ipmasq

    def requested_ips(self, env: Env) -> dict[int, str]:
        """Static addresses asked for, per family (4/6): CNI_ARGS ``IP=`` (comma-separated, as
        host-local takes it), then ``args.cni.ips``, then ``runtimeConfig.ips``; the first
        of each family wins. Malformed text is a config error, not silently skipped."""
        candidates: list[str] = []
        if env.args.get("IP"):
            candidates += env.args["IP"].split(",")
        args = self.raw.get("args")
        if isinstance(args, dict) and isinstance(args.get("cni"), dict):
            candidates += [str(x) for x in args["cni"].get("ips") or []]
        candidates += [str(x) for x in self.runtime_config.get("ips") or []]
        out: dict[int, str] = {}
        for cand in candidates:
            ip = cand.strip().partition("/")[0]
            if not ip:
                continue
            try:
                version, value = parse_ip_any(ip)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"requested IP {ip!r} is not an IP address",
                               cand) from None
            out.setdefault(version, format_ip(version, value))
        return out


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic host-side name (13 chars) so DEL/GC find it with nothing but the IDs."""
    return "na" + digest(f"{container_id}/{ifname}")[:11]
