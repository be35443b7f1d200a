"""bird.conf for the bgp backend: a pure function of (options, own lease, peer leases, facts).

Calico's shape (confd's bird.cfg.template) in BIRD 2 syntax:

* a ``static`` blackhole route for our own subnet, exported over BGP with ``next hop self``
  (a static blackhole would otherwise reach iBGP peers as ``unreachable``);
* one ``protocol bgp Mesh_<ip>`` per other host holding a ``bgp`` lease (its PublicIP is the
  neighbour) and one ``Global_<ip>`` per configured peer; the mesh side whose peer's IP sorts
  above ours is ``passive`` so only one side dials;
* imports and the kernel export accept only subnets strictly inside the Network, never our own
  from a peer, so a peer (or a ToR) can never make us route the whole Network, a default route
  or our own pods elsewhere; our own subnet goes to the kernel only as the blackhole (metric
  32, under cni0's connected route), as Calico does; kernel routes carry BIRD's proto (12) and
  netagent's sweep never sees them;
* ``graceful restart`` everywhere, so a BIRD restart keeps peers forwarding to us.

Nothing here does I/O: the same inputs give byte-identical text, which is how the backend
decides that nothing changed (no reload).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from netagent.config import BgpOptions
from netagent.lease import Lease, PeerId, canonical_json

#: BIRD's route protocol number in the kernel (`proto bird`)
RTPROT_BIRD = 12


@dataclass(frozen=True)
class BgpNeighbor:
    """One ``protocol bgp`` block."""

    name: str
    ip: IPv4Address
    as_number: int
    passive: bool = False
    password: str = ""
    port: int = 179
    multihop: int = 0
    mesh: bool = True


@dataclass(frozen=True)
class BirdConfig:
    text: str
    neighbors: tuple[BgpNeighbor, ...]
    #: peer leases left out, with why (shown in status like other backends' skipped peers)
    skipped: Mapping[PeerId, str] = field(default_factory=dict)


def lease_backend_data(opts: BgpOptions) -> str:
    """Our lease's BackendData: what a mesh peer needs to configure its side of the session."""
    return canonical_json({"ASNumber": opts.as_number})


def _ident(ip: IPv4Address) -> str:
    return str(ip).replace(".", "_")


def _peer_asn(lease: Lease, default: int) -> tuple[int | None, str]:
    """The ASNumber a mesh peer advertised (absent: ours, as an older writer would mean)."""
    try:
        data = lease.attrs.data()
    except ValueError:
        return None, "BackendData is not JSON"
    if not isinstance(data, dict):
        return None, "BackendData is not a JSON object"
    asn = data.get("ASNumber", default)
    if isinstance(asn, bool) or not isinstance(asn, int) or not 1 <= asn <= 4294967295:
        return None, f"BackendData.ASNumber {asn!r} is not an AS number"
    return asn, ""


def mesh_neighbors(
    opts: BgpOptions, own_ip: IPv4Address, peers: Mapping[PeerId, Lease]
) -> tuple[list[BgpNeighbor], dict[PeerId, str]]:
    """One mesh neighbour per other host with a valid bgp lease (ordered by IP, so the file
    does not change with the order leases arrived in)."""
    out: dict[IPv4Address, BgpNeighbor] = {}
    skipped: dict[PeerId, str] = {}
    global_ips = {p.ip for p in opts.peers}
    for ident, lease in peers.items():
        btype, ip = lease.attrs.backend_type, lease.attrs.public_ip
        if btype != "bgp":
            skipped[ident] = f"BackendType {btype or '(none)'!r} is not bgp; ignoring"
            continue
        if not opts.node_mesh:
            continue
        if lease.subnet is None:
            skipped[ident] = "the lease has no IPv4 subnet"
            continue
        if ip == own_ip:
            skipped[ident] = f"lease has our own PublicIP {own_ip} (a stale lease of this host?)"
            continue
        if ip.is_unspecified or ip.is_loopback or ip.is_multicast:
            skipped[ident] = f"PublicIP {ip} cannot be a BGP neighbour"
            continue
        if ip in global_ips:
            skipped[ident] = f"{ip} is also in Backend.Peers; peering once, as a global peer"
            continue
        asn, why = _peer_asn(lease, opts.as_number)
        if asn is None:
            skipped[ident] = why
            continue
        if ip in out:  # two leases of one host (its old and new key during a switch)
            continue
        out[ip] = BgpNeighbor(
            name=f"Mesh_{_ident(ip)}", ip=ip, as_number=asn,
            # Calico: only the side whose peer sorts below it dials
            passive=int(ip) > int(own_ip), password=opts.password,
            multihop=0 if asn == opts.as_number else 64)
    return [out[ip] for ip in sorted(out)], skipped


def global_neighbors(opts: BgpOptions, own_ip: IPv4Address) -> list[BgpNeighbor]:
    return [BgpNeighbor(name=f"Global_{_ident(p.ip)}", ip=p.ip, as_number=p.as_number,
                        passive=p.passive, password=p.password, port=p.port,
                        multihop=p.multihop, mesh=False)
            for p in opts.peers if p.ip != own_ip]


def _prefix_set(network: IPv4Network, strictly_inside: bool) -> str:
    low = network.prefixlen + 1 if strictly_inside else network.prefixlen
    return f"[ {network}{{{low},32}} ]"


def _neighbor_block(n: BgpNeighbor, opts: BgpOptions, source: IPv4Address) -> str:
    lines = [f"protocol bgp {n.name} from {'netagent_mesh' if n.mesh else 'netagent_global'} {{"]
    if n.mesh:
        lines.append(f"  source address {source};")
    lines.append(f"  neighbor {n.ip}{'' if n.port == 179 else f' port {n.port}'} as "
                 f"{n.as_number};")
    if n.multihop:
        lines.append(f"  multihop {n.multihop};")
    if n.passive:
        lines.append("  passive on;")
    if n.password:
        lines.append(f'  password "{n.password}";')
    lines.append("}")
    return "\n".join(lines)


def render_idle_conf(router_id: IPv4Address) -> str:
    """A file with no netagent protocol at all: loaded into an external BIRD (BIRDSocket) when
    the network switches away from bgp, so it closes our sessions and, its kernel protocol
    gone, removes the routes it installed."""
    return (f"# netagent: the network no longer uses the bgp backend\nrouter id {router_id};\n"
            "protocol device {\n}\n")


def render_bird_conf(
    opts: BgpOptions,
    *,
    network: IPv4Network,
    own_subnet: IPv4Network,
    router_id: IPv4Address,
    source: IPv4Address,
    iface: str,
    peers: Mapping[PeerId, Lease],
) -> BirdConfig:
    """The whole bird.conf. `source` is our interface address (the mesh sessions' source,
    which peers know as our lease's PublicIP); `iface` is the underlay, whose connected network
    BIRD needs to resolve next hops."""
    mesh, skipped = mesh_neighbors(opts, router_id, peers)
    neighbors = [*mesh, *global_neighbors(opts, router_id)]
    inside = _prefix_set(network, strictly_inside=True)
    whole = _prefix_set(network, strictly_inside=False)
    hold = opts.hold_time
    retry = opts.connect_retry_time
    head = f"""\
# Written by netagent (bgp backend) from the network config and the leases in etcd.
# Rewritten and reloaded on every change: edits here are lost.
log stderr {{ info, remote, warning, error, auth, fatal, bug }};
router id {router_id};
# a BIRD started in graceful-restart recovery (-R, after a crash) keeps the kernel routes at
# most this long while waiting for its peers
graceful restart wait {opts.graceful_restart_time};

# our own subnet and the subnets BIRD may put into the kernel: strictly inside {network}
define NETAGENT_OWN = {own_subnet};

filter netagent_import {{
  if net ~ {inside} && net != NETAGENT_OWN then accept;
  reject;
}}

filter netagent_export {{
  if proto = "netagent_own" && net = NETAGENT_OWN then accept;
  reject;
}}

# learned subnets of other hosts, and (as Calico) a blackhole for our own subnet: cni0's
# connected route (metric 0) wins over it, but a packet for an unused address of our subnet
# is dropped here instead of bouncing between us and a router until its TTL runs out
filter netagent_kernel_out {{
  if source = RTS_BGP && net ~ {inside} && net != NETAGENT_OWN then accept;
  if proto = "netagent_own" && net = NETAGENT_OWN then accept;
  reject;
}}

# routes other programs made (default route, routes to other segments) resolve next hops;
# anything inside the Network is left to BGP
filter netagent_kernel_in {{
  if net ~ {whole} then reject;
  accept;
}}

protocol device {{
  scan time 10;
}}

protocol direct netagent_direct {{
  ipv4;
  interface "{iface}";
}}

protocol kernel netagent_kernel {{
  ipv4 {{
    import filter netagent_kernel_in;
    export filter netagent_kernel_out;
  }};
  learn;
  scan time 10;
  graceful restart;
}}

protocol static netagent_own {{
  ipv4;
  route {own_subnet} blackhole;
}}

template bgp netagent_common {{
  local as {opts.as_number};
  hold time {hold};
  keepalive time {max(1, hold // 3)};
  connect delay time 1;
  connect retry time {retry};
  error wait time {retry},{max(retry, 30)};
  graceful restart on;
  graceful restart time {opts.graceful_restart_time};
  ipv4 {{
    import filter netagent_import;
    export filter netagent_export;
    next hop self;
  }};
}}

template bgp netagent_mesh from netagent_common {{
  ipv4 {{
    import filter netagent_import;
    export filter netagent_export;
    next hop self;
    gateway recursive;
  }};
}}

template bgp netagent_global from netagent_common {{
}}
"""
    body = "\n\n".join(_neighbor_block(n, opts, source) for n in neighbors)
    text = head + ("\n" + body + "\n" if body else "")
    return BirdConfig(text=text, neighbors=tuple(neighbors), skipped=skipped)
