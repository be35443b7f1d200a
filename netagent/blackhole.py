"""The own-subnet blackhole route of ``--ip-blackhole-route`` (flannel v0.27.1+).

Without it, a packet to an address of our subnet that no pod holds (a pod just deleted, or
never started) matches no route more specific than the default one and leaves the host by the
default route, out to the underlay with an overlay source. With it the packet is dropped here.

The route is ``blackhole <subnet> proto 111 metric`` :data:`BLACKHOLE_METRIC` in the main
table, one per family the lease has. The metric is far above the kernel's prefix route of the
CNI bridge (metric 0 on IPv4, 256 on IPv6; both for the same destination), so while ``cni0``
exists its on-link route wins and pods are reached; only once the bridge is gone (or before
it exists) does the blackhole decide. A routed pod's /32 (proto 112) wins by prefix length.

flannel's first versions never installed it: their existence check was inverted (flannel
#2328). Here the check is a read-back compared entry by entry, so "present" means the kernel
holds exactly our route.

Ours are recognised by all of proto :data:`~netagent.kernel.RTPROT_NETAGENT`, type blackhole
and our metric; the peer-route sweep (``route_owner``) claims only unicast routes, so this route
is never swept as a peer route, and a blackhole route someone else made is never touched here.
Runs on the main loop only (single writer), re-checked every ``--iptables-resync`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from netagent.kernel import (
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    RTPROT_NETAGENT,
    IPNetwork,
    Kernel,
    Op,
    Route,
)

log = logging.getLogger("netagent")

#: far above the CNI bridge's kernel prefix route (IPv4 0, IPv6 256) and the metrics DHCP
#: clients and NetworkManager give (100-20600): the blackhole only decides when nothing else
#: routes the subnet
BLACKHOLE_METRIC = 1_000_000


def blackhole_route(subnet: IPNetwork) -> Route:
    """Our blackhole route for ``subnet`` (no gateway, no device)."""
    return Route(subnet, None, None, table=RT_TABLE_MAIN, metric=BLACKHOLE_METRIC,
                 proto=RTPROT_NETAGENT, rtype=RTN_BLACKHOLE)


def is_our_blackhole(r: Route) -> bool:
    """A blackhole route we made: our proto, our metric, the main table."""
    return (r.rtype == RTN_BLACKHOLE and r.proto == RTPROT_NETAGENT
            and r.metric == BLACKHOLE_METRIC and r.table == RT_TABLE_MAIN)


def our_blackholes(kernel: Kernel) -> list[Route]:
    """Every blackhole route of ours in the kernel, both families."""
    return [r for fam in (4, 6) for r in kernel.dump_routes(RT_TABLE_MAIN, family=fam)
            if is_our_blackhole(r)]


def plan_blackholes(have: Iterable[Route], subnets: Iterable[IPNetwork]) -> list[Op]:
    """The writes that leave exactly one blackhole route per subnet in ``subnets``: ours for
    other subnets (an old lease, or the flag turned off) are deleted, missing ones added."""
    want = {r.key: r for r in map(blackhole_route, subnets)}
    have_by_key = {r.key: r for r in have if is_our_blackhole(r)}
    ops = [Op("delete", r) for k, r in have_by_key.items() if k not in want]
    ops += [Op("replace", r) for k, r in want.items() if have_by_key.get(k) != r]
    return ops


class BlackholeRoutes:
    """Keeps our blackhole routes equal to the lease's subnets (enabled) or absent (disabled)."""

    def __init__(self, enabled: bool, kernel: Callable[[], Kernel]) -> None:
        """``kernel`` is called once, at the first reconcile (a host that never enables the
        flag and has nothing to sweep still opens one netlink socket, at start-up only)."""
        self.enabled = enabled
        self._make_kernel = kernel
        self._kernel: Kernel | None = None
        #: times a missing or different route was put back after it had been in place
        self.repairs = 0
        self._placed = False
        self._swept = False
        self._warned: set[str] = set()

    def _drop_kernel(self) -> None:
        kernel, self._kernel = self._kernel, None
        close = getattr(kernel, "close", None)
        if close is not None:
            close()

    def reconcile(self, subnets: Iterable[IPNetwork | None]) -> None:
        """Install or re-check the routes for ``subnets`` (None entries: that family is off);
        with the flag off, delete ours left from an earlier run, once."""
        if not self.enabled:
            if self._swept:
                return
            self._swept = True
            wanted: list[IPNetwork] = []
        else:
            wanted = [s for s in subnets if s is not None]
        if self._kernel is None:
            self._kernel = self._make_kernel()
        kernel = self._kernel
        try:
            ops = plan_blackholes(our_blackholes(kernel), wanted)
            if not ops:
                self._placed = bool(wanted)
                if not self.enabled:
                    self._drop_kernel()  # the sweep found nothing: done (see below)
                return
            errors: list[tuple[Op | None, Exception]] = [
                (op, e) for op, e in zip(ops, kernel.write(ops), strict=True) if e]
        except OSError as exc:
            errors = [(None, exc)]
        for op, err in errors:
            msg = f"blackhole route {op.action + ' ' + str(op.entry.dst) if op else ''}: {err}"
            if msg not in self._warned:
                self._warned.add(msg)
                log.error("%s (retrying every --iptables-resync)", msg)
        if errors:
            if not self.enabled:
                self._swept = False  # try again next time
            return
        if not self.enabled:
            # the one-off sweep is done: its kernel remembered the whole main table it dumped
            # (every peer route, ~10 MB at 20,000 peers), so it goes now
            self._drop_kernel()
        adds = [str(op.entry.dst) for op in ops if op.action == "replace"]
        dels = [str(op.entry.dst) for op in ops if op.action == "delete"]
        if adds:
            if self._placed:
                self.repairs += 1
            log.info("blackhole route %s for %s (metric %d)",
                     "put back" if self._placed else "added", ", ".join(adds), BLACKHOLE_METRIC)
        if dels:
            log.info("blackhole route removed for %s%s", ", ".join(dels),
                     "" if self.enabled else " (--ip-blackhole-route is off)")
        self._placed = bool(wanted)
