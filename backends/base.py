"""The backend interface: what the daemon asks of vxlan, host-gw, udp and alloc.

A backend owns one kind of kernel state. The daemon calls, in this order:
``prepare()`` (devices exist, lease attributes known) → the lease is acquired →
``activate(own_lease)`` (address the device) → ``sync(peers, changed=...)`` on every change and
on the drift-repair timer → ``shutdown()`` (leaves kernel state in place so restarts don't
interrupt traffic).

Inside a backend, desired state is computed by a pure render function from
(config, own lease, peers, host facts) into frozen dataclasses; an applier reads the kernel back,
diffs and applies only the difference. ``sync`` must never raise for one bad peer: it skips it,
reports it in :class:`SyncReport`, and retries next cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, ClassVar

from netagent.config import NetworkConfig
from netagent.kernel.monitor import KernelChange
from netagent.lease import Lease, PeerId


@dataclass(frozen=True)
class HostFacts:
    """Local facts a backend renders from; found once at start by the daemon."""

    iface: str
    iface_index: int
    iface_mtu: int
    #: 0.0.0.0 for an IPv6-only network (the lease's PublicIP then is 0.0.0.0 too)
    iface_addr: IPv4Address
    public_ip: IPv4Address
    state_dir: Path
    public_ipv6: IPv6Address | None = None
    #: the interface's own IPv6 address that matched (None when not known)
    iface_addr6: IPv6Address | None = None


@dataclass(frozen=True)
class LeaseContribution:
    """What the backend puts in our lease value and in subnet.env."""

    backend_type: str  # "" for udp (flannel's udp lease has no BackendType)
    backend_data: str  # canonical compact JSON, "" when absent
    mtu: int
    backend_v6_data: str = ""


@dataclass
class SyncReport:
    """Outcome of one sync, for logs, metrics and `netagent status`."""

    added: int = 0
    removed: int = 0
    failed: int = 0
    #: kernel entries we own after the sync, by kind ("route", "neigh", "fdb", ...)
    entries: dict[str, int] = field(default_factory=dict)
    #: peers skipped (wrong backend type, malformed data, unreachable), peer id -> reason
    skipped: dict[PeerId, str] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return self.added + self.removed


@dataclass(frozen=True)
class BackendGauge:
    """One sample a backend exports as the Prometheus gauge ``netagent_<name>``."""

    name: str
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BackendHealth:
    """How a backend's own machinery is doing beyond its kernel entries: a routing daemon and
    its sessions, a userspace WireGuard process. ``ok`` False makes /readyz fail; ``info`` is
    shown by ``netagent status`` and kept in status.json (JSON values only)."""

    ok: bool = True
    detail: str = ""
    info: Mapping[str, object] = field(default_factory=dict)
    gauges: tuple[BackendGauge, ...] = ()


class Backend(ABC):
    """One backend instance per daemon run."""

    #: the config's Backend.Type this class implements
    type_name: ClassVar[str]
    #: packet counters of a userspace data path (udp: rx/tx packets and bytes, "drops" by
    #: reason), updated in place by its packet loop and exported as netagent_udp_*; None for
    #: backends whose packets the kernel forwards
    stats: dict[str, Any] | None = None
    #: deletions of this backend's kernel entries are repaired from kernel events
    #: (`owns_change`), so the daemon may run its periodic full compare less often
    repairs_from_events: ClassVar[bool] = False

    def __init__(self, config: NetworkConfig, host: HostFacts) -> None:
        self.config = config
        self.host = host

    @classmethod
    def check_config(cls, config: NetworkConfig) -> str:
        """Why this backend cannot run `config` (which the parser accepted), or "" when it
        can. Pure and cheap: the daemon asks before it changes anything, at start (it waits
        for a config it can run) and on a live change (it keeps the running one), and
        `netagent config validate` asks the same. Requirements of the host (a kernel module,
        a binary) are `prepare()`'s to report, not this."""
        return ""

    @abstractmethod
    def prepare(self) -> LeaseContribution:
        """Create or reuse devices; return the lease attributes. Called before the lease."""

    @abstractmethod
    def activate(self, own: Lease) -> None:
        """Configure what depends on our own subnet (device address, overlay route)."""

    @abstractmethod
    def sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None = None
    ) -> SyncReport:
        """Make the kernel match `peers` (all peer leases, own lease excluded).

        `changed` = None asks for a full compare against a fresh kernel read-back (first sync,
        drift repair), sweeping our own entries that no lease justifies. A set names the only
        subnets whose leases changed since the last sync, so the backend may limit its work.
        """

    def repair_steps(self, peers: Mapping[PeerId, Lease]) -> Generator[None, None, SyncReport]:
        """The periodic full compare (drift repair) in slices: the daemon handles events
        between two steps, calling ``sync(peers, changed)`` for them, and gets the report as
        the generator's return value. Closing it half-way must leave the backend as if it had
        not begun. This default does the whole ``sync(peers, None)`` in its one step."""
        return self.sync(peers, None)
        yield  # makes this a generator; never reached

    def owns_change(self, change: KernelChange) -> bool:
        """Whether a deletion the kernel announced (:mod:`netagent.kernel.monitor`) is of a
        device or entry this backend wants, so the daemon should repair it now. Backends that
        do not say (udp, wireguard, bgp, alloc) leave their state to the periodic repair."""
        return False

    def entries_gone(self, changes: Sequence[KernelChange]) -> bool:
        """Mark these deleted entries (all owned, none a link) for re-writing by the next
        ``sync(peers, frozenset())``; False when that cannot do it (a full sync is needed)."""
        return False

    def health(self) -> BackendHealth:
        """Called from the ops threads (/readyz, /metrics) and by the main loop after each
        sync: thread-safe, cheap and never blocking (return a value kept up to date
        elsewhere). Backends with no machinery of their own are always healthy."""
        return BackendHealth()

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work. Kernel state stays so a restart doesn't interrupt traffic."""

    def prepare_teardown(self) -> None:
        """Get ready for :meth:`teardown` only (a live switch turned this backend's family
        off): what `prepare` does to find our kernel state, without the checks a backend
        that is to carry traffic must pass."""
        self.prepare()

    def teardown(self) -> None:
        """Remove the kernel entries this backend owns: called when a live config change
        switches to another backend, device or network. By default a full sync with no peers,
        which sweeps every peer entry by this backend's own ownership rules; backends with
        devices of their own also remove those."""
        self.sync({}, None)
