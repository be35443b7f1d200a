"""Shared pieces of the reconciling backends (vxlan, host-gw).

The top half is pure: MAC helpers and the :class:`Rendered` result of a backend's render
function. The bottom half, :class:`ReconcilingBackend`, is the thin shell every such backend
shares: it asks the kernel the few facts a render needs (route lookups), calls the backend's pure
render for the peers that need it, hands the entries to the :class:`~netagent.kernel.Reconciler`
and turns the outcome into a :class:`~backends.base.SyncReport`. It talks to the kernel only
through :class:`~netagent.kernel.Kernel`, so the fake kernel can stand in for netlink.
"""

from __future__ import annotations

import gc
import logging
import re
import secrets
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from netagent.backends.base import Backend, HostFacts, SyncReport
from netagent.config import NetworkConfig
from netagent.kernel import (
    Dumps,
    Entry,
    IPAddress,
    Kernel,
    KernelChange,
    Reconciler,
    RouteLookup,
    lookup_all,
    route_owner,
)
from netagent.lease import Lease, PeerId

log = logging.getLogger(__name__)

#: full syncs a cached route lookup may serve before it is asked again even if nothing changed
#: (a safety net for changes the underlay-route comparison cannot see, e.g. policy routing)
LOOKUP_REFRESH = 6

#: peers a drift repair's step re-renders (when their lookups went stale), ~1-2 ms
RENDER_SLICE = 250

#: after a sync that changed this many entries, hand freed heap back to the system
TRIM_AFTER = 1000

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --------------------------------------------------------------------------- pure helpers


def parse_unicast_mac(text: object) -> str:
    """A MAC usable as a VTEP address, lower-cased; ValueError says why not."""
    if not isinstance(text, str):
        raise ValueError(f"VtepMAC must be a string, got {text!r}")
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise ValueError(f"VtepMAC {text!r} is not a MAC address")
    first = int(mac[:2], 16)
    if first & 0x01:
        raise ValueError(f"VtepMAC {text!r} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise ValueError("VtepMAC is all zeros")
    return mac


def generate_vtep_mac(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """Random MAC with the locally administered bit set and the multicast bit clear."""
    raw = bytearray(randbytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class Rendered:
    """A render's output: entries per peer, and peers left out with the reason."""

    entries: Mapping[PeerId, tuple[Entry, ...]] = field(default_factory=dict)
    skipped: Mapping[PeerId, str] = field(default_factory=dict)


def _trim_heap() -> None:
    """glibc ``malloc_trim(0)``: a first sync of 5,000 peers leaves ~10 MB of freed netlink
    buffers and temporaries in the heap, which glibc keeps (and RSS counts) unless asked. No-op
    where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_direct(lookup: RouteLookup | None, iface_index: int | None = None) -> bool:
    """flannel's same-L2 test: the kernel reaches the address without a gateway (on iface)."""
    if lookup is None or lookup.gateway is not None or lookup.oif is None:
        return False
    return iface_index is None or lookup.oif == iface_index


# --------------------------------------------------------------------------- shared shell


class ReconcilingBackend(Backend):
    """sync() for backends whose per-peer state is rendered by a pure function."""

    repairs_from_events = True

    def __init__(self, config: NetworkConfig, host: HostFacts, *,
                 kernel: Kernel | None = None) -> None:
        super().__init__(config, host)
        self._kernel = kernel
        self.own: Lease | None = None
        self.reconciler: Reconciler | None = None
        #: peers the render left out, and peers whose routes the apply held back
        self._skipped: dict[PeerId, str] = {}
        self._blocked: dict[PeerId, str] = {}
        #: subnet -> (lease, its route lookups) it was last rendered from: a full sync renders
        #: only peers whose lease or lookups changed (5,000 JSON parses every 10 s otherwise)
        self._rendered_from: dict[PeerId, tuple[Lease, tuple[RouteLookup | None, ...]]] = {}
        #: ``ip route get`` answers by underlay address, valid while the kernel's non-peer
        #: routes (``Reconciler.underlay``) stay the same, and at most LOOKUP_REFRESH full syncs
        self._lookups: dict[IPAddress, RouteLookup | None] = {}
        self._lookups_basis: frozenset[object] | None = None
        self._lookups_age = 0
        self._dumps: Dumps | None = None

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            from netagent.kernel import NetlinkKernel

            self._kernel = NetlinkKernel()
        return self._kernel

    @property
    def ipv6(self) -> bool:
        """Dual stack: the backend programs IPv6 entries beside the IPv4 ones."""
        return self.config.enable_ipv6

    def _new_reconciler(self, device: int | None, device6: int | None = None) -> Reconciler:
        if self._dumps is None:  # the repair's read-back: its own socket, kept across devices
            self._dumps = self.kernel.sliced_dumps()
        return Reconciler(
            self.kernel,
            route_owner(self.config.network, lambda: self.own.subnet if self.own else None,
                        self.config.ipv6_network,
                        lambda: self.own.ipv6_subnet if self.own else None),
            device=device, device6=device6, ipv6=self.ipv6, dumps=self._dumps,
        )

    # hooks for the concrete backends

    @abstractmethod
    def render(self, peers: Mapping[PeerId, Lease],
               lookups: Mapping[IPAddress, RouteLookup | None]) -> Rendered:
        """The backend's pure render, with its parameters bound."""

    def lookup_targets(self, lease: Lease) -> tuple[IPAddress, ...]:
        """The underlay addresses of this peer the render needs ``ip route get`` for."""
        return ()

    def repair_devices(self) -> bool:
        """Full sync only: make devices right; True when every peer must be re-rendered."""
        return False

    # kernel events (netagent.kernel.monitor)

    def owns_change(self, change: KernelChange) -> bool:
        rec = self.reconciler
        if rec is None or not rec.synced:
            return False  # the first full sync is still to come
        if change.kind == "overflow":
            return True
        if change.kind == "link":
            return change.key[0] in (rec.device, rec.device6)
        return change.key in rec.desired_keys(change.kind)

    def entries_gone(self, changes: Sequence[KernelChange]) -> bool:
        rec = self.reconciler
        if rec is None or not rec.synced:
            return False
        for change in changes:
            if change.kind in ("link", "overflow"):
                return False
            rec.entry_gone(change.kind, change.key)
        return True

    # the driver

    def sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None = None
    ) -> SyncReport:
        # A first sync of 5,000 peers allocates ~150,000 long-lived objects and no cycles; left
        # on, the cyclic collector runs dozens of times over the whole heap meanwhile (measured:
        # a third of the Python time of that sync). Paused for the sync, resumed after.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            report = self._sync(peers, changed)
        finally:
            if paused:
                gc.enable()
        if report.changes >= TRIM_AFTER:
            _trim_heap()
        return report

    def _sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None
    ) -> SyncReport:
        rec = self.reconciler
        full = changed is None or rec is None or not rec.synced
        if rec is None:
            rec = self.reconciler = self._new_reconciler(None)
        if full:
            if self.repair_devices():
                self._rendered_from.clear()
            # read back first: the routes that are not ours decide whether cached lookups hold
            rec.read_back()
            self._expire_lookups(rec.underlay)
            todo = set(peers) | set(rec.peers()) | set(self._skipped)
        else:
            assert changed is not None
            todo = set(changed)
            for subnet in todo:  # a changed lease is looked up afresh
                lz = peers.get(subnet)
                if lz is not None:
                    for ip in (lz.attrs.public_ip, lz.attrs.public_ipv6):
                        self._lookups.pop(ip, None)  # type: ignore[arg-type]
        self._render_some(peers, todo)
        if full:
            rec.compare()
        return self._apply(rec)

    def repair_steps(self, peers: Mapping[PeerId, Lease]) -> Generator[None, None, SyncReport]:
        """The drift repair in slices of ~1 ms: the read-back (``Reconciler.read_back_steps``,
        whose last step lets what the loop wrote meanwhile stand over older dumps), then the
        re-render of peers whose lookups went stale, ``RENDER_SLICE`` peers a step, then one
        apply. A device that had to be made again (or a first sync) takes the whole sync."""
        rec = self.reconciler
        if rec is None or not rec.synced:
            return self.sync(peers, None)
        if self.repair_devices():  # made again: every entry is to be written, in one go
            self._rendered_from.clear()
            return self.sync(peers, None)
        yield from rec.read_back_steps()
        rec.compare()
        self._expire_lookups(rec.underlay)
        # every peer of the table, of the reconciler and skipped, duplicates and all: lists of
        # keys cost no hashing (a set of 20,000 IPv4Network keys is ~20 ms of Python hashes);
        # a peer met twice is skipped by its basis the second time
        todo = [*peers, *rec.peer_keys(), *self._skipped]
        for i in range(0, len(todo), RENDER_SLICE):
            yield
            # the peers may have changed meanwhile: what is gone now is dropped, what changed
            # was synced by its event and renders the same (skipped by its basis)
            self._render_some(peers, todo[i:i + RENDER_SLICE])
        return self._apply(rec)

    def _render_some(self, peers: Mapping[PeerId, Lease], todo: Iterable[PeerId]) -> None:
        """Render the peers of ``todo`` whose lease or lookups changed; forget those gone."""
        rec = self.reconciler
        assert rec is not None
        todo = set(todo)
        if self.own is not None:
            todo.discard(self.own.ident)
        present = {s: peers[s] for s in todo if s in peers}
        targets = {s: self.lookup_targets(lz) for s, lz in present.items()}
        lookups = self._lookup(ip for ips in targets.values() for ip in ips)
        subset = {}
        for subnet, lz in present.items():
            basis = (lz, tuple(lookups[ip] for ip in targets[subnet]))
            if self._rendered_from.get(subnet) != basis:
                subset[subnet] = lz
                self._rendered_from[subnet] = basis
        rendered = self.render(subset, lookups)
        for subnet in subset:
            rec.set_peer(subnet, rendered.entries.get(subnet))
            self._note_skip(self._skipped, subnet, rendered.skipped.get(subnet))
        for subnet in todo - present.keys():
            rec.set_peer(subnet, None)
            self._rendered_from.pop(subnet, None)
            self._skipped.pop(subnet, None)
            self._blocked.pop(subnet, None)

    def _apply(self, rec: Reconciler) -> SyncReport:
        result = rec.apply()
        # held-back routes stay pending, so every apply re-evaluates all of them
        for subnet in set(self._blocked) | set(result.blocked):
            self._note_skip(self._blocked, subnet, result.blocked.get(subnet))
        skipped = {**self._blocked, **self._skipped}
        return SyncReport(added=result.added, removed=result.removed, failed=len(result.failed),
                          entries=rec.counts(), skipped=skipped)

    def _expire_lookups(self, basis: frozenset[object]) -> None:
        """Forget cached lookups when the underlay routes changed or they are too old."""
        self._lookups_age += 1
        if basis != self._lookups_basis or self._lookups_age > LOOKUP_REFRESH:
            self._lookups.clear()
            self._lookups_basis = basis
            self._lookups_age = 0

    def _lookup(self, ips: Iterable[IPAddress]) -> Mapping[IPAddress, RouteLookup | None]:
        """Route lookups for these addresses: cached ones reused, the rest asked once each."""
        wanted = set(ips)
        missing = [ip for ip in wanted if ip not in self._lookups]
        if missing:
            self._lookups.update(lookup_all(self.kernel, missing))
        return {ip: self._lookups[ip] for ip in wanted}

    @staticmethod
    def _note_skip(table: dict[PeerId, str], subnet: PeerId, why: str | None) -> None:
        """Log a skipped peer once per reason, not on every sync."""
        before = table.get(subnet)
        if why is None:
            if before is not None:
                del table[subnet]
                log.info("peer %s is no longer skipped", subnet)
            return
        if why != before:
            log.warning("skipping peer %s: %s", subnet, why)
        table[subnet] = why
