"""The vxlan backend (default): device ``flannel.<VNI>`` plus per-peer neighbour, FDB and route.

:func:`render_vxlan_peers` is the pure part: (VNI, device index, peer leases, route lookups) →
entries per peer, or the reason a peer is skipped. :class:`VxlanBackend` owns the device
(create, reuse as is when compatible, keep its MAC across restarts and reboots) and leaves
per-peer entries to the shared :class:`~backends.render.ReconcilingBackend` shell.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from backends.base import HostFacts, LeaseContribution
from backends.render import (
    ReconcilingBackend,
    Rendered,
    generate_vtep_mac,
    is_direct,
    parse_unicast_mac,
)
from netagent.config import NetworkConfig
from netagent.dataplane import (
    Entry,
    Fdb,
    Kernel,
    KernelError,
    LinkInfo,
    Neigh,
    Route,
    RouteLookup,
    VxlanSpec,
    kernel_needs_csum_workaround,
)
from netagent.lease import Lease, canonical_json

log = logging.getLogger(__name__)

#: flannel's (and the Linux kernel's historical) vxlan port; passed explicitly, never implied.
DEFAULT_VXLAN_PORT = 8472
#: inner Ethernet 14 + VXLAN 8 + UDP 8 + outer IPv4 20
VXLAN_OVERHEAD = 50


def render_vxlan_peers(
    peers: Mapping[IPv4Network, Lease],
    *,
    vni: int,
    device_index: int,
    own_ip: IPv4Address | None = None,
    direct_routing: bool = False,
    lookups: Mapping[IPv4Address, RouteLookup | None] | None = None,
) -> Rendered:
    """Desired entries per peer, in apply order (neighbour, FDB, route).

    A peer on the same L2 segment gets one plain route via its PublicIP when DirectRouting is
    on; every other vxlan peer gets neighbour (gateway → VtepMAC), FDB (VtepMAC → PublicIP) and
    an onlink route via its subnet's network address on our device.
    """
    entries: dict[IPv4Network, tuple[Entry, ...]] = {}
    skipped: dict[IPv4Network, str] = {}
    for subnet, lease in peers.items():
        why, mac = _vxlan_peer_mac(lease, vni, own_ip)
        if why:
            skipped[subnet] = why
            continue
        public = lease.attrs.public_ip
        lookup = (lookups or {}).get(public)
        if direct_routing and is_direct(lookup) and lookup and lookup.oif != device_index:
            entries[subnet] = (Route(subnet, gateway=public, oif=lookup.oif),)
            continue
        gw = subnet.network_address
        entries[subnet] = (
            Neigh(device_index, gw, mac),
            Fdb(device_index, mac, public),
            Route(subnet, gateway=gw, oif=device_index, onlink=True),
        )
    return Rendered(entries, skipped)


def _vxlan_peer_mac(lease: Lease, vni: int, own_ip: IPv4Address | None) -> tuple[str, str]:
    """(reason to skip, "") or ("", VtepMAC)."""
    btype = lease.attrs.backend_type
    if btype != "vxlan":
        return f"BackendType {btype or '(none)'!r} is not vxlan; ignoring this lease", ""
    if own_ip is not None and lease.attrs.public_ip == own_ip:
        return f"lease has our own PublicIP {own_ip} (a stale lease of this host?)", ""
    try:
        data = lease.attrs.data()
    except ValueError as exc:
        return f"BackendData is not valid JSON: {exc}", ""
    if not isinstance(data, dict):
        return "BackendData is not a JSON object", ""
    low = {k.lower(): v for k, v in data.items() if isinstance(k, str)}
    if "vtepmac" not in low:
        return "BackendData has no VtepMAC", ""
    try:
        mac = parse_unicast_mac(low["vtepmac"])
    except ValueError as exc:
        return f"BackendData: {exc}", ""
    peer_vni = low.get("vni")
    if peer_vni is not None and peer_vni != vni:
        return f"peer VNI {peer_vni!r} differs from ours ({vni})", ""
    return "", mac


def vxlan_incompatibility(spec: VxlanSpec, link: LinkInfo) -> str:
    """Why an existing link cannot be reused as our device ("" = reuse it as is).

    The MTU is not here: it can be changed in place without touching peers.
    """
    if link.kind != "vxlan":
        return f"{link.name} is a {link.kind or 'non-vxlan'} link"
    checks = (
        ("VNI", link.vni, spec.vni),
        ("underlay device", link.underlay_index, spec.underlay_index),
        ("local address", link.local, spec.local),
        ("port", link.port, spec.port),
        ("learning", bool(link.learning), spec.learning),
        ("GBP", link.gbp, spec.gbp),
    )
    diffs = [f"{name} {have} (want {want})" for name, have, want in checks if have != want]
    return ", ".join(diffs)


class VxlanBackend(ReconcilingBackend):
    type_name = "vxlan"

    def __init__(self, config: NetworkConfig, host: HostFacts, *, kernel: Kernel | None = None,
                 csum_workaround: bool | None = None) -> None:
        super().__init__(config, host, kernel=kernel)
        b = config.backend
        self.vni = b.vni
        self.mtu = (b.mtu or host.iface_mtu) - VXLAN_OVERHEAD
        self.spec = VxlanSpec(
            name=f"flannel.{b.vni}", vni=b.vni, port=b.port or DEFAULT_VXLAN_PORT,
            local=host.public_ip, underlay_index=host.iface_index, mtu=self.mtu,
            learning=b.learning, gbp=b.gbp,
        )
        #: None = decide from the kernel release (see kernel_needs_csum_workaround)
        self.csum_workaround = csum_workaround
        self.mac = ""
        self.ifindex = 0

    @property
    def mac_file(self) -> Path:
        return self.host.state_dir / f"{self.spec.name}.mac"

    # -- lifecycle

    def prepare(self) -> LeaseContribution:
        self._ensure_device()
        self.reconciler = self._new_reconciler(self.ifindex)
        data = canonical_json({"VNI": self.vni, "VtepMAC": self.mac})
        return LeaseContribution(backend_type="vxlan", backend_data=data, mtu=self.mtu)

    def activate(self, own: Lease) -> None:
        self.own = own
        self._ensure_address()

    def render(self, peers: Mapping[IPv4Network, Lease],
               lookups: Mapping[IPv4Address, RouteLookup | None]) -> Rendered:
        return render_vxlan_peers(
            peers, vni=self.vni, device_index=self.ifindex, own_ip=self.host.public_ip,
            direct_routing=self.config.backend.direct_routing, lookups=lookups,
        )

    def wants_lookup(self, lease: Lease) -> bool:
        return self.config.backend.direct_routing and lease.attrs.backend_type == "vxlan"

    def teardown(self) -> None:
        """Live switch away from this device: remove our peer entries (DirectRouting routes
        live on the underlay, not on the device), then the device itself."""
        self.sync({}, None)
        link = self.kernel.link(self.spec.name)
        if link is not None and link.kind == "vxlan":
            self.kernel.delete_link(link.index)
            log.info("removed %s", self.spec.name)
        self.ifindex = 0

    def repair_devices(self) -> bool:
        before = self.ifindex
        self._ensure_device()
        if self.own is not None:
            self._ensure_address()
        if self.reconciler is not None and self.ifindex != before:
            log.warning("%s was recreated (index %d → %d); reprogramming every peer",
                        self.spec.name, before, self.ifindex)
            self.reconciler.device = self.ifindex
            self.reconciler.forget_device()
            return True
        return False

    # -- device

    def _ensure_device(self) -> None:
        """Reuse a compatible device as is (MAC kept); otherwise (re)create it.

        The MAC is chosen before the link exists and passed in the create request (systemd
        would otherwise rewrite it after we advertised it, flannel #1155), and persisted in the
        state dir so a reboot keeps it and peers need no reprogramming.
        """
        k, spec = self.kernel, self.spec
        link = k.link(spec.name)
        if link is not None:
            why = vxlan_incompatibility(spec, link)
            if why:
                log.warning("%s has an incompatible configuration (%s); recreating it",
                            spec.name, why)
                k.delete_link(link.index)
                link = None
        if link is None:
            mac = self._stored_mac() or generate_vtep_mac()
            k.create_vxlan(spec, mac)
            link = k.link(spec.name)
            if link is None:
                raise KernelError(0, f"{spec.name} vanished right after creation")
            if link.mac != mac:
                log.warning("%s came up with MAC %s, not %s; setting it back",
                            spec.name, link.mac, mac)
                k.set_link(link.index, mac=mac)
                link = k.link(spec.name)
                if link is None or link.mac != mac:
                    raise KernelError(0, f"{spec.name} will not keep MAC {mac}")
            log.info("created %s (VNI %d, port %d, local %s, MTU %d, MAC %s)", spec.name,
                     spec.vni, spec.port, spec.local, spec.mtu, mac)
        elif link.mtu != spec.mtu:
            log.info("setting %s MTU %d → %d", spec.name, link.mtu, spec.mtu)
            k.set_link(link.index, mtu=spec.mtu)
        self.mac, self.ifindex = link.mac.lower(), link.index
        self._apply_csum_workaround()
        if self._stored_mac() != self.mac:
            from netagent.files import write_atomic

            write_atomic(self.mac_file, self.mac + "\n")

    def _ensure_address(self) -> None:
        """Our subnet's network address as /32 (no connected route), nothing else, link up."""
        assert self.own is not None
        k = self.kernel
        link = k.link(self.spec.name)
        if link is None:
            return  # the next full sync recreates it
        want = IPv4Interface(f"{self.own.subnet.network_address}/32")
        net = self.config.network
        for addr in link.addrs:
            if addr != want and net is not None and addr.ip in net:
                log.info("removing stale address %s from %s", addr, self.spec.name)
                k.del_addr(link.index, addr)
        if want not in link.addrs:
            k.add_addr(link.index, want)
        if not link.up:
            k.set_link(link.index, up=True)

    def _stored_mac(self) -> str:
        try:
            return parse_unicast_mac(self.mac_file.read_text().strip())
        except (OSError, ValueError):
            return ""

    def _apply_csum_workaround(self) -> None:
        release = os.uname().release
        apply = self.csum_workaround
        if apply is None:
            apply = kernel_needs_csum_workaround(release)
        if not apply:
            log.debug("kernel %s is not affected by the vxlan checksum bug", release)
            return
        try:
            how = self.kernel.disable_tx_checksum(self.spec.name)
        except (KernelError, OSError) as exc:
            log.warning("could not disable tx-checksum-ip-generic on %s: %s", self.spec.name, exc)
            return
        if not how:
            return  # already off (a restart): nothing changed, nothing to say
        log.info("disabled tx-checksum-ip-generic on %s (kernel %s ≤ 5.7, vxlan checksum bug, "
                 "flannel #1282/#2152) via %s", self.spec.name, release, how)

