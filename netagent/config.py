"""The flannel network config (`<prefix>/config`): one typed model, one parser.

Pure: no I/O. Mirrors flannel's `CheckNetworkConfig` (case-insensitive keys, unknown keys
ignored, same defaults) but every rejection is a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

#: Backend used when the config has no `Backend` key. flannel's code falls back to udp while its
#: documentation says vxlan (flannel #1221); we follow the documentation and log the choice.
DEFAULT_BACKEND = "vxlan"

#: Backend types whose leases we recognise. Only some are implemented (see backends.BACKENDS).
KNOWN_BACKENDS = frozenset(
    {"vxlan", "host-gw", "udp", "alloc", "wireguard", "ipip", "ipsec", "extension", "tencent-vpc",
     "bgp"}
)


class ConfigError(ValueError):
    """A network config was rejected; `field` names the offending key."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class BackendConfig:
    type: str
    vni: int = 1
    port: int = 0
    direct_routing: bool = False
    mtu: int = 0
    gbp: bool = False
    learning: bool = False
    #: every key as given (original spelling), for backends with options of their own
    raw: tuple[tuple[str, Any], ...] = ()
    #: the backend's own options, parsed by its BACKEND_OPTIONS parser (None when it has none)
    options: Any = None


@dataclass(frozen=True)
class NetworkConfig:
    enable_ipv4: bool
    enable_ipv6: bool
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    backend: BackendConfig
    backend_defaulted: bool = False
    enable_nftables: bool = False
    extra: tuple[str, ...] = field(default=())

    def candidate_subnets(self) -> list[IPv4Network]:
        """Every leasable IPv4 subnet from SubnetMin to SubnetMax, in order."""
        return list(self.iter_candidate_subnets())

    def iter_candidate_subnets(self) -> Iterator[IPv4Network]:
        if self.network is None or self.subnet_min is None or self.subnet_max is None:
            return
        size = 1 << (32 - self.subnet_len)
        for addr in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield IPv4Network((addr, self.subnet_len))

    @property
    def candidate_count(self) -> int:
        if self.subnet_min is None or self.subnet_max is None:
            return 0
        size = 1 << (32 - self.subnet_len)
        return (int(self.subnet_max) - int(self.subnet_min)) // size + 1

    def iter_candidate_subnets6(self) -> Iterator[IPv6Network]:
        if self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return
        size = 1 << (128 - self.ipv6_subnet_len)
        for addr in range(int(self.ipv6_subnet_min), int(self.ipv6_subnet_max) + 1, size):
            yield IPv6Network((addr, self.ipv6_subnet_len))

    def only_family(self, family: int) -> NetworkConfig:
        """This config with the other address family turned off (a live switch that turns a
        family off removes that family's entries through a backend that knows only it)."""
        if family == 4:
            return replace(self, enable_ipv6=False, ipv6_network=None, ipv6_subnet_len=0,
                           ipv6_subnet_min=None, ipv6_subnet_max=None)
        return replace(self, enable_ipv4=False, network=None, subnet_len=0, subnet_min=None,
                       subnet_max=None)

    @property
    def primary_network(self) -> IPv4Network | IPv6Network | None:
        """The network leases are known by: the IPv4 one, or IPv6Network when IPv4 is off."""
        return self.network if self.enable_ipv4 else self.ipv6_network

    def contains_subnet(self, subnet: IPv4Network | None) -> bool:
        """flannel's isSubnetConfigCompat for the IPv4 side (IPv6-only: no IPv4 subnet)."""
        if not self.enable_ipv4:
            return subnet is None
        if subnet is None or self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def contains_ipv6_subnet(self, subnet: IPv6Network | None) -> bool:
        if not self.enable_ipv6:
            return subnet is None
        if subnet is None or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.ipv6_subnet_len
            and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max
        )


def _lower_keys(obj: dict[str, Any], where: str) -> dict[str, tuple[str, Any]]:
    """Case-insensitive key lookup table, like Go's encoding/json."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in obj.items():
        if not isinstance(key, str):  # pragma: no cover - json keys are always str
            raise ConfigError(where, "keys must be strings")
        out.setdefault(key.lower(), (key, value))
    return out


def _get(table: dict[str, tuple[str, Any]], name: str, default: Any = None) -> Any:
    return table[name.lower()][1] if name.lower() in table else default


def _bool(table: dict[str, tuple[str, Any]], name: str, default: bool, where: str = "") -> bool:
    value = _get(table, name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{name}", f"must be true or false, got {json.dumps(value)}")
    return value


def _int(table: dict[str, tuple[str, Any]], name: str, where: str = "") -> int:
    value = _get(table, name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{name}", f"must be a whole number, got {json.dumps(value)}")
    return value


#: Parsers of a backend's own keys, by Backend.Type: pure, given the Backend table (lower-cased
#: key -> (original key, value), read with `_get`/`_int`/`_bool`), returning a frozen dataclass
#: and raising ConfigError naming the field ("Backend.PSK") for anything wrong.
BACKEND_OPTIONS: dict[str, Callable[[dict[str, tuple[str, Any]]], Any]] = {}


def _parse_backend(raw: Any) -> tuple[BackendConfig, bool]:
    if raw is None:
        return BackendConfig(type=DEFAULT_BACKEND), True
    if not isinstance(raw, dict):
        raise ConfigError("Backend", f"must be a JSON object, got {json.dumps(raw)}")
    table = _lower_keys(raw, "Backend")
    btype = _get(table, "Type")
    if not isinstance(btype, str) or not btype:
        raise ConfigError("Backend.Type", "missing: name a backend (vxlan, host-gw or udp)")
    btype = btype.lower()
    if btype not in KNOWN_BACKENDS:
        raise ConfigError(
            "Backend.Type", f"unknown backend type {btype!r} (expected vxlan, host-gw or udp)"
        )
    vni = _int(table, "VNI", "Backend.")
    port = _int(table, "Port", "Backend.")
    mtu = _int(table, "MTU", "Backend.")
    if "vni" in table and not 0 <= vni < (1 << 24):
        raise ConfigError("Backend.VNI", f"must be between 0 and 16777215, got {vni}")
    if not 0 <= port <= 65535:
        raise ConfigError("Backend.Port", f"must be between 0 and 65535, got {port}")
    if mtu and not 576 <= mtu <= 65535:
        raise ConfigError("Backend.MTU", f"must be between 576 and 65535, got {mtu}")
    parse_options = BACKEND_OPTIONS.get(btype)
    return (
        BackendConfig(
            type=btype,
            vni=vni if "vni" in table else 1,
            port=port,
            direct_routing=_bool(table, "DirectRouting", False, "Backend."),
            mtu=mtu,
            gbp=_bool(table, "GBP", False, "Backend."),
            learning=_bool(table, "Learning", False, "Backend."),
            raw=tuple(sorted((k, v) for k, v in raw.items() if isinstance(k, str))),
            options=parse_options(table) if parse_options else None,
        ),
        False,
    )


def _addr_in(
    table: dict[str, tuple[str, Any]],
    name: str,
    net: IPv4Network | IPv6Network,
    sublen: int,
    default: IPv4Address | IPv6Address,
) -> Any:
    raw = _get(table, name)
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        raise ConfigError(name, f"must be an IP address string, got {json.dumps(raw)}")
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not an IP address") from None
    if addr.version != net.version or addr not in net:
        raise ConfigError(name, f"{raw} is not in the range of the Network {net}")
    hostbits = net.max_prefixlen - sublen
    if int(addr) & ((1 << hostbits) - 1):
        raise ConfigError(name, f"{raw} is not on a SubnetLen boundary (/{sublen})")
    return addr


def _family(
    table: dict[str, tuple[str, Any]],
    version: int,
) -> tuple[Any, int, Any, Any]:
    """Validate one address family; returns (network, subnet_len, min, max)."""
    p = "" if version == 4 else "IPv6"
    net_key, len_key = f"{p}Network", f"{p}SubnetLen"
    raw_net = _get(table, net_key)
    if not isinstance(raw_net, str) or not raw_net:
        raise ConfigError(net_key, "missing: please define a correct Network parameter")
    try:
        net = ipaddress.ip_network(raw_net, strict=False)
    except ValueError:
        raise ConfigError(net_key, f"{raw_net!r} is not a CIDR (like 10.5.0.0/16)") from None
    if net.version != version:
        raise ConfigError(net_key, f"{raw_net!r} is not an IPv{version} CIDR")
    if net.network_address != ipaddress.ip_network(raw_net, strict=False).network_address:
        raise ConfigError(net_key, f"{raw_net!r} is not a network address")  # pragma: no cover
    sublen = _int(table, len_key)
    maxlen = net.max_prefixlen
    if version == 4:
        max_sub, too_small = 30, 28
        default_len = 24 if net.prefixlen <= 22 else net.prefixlen + 2
    else:
        max_sub, too_small = 126, 124
        default_len = 64 if net.prefixlen <= 62 else net.prefixlen + 2
    if net.prefixlen > too_small:
        raise ConfigError(
            net_key, f"network is too small: minimum useful network prefix is /{too_small}"
        )
    if len_key.lower() in table and _get(table, len_key) is not None:
        if sublen > max_sub:
            raise ConfigError(len_key, f"must be at most /{max_sub}, got {sublen}")
        if sublen < net.prefixlen + 2:
            raise ConfigError(
                len_key,
                f"/{sublen} leaves fewer than four subnets in {net}: "
                f"use at least /{net.prefixlen + 2}",
            )
    else:
        sublen = default_len
    size = 1 << (maxlen - sublen)
    first = ipaddress.ip_address(int(net.network_address) + size)
    last = ipaddress.ip_address(int(net.broadcast_address) + 1 - size)
    smin = _addr_in(table, f"{p}SubnetMin", net, sublen, first)
    smax = _addr_in(table, f"{p}SubnetMax", net, sublen, last)
    if smin > smax:
        raise ConfigError(f"{p}SubnetMin", f"{smin} is above {p}SubnetMax {smax}")
    return net, sublen, smin, smax


def parse_network_config(raw: str | bytes) -> NetworkConfig:
    """Parse and validate the config JSON; raise ConfigError naming the field on any mistake."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("(json)", f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("(json)", "the config must be a JSON object")
    table = _lower_keys(doc, "(json)")
    enable4 = _bool(table, "EnableIPv4", True)
    enable6 = _bool(table, "EnableIPv6", False)
    if not enable4 and not enable6:
        raise ConfigError("EnableIPv4", "both IPv4 and IPv6 are disabled")
    net4 = min4 = max4 = None
    len4 = 0
    if enable4:
        net4, len4, min4, max4 = _family(table, 4)
    net6 = min6 = max6 = None
    len6 = 0
    if enable6:
        net6, len6, min6, max6 = _family(table, 6)
    backend, defaulted = _parse_backend(_get(table, "Backend"))
    known = {
        "network", "subnetlen", "subnetmin", "subnetmax", "enableipv4", "enableipv6",
        "ipv6network", "ipv6subnetlen", "ipv6subnetmin", "ipv6subnetmax", "backend",
        "enablenftables",
    }
    return NetworkConfig(
        enable_ipv4=enable4,
        enable_ipv6=enable6,
        network=net4,
        subnet_len=len4,
        subnet_min=min4,
        subnet_max=max4,
        ipv6_network=net6,
        ipv6_subnet_len=len6,
        ipv6_subnet_min=min6,
        ipv6_subnet_max=max6,
        backend=backend,
        backend_defaulted=defaulted,
        enable_nftables=_bool(table, "EnableNFTables", False),
        extra=tuple(sorted(orig for low, (orig, _) in table.items() if low not in known)),
    )


# =========================================================================== wireguard options
# The wireguard backend's own keys (flannel's pkg/backend/wireguard): parsed here, used by
# backends/wireguard. Kept in this one section so other backends' sections merge beside it.

#: flannel's defaults
WIREGUARD_DEFAULT_PORT = 51820
WIREGUARD_DEFAULT_PORT_V6 = 51821
WIREGUARD_MODES = ("separate", "auto", "ipv4", "ipv6")


@dataclass(frozen=True)
class WireguardOptions:
    """``Backend`` keys of ``"Type": "wireguard"``. ``psk`` is the canonical base64 text of a
    32-byte key ("" = none); ``mtu`` 0 = the external interface's MTU."""

    listen_port: int = WIREGUARD_DEFAULT_PORT
    listen_port_v6: int = WIREGUARD_DEFAULT_PORT_V6
    mtu: int = 0
    psk: str = ""
    persistent_keepalive: int = 0
    mode: str = "separate"


def parse_wg_key(text: object, field_name: str) -> str:
    """A WireGuard key (base64 of exactly 32 bytes) in canonical form; ConfigError otherwise.

    Strict base64: a key with stray characters or the wrong length would otherwise be cut or
    padded into some other key, and the tunnel would silently never come up."""
    import base64
    import binascii

    if not isinstance(text, str):
        raise ConfigError(field_name, f"must be a base64 WireGuard key string, got "
                                      f"{json.dumps(text)}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(field_name, "is not valid base64 (make one with `wg genpsk`)") from None
    if len(raw) != 32:
        raise ConfigError(field_name, f"must decode to 32 bytes, got {len(raw)} "
                                      "(make one with `wg genpsk`)")
    return base64.b64encode(raw).decode()


def _wg_port(table: dict[str, tuple[str, Any]], name: str, default: int) -> int:
    if _get(table, name) is None:
        return default
    port = _int(table, name, "Backend.")
    if not 1 <= port <= 65535:
        raise ConfigError(f"Backend.{name}", f"must be between 1 and 65535, got {port}")
    return port


def parse_wireguard_options(table: dict[str, tuple[str, Any]]) -> WireguardOptions:
    """flannel's keys, same defaults; ``PSK`` validated as a key; ``Mode`` one of
    :data:`WIREGUARD_MODES` (case-insensitive, like flannel's comparison)."""
    port = _wg_port(table, "ListenPort", WIREGUARD_DEFAULT_PORT)
    port6 = _wg_port(table, "ListenPortV6", WIREGUARD_DEFAULT_PORT_V6)
    keepalive = _int(table, "PersistentKeepaliveInterval", "Backend.")
    if not 0 <= keepalive <= 65535:
        raise ConfigError("Backend.PersistentKeepaliveInterval",
                          f"must be between 0 and 65535 seconds, got {keepalive}")
    raw_psk = _get(table, "PSK")
    psk = "" if raw_psk is None or raw_psk == "" else parse_wg_key(raw_psk, "Backend.PSK")
    raw_mode = _get(table, "Mode")
    mode = "separate" if raw_mode is None or raw_mode == "" else raw_mode
    if not isinstance(mode, str) or mode.lower() not in WIREGUARD_MODES:
        raise ConfigError("Backend.Mode", f"unknown mode {json.dumps(raw_mode)} (expected one of "
                                          f"{', '.join(WIREGUARD_MODES)})")
    return WireguardOptions(listen_port=port, listen_port_v6=port6,
                            mtu=_int(table, "MTU", "Backend."), psk=psk,
                            persistent_keepalive=keepalive, mode=mode.lower())


BACKEND_OPTIONS["wireguard"] = parse_wireguard_options
# ======================================================================= end wireguard options


# =========================================================================== bgp backend options
# `"Backend": {"Type": "bgp", "ASNumber": 64512, "Peers": [{"IP": ..., "ASNumber": ...}],
# "NodeMesh": true, ...}`: parsed here (pure), used by backends/bgp. Names are flannel-cased
# (the public interface); the extra keys are what Calico users know from BGPConfiguration and
# BGPPeer (asNumber, nodeToNodeMeshEnabled, password, maxRestartTime, keepalive/hold timers).

#: Calico's and kube-router's default private AS for the node mesh
BGP_DEFAULT_ASN = 64512
#: per-peer keys we know; anything else in a Peers entry is refused (a typo such as "Pasword"
#: would otherwise silently leave a session without its password)
_BGP_PEER_KEYS = ("ip", "asnumber", "password", "port", "multihop", "passive")


@dataclass(frozen=True)
class BgpPeerConfig:
    """One global peer (a ToR router, a route reflector) every host peers with."""

    ip: IPv4Address
    as_number: int
    password: str = ""
    #: TCP port of the peer (179)
    port: int = 179
    #: 0: the peer is on a directly connected network (eBGP's default); else the TTL for a
    #: peer some hops away
    multihop: int = 0
    #: wait for the peer to connect (never dial it)
    passive: bool = False


@dataclass(frozen=True)
class BgpOptions:
    as_number: int = BGP_DEFAULT_ASN
    peers: tuple[BgpPeerConfig, ...] = ()
    node_mesh: bool = True
    #: BGP hold time (s): a silent peer's session drops, and its routes go, after this long.
    #: Keepalives every HoldTime/3. RFC 4271: 0 or at least 3; we refuse 0 (no liveness at all).
    hold_time: int = 90
    #: seconds a restarting peer's routes are kept (BGP graceful restart, Calico's
    #: maxRestartTime), so an agent or BIRD restart does not interrupt traffic
    graceful_restart_time: int = 120
    #: seconds between attempts to (re)connect to a peer that is down
    connect_retry_time: int = 5
    #: password (TCP MD5) for the node mesh sessions (Calico's nodeMeshPassword)
    password: str = ""
    #: use a BIRD that is already running on this control socket (netagent then only writes
    #: its config and reloads it) instead of starting one as the agent's child
    bird_socket: str = ""


def _asn(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"must be an AS number (a whole number), got {json.dumps(value)}")
    if not 1 <= value <= 4294967295 or value == 23456:
        raise ConfigError(where, f"must be between 1 and 4294967295 (not 23456, AS_TRANS), "
                                 f"got {value}")
    return value


def _bounded(table: dict[str, tuple[str, Any]], name: str, default: int, low: int, high: int,
             where: str) -> int:
    if name.lower() not in table or _get(table, name) is None:
        return default
    value = _int(table, name, where)
    if not low <= value <= high:
        raise ConfigError(f"{where}{name}", f"must be between {low} and {high}, got {value}")
    return value


def _password(table: dict[str, tuple[str, Any]], where: str) -> str:
    value = _get(table, "Password", "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}Password", f"must be a string, got {json.dumps(value)}")
    if len(value) > 80 or any(ord(c) < 32 or c in '"\\' for c in value):
        # TCP MD5 keys are at most 80 bytes; quotes/backslashes/control characters would have
        # to be escaped into bird.conf, so they are refused rather than mangled
        raise ConfigError(f"{where}Password", "must be at most 80 printable characters, without "
                                              "quotes or backslashes")
    return value


def _bgp_peer(raw: Any, where: str) -> BgpPeerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a JSON object like {{\"IP\": \"10.0.0.254\", "
                                 f"\"ASNumber\": 65000}}, got {json.dumps(raw)}")
    table = _lower_keys(raw, where)
    unknown = sorted(orig for low, (orig, _) in table.items() if low not in _BGP_PEER_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key (known: IP, ASNumber, "
                                                    "Password, Port, Multihop, Passive)")
    ip_raw = _get(table, "IP")
    if not isinstance(ip_raw, str) or not ip_raw:
        raise ConfigError(f"{where}.IP", f"missing or not a string: the peer's IPv4 address, "
                                         f"got {json.dumps(ip_raw)}")
    try:
        ip = IPv4Address(ip_raw)
    except ValueError:
        raise ConfigError(f"{where}.IP", f"{ip_raw!r} is not an IPv4 address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == IPv4Address(
            "255.255.255.255"):
        raise ConfigError(f"{where}.IP", f"{ip} cannot be a BGP peer")
    if "asnumber" not in table:
        raise ConfigError(f"{where}.ASNumber", "missing: the peer's AS number")
    multihop_raw = _get(table, "Multihop", False)
    if multihop_raw is True:
        multihop = 64  # BIRD's own default TTL for `multihop` without a number
    elif multihop_raw is False or multihop_raw is None:
        multihop = 0
    else:
        multihop = _bounded(table, "Multihop", 0, 1, 255, f"{where}.")
    return BgpPeerConfig(
        ip=ip,
        as_number=_asn(_get(table, "ASNumber"), f"{where}.ASNumber"),
        password=_password(table, f"{where}."),
        port=_bounded(table, "Port", 179, 1, 65535, f"{where}."),
        multihop=multihop,
        passive=_bool(table, "Passive", False, f"{where}."),
    )


def parse_bgp_options(table: dict[str, tuple[str, Any]]) -> BgpOptions:
    """The bgp backend's keys from the (lower-cased) Backend table."""
    asn = _asn(_get(table, "ASNumber", BGP_DEFAULT_ASN), "Backend.ASNumber")
    peers_raw = _get(table, "Peers", [])
    if peers_raw is None:
        peers_raw = []
    if not isinstance(peers_raw, list):
        raise ConfigError("Backend.Peers", f"must be a list of peers, got {json.dumps(peers_raw)}")
    peers = tuple(_bgp_peer(p, f"Backend.Peers[{i}]") for i, p in enumerate(peers_raw))
    seen: dict[IPv4Address, int] = {}
    for i, peer in enumerate(peers):
        if peer.ip in seen:
            raise ConfigError(f"Backend.Peers[{i}].IP",
                              f"{peer.ip} is already Backend.Peers[{seen[peer.ip]}]")
        seen[peer.ip] = i
    node_mesh = _bool(table, "NodeMesh", True, "Backend.")
    if not node_mesh and not peers:
        raise ConfigError("Backend.NodeMesh", "false with no Peers: no host would learn any "
                                              "other host's subnet")
    socket_raw = _get(table, "BIRDSocket", "")
    if socket_raw is None:
        socket_raw = ""
    if not isinstance(socket_raw, str) or (socket_raw and not socket_raw.startswith("/")):
        raise ConfigError("Backend.BIRDSocket", f"must be an absolute path, got "
                                                f"{json.dumps(socket_raw)}")
    if len(socket_raw.encode()) > 107:
        raise ConfigError("Backend.BIRDSocket", "longer than a unix socket path can be (107)")
    return BgpOptions(
        as_number=asn,
        peers=peers,
        node_mesh=node_mesh,
        hold_time=_bounded(table, "HoldTime", 90, 3, 65535, "Backend."),
        graceful_restart_time=_bounded(table, "GracefulRestartTime", 120, 1, 4095, "Backend."),
        connect_retry_time=_bounded(table, "ConnectRetryTime", 5, 1, 65535, "Backend."),
        password=_password(table, "Backend."),
        bird_socket=socket_raw,
    )


BACKEND_OPTIONS["bgp"] = parse_bgp_options
# ======================================================================= end bgp backend options
