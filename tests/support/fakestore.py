"""An in-memory etcd v3 key space that satisfies `netagent.store.Store`, for unit tests.

Modelled on flannel's `mock_registry.go` and CNI host-local's fake store, with what the agent
relies on from etcd: one global revision bumped by every write; keys attached to TTL leases
(grant, keepalive, expiry driven by a `FakeClock`, the expired keys deleted with delete events);
a create-if-absent transaction; an event history a watch replays from any revision, compaction
(a watch from a compacted revision gets the whole prefix as a `WatchResync`, as
`Registry.watch_prefix` turns etcd's ErrCompacted into one); and failures injected per
operation (`fail("create", "unavailable", times=2)`), raised as the `RegistryError` kinds the
real registry raises.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from netagent.store import KeyValue, RegistryError, RegistryStats, WatchEvent, WatchResync


class FakeClock:
    """Time for lease TTLs; moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Entry:
    value: bytes
    lease_id: int
    create_revision: int
    mod_revision: int
    version: int


@dataclass
class _Failure:
    operation: str
    kind: str
    left: int


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class FakeStore:
    """A `Store` in memory; thread-safe (the daemon's watch and keepalive threads use it)."""

    def __init__(self, prefix: str = "/coreos.com/network", clock: FakeClock | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.stats = RegistryStats()
        self.clock = clock or FakeClock()
        self.revision = 1
        self.compacted = 0
        self.data: dict[str, _Entry] = {}
        self.leases: dict[int, _Lease] = {}
        self.history: list[WatchEvent] = []
        #: what `find_v2_value` answers (a config written with the v2 API)
        self.v2: dict[str, str] = {}
        #: every call, by operation name (tests assert e.g. "no write happened")
        self.calls: list[tuple[str, str]] = []
        self.closed = False
        self._next_lease = 0x7000
        self._fail: list[_Failure] = []
        self._lose: list[_Failure] = []
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ test controls

    def fail(self, operation: str, kind: str = "unavailable", times: int = 1) -> None:
        """The next `times` calls of `operation` ("get", "put", "create", "keepalive", "list",
        "delete", "revoke", "watch" or "*") raise RegistryError(kind) and change nothing."""
        self._fail.append(_Failure(operation, kind, times))

    def lose_answer(self, operation: str, times: int = 1) -> None:
        """The next `times` calls of `operation` take effect, then raise RegistryError
        ("unavailable"): etcd applied the request but its answer was lost (etcd killed, the
        connection cut), the sequence that leaked etcd leases in issue 19 item 8."""
        self._lose.append(_Failure(operation, "unavailable", times))

    def live_leases(self) -> dict[int, set[str]]:
        """Every etcd lease and the keys attached to it (`etcdctl lease list` + timetolive)."""
        with self._cond:
            return {lid: set(lease.keys) for lid, lease in self.leases.items()}

    def expire(self) -> list[str]:
        """Delete every lease whose TTL ran out on the fake clock, and its keys (with delete
        events, as etcd does); returns the deleted keys."""
        with self._cond:
            gone = [lid for lid, lease in self.leases.items()
                    if lease.expires_at <= self.clock.now]
            keys: list[str] = []
            for lid in gone:
                keys += self._revoke_locked(lid)
            return keys

    def compact(self, revision: int) -> None:
        """Forget the history up to `revision` (a watch from below it resyncs)."""
        with self._cond:
            self.compacted = max(self.compacted, revision)
            self.history = [e for e in self.history if e.revision > revision]

    def atomically(self) -> threading.Condition:
        """`with store.atomically(): ...` — no watch sees the store between these calls (to
        compact events away before a running watch could deliver them)."""
        return self._cond

    def reopen(self) -> None:
        """A new agent process connects to the same etcd (the last one closed its client)."""
        self.closed = False

    def writes(self) -> int:
        """How many writes (revisions) happened since the store was made."""
        return self.revision - 1

    # ------------------------------------------------------------------ internals

    def _check(self, operation: str, key: str = "") -> None:
        self.calls.append((operation, key))
        if self.closed:
            raise RegistryError("registry closed", "closed")
        for rule in self._fail:
            if rule.left and rule.operation in (operation, "*"):
                rule.left -= 1
                self.stats.count(rule.kind)
                raise RegistryError(f"{operation} {key}: injected {rule.kind}", rule.kind)

    def _answer(self, operation: str, key: str = "") -> None:
        """After a request took effect: raise if its answer is to be lost."""
        for rule in self._lose:
            if rule.left and rule.operation in (operation, "*"):
                rule.left -= 1
                self.stats.count(rule.kind)
                raise RegistryError(f"{operation} {key}: answer lost (injected)", rule.kind)

    def _emit(self, kind: str, key: str, value: bytes, lease_id: int) -> None:
        self.history.append(WatchEvent(kind, key, value, lease_id, self.revision))
        self._cond.notify_all()

    def _put_locked(self, key: str, value: bytes, lease_id: int) -> None:
        if lease_id and lease_id not in self.leases:
            raise RegistryError(f"put {key}: etcd lease {lease_id:x} not found", "other")
        self.revision += 1
        old = self.data.get(key)
        if old is not None and old.lease_id in self.leases:
            self.leases[old.lease_id].keys.discard(key)
        self.data[key] = _Entry(value, lease_id, old.create_revision if old else self.revision,
                                self.revision, (old.version if old else 0) + 1)
        if lease_id:
            self.leases[lease_id].keys.add(key)
        self._emit("put", key, value, lease_id)

    def _delete_locked(self, key: str) -> bool:
        old = self.data.pop(key, None)
        if old is None:
            return False
        if old.lease_id in self.leases:
            self.leases[old.lease_id].keys.discard(key)
        self.revision += 1
        self._emit("delete", key, b"", 0)
        return True

    def _revoke_locked(self, lease_id: int) -> list[str]:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return []
        keys = sorted(lease.keys)
        for key in keys:
            self._delete_locked(key)
        return keys

    def _grant_locked(self, ttl: int, lease_id: int = 0) -> int:
        if not lease_id:
            self._next_lease += 1
            lease_id = self._next_lease
        if lease_id not in self.leases:  # an existing ID: etcd says "lease already exists"
            self.leases[lease_id] = _Lease(ttl, self.clock.now + ttl)
        return lease_id

    @staticmethod
    def _bytes(value: bytes | str) -> bytes:
        return value.encode() if isinstance(value, str) else value

    def _kv(self, key: str) -> KeyValue | None:
        e = self.data.get(key)
        return None if e is None else KeyValue(key, e.value, e.lease_id, e.mod_revision)

    # ------------------------------------------------------------------ Store

    def key(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix.lstrip('/')}"

    def get(self, key: str) -> KeyValue | None:
        with self._cond:
            self._check("get", key)
            return self._kv(key)

    def put(self, key: str, value: bytes | str, lease_id: int = 0) -> None:
        with self._cond:
            self._check("put", key)
            self._put_locked(key, self._bytes(value), lease_id)

    def delete(self, key: str) -> bool:
        with self._cond:
            self._check("delete", key)
            return self._delete_locked(key)

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        with self._cond:
            self._check("list", prefix)
            items = [kv for k in sorted(self.data) if k.startswith(prefix)
                     for kv in (self._kv(k),) if kv is not None]
            return items, self.revision

    def create(
        self, key: str, value: bytes | str, ttl: int | None, lease_id: int = 0
    ) -> tuple[bool, int, KeyValue | None]:
        with self._cond:
            self._check("create", key)
            if key in self.data:
                return False, 0, self._kv(key)
            if not lease_id and ttl is not None:
                lease_id = self._grant_locked(ttl)
            self._put_locked(key, self._bytes(value), lease_id)
            self._answer("create", key)
            return True, lease_id, None

    def grant(self, ttl: int, lease_id: int = 0) -> int:
        with self._cond:
            self._check("grant")
            lease_id = self._grant_locked(ttl, lease_id)
            self._answer("grant")
            return lease_id

    def revoke(self, lease_id: int) -> None:
        with self._cond:
            self._check("revoke")
            self._revoke_locked(lease_id)  # an unknown lease: nothing to do, as Registry.revoke
            self._answer("revoke")

    def keepalive(self, lease_id: int) -> int:
        with self._cond:
            self._check("keepalive")
            lease = self.leases.get(lease_id)
            if lease is None or lease.expires_at <= self.clock.now:
                self._revoke_locked(lease_id)
                return 0
            lease.expires_at = self.clock.now + lease.ttl
            return lease.ttl

    def lease_ttl(self, lease_id: int) -> int:
        with self._cond:
            lease = self.leases.get(lease_id)
            return -1 if lease is None else max(0, int(lease.expires_at - self.clock.now))

    def events_since(self, prefix: str, revision: int) -> list[WatchEvent]:
        """The raw watch: events under `prefix` from `revision` on; a compacted revision
        fails with kind "compacted", as etcd answers ErrCompacted."""
        with self._cond:
            return self._events_since(prefix, revision)

    def _events_since(self, prefix: str, revision: int) -> list[WatchEvent]:
        if revision <= self.compacted:
            self.stats.count("compacted")
            raise RegistryError(f"watch {prefix}: revision {revision} compacted (at "
                                f"{self.compacted})", "compacted")
        return [e for e in self.history if e.revision >= revision and e.key.startswith(prefix)]

    def watch_prefix(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent | WatchResync]:
        """Replays the history from `start_revision`, then waits for new events (polling the
        stop flag every 50 ms). A compacted start revision yields the whole prefix instead,
        and the watch goes on from that listing, as `Registry.watch_prefix` does."""
        rev = start_revision
        while not stop.is_set():
            with self._cond:
                try:
                    self._check("watch", prefix)
                except RegistryError:
                    self.stats.watch_reconnects += 1
                    pending: list[WatchEvent | WatchResync] = []
                else:
                    try:
                        pending = list(self._events_since(prefix, rev))
                        rev = max(rev, self.revision + 1)
                    except RegistryError:  # compacted: re-list, as Registry.watch_prefix does
                        items = [kv for k in sorted(self.data) if k.startswith(prefix)
                                 for kv in (self._kv(k),) if kv is not None]
                        pending = [WatchResync(tuple(items), self.revision)]
                        rev = self.revision + 1
                    if not pending:
                        self._cond.wait(0.05)
            yield from pending

    def find_v2_value(self, key: str) -> str | None:
        return self.v2.get(key)

    def close(self) -> None:
        self.closed = True


def _fakestore_is_a_store(store: FakeStore) -> object:
    """mypy (when run over tests) checks the fake against the protocol."""
    from netagent.store import Store

    checked: Store = store
    return checked
