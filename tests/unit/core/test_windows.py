"""meterline.core.windows: tumbling windows, closing, checkpoints, restore and fold."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.config import Aggregation
from meterline.core.events import Quantity, UsageEvent
from meterline.core.windows import (
    Closable,
    OpenWindows,
    WindowBuffer,
    WindowKey,
    WindowValue,
    fold,
    window_start_ms,
)

SIZE = 5_000
GRACE = 1_000


def ev(
    time_ms: int,
    offset: int,
    value: Quantity = 1,
    customer: str = "cus_1",
    meter: str = "llm_tokens",
    key: bytes | None = None,
) -> UsageEvent:
    if key is None:
        key = f"{customer}/{meter}/{offset}/{time_ms}".encode()
    return UsageEvent(key, customer, meter, time_ms, value, offset)


def windows(partition: int = 0, start_offset: int = 0) -> OpenWindows:
    w = OpenWindows(SIZE, GRACE)
    w.assign(partition, start_offset)
    return w


def taken_events(closable: Closable) -> list[UsageEvent]:
    return [e for w in closable.windows for e in w.events]


# --- window_start_ms -------------------------------------------------------------------------

WINDOW_STARTS = [
    # the epoch starts a window
    (5_000, 0, 0),
    # the last millisecond of the first window
    (5_000, 4_999, 0),
    # an exact boundary starts the next window
    (5_000, 5_000, 5_000),
    # one past a boundary
    (5_000, 5_001, 5_000),
    # one millisecond before the epoch belongs to the window before it (floor, not truncation)
    (5_000, -1, -5_000),
    # an exact negative boundary starts its own window
    (5_000, -5_000, -5_000),
    # one before a negative boundary
    (5_000, -5_001, -10_000),
    # 1 ms windows: every millisecond is its own window
    (1, 123, 123),
    (1, -7, -7),
    # a size that does not divide 1000
    (7, 13, 7),
    (7, -1, -7),
    # real timestamps, one-minute windows
    (60_000, 1_795_280_700_123, 1_795_280_700_000),
    (60_000, 1_795_280_759_999, 1_795_280_700_000),
]


@pytest.mark.parametrize(("size_ms", "time_ms", "expected"), WINDOW_STARTS)
def test_window_start_ms_floors_to_the_window_boundary(size_ms: int, time_ms: int, expected: int) -> None:
    assert window_start_ms(time_ms, size_ms) == expected


@given(time_ms=st.integers(-(10**13), 10**13), size_ms=st.integers(1, 10**7))
@settings(max_examples=200, deadline=None)
def test_window_start_ms_contains_the_time(time_ms: int, size_ms: int) -> None:
    start = window_start_ms(time_ms, size_ms)

    assert start <= time_ms < start + size_ms
    assert start % size_ms == 0


def test_add_puts_events_in_the_window_window_start_ms_computes() -> None:
    w = windows()
    w.add(0, [ev(-1, 0), ev(4_999, 1), ev(5_000, 2)], next_offset=3, now_ms=0)

    starts = sorted(b.key.start_ms for b in w.take_closable(10**9).windows)

    assert starts == [-5_000, 0, 5_000]


# --- closing ---------------------------------------------------------------------------------


def test_window_is_not_closable_one_ms_before_end_plus_grace() -> None:
    w = windows()
    w.add(0, [ev(1_000, 0)], next_offset=1, now_ms=1_000)

    closable = w.take_closable(SIZE + GRACE - 1)

    assert closable.windows == ()
    assert w.open_window_count() == 1


def test_window_closes_exactly_at_start_plus_size_plus_grace() -> None:
    w = windows()
    w.add(0, [ev(1_000, 0)], next_offset=1, now_ms=1_000)

    closable = w.take_closable(SIZE + GRACE)

    assert [b.key for b in closable.windows] == [WindowKey(0, "cus_1", "llm_tokens", 0)]
    assert [b.late for b in closable.windows] == [False]
    assert w.open_window_count() == 0


def test_closes_at_ms_is_start_plus_size_plus_grace() -> None:
    assert OpenWindows(SIZE, GRACE).closes_at_ms(10_000) == 10_000 + SIZE + GRACE


def test_idle_partition_closes_windows_without_new_events() -> None:
    w = OpenWindows(SIZE, GRACE)
    w.assign(0, 0)
    w.assign(1, 0)
    w.add(0, [ev(100, 0)], next_offset=1, now_ms=100)
    w.add(1, [ev(200, 0, customer="cus_2")], next_offset=1, now_ms=200)
    # partition 1 keeps receiving events for a later window; partition 0 goes quiet
    w.add(1, [ev(20_000, 1, customer="cus_2")], next_offset=2, now_ms=20_000)

    closable = w.take_closable(20_000)

    assert sorted((b.key.partition, b.key.start_ms) for b in closable.windows) == [(0, 0), (1, 0)]
    assert closable.checkpoints == {0: 1, 1: 1}  # partition 1 still holds offset 1


def test_take_closable_with_no_new_events_closes_windows_later() -> None:
    w = windows()
    w.add(0, [ev(0, 0), ev(1, 1)], next_offset=2, now_ms=0)
    assert w.take_closable(1_000).windows == ()

    closable = w.take_closable(6_000)  # nothing added in between

    assert [e.offset for e in taken_events(closable)] == [0, 1]


def test_windows_are_kept_per_partition_customer_meter_and_start() -> None:
    w = OpenWindows(SIZE, GRACE)
    events = [
        ev(0, 0, customer="a"), ev(1, 1, customer="b"), ev(2, 2, customer="a", meter="api_calls"),
        ev(5_000, 3, customer="a"), ev(3, 4, customer="a"),
    ]
    w.add(0, events, next_offset=5, now_ms=0)
    w.add(1, [ev(0, 0, customer="a")], next_offset=1, now_ms=0)

    grouped = {b.key: [e.offset for e in b.events] for b in w.take_closable(10**9).windows}

    assert grouped == {
        WindowKey(0, "a", "llm_tokens", 0): [0, 4],
        WindowKey(0, "b", "llm_tokens", 0): [1],
        WindowKey(0, "a", "api_calls", 0): [2],
        WindowKey(0, "a", "llm_tokens", 5_000): [3],
        WindowKey(1, "a", "llm_tokens", 0): [0],
    }


def test_pending_events_counts_buffered_events() -> None:
    w = windows()
    w.add(0, [ev(0, 0), ev(10_000, 1), ev(10_001, 2)], next_offset=3, now_ms=0)
    assert w.pending_events == 3

    w.take_closable(6_000)

    assert w.pending_events == 2


# --- late events -----------------------------------------------------------------------------


def test_late_event_opens_correction_buffer_for_its_own_window() -> None:
    w = windows()
    w.add(0, [ev(1_000, 0, value=5)], next_offset=1, now_ms=1_000)
    first = w.take_closable(6_000)
    assert [b.late for b in first.windows] == [False]

    w.add(0, [ev(2_000, 1, value=7)], next_offset=2, now_ms=6_000)  # its window closed at 6 000

    [late] = w.take_closable(6_000).windows
    assert late.late is True
    assert late.key == first.windows[0].key  # the same window, not the current one
    assert [e.value for e in late.events] == [7]


def test_late_buffer_is_taken_at_the_next_take_regardless_of_time() -> None:
    w = windows()
    w.add(0, [ev(1_000, 0)], next_offset=1, now_ms=50_000)

    closable = w.take_closable(0)  # a clock that went backwards still flushes corrections

    assert [(b.key.start_ms, b.late) for b in closable.windows] == [(0, True)]
    assert closable.checkpoints == {0: 1}


def test_late_and_regular_buffers_of_one_window_are_separate() -> None:
    w = windows()
    w.add(0, [ev(1_000, 0)], next_offset=1, now_ms=1_000)
    w.add(0, [ev(1_500, 1)], next_offset=2, now_ms=6_000)  # not taken yet, but already closed

    closable = w.take_closable(6_000)

    by_late = {b.late: [e.offset for e in b.events] for b in closable.windows}
    assert by_late == {False: [0], True: [1]}
    assert {b.key for b in closable.windows} == {WindowKey(0, "cus_1", "llm_tokens", 0)}


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_equals_next_offset_when_nothing_is_buffered() -> None:
    w = windows(start_offset=100)
    w.add(0, [ev(0, 100), ev(1, 101), ev(2, 104)], next_offset=105, now_ms=0)

    closable = w.take_closable(6_000)

    assert closable.checkpoints == {0: 105}


def test_checkpoint_never_passes_an_offset_still_buffered_in_an_open_window() -> None:
    w = windows()
    # offset 11 belongs to a later window that stays open
    w.add(0, [ev(0, 10), ev(7_000, 11), ev(1, 12)], next_offset=13, now_ms=0)

    first = w.take_closable(6_000)

    assert [e.offset for e in taken_events(first)] == [10, 12]
    assert first.checkpoints == {0: 11}

    second = w.take_closable(11_000)

    assert [e.offset for e in taken_events(second)] == [11]
    assert second.checkpoints == {0: 13}


def test_checkpoint_uses_the_smallest_buffered_offset_of_several_open_windows() -> None:
    w = windows()
    w.add(0, [ev(10_000, 3), ev(5_000, 4), ev(0, 5)], next_offset=6, now_ms=0)

    closable = w.take_closable(6_000)  # only window 0 closes

    assert closable.checkpoints == {0: 3}


def test_checkpoint_of_another_partition_ignores_this_partitions_buffers() -> None:
    w = OpenWindows(SIZE, GRACE)
    w.assign(0, 0)
    w.assign(1, 0)
    w.add(0, [ev(0, 0)], next_offset=1, now_ms=0)
    w.add(1, [ev(50_000, 0)], next_offset=1, now_ms=0)

    closable = w.take_closable(6_000)

    assert closable.checkpoints == {0: 1, 1: 0}


def test_records_without_accepted_events_still_advance_the_checkpoint() -> None:
    w = windows(start_offset=40)
    w.advance(0, 50)  # rejected or duplicate records 40..49

    closable = w.take_closable(0)

    assert closable.windows == ()
    assert closable.checkpoints == {0: 50}


def test_checkpoint_is_only_reported_when_it_moved() -> None:
    w = windows()
    w.add(0, [ev(0, 0)], next_offset=1, now_ms=0)
    assert w.take_closable(6_000).checkpoints == {0: 1}

    assert w.take_closable(7_000).checkpoints == {}


def test_advance_never_moves_the_next_offset_backwards() -> None:
    w = windows(start_offset=10)
    w.advance(0, 20)
    w.advance(0, 15)

    assert w.next_offset(0) == 20


# --- restore, drop, assign --------------------------------------------------------------------


def test_restore_after_failed_flush_puts_events_back_and_next_take_returns_them() -> None:
    w = windows()
    w.add(0, [ev(0, 0), ev(1, 1), ev(10_000, 2)], next_offset=3, now_ms=0)
    failed = w.take_closable(6_000)
    assert w.pending_events == 1

    w.restore(failed)

    assert w.pending_events == 3
    retry = w.take_closable(6_000)
    assert Counter(taken_events(retry)) == Counter(taken_events(failed))
    assert retry.checkpoints == {0: 2}


def test_restore_returns_the_failed_window_alongside_a_late_buffer_opened_meanwhile() -> None:
    w = windows()
    w.add(0, [ev(0, 0), ev(1, 1)], next_offset=2, now_ms=0)
    failed = w.take_closable(6_000)
    w.add(0, [ev(2, 2)], next_offset=3, now_ms=6_500)  # a late event for the same window

    w.restore(failed)

    retry = w.take_closable(6_500)
    by_late = {b.late: [e.offset for e in b.events] for b in retry.windows}
    assert by_late == {False: [0, 1], True: [2]}
    assert retry.checkpoints == {0: 3}
    assert w.pending_events == 0


def test_restore_into_an_existing_buffer_puts_restored_events_first() -> None:
    w = windows()
    w.add(0, [ev(0, 0)], next_offset=1, now_ms=10_000)  # late
    failed = w.take_closable(10_000)
    w.add(0, [ev(1, 1)], next_offset=2, now_ms=10_000)  # late again, same buffer key

    w.restore(failed)

    [buf] = w.take_closable(10_000).windows
    assert [e.offset for e in buf.events] == [0, 1]
    assert buf.min_offset == 0


def test_restore_skips_partitions_that_were_dropped_meanwhile() -> None:
    w = windows()
    w.add(0, [ev(0, 0)], next_offset=1, now_ms=0)
    failed = w.take_closable(6_000)
    w.drop(0)

    w.restore(failed)

    assert w.pending_events == 0
    assert w.open_window_count() == 0
    assert w.take_closable(10**9).checkpoints == {}


def test_drop_forgets_a_partition() -> None:
    w = OpenWindows(SIZE, GRACE)
    w.assign(0, 0)
    w.assign(1, 0)
    w.add(0, [ev(0, 0), ev(1, 1)], next_offset=2, now_ms=0)
    w.add(1, [ev(0, 0, customer="b")], next_offset=1, now_ms=0)

    w.drop(0)

    assert not w.owns(0) and w.owns(1)
    assert w.next_offset(0) is None
    assert w.pending_events == 1
    closable = w.take_closable(10**9)
    assert {b.key.partition for b in closable.windows} == {1}
    assert closable.checkpoints == {1: 1}


def test_assign_restarts_a_partition_at_the_given_offset_without_old_state() -> None:
    w = windows()
    w.add(0, [ev(0, 0)], next_offset=1, now_ms=0)

    w.assign(0, 500)

    assert w.next_offset(0) == 500
    assert w.pending_events == 0
    assert w.take_closable(10**9).windows == ()


# --- property: nothing lost, nothing doubled ----------------------------------------------------


@st.composite
def stream_and_schedule(draw: st.DrawFn) -> tuple[int, int, list[list[tuple[int, UsageEvent]]], list[int]]:
    size = draw(st.integers(100, 3_000))
    grace = draw(st.integers(0, 1_500))
    n = draw(st.integers(0, 40))
    offsets = {0: 0, 1: 0}
    records: list[tuple[int, UsageEvent]] = []
    for i in range(n):
        p = draw(st.sampled_from([0, 1]))
        t = draw(st.integers(-2_000, 15_000))
        customer = draw(st.sampled_from(["a", "b"]))
        meter = draw(st.sampled_from(["m1", "m2"]))
        records.append((p, UsageEvent(f"k{i}".encode(), customer, meter, t, i, offsets[p])))
        offsets[p] += 1
    # split the stream into runs (batches added in one call)
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=n)))
    runs, prev = [], 0
    for c in [*cuts, n]:
        if c > prev:
            runs.append(records[prev:c])
            prev = c
    # clock advance before each run and how many takes follow it
    steps = draw(st.lists(st.integers(0, 4_000), min_size=len(runs), max_size=len(runs)))
    return size, grace, runs, steps


@given(stream_and_schedule(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_batching_and_take_schedule_yields_every_event_exactly_once(
    schedule: tuple[int, int, list[list[tuple[int, UsageEvent]]], list[int]], data: st.DataObject
) -> None:
    size, grace, runs, steps = schedule
    w = OpenWindows(size, grace)
    w.assign(0, 0)
    w.assign(1, 0)
    now = data.draw(st.integers(-1_000, 5_000))
    taken: list[UsageEvent] = []
    committed = {0: 0, 1: 0}

    def take(at: int) -> None:
        closable = w.take_closable(at)
        for buf in closable.windows:
            for e in buf.events:  # every event sits in its own window
                assert window_start_ms(e.time_ms, size) == buf.key.start_ms
                assert (e.customer, e.meter) == (buf.key.customer, buf.key.meter)
        taken.extend(taken_events(closable))
        buffered = {0: [], 1: []}  # offsets still waiting after this take
        for buf in w.buffers():
            buffered[buf.key.partition].extend(e.offset for e in buf.events)
        for p, cp in closable.checkpoints.items():
            assert cp >= committed[p]  # checkpoints never go back
            assert all(cp <= o for o in buffered[p])  # and never skip a buffered event
            if not buffered[p]:
                assert cp == w.next_offset(p)  # nothing waits: everything read is committed
            committed[p] = cp

    for run, step in zip(runs, steps, strict=True):
        now += step
        by_partition: dict[int, list[UsageEvent]] = {0: [], 1: []}
        for p, e in run:
            by_partition[p].append(e)
        for p, events in by_partition.items():
            if events:
                w.add(p, events, events[-1].offset + 1, now)
        for _ in range(data.draw(st.integers(0, 2))):
            take(now)
    take(now + size + grace + 20_000)  # every window is closed by now

    expected = [e for run in runs for _, e in run]
    assert Counter(taken) == Counter(expected)
    assert len(taken) == len(expected)
    assert w.pending_events == 0
    assert w.open_window_count() == 0
    final_offsets = {p: sum(1 for run in runs for q, _ in run if q == p) for p in (0, 1)}
    for p, n in final_offsets.items():
        if n:
            assert committed[p] == n


# --- fold ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum", "count", "max", "latest"])
def test_fold_of_no_events_without_previous_is_zero(aggregation: Aggregation) -> None:
    assert fold(aggregation, [], None) == (WindowValue(0), 0)


@pytest.mark.parametrize("aggregation", ["sum", "count", "max", "latest"])
def test_fold_of_no_events_keeps_previous_and_bills_nothing(aggregation: Aggregation) -> None:
    previous = WindowValue(Decimal("7.5"), (1_000, 3))

    assert fold(aggregation, [], previous) == (previous, 0)


def test_fold_sum_adds_exact_decimals() -> None:
    value, delta = fold("sum", [ev(0, 0, Decimal("0.1")), ev(1, 1, Decimal("0.2")), ev(2, 2, 3)], None)

    assert value.quantity == Decimal("3.3")
    assert delta == Decimal("3.3")


@pytest.mark.parametrize("aggregation", ["sum", "count"])
def test_fold_sum_and_count_corrections_are_additive(aggregation: Aggregation) -> None:
    first, d1 = fold(aggregation, [ev(0, 0, 2), ev(1, 1, 3)], None)
    second, d2 = fold(aggregation, [ev(2, 2, 4)], first)

    assert (first.quantity, d1) == (5, 5)
    assert (second.quantity, d2) == (9, 4)  # the correction bills only the late events
    assert d1 + d2 == second.quantity


def test_fold_max_bills_the_maximum_first() -> None:
    value, delta = fold("max", [ev(0, 0, 3), ev(1, 1, 9), ev(2, 2, 4)], None)

    assert (value.quantity, delta) == (9, 9)


def test_fold_max_correction_bills_only_the_rise() -> None:
    value, delta = fold("max", [ev(5, 5, 12)], WindowValue(9))

    assert (value.quantity, delta) == (12, 3)


def test_fold_max_correction_with_a_lower_value_bills_nothing() -> None:
    value, delta = fold("max", [ev(5, 5, 4)], WindowValue(9))

    assert (value.quantity, delta) == (9, 0)


def test_fold_latest_takes_the_greatest_time_not_the_last_in_the_list() -> None:
    value, delta = fold("latest", [ev(300, 1, 30), ev(100, 2, 10), ev(200, 3, 20)], None)

    assert (value.quantity, delta, value.at) == (30, 30, (300, 1))


def test_fold_latest_breaks_time_ties_by_offset() -> None:
    value, _ = fold("latest", [ev(100, 8, 80), ev(100, 9, 90), ev(100, 7, 70)], None)

    assert (value.quantity, value.at) == (90, (100, 9))


def test_fold_latest_correction_that_drops_the_value_bills_a_negative_delta() -> None:
    previous = WindowValue(50, (1_000, 4))

    value, delta = fold("latest", [ev(1_500, 9, 20)], previous)

    assert (value.quantity, value.at, delta) == (20, (1_500, 9), -30)


def test_fold_latest_correction_that_raises_the_value_bills_the_difference() -> None:
    value, delta = fold("latest", [ev(1_500, 9, Decimal("62.5"))], WindowValue(50, (1_000, 4)))

    assert (value.quantity, delta) == (Decimal("62.5"), Decimal("12.5"))


def test_fold_latest_ignores_a_late_event_older_than_the_current_latest() -> None:
    previous = WindowValue(50, (1_000, 4))

    assert fold("latest", [ev(900, 12, 1)], previous) == (previous, 0)


def test_fold_latest_same_time_lower_offset_does_not_replace() -> None:
    previous = WindowValue(50, (1_000, 4))

    assert fold("latest", [ev(1_000, 3, 1)], previous) == (previous, 0)


# --- property: duplicates never change the totals -------------------------------------------------


def dedupe_like_flush(
    closable: Closable, seen: set[bytes]
) -> list[tuple[WindowKey, list[UsageEvent]]]:
    """Pure mirror of storage/flush.py `_dedupe`: first occurrence wins within the flush,
    then keys already marked (`seen` stands for the durable dedupe_marks table) are dropped."""
    first: dict[bytes, UsageEvent] = {}
    for w in closable.windows:
        for e in w.events:
            first.setdefault(e.dedupe_key, e)
    new_keys = {k for k in first if k not in seen}  # INSERT ... ON CONFLICT DO NOTHING RETURNING
    seen |= new_keys
    out = []
    for w in closable.windows:
        kept = [e for e in w.events if e.dedupe_key in new_keys and first[e.dedupe_key] is e]
        if kept:
            out.append((w.key, kept))
    return out


def flush_like(
    closable: Closable, seen: set[bytes], stored: dict[tuple[str, str, int], WindowValue]
) -> None:
    """Mirror of flush's `_aggregate` for a `sum` meter: merge a window's buffers, fold into
    the stored value."""
    merged: dict[tuple[str, str, int], list[UsageEvent]] = {}
    for key, kept in dedupe_like_flush(closable, seen):
        merged.setdefault((key.customer, key.meter, key.start_ms), []).extend(kept)
    for k, events in merged.items():
        stored[k], _delta = fold("sum", events, stored.get(k))


@st.composite
def duplicated_stream(draw: st.DrawFn) -> tuple[list[UsageEvent], list[tuple[int, UsageEvent]]]:
    n = draw(st.integers(0, 25))
    distinct = [
        UsageEvent(
            f"src\x00id-{i}".encode(),
            draw(st.sampled_from(["a", "b"])),
            "tokens",
            draw(st.integers(0, 12_000)),
            draw(st.one_of(st.integers(0, 1_000), st.decimals(0, 1_000, places=3))),
            -1,  # the offset comes from the arrival order below
        )
        for i in range(n)
    ]
    copies = [e for e in distinct for _ in range(draw(st.integers(1, 3)))]
    arrival = draw(st.permutations(copies))
    # a redelivery is a new record: its own offset (and possibly another partition)
    next_offset = {0: 0, 1: 0}
    records = []
    for e in arrival:
        p = draw(st.sampled_from([0, 1]))
        records.append((p, UsageEvent(e.dedupe_key, e.customer, e.meter, e.time_ms, e.value,
                                      next_offset[p])))
        next_offset[p] += 1
    return distinct, records


@given(duplicated_stream(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_duplication_and_order_gives_the_totals_of_the_deduplicated_input(
    stream: tuple[list[UsageEvent], list[tuple[int, UsageEvent]]], data: st.DataObject
) -> None:
    distinct, records = stream
    size, grace = 1_000, 500
    w = OpenWindows(size, grace)
    w.assign(0, 0)
    w.assign(1, 0)
    seen: set[bytes] = set()
    stored: dict[tuple[str, str, int], WindowValue] = {}
    now = data.draw(st.integers(0, 6_000))
    i = 0
    while i < len(records):
        run = records[i: i + data.draw(st.integers(1, 5))]
        i += len(run)
        for p in (0, 1):
            events = [e for q, e in run if q == p]
            if events:
                w.add(p, events, events[-1].offset + 1, now)
        if data.draw(st.booleans()):
            flush_like(w.take_closable(now), seen, stored)
        now += data.draw(st.integers(0, 1_500))
    flush_like(w.take_closable(now + 10**6), seen, stored)

    expected: dict[tuple[str, str, int], Quantity] = {}
    for e in distinct:
        k = (e.customer, e.meter, window_start_ms(e.time_ms, size))
        expected[k] = expected.get(k, 0) + e.value
    assert {k: v.quantity for k, v in stored.items()} == expected
    assert seen == {e.dedupe_key for e in distinct}


# --- dedupe reservations kept by a buffer -------------------------------------------


def _ev(key: bytes, offset: int, value: int = 1) -> UsageEvent:
    return UsageEvent(key, "c", "m", 1_000, value, offset)


def test_settle_reservation_drops_rejected_events_and_keeps_later_arrivals_unreserved() -> None:
    buf = WindowBuffer(WindowKey(0, "c", "m", 0), False, token=7)
    for i, k in enumerate((b"a", b"b", b"c")):
        buf.add(_ev(k, i, value=10))
    upto = len(buf.events)
    buf.add(_ev(b"d", 3, value=10))  # arrived while the reservation was in flight

    dropped = buf.settle_reservation(upto, {b"b"})

    assert dropped == 1
    assert [e.dedupe_key for e in buf.events] == [b"a", b"c", b"d"]
    assert buf.reserved == 2 and not buf.fully_reserved
    assert buf.total == 30 and buf.tokens == {7}
    assert (buf.min_offset, buf.max_offset) == (0, 3)


def test_merge_keeps_reserved_events_of_both_buffers_first_and_both_tokens() -> None:
    restored = WindowBuffer(WindowKey(0, "c", "m", 0), False, token=1)
    restored.add(_ev(b"a", 0))
    restored.settle_reservation(1, set())
    newer = WindowBuffer(WindowKey(0, "c", "m", 0), False, token=2)
    newer.add(_ev(b"b", 1))
    newer.settle_reservation(1, set())
    newer.add(_ev(b"c", 2))  # not reserved yet

    restored.merge_from(newer)

    assert [e.dedupe_key for e in restored.events] == [b"a", b"b", b"c"]
    assert restored.reserved == 2
    assert restored.tokens == {1, 2}
