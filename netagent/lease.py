"""Subnet leases: key/value codec (byte-compatible with flannel) and the pure allocation choice.

No I/O here. The registry reads and writes bytes; this module turns them into :class:`Lease`
and back, and decides which subnet to ask for.
"""

from __future__ import annotations

import json
import random
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from netagent.config import NetworkConfig

#: flannel's etcd lease TTL: 24 h.
DEFAULT_LEASE_TTL = 24 * 3600
#: how many free subnets flannel collects before picking one at random.
CANDIDATE_POOL = 100

#: the IPv4 part of an IPv6-only lease's key (flannel's empty IP4Net printed the same way)
NO_IPV4 = "0.0.0.0-0"
#: the PublicIP of an IPv6-only lease (flannel's zero ip.IP4)
NO_PUBLIC_IP = IPv4Address(0)

_KEY_RE = re.compile(
    r"^(?P<v4>\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})-(?P<len4>\d{1,2})"
    r"(?:&(?P<v6>[0-9a-fA-F:]+)-(?P<len6>\d{1,3}))?$"
)


#: what names a peer: its lease's IPv4 subnet, or IPv6 subnet in an IPv6-only network
PeerId = IPv4Network | IPv6Network


def _span(net: IPv4Network | IPv6Network) -> tuple[int, int, int]:
    first = int(net.network_address)
    return net.version, first, first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


def subnet_within(sub: IPv4Network | IPv6Network, net: IPv4Network | IPv6Network) -> bool:
    """``sub.subnet_of(net)`` by plain ints (False across families). The ipaddress methods
    cache ``broadcast_address`` on both networks: a ``__dict__`` and an address object more per
    lease subnet, ~190 bytes each, ~3.8 MB held at 20,000 peers."""
    v1, a1, b1 = _span(sub)
    v2, a2, b2 = _span(net)
    return v1 == v2 and a2 <= a1 and b1 <= b2


def subnets_overlap(a: IPv4Network | IPv6Network, b: IPv4Network | IPv6Network) -> bool:
    """``a.overlaps(b)`` by plain ints (False across families), for the same reason."""
    v1, a1, b1 = _span(a)
    v2, a2, b2 = _span(b)
    return v1 == v2 and a1 <= b2 and a2 <= b1


def _ipv4(text: str) -> IPv4Address:
    """IPv4Address(text), parsed in C: a start-up decodes every lease (~10 µs each in
    ipaddress's parser, ~1 µs here). inet_pton takes only plain dotted quads (no leading zeros,
    nothing around), a subset of what ipaddress takes; anything else goes to ipaddress, which
    accepts it or raises its usual ValueError."""
    try:
        return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except (OSError, ValueError):
        return IPv4Address(text)


class LeaseError(ValueError):
    """A lease key or value could not be understood."""


class OutOfSubnets(RuntimeError):
    """No free subnet is left between SubnetMin and SubnetMax."""


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """The lease value (flannel's LeaseAttrs). An IPv6-only lease has PublicIP 0.0.0.0
    (:data:`NO_PUBLIC_IP`): the host is known by its PublicIPv6."""

    public_ip: IPv4Address
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    #: BackendData / BackendV6Data as canonical JSON text ("" = absent) so the dataclass is
    #: hashable and a re-encode is byte-identical.
    backend_data: str = ""
    backend_v6_data: str = ""

    @property
    def host_ip(self) -> IPv4Address | IPv6Address | None:
        """The address that names the host: PublicIP, or PublicIPv6 for an IPv6-only host."""
        return self.public_ip if self.public_ip != NO_PUBLIC_IP else self.public_ipv6

    def data(self) -> dict[str, Any]:
        return json.loads(self.backend_data) if self.backend_data else {}

    def v6_data(self) -> dict[str, Any]:
        return json.loads(self.backend_v6_data) if self.backend_v6_data else {}


@dataclass(frozen=True, slots=True)
class Lease:
    #: None for a lease of an IPv6-only network (key ``0.0.0.0-0&<ipv6>-<len>``)
    subnet: IPv4Network | None
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    #: etcd lease id; 0 means a reservation (a key with no TTL)
    lease_id: int = 0
    mod_revision: int = field(default=0, compare=False)
    #: seconds left (None when not known)
    ttl: int | None = field(default=None, compare=False)

    @property
    def reserved(self) -> bool:
        return self.lease_id == 0

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def ident(self) -> PeerId:
        """What names this lease among its peers: its IPv4 subnet, or its IPv6 subnet in an
        IPv6-only network. Within one network every lease's ident has the same family."""
        return lease_ident(self.subnet, self.ipv6_subnet)

    @property
    def label(self) -> str:
        """The subnets for logs and status: ``10.5.1.0/24``, ``fd00::/64`` or both."""
        return subnets_label(self.subnet, self.ipv6_subnet)


def lease_ident(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> PeerId:
    if subnet is not None:
        return subnet
    assert ipv6_subnet is not None, "a lease has an IPv4 or an IPv6 subnet"
    return ipv6_subnet


def subnets_label(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> str:
    return " + ".join(str(n) for n in (subnet, ipv6_subnet) if n is not None)


def subnet_key(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """`10.5.52.0-24`, `10.5.1.0-24&fc00::-64`, or for an IPv6-only network `0.0.0.0-0&fc00::-64`
    (flannel's key grammar needs an IPv4 part: its empty IPv4 subnet prints as 0.0.0.0-0)."""
    if subnet is None and ipv6_subnet is None:
        raise ValueError("a subnet key needs an IPv4 or an IPv6 subnet")
    key = NO_IPV4 if subnet is None else f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address.compressed}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(name: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Inverse of :func:`subnet_key`; raises LeaseError for anything off the grammar."""
    m = _KEY_RE.match(name)
    if not m:
        raise LeaseError(f"subnet key {name!r} does not look like a.b.c.d-N")
    try:
        v6 = IPv6Network(f"{m['v6']}/{m['len6']}", strict=True) if m["v6"] else None
        if f"{m['v4']}-{m['len4']}" == NO_IPV4:
            if v6 is None:
                raise LeaseError(f"subnet key {name!r} has neither an IPv4 nor an IPv6 subnet")
            return None, v6
        # an int address: IPv4Network would turn an IPv4Address back into text and parse it
        v4 = IPv4Network((int(_ipv4(m["v4"])), int(m["len4"])), strict=True)
    except ValueError as exc:
        raise LeaseError(f"subnet key {name!r}: {exc}") from None
    if v4.prefixlen == 0:
        raise LeaseError(f"subnet key {name!r}: /0 is not a subnet")
    return v4, v6


def encode_attrs(attrs: LeaseAttrs) -> str:
    """Compact JSON in flannel's field order (PublicIP, PublicIPv6, BackendType, BackendData…)."""
    parts = [f'"PublicIP":{json.dumps(str(attrs.public_ip))}']
    parts.append(
        '"PublicIPv6":' + (json.dumps(str(attrs.public_ipv6)) if attrs.public_ipv6 else "null")
    )
    if attrs.backend_type:
        parts.append(f'"BackendType":{json.dumps(attrs.backend_type)}')
    if attrs.backend_data:
        parts.append(f'"BackendData":{attrs.backend_data}')
    if attrs.backend_v6_data:
        parts.append(f'"BackendV6Data":{attrs.backend_v6_data}')
    return "{" + ",".join(parts) + "}"


def canonical_json(obj: Any) -> str:
    """Compact JSON keeping key order (Go marshals struct fields in declaration order)."""
    return json.dumps(obj, separators=(",", ":"))


def decode_attrs(raw: str | bytes) -> LeaseAttrs:
    """Tolerant reader: missing BackendData, null PublicIPv6 and unknown fields are fine."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LeaseError(f"lease value is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise LeaseError("lease value is not a JSON object")
    low = {k.lower(): v for k, v in doc.items() if isinstance(k, str)}
    pub = low.get("publicip")
    if not isinstance(pub, str):
        raise LeaseError("lease value has no PublicIP")
    try:
        public_ip = _ipv4(pub)
    except ValueError:
        raise LeaseError(f"lease PublicIP {pub!r} is not an IPv4 address") from None
    pub6 = low.get("publicipv6")
    public_ipv6 = None
    if pub6 not in (None, ""):
        if not isinstance(pub6, str):
            raise LeaseError("lease PublicIPv6 is not a string")
        try:
            public_ipv6 = IPv6Address(pub6)
        except ValueError:
            raise LeaseError(f"lease PublicIPv6 {pub6!r} is not an IPv6 address") from None
    btype = low.get("backendtype") or ""
    if not isinstance(btype, str):
        raise LeaseError("lease BackendType is not a string")
    btype = sys.intern(btype)  # "vxlan" once, not once per lease

    def data(name: str) -> str:
        value = low.get(name.lower())
        if value is None:
            return ""
        if not isinstance(value, dict):
            raise LeaseError(f"lease {name} is not a JSON object")
        return canonical_json(value) if value else ""

    return LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=btype,
        backend_data=data("BackendData"),
        backend_v6_data=data("BackendV6Data"),
    )


def decode_lease(
    name: str, raw: str | bytes, lease_id: int = 0, mod_revision: int = 0
) -> Lease:
    """Build a Lease from the key's last path element and its value.

    The key and the value must agree: an IPv4 subnet needs a real PublicIP, an IPv6-only
    lease a PublicIPv6 (it names the host)."""
    v4, v6 = parse_subnet_key(name)
    attrs = decode_attrs(raw)
    if v4 is not None and attrs.public_ip == NO_PUBLIC_IP:
        raise LeaseError(f"lease {name} has an IPv4 subnet but PublicIP {NO_PUBLIC_IP}")
    if v4 is None and attrs.public_ipv6 is None:
        raise LeaseError(f"IPv6-only lease {name} has no PublicIPv6")
    return Lease(v4, attrs, v6, lease_id, mod_revision)


def _choose(candidates: Iterable[Any], sublen: int, taken: Iterable[Any],
            rng: random.Random | None, pool: int) -> Any:
    same: set[int] = set()
    odd: list[Any] = []  # taken subnets of another size (e.g. after a SubnetLen change)
    for t in taken:
        if t.prefixlen == sublen:
            same.add(int(t.network_address))
        else:
            odd.append(t)
    free: list[Any] = []
    for cand in candidates:
        if int(cand.network_address) in same or (
                odd and any(subnets_overlap(cand, t) for t in odd)):
            continue
        free.append(cand)
        if len(free) >= pool:
            break
    return (rng or random.Random()).choice(free) if free else None


def choose_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    *,
    rng: random.Random | None = None,
    pool: int = CANDIDATE_POOL,
) -> IPv4Network:
    """flannel's allocation: walk Min→Max, collect up to `pool` free subnets, pick one at random.

    Raises OutOfSubnets when none is free.
    """
    chosen = _choose(config.iter_candidate_subnets(), config.subnet_len, taken, rng, pool)
    if chosen is None:
        raise OutOfSubnets(
            f"out of subnets: every /{config.subnet_len} between {config.subnet_min} and "
            f"{config.subnet_max} is leased or reserved"
        )
    return chosen  # type: ignore[no-any-return]


def choose_subnet6(
    config: NetworkConfig,
    taken: Iterable[IPv6Network],
    *,
    rng: random.Random | None = None,
    pool: int = CANDIDATE_POOL,
) -> IPv6Network:
    chosen = _choose(config.iter_candidate_subnets6(), config.ipv6_subnet_len, taken, rng, pool)
    if chosen is None:
        raise OutOfSubnets(
            f"out of IPv6 subnets: every /{config.ipv6_subnet_len} between "
            f"{config.ipv6_subnet_min} and {config.ipv6_subnet_max} is leased or reserved"
        )
    return chosen  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LeasePlan:
    """What to do to get a lease: reuse an existing key, or create one."""

    #: None in an IPv6-only network
    subnet: IPv4Network | None
    reuse: Lease | None = None
    #: stale own keys (same host, incompatible with the config) to delete first
    delete: tuple[Lease, ...] = ()
    reason: str = ""
    ipv6_subnet: IPv6Network | None = None


def plan_lease(
    config: NetworkConfig,
    existing: Mapping[str, Lease],
    public_ip: IPv4Address | IPv6Address,
    previous_subnet: IPv4Network | None,
    *,
    rng: random.Random | None = None,
    previous_subnet6: IPv6Network | None = None,
) -> LeasePlan:
    """Decide which subnet to ask for, in flannel's order.

    1. a lease whose host address is ours (PublicIP; PublicIPv6 for an IPv6-only host) and
       that fits the config;
    2. the subnet recorded in the old subnet.env, if free and compatible;
    3. random among the first free subnets.
    """
    stale: list[Lease] = []
    for lease in sorted(existing.values(), key=lambda lz: (lz.ident.version, lz.ident)):
        if lease.attrs.host_ip != public_ip:
            continue
        if config.contains_subnet(lease.subnet) and config.contains_ipv6_subnet(
            lease.ipv6_subnet
        ):
            return LeasePlan(lease.subnet, reuse=lease, delete=tuple(stale),
                             reason=f"found lease {lease.key} for {public_ip}, reusing",
                             ipv6_subnet=lease.ipv6_subnet)
        if not lease.reserved:
            stale.append(lease)
    stale_keys = {s.key for s in stale}
    live = [lz for lz in existing.values() if lz.key not in stale_keys]
    taken = [lz.subnet for lz in live if lz.subnet is not None]
    taken6 = [lz.ipv6_subnet for lz in live if lz.ipv6_subnet is not None]

    def free4(want: IPv4Network | None) -> bool:
        return want is not None and config.contains_subnet(want) and not any(
            subnets_overlap(want, t) for t in taken)

    def free6(want: IPv6Network | None) -> bool:
        return want is not None and config.contains_ipv6_subnet(want) and not any(
            subnets_overlap(want, t) for t in taken6)

    # each family's subnet from the subnet file is kept when it is still free and fits, so
    # turning IPv6 on or off (or IPv4 off) keeps the other family's pods where they are
    # (flannel drops both unless both fit)
    prev4 = previous_subnet if config.enable_ipv4 and free4(previous_subnet) else None
    prev6 = previous_subnet6 if config.enable_ipv6 and free6(previous_subnet6) else None
    subnet = prev4 or (choose_subnet(config, taken, rng=rng) if config.enable_ipv4 else None)
    subnet6 = prev6 or (choose_subnet6(config, taken6, rng=rng) if config.enable_ipv6 else None)
    reasons = []
    if prev4 or prev6:
        reasons.append(f"reusing {subnets_label(prev4, prev6)} from the subnet file")
    fresh4, fresh6 = (None if prev4 else subnet), (None if prev6 else subnet6)
    if fresh4 or fresh6:
        reasons.append(f"allocated free subnet {subnets_label(fresh4, fresh6)}")
    return LeasePlan(subnet, delete=tuple(stale), reason="; ".join(reasons),
                     ipv6_subnet=subnet6)
