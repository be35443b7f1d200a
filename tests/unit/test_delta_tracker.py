"""DeltaTracker: the pending work always equals the difference of its two views.

The reconciler trusts the tracker to say what to write and what to delete, so the tracker is
checked against the definition (wanted-and-different = update, held-and-unwanted = delete) after
every step of random sequences, and against the event-order properties the reconciler needs:
a sequence reordered across keys, squashed to each key's last event, or replayed twice leaves
the same pending work. A writer loop with failures shows failed keys stay pending until done.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from netagent.kernel import DeltaTracker

KEYS = st.integers(min_value=0, max_value=7)
VALUES = st.sampled_from(["a", "b", "c"])

# one event: (side, key, value or None for a delete)
EVENT = st.tuples(st.sampled_from(["desired", "actual"]), KEYS, st.none() | VALUES)


def apply(t: DeltaTracker[int, str], events: Iterable[tuple[str, int, str | None]]) -> None:
    for side, k, v in events:
        if side == "desired":
            t.delete_desired(k) if v is None else t.set_desired(k, v)
        else:
            t.delete_actual(k) if v is None else t.set_actual(k, v)


def expected(t: DeltaTracker[int, str]) -> tuple[set[int], set[int]]:
    want, have = t.desired, t.actual
    return ({k for k, v in want.items() if have.get(k) != v},
            {k for k in have if k not in want})


def state(t: DeltaTracker[int, str]) -> tuple[object, ...]:
    return (dict(t.desired), dict(t.actual), set(t.pending_updates), set(t.pending_deletes))


@given(st.lists(EVENT, max_size=60))
@settings(max_examples=300, deadline=None)
def test_pending_is_the_difference_after_every_event(events: list[tuple[str, int, str | None]]
                                                      ) -> None:
    t: DeltaTracker[int, str] = DeltaTracker()
    for ev in events:
        apply(t, [ev])
        assert (set(t.pending_updates), set(t.pending_deletes)) == expected(t), ev
        assert t.in_sync() == (expected(t) == (set(), set()))


@given(st.lists(EVENT, max_size=60), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_reordered_across_keys_squashed_and_repeated_agree(
        events: list[tuple[str, int, str | None]], rnd: random.Random) -> None:
    """Only each (side, key)'s last event matters: the same state whether the events come
    interleaved differently across keys, squashed to the last one each, or twice over."""
    base: DeltaTracker[int, str] = DeltaTracker()
    apply(base, events)

    squashed: DeltaTracker[int, str] = DeltaTracker()
    last = {(side, k): v for side, k, v in events}
    apply(squashed, [(side, k, v) for (side, k), v in last.items()])
    assert state(squashed) == state(base)

    # reorder: keep each (side, key)'s own order, shuffle how the streams interleave
    streams: dict[tuple[str, int], list[tuple[str, int, str | None]]] = {}
    for ev in events:
        streams.setdefault((ev[0], ev[1]), []).append(ev)
    order = [sk for sk, evs in streams.items() for _ in evs]
    rnd.shuffle(order)
    cursor = {sk: 0 for sk in streams}
    reordered = []
    for sk in order:
        reordered.append(streams[sk][cursor[sk]])
        cursor[sk] += 1
    shuffled: DeltaTracker[int, str] = DeltaTracker()
    apply(shuffled, reordered)
    assert state(shuffled) == state(base)

    twice: DeltaTracker[int, str] = DeltaTracker()
    apply(twice, events + events)
    assert state(twice) == state(base)


@given(st.dictionaries(KEYS, VALUES), st.dictionaries(KEYS, VALUES),
       st.lists(EVENT, max_size=20))
@settings(max_examples=200, deadline=None)
def test_a_full_read_back_recomputes_everything(want: dict[int, str], kernel: dict[int, str],
                                                before: list[tuple[str, int, str | None]]
                                                ) -> None:
    """Whatever the tracker believed, ``replace_actual`` makes the kernel's view the truth."""
    t: DeltaTracker[int, str] = DeltaTracker()
    apply(t, before)
    for k in list(t.desired):
        t.delete_desired(k)
    for k, v in want.items():
        t.set_desired(k, v)
    t.replace_actual(kernel.items())
    assert dict(t.actual) == kernel
    assert (set(t.pending_updates), set(t.pending_deletes)) == expected(t)


@dataclass(frozen=True)
class Box:
    """A value whose equal copies are different objects (like a dumped kernel entry)."""

    v: int


def test_equal_read_back_keeps_the_wanted_object() -> None:
    """A dumped twin equal to the wanted entry is dropped for the wanted object (memory)."""
    t: DeltaTracker[int, Box] = DeltaTracker()
    wanted = Box(1)
    t.set_desired(1, wanted)
    t.replace_actual([(1, Box(1)), (2, Box(2))])
    assert t.actual[1] is wanted
    assert set(t.pending_updates) == set() and set(t.pending_deletes) == {2}
    t.set_actual(3, Box(3))
    twin = Box(3)
    t.set_desired(3, twin)
    assert t.actual[3] is twin and 3 not in t.pending_updates


class FlakyKernel:
    """Applies writes to a dict; the keys in ``failing`` fail while they are there."""

    def __init__(self) -> None:
        self.table: dict[int, str] = {}
        self.failing: set[int] = set()


def writer_pass(t: DeltaTracker[int, str], kernel: FlakyKernel) -> int:
    """What the reconciler does: walk the pending keys, write, mark only what succeeded."""
    ups, dels = t.pending()
    done = 0
    for k in ups:
        if k not in kernel.failing:
            kernel.table[k] = t.desired[k]
            t.mark_written(k, t.desired[k])
            done += 1
    for k in dels:
        if k not in kernel.failing:
            del kernel.table[k]
            t.delete_actual(k)
            done += 1
    t.trim()
    return done


def test_failed_items_stay_pending_until_they_succeed() -> None:
    t: DeltaTracker[int, str] = DeltaTracker()
    kernel = FlakyKernel()
    kernel.table = {1: "old", 9: "stale"}
    t.replace_actual(kernel.table.items())
    for k in range(1, 6):
        t.set_desired(k, "new")
    kernel.failing = {3, 9}
    assert writer_pass(t, kernel) == 4
    assert set(t.pending_updates) == {3} and set(t.pending_deletes) == {9}
    assert writer_pass(t, kernel) == 0  # still failing: still pending, nothing else redone
    kernel.failing.clear()
    assert writer_pass(t, kernel) == 2
    assert t.in_sync() and kernel.table == dict(t.desired) == {k: "new" for k in range(1, 6)}
    # an outside change seen by a read-back (drift) is pending again
    kernel.table[2] = "drift"
    t.replace_actual(kernel.table.items())
    assert set(t.pending_updates) == {2}
    assert writer_pass(t, kernel) == 1 and t.in_sync()
