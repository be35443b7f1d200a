"""The `alloc` backend: leases a subnet and programs nothing (flannel's alloc)."""

from __future__ import annotations

from collections.abc import Mapping

from netagent.backends.base import Backend, LeaseContribution, SyncReport
from netagent.lease import Lease, PeerId


class AllocBackend(Backend):
    type_name = "alloc"

    def prepare(self) -> LeaseContribution:
        mtu = self.config.backend.mtu or self.host.iface_mtu
        return LeaseContribution(backend_type="alloc", backend_data="", mtu=mtu)

    def activate(self, own: Lease) -> None:
        return None

    def sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None = None
    ) -> SyncReport:
        return SyncReport()
