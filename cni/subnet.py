"""Read ``subnet.env`` (flannel-compat §9), the only thing the plugin learns from the daemon.

The daemon writes the IPv4 pair (``FLANNEL_NETWORK``/``FLANNEL_SUBNET``) when IPv4 is enabled
and the IPv6 pair (``FLANNEL_IPV6_NETWORK``/``FLANNEL_IPV6_SUBNET``) when IPv6 is, so a file
can be IPv4-only, dual-stack or IPv6-only; each pair present becomes one address family the
plugin configures.
"""

from __future__ import annotations

import time

from netagent.cni.errors import IO_FAILURE, TRY_AGAIN_LATER, CniError
from netagent.cni.fast import format_ip, netmask_any, parse_cidr_any

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"

# (version, network variable, subnet variable), in the file's order
_PAIRS = ((4, "FLANNEL_NETWORK", "FLANNEL_SUBNET"),
          (6, "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET"))
# the smallest host subnet that still leaves the gateway plus one pod address
_MAX_PLEN = {4: 30, 6: 126}


class SubnetFamily:
    """One address family of the host's lease: overlay network and own subnet (gateway = .1)."""

    __slots__ = ("version", "network", "network_plen", "gateway", "subnet", "plen")

    def __init__(self, version: int, network: int, network_plen: int, gateway: int,
                 plen: int) -> None:
        self.version = version
        self.network = network & netmask_any(version, network_plen)
        self.network_plen = network_plen
        self.gateway = gateway  # FLANNEL_(IPV6_)SUBNET's address: the bridge address
        self.subnet = gateway & netmask_any(version, plen)
        self.plen = plen

    @property
    def network_cidr(self) -> str:
        return f"{format_ip(self.version, self.network)}/{self.network_plen}"

    @property
    def subnet_cidr(self) -> str:
        return f"{format_ip(self.version, self.subnet)}/{self.plen}"

    @property
    def gateway_ip(self) -> str:
        return format_ip(self.version, self.gateway)

    @property
    def default_dst(self) -> str:
        return "::/0" if self.version == 6 else "0.0.0.0/0"

    def __repr__(self) -> str:
        return f"SubnetFamily(v{self.version} {self.network_cidr} gw {self.gateway_ip}/{self.plen})"


class SubnetEnv:
    """The host's lease as written by the daemon: one or two families, MTU, masquerade.

    ``network``/``subnet``/``gateway``/``plen`` and the ``*_cidr``/``gateway_ip`` properties
    describe the primary family (IPv4 when present, as flannel's IPv4 readers see the file).
    """

    __slots__ = ("v4", "v6", "mtu", "ipmasq")

    def __init__(self, v4: SubnetFamily | None, v6: SubnetFamily | None, mtu: int,
                 ipmasq: bool) -> None:
        if v4 is None and v6 is None:
            raise ValueError("a subnet.env needs at least one address family")
        self.v4, self.v6 = v4, v6
        self.mtu = mtu
        self.ipmasq = ipmasq

    @property
    def families(self) -> list[SubnetFamily]:
        """IPv4 first, then IPv6: the order of range sets, addresses and routes everywhere."""
        return [f for f in (self.v4, self.v6) if f is not None]

    def family(self, version: int) -> SubnetFamily | None:
        return self.v4 if version == 4 else self.v6 if version == 6 else None

    @property
    def primary(self) -> SubnetFamily:
        return self.families[0]

    @property
    def network(self) -> int:
        return self.primary.network

    @property
    def network_plen(self) -> int:
        return self.primary.network_plen

    @property
    def gateway(self) -> int:
        return self.primary.gateway

    @property
    def subnet(self) -> int:
        return self.primary.subnet

    @property
    def plen(self) -> int:
        return self.primary.plen

    @property
    def network_cidr(self) -> str:
        return self.primary.network_cidr

    @property
    def subnet_cidr(self) -> str:
        return self.primary.subnet_cidr

    @property
    def gateway_ip(self) -> str:
        return self.primary.gateway_ip


def _family(version: int, values: dict[str, str], net_key: str, sub_key: str,
            path: str) -> SubnetFamily:
    try:
        net_v, net, net_plen = parse_cidr_any(values[net_key])
        sub_v, gw, plen = parse_cidr_any(values[sub_key])
    except ValueError as e:
        raise CniError(IO_FAILURE, f"{path} is malformed", str(e)) from None
    if net_v != version or sub_v != version:
        raise CniError(IO_FAILURE, f"{path} is malformed",
                       f"{net_key}/{sub_key} must be IPv{version}: "
                       f"{values[net_key]} {values[sub_key]}")
    if plen > _MAX_PLEN[version]:
        raise CniError(IO_FAILURE, f"{path}: {sub_key} /{plen} leaves no room for containers")
    return SubnetFamily(version, net, net_plen, gw, plen)


def parse_subnet_env(text: str, path: str = "subnet.env") -> SubnetEnv:
    """Parse the file's NAME=value lines; values split on ',' like flannel's readers do."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').split(",")[0].strip()
    missing = [k for k in ("FLANNEL_MTU", "FLANNEL_IPMASQ") if not values.get(k)]
    families: dict[int, SubnetFamily] = {}
    for version, net_key, sub_key in _PAIRS:
        have = [k for k in (net_key, sub_key) if values.get(k)]
        if len(have) == 2:
            families[version] = _family(version, values, net_key, sub_key, path)
        elif have:  # half a pair: name the other half
            missing += [k for k in (net_key, sub_key) if k not in have]
    if not families and not missing:
        missing = ["FLANNEL_NETWORK", "FLANNEL_SUBNET"]
    if missing:
        raise CniError(IO_FAILURE, f"{path} is missing {', '.join(missing)}",
                       "" if families else "need FLANNEL_NETWORK/FLANNEL_SUBNET and/or "
                       "FLANNEL_IPV6_NETWORK/FLANNEL_IPV6_SUBNET")
    try:
        mtu = int(values["FLANNEL_MTU"])
    except ValueError as e:
        raise CniError(IO_FAILURE, f"{path} is malformed", str(e)) from None
    if not 68 <= mtu <= 65535:
        raise CniError(IO_FAILURE, f"{path}: FLANNEL_MTU {mtu} out of range")
    if 6 in families and mtu < 1280:
        raise CniError(IO_FAILURE, f"{path}: FLANNEL_MTU {mtu} is below IPv6's minimum 1280")
    return SubnetEnv(families.get(4), families.get(6), mtu,
                     values["FLANNEL_IPMASQ"].lower() == "true")


def read_subnet_env(path: str, wait: float = 0.0) -> SubnetEnv:
    """Read the file, waiting up to ``wait`` s for the daemon to write it.

    Pods scheduled before the daemon holds a lease are flannel's most reported failure; a short
    wait plus code 11 (try again later) tells the runtime to retry instead of giving up.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            return parse_subnet_env(text, path)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise CniError(TRY_AGAIN_LATER,
                               f"open {path}: no such file or directory",
                               "the netagent daemon has not written the host's subnet yet; "
                               "is it running?") from None
            time.sleep(0.05)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot read {path}: {e.strerror}") from None
