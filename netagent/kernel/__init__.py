"""Everything netagent does to the kernel's network state, and nothing else does.

Layers, so that all but the last two run without root:

* :mod:`~netagent.kernel.entries` — frozen entries keyed as the kernel keys them
  (:class:`Neigh` ifindex + IP, :class:`Fdb` ifindex + MAC + dst, :class:`Route` table + dst +
  metric), link facts, and the :class:`Kernel` protocol (every call the reconciler and the
  backends make).
* :mod:`~netagent.kernel.delta` — :class:`DeltaTracker`: desired and actual views keyed alike,
  pending updates/deletes kept current on every change (Calico Felix's ``deltatracker``).
* :mod:`~netagent.kernel.reconciler` — :class:`Reconciler`: desired entries per peer on top of
  one tracker per kind; ownership, conflicts (lowest subnet wins), write order (neighbours →
  FDB → routes, deletes reversed), routes held while their peer's L2 entries fail, failed items
  left pending.
* :mod:`~netagent.kernel.rtnetlink` — rtnetlink message encoding and the raw socket (batched
  writes, dumps, requests); :mod:`~netagent.kernel.netlink` — :class:`NetlinkKernel`, the one
  production :class:`Kernel`.
* :mod:`~netagent.kernel.host` — read-only host facts (``route_get``, ``host_interfaces``,
  ``gateway_route_to``); :mod:`~netagent.kernel.ethtool` — the checksum-offload workaround.

**What is ours.** Routes carry ``proto`` :data:`RTPROT_NETAGENT`; neighbours and FDB entries are
ours because they live on our own vxlan device. Nothing else is ever deleted.

Public API (import from ``netagent.kernel``):

* entries and facts: ``Neigh``, ``Fdb``, ``Route``, ``Entry``, ``Op``, ``LinkInfo``,
  ``LinkSummary`` (``NetlinkKernel.links()``: the link table, for ``netagent cleanup``),
  ``VxlanSpec``, ``RouteLookup``, ``KernelError``, the ``Kernel`` protocol; type aliases
  ``IPAddress``, ``IPNetwork``, ``IPInterface``; constants ``RTPROT_NETAGENT``,
  ``RT_TABLE_MAIN``, ``RT_SCOPE_UNIVERSE``, ``RT_SCOPE_LINK``, ``IPV6_DEFAULT_METRIC``,
  ``RTN_UNICAST``, ``RTN_BLACKHOLE``, ``KINDS``.
* devices: ``address_device`` (our overlay address on a device we own, link up).
* reconciling: ``DeltaTracker``, ``Reconciler``, ``ApplyResult``, ``route_owner``,
  ``lookup_all``.
* the kernel: ``NetlinkKernel(netns=None)``; ``encode_op`` (one op's rtnetlink message).
* kernel events: ``KernelMonitor`` (rtnetlink multicast), ``parse_changes``,
  ``KernelChange``, ``RepairBackoff``.
* host read-outs: ``HostInterface``, ``route_get``, ``host_interfaces``, ``gateway_route_to``;
  ``kernel_needs_csum_workaround``, ``disable_tx_checksum``.

A point-to-point overlay device (WireGuard: a kernel ``wireguard`` link, or the TUN that
wireguard-go makes) needs no more than this::

    link = kernel.link("flannel-wg")                  # adopt whatever is there (kind "tun"...)
    if link is None:
        kernel.create_link("flannel-wg", "wireguard", mtu=1420)
        link = kernel.link("flannel-wg")
    kernel.set_link(link.index, mtu=1420, up=True)
    kernel.add_addr(link.index, IPv4Interface("10.5.3.0/32"))   # IPv6 /128: NODAD
    rec = Reconciler(kernel, is_ours)                 # device=None: no neighbours/FDB of ours
    rec.set_peer(own_subnet, [Route(network, None, link.index, scope=RT_SCOPE_LINK)])
    rec.resync(); rec.apply()                         # proto 111, swept like any of ours

(``is_ours`` is the backend's own predicate: :func:`route_owner` claims peer routes strictly
inside the Network, not a whole-Network route.)
"""

from netagent.kernel.delta import DeltaTracker
from netagent.kernel.device import address_device
from netagent.kernel.entries import (
    IPV6_DEFAULT_METRIC,
    KINDS,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    RTPROT_NETAGENT,
    Dumps,
    Entry,
    Fdb,
    IPAddress,
    IPInterface,
    IPNetwork,
    Kernel,
    KernelError,
    LinkInfo,
    LinkSummary,
    Neigh,
    Op,
    Route,
    RouteLookup,
    VxlanSpec,
)
from netagent.kernel.ethtool import disable_tx_checksum, kernel_needs_csum_workaround
from netagent.kernel.host import HostInterface, gateway_route_to, host_interfaces, route_get
from netagent.kernel.monitor import KernelChange, KernelMonitor, RepairBackoff, parse_changes
from netagent.kernel.netlink import NetlinkKernel
from netagent.kernel.reconciler import ApplyResult, Reconciler, lookup_all, route_owner
from netagent.kernel.rtnetlink import encode_op

__all__ = [
    "IPV6_DEFAULT_METRIC", "KINDS", "RTN_BLACKHOLE", "RTN_UNICAST", "RT_SCOPE_LINK",
    "RT_SCOPE_UNIVERSE", "RT_TABLE_MAIN",
    "RTPROT_NETAGENT", "ApplyResult", "address_device", "DeltaTracker", "Entry", "Fdb", "HostInterface",
    "IPAddress", "IPInterface", "IPNetwork", "Kernel", "KernelChange", "KernelError",
    "KernelMonitor", "LinkInfo", "LinkSummary", "Neigh", "RepairBackoff",
    "NetlinkKernel", "Dumps", "Op", "Reconciler", "Route", "RouteLookup", "VxlanSpec",
    "disable_tx_checksum", "encode_op", "gateway_route_to", "host_interfaces",
    "kernel_needs_csum_workaround", "lookup_all", "parse_changes", "route_get", "route_owner",
]
