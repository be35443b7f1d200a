"""The pure core of the wireguard backend: keys, the desired peers, the device diff, and the two
text forms a device is read and written in (the UAPI protocol and ``wg`` argv/dump).

No I/O here. The flow per sync: :func:`render_wg_peers` turns leases into one
:class:`WgPeer` per lease; :func:`merge_by_key` folds leases that carry the same PublicKey
(a rebooted host's old and new lease) into one device peer; :func:`diff_device` compares that
with what the device reports (:func:`parse_uapi_get` / :func:`parse_wg_dump`) and returns only
the difference (:class:`WgChange`), which :func:`uapi_set_text` or :func:`wg_set_argv` writes.
An empty change writes nothing: that is what makes a restart with nothing changed silent.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Literal

from netagent.lease import Lease, PeerId, canonical_json

IPNetwork = PeerId
Family = Literal[4, 6]
#: IPv6 40 + UDP 8 + WireGuard header (type 4, key index 4, nonce 8) + tag 16 (flannel's)
WG_OVERHEAD = 80
#: what ``get=1`` reports for "no preshared key"
ZERO_KEY = base64.b64encode(bytes(32)).decode()


# --------------------------------------------------------------------------- keys


def parse_key(text: object) -> str:
    """Canonical base64 of a 32-byte WireGuard key; ValueError says why not."""
    if not isinstance(text, str):
        raise ValueError(f"a key must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{text[:60]!r} is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"key decodes to {len(raw)} bytes, not 32")
    return base64.b64encode(raw).decode()


def key_to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def hex_to_key(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"hex key of {len(raw)} bytes")
    return base64.b64encode(raw).decode()


def generate_private_key(randbytes: Iterable[int] | None = None) -> str:
    """A new Curve25519 private key, clamped as ``wg genkey`` does."""
    raw = bytearray(bytes(randbytes) if randbytes is not None else secrets.token_bytes(32))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


_P = 2**255 - 19
_A24 = 121665


def public_key(private: str) -> str:
    """X25519(private, 9): the public key ``wg pubkey`` prints (RFC 7748 Montgomery ladder).

    Pure Python so that no crypto library is needed to compute the one value we publish;
    the data path's cryptography is WireGuard's own."""
    k = bytearray(base64.b64decode(private))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    scalar = int.from_bytes(k, "little")
    x1, x2, z2, x3, z3, swap = 9, 1, 0, 9, 1, 0
    for t in reversed(range(255)):
        bit = (scalar >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    out = x2 * pow(z2, _P - 2, _P) % _P
    return base64.b64encode(out.to_bytes(32, "little")).decode()


# --------------------------------------------------------------------------- device state


@dataclass(frozen=True)
class WgPeer:
    """One peer as the device holds it. ``preshared_key`` "" = none; ``endpoint`` in the text
    form the device reports (``1.2.3.4:51820``, ``[fd00::1]:51821``)."""

    public_key: str
    endpoint: str
    allowed_ips: frozenset[IPNetwork]
    preshared_key: str = ""
    keepalive: int = 0


@dataclass(frozen=True)
class WgState:
    """A device's configuration (counters and handshake times are left out: they are not
    configuration, and a comparison must not see them)."""

    private_key: str = ""
    listen_port: int = 0
    peers: Mapping[str, WgPeer] = field(default_factory=dict)

    def config_text(self) -> str:
        """A stable text of the configuration, for before/after comparisons in tests and logs."""
        lines = [f"listen_port={self.listen_port}", f"public_key={public_key(self.private_key)}"
                 if self.private_key else "private_key=(none)"]
        for key in sorted(self.peers):
            p = self.peers[key]
            ips = ",".join(sorted(str(n) for n in p.allowed_ips))
            lines.append(f"peer={key} endpoint={p.endpoint} allowed_ips={ips} "
                         f"psk={'yes' if p.preshared_key else 'no'} keepalive={p.keepalive}")
        return "\n".join(lines)


PeerField = Literal["endpoint", "allowed_ips", "preshared_key", "keepalive"]


@dataclass(frozen=True)
class WgChange:
    """What one write must change; empty means the device is right and nothing is written."""

    private_key: str | None = None
    listen_port: int | None = None
    remove: tuple[str, ...] = ()
    add: tuple[WgPeer, ...] = ()
    update: tuple[tuple[WgPeer, frozenset[PeerField]], ...] = ()

    @property
    def empty(self) -> bool:
        return (self.private_key is None and self.listen_port is None and not self.remove
                and not self.add and not self.update)


def diff_device(have: WgState, private_key: str, listen_port: int,
                peers: Mapping[str, WgPeer]) -> WgChange:
    """The least change that turns ``have`` into (private_key, listen_port, peers): peers the
    device has and nobody wants are removed (mark and sweep: the device is ours, every peer on it
    must be justified by a lease), missing ones added, differing ones updated field by field."""
    remove = tuple(sorted(k for k in have.peers if k not in peers))
    add: list[WgPeer] = []
    update: list[tuple[WgPeer, frozenset[PeerField]]] = []
    for key in sorted(peers):
        want, cur = peers[key], have.peers.get(key)
        if cur is None:
            add.append(want)
            continue
        fields: set[PeerField] = set()
        if cur.endpoint != want.endpoint:
            fields.add("endpoint")
        if cur.allowed_ips != want.allowed_ips:
            fields.add("allowed_ips")
        if (cur.preshared_key or "") != (want.preshared_key or ""):
            fields.add("preshared_key")
        if cur.keepalive != want.keepalive:
            fields.add("keepalive")
        if fields:
            update.append((want, frozenset(fields)))
    return WgChange(
        private_key=private_key if have.private_key != private_key else None,
        listen_port=listen_port if have.listen_port != listen_port else None,
        remove=remove, add=tuple(add), update=tuple(update),
    )


# --------------------------------------------------------------------------- UAPI text


class UapiError(ValueError):
    """The device answered with an errno, or with text we cannot read."""


def parse_uapi_get(text: str) -> WgState:
    """The answer to ``get=1`` (keys in hex; a zero preshared key means none)."""
    private = ""
    port = 0
    peers: dict[str, WgPeer] = {}
    cur: dict[str, str] | None = None
    allowed: set[IPNetwork] = set()

    def close() -> None:
        if cur is not None:
            key = cur["public_key"]
            peers[key] = WgPeer(key, cur.get("endpoint", ""), frozenset(allowed),
                                cur.get("psk", ""), int(cur.get("keepalive", "0")))

    for line in text.splitlines():
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"unexpected line {line!r}")
        try:
            if name == "errno":
                if value != "0":
                    raise UapiError(f"get failed: errno={value}")
            elif name == "private_key":
                private = hex_to_key(value)
            elif name == "listen_port":
                port = int(value)
            elif name == "public_key":
                close()
                cur = {"public_key": hex_to_key(value)}
                allowed = set()
            elif cur is None:
                continue  # device-level keys we do not manage (fwmark)
            elif name == "endpoint":
                cur["endpoint"] = value
            elif name == "preshared_key":
                psk = hex_to_key(value)
                cur["psk"] = "" if psk == ZERO_KEY else psk
            elif name == "persistent_keepalive_interval":
                cur["keepalive"] = str(int(value))
            elif name == "allowed_ip":
                allowed.add(ip_network(value, strict=False))
        except ValueError as exc:
            if isinstance(exc, UapiError):
                raise
            raise UapiError(f"cannot read {line!r}: {exc}") from None
    close()
    return WgState(private, port, peers)


def _peer_lines(p: WgPeer, fields: frozenset[PeerField] | None) -> list[str]:
    """``set=1`` lines for one peer: all fields for a new one (``fields`` None), else only the
    changed ones, with ``update_only`` so a peer removed meanwhile is not re-created."""
    out = [f"public_key={key_to_hex(p.public_key)}"]
    if fields is not None:
        out.append("update_only=true")
    every = fields is None
    if every or "preshared_key" in fields:  # type: ignore[operator]
        out.append(f"preshared_key={key_to_hex(p.preshared_key or ZERO_KEY)}")
    if (every or "endpoint" in fields) and p.endpoint:  # type: ignore[operator]
        out.append(f"endpoint={p.endpoint}")
    if every or "keepalive" in fields:  # type: ignore[operator]
        out.append(f"persistent_keepalive_interval={p.keepalive}")
    if every or "allowed_ips" in fields:  # type: ignore[operator]
        out.append("replace_allowed_ips=true")
        out += [f"allowed_ip={n}" for n in sorted(p.allowed_ips, key=_net_order)]
    return out


def _net_order(n: IPNetwork) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)


def uapi_set_text(change: WgChange) -> str:
    """The ``set=1`` request for ``change`` (ends with the blank line that sends it)."""
    lines = ["set=1"]
    if change.private_key is not None:
        lines.append(f"private_key={key_to_hex(change.private_key)}")
    if change.listen_port is not None:
        lines.append(f"listen_port={change.listen_port}")
    for key in change.remove:
        lines += [f"public_key={key_to_hex(key)}", "remove=true"]
    for p in change.add:
        lines += _peer_lines(p, None)
    for p, fields in change.update:
        lines += _peer_lines(p, fields)
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------- wg(8) text


def parse_wg_dump(text: str) -> WgState:
    """``wg show NAME dump``: the device line, then one tab-separated line per peer."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UapiError("empty `wg show dump`")
    head = lines[0].split("\t")
    if len(head) < 3:
        raise UapiError(f"unexpected device line {lines[0]!r}")
    private = "" if head[0] == "(none)" else head[0]
    peers: dict[str, WgPeer] = {}
    for ln in lines[1:]:
        f = ln.split("\t")
        if len(f) < 8:
            raise UapiError(f"unexpected peer line {ln!r}")
        allowed = frozenset(ip_network(a, strict=False) for a in f[3].split(",")
                            if a and a != "(none)")
        peers[f[0]] = WgPeer(f[0], "" if f[2] == "(none)" else f[2], allowed,
                             "" if f[1] == "(none)" else f[1],
                             0 if f[7] == "off" else int(f[7]))
    return WgState(private, int(head[2]), peers)


def wg_set_argv(name: str, change: WgChange, *, private_key_file: str,
                psk_file: str) -> list[str]:
    """``wg set`` arguments for ``change`` (the kernel path: ``wg`` speaks generic netlink to a
    kernel device). Keys are passed as files, never on the command line."""
    argv = ["wg", "set", name]
    if change.listen_port is not None:
        argv += ["listen-port", str(change.listen_port)]
    if change.private_key is not None:
        argv += ["private-key", private_key_file]
    for key in change.remove:
        argv += ["peer", key, "remove"]
    items: list[tuple[WgPeer, frozenset[PeerField] | None]] = [(p, None) for p in change.add]
    items += list(change.update)
    for p, fields in items:
        argv += ["peer", p.public_key]
        every = fields is None
        if every or "preshared_key" in fields:  # type: ignore[operator]
            argv += ["preshared-key", psk_file if p.preshared_key else "/dev/null"]
        if (every or "endpoint" in fields) and p.endpoint:  # type: ignore[operator]
            argv += ["endpoint", p.endpoint]
        if every or "keepalive" in fields:  # type: ignore[operator]
            argv += ["persistent-keepalive", str(p.keepalive) if p.keepalive else "off"]
        if every or "allowed_ips" in fields:  # type: ignore[operator]
            argv += ["allowed-ips", ",".join(str(n) for n in sorted(p.allowed_ips,
                                                                     key=_net_order))]
    return argv


# --------------------------------------------------------------------------- render


def lease_data(public: str, port: int) -> str:
    """Our BackendData / BackendV6Data: flannel's Go struct order, compact."""
    return canonical_json({"PublicKey": public, "Port": port})


@dataclass(frozen=True)
class RenderedPeers:
    """One device peer per usable lease, and leases left out with the reason."""

    peers: Mapping[PeerId, WgPeer]
    skipped: Mapping[PeerId, str]


def endpoint_text(addr: IPv4Address | IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def render_wg_peers(
    leases: Mapping[PeerId, Lease], *, family: Family, own_public_key: str,
    default_port: int, psk: str = "", keepalive: int = 0,
    own_ip: IPv4Address | IPv6Address | None = None,
) -> RenderedPeers:
    """The ``family`` device's peer for each wireguard lease: endpoint PublicIP:Port (IPv6:
    [PublicIPv6]:Port from BackendV6Data), AllowedIPs = that family's subnet. A lease whose Port
    is 0 or absent is reached on ``default_port`` (our own listen port, like flannel). A lease
    of another backend type, without this family's side, with our own key or address, or with
    a malformed PublicKey is left out with the reason."""
    out: dict[PeerId, WgPeer] = {}
    skipped: dict[PeerId, str] = {}
    data_name = "BackendData" if family == 4 else "BackendV6Data"
    for ident, lease in leases.items():
        a = lease.attrs
        if a.backend_type != "wireguard":
            skipped[ident] = f"BackendType {a.backend_type or '(none)'!r} is not wireguard"
            continue
        subnet = lease.subnet if family == 4 else lease.ipv6_subnet
        public = a.public_ip if family == 4 else a.public_ipv6
        if subnet is None or public is None or (family == 4 and int(public) == 0):
            skipped[ident] = f"the lease has no IPv{family} side"
            continue
        if own_ip is not None and public == own_ip:
            skipped[ident] = f"lease has our own public address {own_ip} (a stale lease?)"
            continue
        try:
            data = a.data() if family == 4 else a.v6_data()
        except ValueError as exc:
            skipped[ident] = f"{data_name} is not valid JSON: {exc}"
            continue
        if not isinstance(data, dict):
            skipped[ident] = f"{data_name} is not a JSON object"
            continue
        low = {k.lower(): v for k, v in data.items() if isinstance(k, str)}
        try:
            key = parse_key(low.get("publickey"))
        except ValueError as exc:
            skipped[ident] = f"{data_name}.PublicKey is malformed: {exc}"
            continue
        if key == own_public_key:
            skipped[ident] = "the lease carries our own PublicKey (a stale lease of this host?)"
            continue
        port = low.get("port") or 0
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            skipped[ident] = f"{data_name}.Port {port!r} is not a port number"
            continue
        out[ident] = WgPeer(key, endpoint_text(ip_address(public), port or default_port),
                            frozenset({subnet}), psk, keepalive)
    return RenderedPeers(out, skipped)


def merge_by_key(peers: Mapping[PeerId, WgPeer],
                 revision: Mapping[PeerId, int]) -> dict[str, WgPeer]:
    """Device peers keyed by public key. Two leases with one key (a host's old lease, not yet
    expired, beside its new one) become one peer holding both subnets, with the endpoint of the
    newer lease: WireGuard allows a key once per device, and the old subnet is that host's too."""
    by_key: dict[str, tuple[int, WgPeer]] = {}
    for ident in sorted(peers, key=lambda i: (i.version, int(i.network_address))):
        p, rev = peers[ident], revision.get(ident, 0)
        prev = by_key.get(p.public_key)
        if prev is None:
            by_key[p.public_key] = (rev, p)
            continue
        newer = p if rev >= prev[0] else prev[1]
        merged = WgPeer(p.public_key, newer.endpoint, prev[1].allowed_ips | p.allowed_ips,
                        newer.preshared_key, newer.keepalive)
        by_key[p.public_key] = (max(rev, prev[0]), merged)
    return {k: v for k, (_, v) in by_key.items()}
