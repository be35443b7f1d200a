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
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

from netagent.backends.base import HostFacts, LeaseContribution
from netagent.backends.render import (
    ReconcilingBackend,
    Rendered,
    generate_vtep_mac,
    is_direct,
    parse_unicast_mac,
)
from netagent.config import NetworkConfig
from netagent.kernel import (
    Entry,
    Fdb,
    IPAddress,
    IPInterface,
    IPNetwork,
    Kernel,
    KernelError,
    LinkInfo,
    Neigh,
    Route,
    RouteLookup,
    VxlanSpec,
    address_device,
    kernel_needs_csum_workaround,
)
from netagent.lease import Lease, PeerId, canonical_json

log = logging.getLogger(__name__)

#: flannel's (and the Linux kernel's historical) vxlan port; passed explicitly, never implied.
DEFAULT_VXLAN_PORT = 8472
#: inner Ethernet 14 + VXLAN 8 + UDP 8 + outer IPv4 20
VXLAN_OVERHEAD = 50
#: the same with an outer IPv6 header (40)
VXLAN6_OVERHEAD = 70


def render_vxlan_peers(
    peers: Mapping[PeerId, Lease],
    *,
    vni: int,
    device_index: int | None,
    own_ip: IPv4Address | None = None,
    direct_routing: bool = False,
    lookups: Mapping[IPAddress, RouteLookup | None] | None = None,
    device6_index: int | None = None,
    own_ip6: IPv6Address | None = None,
) -> Rendered:
    """Desired entries per peer, in apply order (neighbour, FDB, route).

    A peer on the same L2 segment gets one plain route via its PublicIP when DirectRouting is
    on; every other vxlan peer gets neighbour (gateway → VtepMAC), FDB (VtepMAC → PublicIP) and
    an onlink route via its subnet's network address on our device. With ``device6_index``
    (dual stack) the same again for the peer's IPv6 subnet on the IPv6 device, from its
    BackendV6Data and PublicIPv6; a peer whose IPv6 side is unusable keeps its IPv4 entries and
    is reported; a lease with no IPv4 subnet at all (a host that has not yet followed a switch
    from IPv6-only to dual stack) gets its IPv6 entries alone. With ``device_index`` None (an
    IPv6-only network) only the IPv6 side is rendered, and a peer whose IPv6 side is unusable
    is skipped.
    """
    entries: dict[PeerId, tuple[Entry, ...]] = {}
    skipped: dict[PeerId, str] = {}
    looked = lookups or {}
    for ident, lease in peers.items():
        btype = lease.attrs.backend_type
        if btype != "vxlan":
            skipped[ident] = f"BackendType {btype or '(none)'!r} is not vxlan; ignoring this lease"
            continue
        out: tuple[Entry, ...] = ()
        note = ""
        if device_index is not None:
            why, mac = _vxlan_peer_mac(lease, vni, own_ip)
            if why and (lease.subnet is not None or device6_index is None):
                skipped[ident] = why
                continue
            if why:  # an IPv6-only lease in a dual-stack network (a host switching families)
                note = f"IPv4 side left out: {why}"
            else:
                assert lease.subnet is not None
                out = _vxlan_entries(lease.subnet, mac, lease.attrs.public_ip, device_index,
                                     direct_routing, looked)
        if device6_index is not None:
            why6, mac6 = _vxlan_peer_mac6(lease, vni, own_ip6)
            if why6 and not out:
                skipped[ident] = why6
                continue
            if why6:
                note = f"IPv6 side left out: {why6}"
            else:
                assert lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None
                out += _vxlan_entries(lease.ipv6_subnet, mac6, lease.attrs.public_ipv6,
                                      device6_index, direct_routing, looked)
        if note:
            skipped[ident] = note
        entries[ident] = out
    return Rendered(entries, skipped)


def _vxlan_entries(subnet: IPNetwork, mac: str, public: IPAddress, device_index: int,
                   direct_routing: bool, lookups: Mapping[IPAddress, RouteLookup | None]
                   ) -> tuple[Entry, ...]:
    lookup = lookups.get(public)
    if direct_routing and is_direct(lookup) and lookup and lookup.oif != device_index:
        return (Route(subnet, gateway=public, oif=lookup.oif),)
    gw = subnet.network_address
    return (
        Neigh(device_index, gw, mac),
        Fdb(device_index, mac, public),
        Route(subnet, gateway=gw, oif=device_index, onlink=True),
    )


def _vxlan_peer_mac(lease: Lease, vni: int, own_ip: IPv4Address | None) -> tuple[str, str]:
    """The IPv4 side of a vxlan lease: (reason to skip, "") or ("", VtepMAC)."""
    if lease.subnet is None:
        return "the lease has no IPv4 subnet (an IPv6-only lease)", ""
    if own_ip is not None and lease.attrs.public_ip == own_ip:
        return f"lease has our own PublicIP {own_ip} (a stale lease of this host?)", ""
    try:
        data = lease.attrs.data()
    except ValueError as exc:
        return f"BackendData is not valid JSON: {exc}", ""
    return _mac_from(data, "BackendData", vni)


def _vxlan_peer_mac6(lease: Lease, vni: int, own_ip6: IPv6Address | None) -> tuple[str, str]:
    """The IPv6 side of a vxlan lease: (reason to skip, "") or ("", VtepMAC of its v6 device)."""
    if lease.ipv6_subnet is None:
        return "the lease has no IPv6 subnet", ""
    if lease.attrs.public_ipv6 is None:
        return "the lease has no PublicIPv6", ""
    if own_ip6 is not None and lease.attrs.public_ipv6 == own_ip6:
        return f"lease has our own PublicIPv6 {own_ip6}", ""
    try:
        data = lease.attrs.v6_data()
    except ValueError as exc:
        return f"BackendV6Data is not valid JSON: {exc}", ""
    if not data:
        return "the lease has no BackendV6Data", ""
    return _mac_from(data, "BackendV6Data", vni)


def _mac_from(data: object, name: str, vni: int) -> tuple[str, str]:
    if not isinstance(data, dict):
        return f"{name} is not a JSON object", ""
    low = {k.lower(): v for k, v in data.items() if isinstance(k, str)}
    if "vtepmac" not in low:
        return f"{name} has no VtepMAC", ""
    try:
        mac = parse_unicast_mac(low["vtepmac"])
    except ValueError as exc:
        return f"{name}: {exc}", ""
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


class VxlanDevice:
    """One vxlan device of ours (``flannel.<VNI>``, or ``flannel-v6.<VNI>`` over IPv6): create
    or reuse it, keep its MAC across restarts and reboots, give it our one address."""

    def __init__(self, spec: VxlanSpec, kernel: Kernel, state_dir: Path) -> None:
        self.spec = spec
        self.kernel = kernel
        self.mac_file = state_dir / f"{spec.name}.mac"
        self.mac = ""
        self.ifindex = 0

    def ensure(self) -> None:
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
            if spec.local.version == 6:
                _no_router_advertisements(spec.name)
        elif link.mtu != spec.mtu:
            log.info("setting %s MTU %d → %d", spec.name, link.mtu, spec.mtu)
            k.set_link(link.index, mtu=spec.mtu)
        self.mac, self.ifindex = link.mac.lower(), link.index
        if self._stored_mac() != self.mac:
            from netagent.files import write_atomic

            write_atomic(self.mac_file, self.mac + "\n")

    def ensure_address(self, want: IPInterface, network: IPNetwork | None) -> None:
        """``want`` (our subnet's network address as /32 or /128: no connected route) and no
        other address from ``network``; link up."""
        link = self.kernel.link(self.spec.name)
        if link is None:
            return  # the next full sync recreates it
        address_device(self.kernel, link, want, network)

    def delete(self) -> None:
        link = self.kernel.link(self.spec.name)
        if link is not None and link.kind == "vxlan":
            self.kernel.delete_link(link.index)
            log.info("removed %s", self.spec.name)
        self.ifindex = 0

    def _stored_mac(self) -> str:
        try:
            return parse_unicast_mac(self.mac_file.read_text().strip())
        except (OSError, ValueError):
            return ""


def _no_router_advertisements(name: str) -> None:
    """flannel sets ``net.ipv6.conf.<dev>.accept_ra = 0`` on its IPv6 device: the overlay
    device must never pick up an address or default route from a stray RA."""
    path = Path("/proc/sys/net/ipv6/conf") / name / "accept_ra"
    try:
        path.write_text("0")
    except OSError as exc:
        log.warning("could not set accept_ra=0 on %s: %s", name, exc)


class VxlanBackend(ReconcilingBackend):
    type_name = "vxlan"

    def __init__(self, config: NetworkConfig, host: HostFacts, *, kernel: Kernel | None = None,
                 csum_workaround: bool | None = None) -> None:
        super().__init__(config, host, kernel=kernel)
        b = config.backend
        self.vni = b.vni
        underlay_mtu = b.mtu or host.iface_mtu
        port = b.port or DEFAULT_VXLAN_PORT
        #: the IPv4 device, absent in an IPv6-only network
        self.spec: VxlanSpec | None = None
        if config.enable_ipv4:
            self.spec = VxlanSpec(
                name=f"flannel.{b.vni}", vni=b.vni, port=port,
                local=host.public_ip, underlay_index=host.iface_index,
                mtu=underlay_mtu - VXLAN_OVERHEAD, learning=b.learning, gbp=b.gbp,
            )
        #: the IPv6 device (dual stack, IPv6-only): outer IPv6 needs 20 bytes more than IPv4
        #: (flannel applies −50 here too, #1781, which makes full-size packets fail)
        self.spec6: VxlanSpec | None = None
        if self.ipv6 and host.public_ipv6 is not None:
            self.spec6 = VxlanSpec(
                name=f"flannel-v6.{b.vni}", vni=b.vni, port=port, local=host.public_ipv6,
                underlay_index=host.iface_index, mtu=underlay_mtu - VXLAN6_OVERHEAD,
                learning=b.learning, gbp=b.gbp,
            )
        #: None = decide from the kernel release (see kernel_needs_csum_workaround)
        self.csum_workaround = csum_workaround
        self._dev: VxlanDevice | None = None
        self._dev6: VxlanDevice | None = None

    @property
    def dev(self) -> VxlanDevice | None:
        if self._dev is None and self.spec is not None:
            self._dev = VxlanDevice(self.spec, self.kernel, self.host.state_dir)
        return self._dev

    @property
    def dev6(self) -> VxlanDevice | None:
        if self._dev6 is None and self.spec6 is not None:
            self._dev6 = VxlanDevice(self.spec6, self.kernel, self.host.state_dir)
        return self._dev6

    def _devices(self) -> list[VxlanDevice]:
        return [d for d in (self.dev, self.dev6) if d is not None]

    @property
    def mac(self) -> str:
        """The IPv4 device's MAC ("" in an IPv6-only network)."""
        return self.dev.mac if self.dev is not None else ""

    @property
    def ifindex(self) -> int:
        """The IPv4 device's index (0 in an IPv6-only network)."""
        return self.dev.ifindex if self.dev is not None else 0

    @property
    def mac_file(self) -> Path:
        dev = self.dev or self.dev6
        assert dev is not None
        return dev.mac_file

    @property
    def mtu(self) -> int:
        """The IPv4 device's MTU (the IPv6 device's in an IPv6-only network)."""
        spec = self.spec or self.spec6
        assert spec is not None
        return spec.mtu

    @property
    def subnet_mtu(self) -> int:
        """The pods' MTU (subnet.env): small enough for every device a pod's packet may take."""
        return min(d.spec.mtu for d in self._devices())

    # -- lifecycle

    def prepare(self) -> LeaseContribution:
        if self.ipv6 and self.spec6 is None:
            raise RuntimeError("vxlan: EnableIPv6 is set but this host has no PublicIPv6")
        self._ensure_devices()
        self.reconciler = self._new_reconciler(self._index4(), self._index6())
        data = data6 = ""
        if self.dev is not None:
            data = canonical_json({"VNI": self.vni, "VtepMAC": self.dev.mac})
        if self.dev6 is not None:
            data6 = canonical_json({"VNI": self.vni, "VtepMAC": self.dev6.mac})
        return LeaseContribution(backend_type="vxlan", backend_data=data, mtu=self.subnet_mtu,
                                 backend_v6_data=data6)

    def activate(self, own: Lease) -> None:
        self.own = own
        self._ensure_addresses()

    def render(self, peers: Mapping[PeerId, Lease],
               lookups: Mapping[IPAddress, RouteLookup | None]) -> Rendered:
        return render_vxlan_peers(
            peers, vni=self.vni, device_index=self._index4(), own_ip=self.host.public_ip,
            direct_routing=self.config.backend.direct_routing, lookups=lookups,
            device6_index=self._index6(), own_ip6=self.host.public_ipv6,
        )

    def lookup_targets(self, lease: Lease) -> tuple[IPAddress, ...]:
        if not self.config.backend.direct_routing or lease.attrs.backend_type != "vxlan":
            return ()
        out: list[IPAddress] = []
        if self.dev is not None and lease.subnet is not None:
            out.append(lease.attrs.public_ip)
        public6 = lease.attrs.public_ipv6
        if self.dev6 is not None and public6 is not None:
            out.append(public6)
        return tuple(out)

    def teardown(self) -> None:
        """Live switch away from these devices: remove our peer entries (DirectRouting routes
        live on the underlay, not on the device), then the devices themselves."""
        self.sync({}, None)
        for dev in self._devices():
            dev.delete()

    def repair_devices(self) -> bool:
        before, before6 = self._index4(), self._index6()
        self._ensure_devices()
        if self.own is not None:
            self._ensure_addresses()
        rec = self.reconciler
        if rec is None:
            return False
        changed = False
        for old, new, spec in ((before, self._index4(), self.spec),
                               (before6, self._index6(), self.spec6)):
            if old != new:
                log.warning("%s was recreated (index %s → %s); reprogramming every peer",
                            spec and spec.name, old, new)
                rec.forget_device(old)
                changed = True
        rec.device, rec.device6 = self._index4(), self._index6()
        return changed

    # -- devices

    def _index4(self) -> int | None:
        return self.dev.ifindex if self.dev is not None else None

    def _index6(self) -> int | None:
        return self.dev6.ifindex if self.dev6 is not None else None

    def _ensure_devices(self) -> None:
        for dev in self._devices():
            dev.ensure()
            self._apply_csum_workaround(dev.spec.name)

    def _ensure_addresses(self) -> None:
        own = self.own
        assert own is not None
        if self.dev is not None and own.subnet is not None:
            self.dev.ensure_address(IPv4Interface(f"{own.subnet.network_address}/32"),
                                    self.config.network)
        if self.dev6 is not None and own.ipv6_subnet is not None:
            self.dev6.ensure_address(
                IPv6Interface(f"{own.ipv6_subnet.network_address}/128"),
                self.config.ipv6_network)

    def _apply_csum_workaround(self, name: str) -> None:
        release = os.uname().release
        apply = self.csum_workaround
        if apply is None:
            apply = kernel_needs_csum_workaround(release)
        if not apply:
            log.debug("kernel %s is not affected by the vxlan checksum bug", release)
            return
        try:
            how = self.kernel.disable_tx_checksum(name)
        except (KernelError, OSError) as exc:
            log.warning("could not disable tx-checksum-ip-generic on %s: %s", name, exc)
            return
        if not how:
            return  # already off (a restart): nothing changed, nothing to say
        log.info("disabled tx-checksum-ip-generic on %s (kernel %s ≤ 5.7, vxlan checksum bug, "
                 "flannel #1282/#2152) via %s", name, release, how)
