"""Read ``subnet.env`` (flannel-compat §9), the only thing the plugin learns from the daemon."""

from __future__ import annotations

import os
import time

from cni.errors import IO_FAILURE, TRY_AGAIN_LATER, CniError
from cni.fast import int_to_ip, netmask, parse_cidr

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"


class SubnetEnv:
    """The host's lease as written by the daemon: overlay network, own subnet, MTU, masquerade."""

    __slots__ = ("network", "network_plen", "gateway", "subnet", "plen", "mtu", "ipmasq")

    def __init__(self, network: int, network_plen: int, gateway: int, plen: int, mtu: int,
                 ipmasq: bool) -> None:
        self.network = network & netmask(network_plen)
        self.network_plen = network_plen
        self.gateway = gateway  # FLANNEL_SUBNET's address: the bridge address
        self.subnet = gateway & netmask(plen)
        self.plen = plen
        self.mtu = mtu
        self.ipmasq = ipmasq

    @property
    def network_cidr(self) -> str:
        return f"{int_to_ip(self.network)}/{self.network_plen}"

    @property
    def subnet_cidr(self) -> str:
        return f"{int_to_ip(self.subnet)}/{self.plen}"

    @property
    def gateway_ip(self) -> str:
        return int_to_ip(self.gateway)


def parse_subnet_env(text: str, path: str = "subnet.env") -> SubnetEnv:
    """Parse the file's NAME=value lines; values split on ',' like flannel's readers do."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').split(",")[0]
    missing = [k for k in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ")
               if not values.get(k)]
    if missing:
        raise CniError(IO_FAILURE, f"{path} is missing {', '.join(missing)}",
                       "IPv6-only subnet.env is not supported" if "FLANNEL_IPV6_SUBNET" in values
                       else "")
    try:
        net, net_plen = parse_cidr(values["FLANNEL_NETWORK"])
        gw, plen = parse_cidr(values["FLANNEL_SUBNET"])
        mtu = int(values["FLANNEL_MTU"])
    except ValueError as e:
        raise CniError(IO_FAILURE, f"{path} is malformed", str(e)) from None
    if plen > 30:
        raise CniError(IO_FAILURE, f"{path}: subnet /{plen} leaves no room for containers")
    if not 68 <= mtu <= 65535:
        raise CniError(IO_FAILURE, f"{path}: FLANNEL_MTU {mtu} out of range")
    return SubnetEnv(net, net_plen, gw, plen, mtu, values["FLANNEL_IPMASQ"].lower() == "true")


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


def subnet_file_exists(path: str) -> bool:
    return os.path.exists(path)
