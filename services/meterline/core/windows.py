"""Event-time tumbling windows per (partition, customer, meter), closed by a processing-time clock.

Pure: the processor feeds accepted events in and takes closable windows out;
`now_ms` is always passed in, so tests drive time.

Invariants kept here:
- a window [start, start + size) closes when `now_ms >= start + size + grace`,
  so an idle partition never holds a window open;
- an event whose window already closed is never dropped: it opens a *late*
  buffer for that same window, flushed at the next tick as a correction;
- `checkpoints()` never passes an offset whose event still waits in a buffer,
  so a crash can only replay events (which the durable dedupe marks absorb),
  never skip them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from meterline.config import Aggregation
from meterline.core.events import Quantity, UsageEvent
from meterline.core.money import add, subtract


def window_start_ms(time_ms: int, size_ms: int) -> int:
    """Start of the tumbling window holding `time_ms` (floor, also for pre-1970 times)."""
    return time_ms - time_ms % size_ms


@dataclass(frozen=True, slots=True)
class WindowKey:
    partition: int
    customer: str
    meter: str
    start_ms: int


TIME_BUCKET_MS = 250  # resolution of the event-time counts kept for the latency histogram


@dataclass(slots=True)
class WindowBuffer:
    """Events of one window waiting for their flush, deduplicated within the window.

    `total`, the offset range and the event-time counts are kept as events
    arrive, so a flush that finds no duplicates in Postgres does no per-event work.
    """

    key: WindowKey
    late: bool  # opened after the window had closed: becomes a correction aggregate
    # Dedupe reservations (storage/dedupe.py): events[:reserved] hold reserved marks
    # under one of `tokens`; new reservations use `token`. The flush confirms `tokens`.
    token: int = 0
    events: list[UsageEvent] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    reserved: int = 0
    tokens: set[int] = field(default_factory=set)
    total: Quantity = 0
    min_offset: int = 2**63
    max_offset: int = -1
    time_counts: dict[int, int] = field(default_factory=dict)  # event time // TIME_BUCKET_MS

    def add(self, ev: UsageEvent) -> bool:
        """Add an event; False if this window already holds its dedupe key."""
        if ev.dedupe_key in self.keys:
            return False
        self.keys.add(ev.dedupe_key)
        self.events.append(ev)
        self.total = add(self.total, ev.value)  # MONEY context: 28 digits would lose the tail
        if ev.offset < self.min_offset:
            self.min_offset = ev.offset
        if ev.offset > self.max_offset:
            self.max_offset = ev.offset
        bucket = ev.time_ms // TIME_BUCKET_MS
        self.time_counts[bucket] = self.time_counts.get(bucket, 0) + 1
        return True

    @property
    def fully_reserved(self) -> bool:
        return self.reserved == len(self.events)

    def settle_reservation(self, upto: int, rejected: set[bytes]) -> int:
        """Events[reserved:upto] were sent for reservation; drop the `rejected` (duplicates).

        Events appended meanwhile (after `upto`) stay unreserved. Returns how many were dropped.
        """
        self.tokens.add(self.token)
        sent = self.events[self.reserved:upto]
        kept = [e for e in sent if e.dedupe_key not in rejected] if rejected else sent
        dropped = len(sent) - len(kept)
        if dropped:
            head, tail = self.events[:self.reserved], self.events[upto:]
            self._rebuild(head + kept + tail)
        self.reserved += len(kept)
        return dropped

    def absorb(self, other: WindowBuffer) -> None:
        """Append `other`'s events; their keys must differ from ours (reservations ensure it)."""
        self.events.extend(other.events)
        self.keys |= other.keys
        self.total = add(self.total, other.total)
        self.min_offset = min(self.min_offset, other.min_offset)
        self.max_offset = max(self.max_offset, other.max_offset)
        for bucket, n in other.time_counts.items():
            self.time_counts[bucket] = self.time_counts.get(bucket, 0) + n
        self.reserved += other.reserved
        self.tokens |= other.tokens

    def merge_from(self, other: WindowBuffer) -> None:
        """Take `other`'s events after ours, keeping reserved events first (both token sets)."""
        events = (self.events[:self.reserved] + other.events[:other.reserved]
                  + self.events[self.reserved:] + other.events[other.reserved:])
        reserved = self.reserved + other.reserved
        self.tokens |= other.tokens
        self._rebuild(events)
        self.reserved = reserved

    def _rebuild(self, events: list[UsageEvent]) -> None:
        self.events, self.keys, self.total = [], set(), 0
        self.min_offset, self.max_offset, self.time_counts = 2**63, -1, {}
        for ev in events:
            self.add(ev)


@dataclass(frozen=True, slots=True)
class Closable:
    """What one flush writes: closed windows plus the offsets it may commit."""

    windows: tuple[WindowBuffer, ...]
    # partition -> next offset to consume after this flush commits (Kafka convention).
    checkpoints: dict[int, int]

    @property
    def event_count(self) -> int:
        return sum(len(w.events) for w in self.windows)


class OpenWindows:
    """One worker's window state for the partitions it owns."""

    def __init__(self, size_ms: int, grace_ms: int, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.size_ms = size_ms
        self.grace_ms = grace_ms
        # keyed by the plain tuple (partition, customer, meter, start_ms, late): tuple hashing
        # is C-fast, and a WindowKey is built only when a buffer is created
        self._buffers: dict[tuple[int, str, str, int, bool], WindowBuffer] = {}
        self._next_offset: dict[int, int] = {}  # partition -> offset after the last ingested record
        self._dirty: set[int] = set()  # partitions whose checkpoint moved since the last take
        self.pending_events = 0
        self.duplicates_dropped = 0  # within-window duplicates, dropped on arrival

    def closes_at_ms(self, start_ms: int) -> int:
        return start_ms + self.size_ms + self.grace_ms

    def assign(self, partition: int, start_offset: int) -> None:
        """Start (or restart) a partition at `start_offset`, forgetting any state it had."""
        self.drop(partition)
        self._next_offset[partition] = start_offset

    def drop(self, partition: int) -> None:
        """Forget a partition (revoked, or fenced): its owner will replay from the durable checkpoint."""
        for k in [k for k in self._buffers if k[0] == partition]:
            self.pending_events -= len(self._buffers.pop(k).events)
        self._next_offset.pop(partition, None)
        self._dirty.discard(partition)

    def owns(self, partition: int) -> bool:
        return partition in self._next_offset

    def next_offset(self, partition: int) -> int | None:
        return self._next_offset.get(partition)

    def add(self, partition: int, events: Iterable[UsageEvent], next_offset: int, now_ms: int) -> None:
        """Buffer accepted events of records up to `next_offset - 1` of `partition`."""
        size, buffers = self.size_ms, self._buffers
        n = 0
        closed_before = now_ms - size - self.grace_ms  # windows starting at or before this are closed
        for ev in events:
            start = ev.time_ms - ev.time_ms % size
            late = start <= closed_before
            k = (partition, ev.customer, ev.meter, start, late)
            buf = buffers.get(k)
            if buf is None:
                buf = buffers[k] = WindowBuffer(
                    WindowKey(partition, ev.customer, ev.meter, start), late, self._rng.getrandbits(63))
            if buf.add(ev):
                n += 1
            else:
                self.duplicates_dropped += 1
        self.pending_events += n
        self.advance(partition, next_offset)

    def advance(self, partition: int, next_offset: int) -> None:
        """Records before `next_offset` are handled (buffered, rejected or duplicates)."""
        if next_offset > self._next_offset.get(partition, -1):
            self._next_offset[partition] = next_offset
            self._dirty.add(partition)

    def take_closable(self, now_ms: int) -> Closable:
        """Remove and return every window closed at `now_ms` (and every late buffer).

        The checkpoint of a partition is the smallest offset still waiting in a
        buffer that stays open, else the partition's next offset.
        """
        taken: list[WindowBuffer] = []
        for k, buf in list(self._buffers.items()):
            if buf.late or now_ms >= self.closes_at_ms(buf.key.start_ms):
                taken.append(self._buffers.pop(k))
        touched = {w.key.partition for w in taken} | self._dirty
        self._dirty = set()
        checkpoints = {p: self._next_offset[p] for p in touched if p in self._next_offset}
        for buf in self._buffers.values():
            p = buf.key.partition
            if p in checkpoints and buf.min_offset < checkpoints[p]:
                checkpoints[p] = buf.min_offset
        self.pending_events -= sum(len(w.events) for w in taken)
        return Closable(tuple(taken), checkpoints)

    def restore(self, closable: Closable) -> None:
        """Put back windows whose flush failed, so the next tick retries them."""
        for buf in closable.windows:
            if not self.owns(buf.key.partition):
                continue  # partition moved away meanwhile: the new owner replays it
            k = (buf.key.partition, buf.key.customer, buf.key.meter, buf.key.start_ms, buf.late)
            mine = self._buffers.get(k)
            if mine is None:
                self._buffers[k] = buf
                self.pending_events += len(buf.events)
            else:  # events arrived for this window since the take: merge, restored ones first
                before = len(mine.events)
                buf.merge_from(mine)
                self._buffers[k] = buf
                self.pending_events += len(buf.events) - before
        self._dirty |= {p for p in closable.checkpoints if self.owns(p)}

    def open_window_count(self) -> int:
        return len(self._buffers)

    def buffers(self) -> list[WindowBuffer]:
        """The buffers still waiting (for inspection: views and tests)."""
        return list(self._buffers.values())


# --- Aggregation -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowValue:
    """A window's aggregated value so far; `at` orders `latest` (event time, offset)."""

    quantity: Quantity
    at: tuple[int, int] = (0, -1)


def fold(
    aggregation: Aggregation,
    events: Sequence[UsageEvent],
    previous: WindowValue | None,
    total: Quantity | None = None,
) -> tuple[WindowValue, Quantity]:
    """Fold new (deduplicated) events into a window; return its new value and the delta to bill.

    The delta is what this aggregate adds to the window: for `sum`/`count` the
    new events' total; for `max` how far the maximum rose; for `latest` the
    change of the latest value (may be negative: a correction credits back).
    """
    if not events:
        return previous or WindowValue(0), 0
    if aggregation in ("sum", "count"):
        if total is None:  # a buffer passes its running total
            total = 0
            for e in events:
                total = add(total, e.value)
        base = previous.quantity if previous else 0
        return WindowValue(add(base, total), previous.at if previous else (0, -1)), total
    if aggregation == "max":
        top = max(e.value for e in events)
        if previous is None:
            return WindowValue(top), top
        new = max(previous.quantity, top)
        return WindowValue(new), subtract(new, previous.quantity)
    # latest: the value of the event with the greatest (time, offset)
    last = max(events, key=lambda e: (e.time_ms, e.offset))
    at = (last.time_ms, last.offset)
    if previous is None:
        return WindowValue(last.value, at), last.value
    if at <= previous.at:
        return previous, 0
    return WindowValue(last.value, at), subtract(last.value, previous.quantity)


def as_decimal(q: Quantity) -> Decimal:
    return q if isinstance(q, Decimal) else Decimal(q)
