"""The etcd seam: what the daemon and the lease manager need from a key-value store.

`netagent.registry.Registry` (pyetcd + gRPC) is the one production implementation;
`tests/support/fakestore.py` is an in-memory one with revisions, TTL leases on a fake clock,
compaction and injected failures, so the lease and daemon logic is tested without etcd or root
(flannel's `mock_registry.go` and CNI host-local's fake store are the models). This module
imports nothing but the standard library: the value types live here so the fake needs no etcd
client, and `registry.py` re-exports them for its callers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

#: watch/retry backoff: 100 ms doubling to 5 s (flannel's numbers)
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


class RegistryError(RuntimeError):
    """etcd refused or failed a request; the message says what and why."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        #: metric label: unavailable, timeout, auth, permission, compacted, other
        self.kind = kind


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease_id: int
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix (`value` is b"" for deletes)."""

    kind: str  # "put" | "delete"
    key: str
    value: bytes
    lease_id: int
    revision: int


@dataclass(frozen=True)
class WatchResync:
    """The watch lost its place (compaction): here is the whole prefix at `revision`."""

    items: tuple[KeyValue, ...]
    revision: int


@dataclass
class RegistryStats:
    errors: dict[str, int] = field(default_factory=dict)
    watch_reconnects: int = 0
    failovers: int = 0

    def count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Store(Protocol):
    """A flannel etcd v3 key space, as the agent uses it. Errors are `RegistryError` with a
    `kind` (unavailable, timeout, auth, permission, compacted, config, other); "config" means
    retrying cannot help; "notfound" a lease etcd does not know."""

    prefix: str
    stats: RegistryStats

    def key(self, suffix: str) -> str:
        """`<prefix>/<suffix>`."""
        ...

    def get(self, key: str) -> KeyValue | None:
        ...

    def put(self, key: str, value: bytes | str, lease_id: int = 0) -> None:
        ...

    def delete(self, key: str) -> bool:
        ...

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` and the store revision of that one read."""
        ...

    def create(
        self, key: str, value: bytes | str, ttl: int | None, lease_id: int = 0
    ) -> tuple[bool, int, KeyValue | None]:
        """Create-if-absent (one transaction), on `lease_id` or a fresh lease of `ttl` seconds
        (neither: a reservation). Returns (created, lease_id, the existing value if not); a
        lease granted here for a create that failed is revoked."""
        ...

    def grant(self, ttl: int, lease_id: int = 0) -> int:
        """A new etcd lease of `ttl` seconds with the ID `lease_id` (0: the store picks one);
        a grant of an ID that already exists answers that ID (our own retried grant)."""
        ...

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease and delete its keys; a lease already gone is not an error."""
        ...

    def keepalive(self, lease_id: int) -> int:
        """One keepalive: the TTL granted, 0 when the lease is gone."""
        ...

    def watch_prefix(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent | WatchResync]:
        """Changes under `prefix` from `start_revision` until `stop`; resumes by itself after
        errors and yields a `WatchResync` (the whole prefix) when its revision was compacted."""
        ...

    def find_v2_value(self, key: str) -> str | None:
        """The value of `key` in etcd's v2 store, if the server has one (for a hint only)."""
        ...

    def close(self) -> None:
        ...
