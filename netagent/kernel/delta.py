"""A desired/actual table with its pending work kept up to date as either side changes.

Modelled on Calico Felix's ``deltatracker``: two views keyed alike (what we want in the kernel,
and what we believe the kernel holds), and from every change to either view, incrementally,
the keys that need a write (``pending_updates``: wanted but missing or different) and the keys
that need a delete (``pending_deletes``: held but no longer wanted). A writer walks the pending
keys, does its I/O, and marks each one done (:meth:`DeltaTracker.set_actual` /
:meth:`DeltaTracker.delete_actual`); what failed is simply not marked and stays pending.

Pure bookkeeping: no I/O, no order, no ownership rules (those are the reconciler's). Values are
compared with ``==``; when a held value equals the wanted one, the table keeps the wanted object
and drops the other (a read-back of 15,000 entries would otherwise keep 15,000 twins alive).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DeltaTracker(Generic[K, V]):
    """Desired and actual values by key, and the keys where they differ (values are never
    None: None is how a lookup says "no value")."""

    __slots__ = ("_desired", "_actual", "_updates", "_deletes", "touched")

    def __init__(self) -> None:
        self._desired: dict[K, V] = {}
        self._actual: dict[K, V] = {}
        #: keys wanted whose actual value is missing or different
        self._updates: set[K] = set()
        #: keys held that nothing wants
        self._deletes: set[K] = set()
        #: while a read-back runs in slices: the keys whose actual side changed meanwhile
        #: (a write, a kernel event), which the read-back may have seen before the change
        self.touched: set[K] | None = None

    # -- read-only views

    @property
    def desired(self) -> Mapping[K, V]:
        return self._desired

    @property
    def actual(self) -> Mapping[K, V]:
        return self._actual

    @property
    def pending_updates(self) -> frozenset[K] | set[K]:
        """Keys to write (the desired value); a copy is not made: do not mutate the tracker
        while iterating it (use :meth:`pending` for a snapshot)."""
        return self._updates

    @property
    def pending_deletes(self) -> frozenset[K] | set[K]:
        """Keys to delete (the actual value)."""
        return self._deletes

    def pending(self) -> tuple[list[K], list[K]]:
        """A snapshot of (keys to write, keys to delete), safe to walk while marking."""
        return list(self._updates), list(self._deletes)

    def in_sync(self) -> bool:
        return not self._updates and not self._deletes

    # -- the desired side

    def set_desired(self, key: K, value: V) -> None:
        self._desired[key] = value
        have = self._actual.get(key)
        if have is None:  # a key only pending deletion is always held, so none to cancel
            self._updates.add(key)
            return
        self._deletes.discard(key)
        if have is value:
            self._updates.discard(key)
        elif have == value:
            self._actual[key] = value  # one object per entry
            self._updates.discard(key)
        else:
            self._updates.add(key)

    def delete_desired(self, key: K) -> None:
        if self._desired.pop(key, None) is None:
            return
        self._updates.discard(key)
        if key in self._actual:
            self._deletes.add(key)

    # -- the actual side (what a read-back found, or what a write just did)

    def set_actual(self, key: K, value: V) -> None:
        """The kernel holds ``value`` at ``key`` (a write succeeded, or a read-back saw it)."""
        if self.touched is not None:
            self.touched.add(key)
        want = self._desired.get(key)
        if want is None:
            self._actual[key] = value
            self._deletes.add(key)
            self._updates.discard(key)
        elif want is value or want == value:
            self._actual[key] = want
            self._updates.discard(key)
            self._deletes.discard(key)
        else:
            self._actual[key] = value
            self._updates.add(key)

    def mark_written(self, key: K, value: V) -> None:
        """A write of the desired ``value`` at ``key`` succeeded: the cheap form of
        :meth:`set_actual` for the writer's hot path (``value`` must be ``desired[key]``)."""
        if self.touched is not None:
            self.touched.add(key)
        self._actual[key] = value
        self._updates.discard(key)

    def delete_actual(self, key: K) -> None:
        """The kernel holds nothing at ``key`` (a delete succeeded, or the device went away)."""
        if self.touched is not None:
            self.touched.add(key)
        self._actual.pop(key, None)
        self._deletes.discard(key)
        if key in self._desired:
            self._updates.add(key)

    def replace_actual(self, items: Iterable[tuple[K, V]]) -> None:
        """A full read-back: the kernel holds exactly ``items``; every key is compared afresh
        (by dict lookups only)."""
        want = self._desired
        actual: dict[K, V] = {}
        updates: set[K] = set()
        deletes: set[K] = set()
        seen = hits = 0
        for k, v in items:
            seen += 1
            w = want.get(k)
            if w is None:
                deletes.add(k)
            elif w is v or w == v:
                # an entry equal to the wanted one is kept as that object, so the dumped copy
                # is freed at once (15,000 copies would otherwise raise the peak RSS by ~6 MB)
                v = w
                hits += 1
            else:
                updates.add(k)
                hits += 1
            actual[k] = v
        if seen != len(actual):  # a key seen twice (the last value stands): compare afresh
            updates, deletes = set(), set()
            hits = 0
            for k, v in actual.items():
                w = want.get(k)
                if w is None:
                    deletes.add(k)
                else:
                    hits += 1
                    if w is not v and w != v:
                        updates.add(k)
        if hits != len(want):  # some wanted keys are not held at all (skipped when all are)
            updates.update(want.keys() - actual.keys())
        self._actual, self._updates, self._deletes = actual, updates, deletes

    def trim(self) -> None:
        """Give back the memory of emptied pending sets (a set never shrinks its table: after a
        first sync of 5,000 peers the emptied sets would keep ~1.5 MB)."""
        if not self._updates:
            self._updates = set()
        if not self._deletes:
            self._deletes = set()
