"""The flush: closed windows -> ONE Postgres transaction.

Order inside the transaction, and why it is safe:

1. lock the partitions' checkpoint rows and check our fencing epochs — a
   worker that lost a partition stops here, before writing anything;
2. confirm the windows' dedupe reservations (one `flush_tokens` row per window
   token, see `dedupe.py`): the marks reserved while the windows were open
   become applied in the same transaction as the debits, never before
   (marks that count before their debit commits lose usage on a crash);
3. fold the new events into window aggregates (a late window becomes a
   correction, seq 1, 2, ...), debit `quantity x credits_per_unit`;
4. turn each aggregate's credits into ledger transfers (`meterline.ledger`: it
   locks balances then grants in its one order, writes entries, transfers,
   balances and the `billing.balance-changes` outbox rows);
5. write `usage.aggregates` outbox rows;
6. store the partitions' next offsets.

Commit makes all of it visible at once; a crash anywhere before that leaves
nothing, and the worker (or the partition's next owner) replays from the
previous checkpoint, where the reservations drop what had already been applied.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson

from meterline.config import MeterConfig
from meterline.core.credits import BalanceChange, debit_for, decimal_text
from meterline.core.events import EPOCH
from meterline.core.money import MONEY
from meterline.core.windows import Closable, WindowBuffer, WindowValue, as_decimal, fold
from meterline.ledger.accounts import USAGE_ACCOUNT
from meterline.ledger.book import Entry, open_books, paid_for_windows, post
from meterline.storage.checkpoints import check_epochs, store_offsets
from meterline.storage.dedupe import confirm, confirmed


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    usage_topic: str
    aggregates_topic: str
    balance_changes_topic: str
    meters: Mapping[str, MeterConfig]  # by meter key
    window_size_ms: int
    credit_places: int
    thresholds: tuple[int, ...]


@dataclass(slots=True)
class FlushResult:
    events_new: int = 0
    duplicates: int = 0
    aggregates: int = 0
    corrections: int = 0
    debits: int = 0
    credits_debited: Decimal = Decimal(0)
    thresholds_crossed: list[int] = field(default_factory=list)  # one entry per crossing
    # per meter: events debited, for metrics
    events_by_meter: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # debited events per event-time bucket (TIME_BUCKET_MS), for the latency histogram
    time_counts: Counter[int] = field(default_factory=Counter)


def aggregate_id(customer: str, meter: str, start_ms: int, seq: int) -> str:
    """Deterministic aggregate id; also the Stripe meter-event `identifier` (<= 100 chars)."""
    digest = hashlib.blake2b(
        f"{customer}\x00{meter}\x00{start_ms}\x00{seq}".encode(), digest_size=12
    ).hexdigest()
    return f"agg_{digest}"


def ms_to_dt(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


# The window's latest value, and what all its aggregates debited so far.
PREVIOUS_VALUES = """
SELECT DISTINCT ON (a.customer_id, a.meter, a.window_start)
       a.customer_id, a.meter, a.window_start, a.seq, a.window_value, a.value_time_ms, a.value_offset,
       sum(a.credits) OVER (PARTITION BY a.customer_id, a.meter, a.window_start) AS debited
FROM window_aggregates a
JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS w (customer_id, meter, window_start)
  USING (customer_id, meter, window_start)
ORDER BY a.customer_id, a.meter, a.window_start, a.seq DESC
"""

INSERT_AGGREGATES = """
INSERT INTO window_aggregates (id, customer_id, meter, window_start, window_end, seq, quantity,
    window_value, value_time_ms, value_offset, event_count, credits, kafka_partition,
    first_offset, last_offset)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
    $6::int[], $7::numeric[], $8::numeric[], $9::bigint[], $10::bigint[], $11::int[],
    $12::numeric[], $13::int[], $14::bigint[], $15::bigint[])
"""

INSERT_OUTBOX = """
INSERT INTO outbox (topic, key, payload) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
"""


@dataclass(slots=True)
class _Aggregate:
    id: str
    window: WindowBuffer  # its events are the new (deduplicated) ones
    seq: int
    value: WindowValue
    quantity: Decimal | int
    credits: Decimal


async def flush(
    conn: asyncpg.Connection,
    closable: Closable,
    epochs: dict[int, int],
    policy: FlushPolicy,
    now: datetime | None = None,
    result: FlushResult | None = None,
) -> FlushResult:
    """Write one flush atomically; raises FencedError (and writes nothing) if fenced off.

    Pass `result` to keep what the flush wrote even when its COMMIT is never acknowledged
    (the connection broke): `flush_committed` then says whether it counts.
    """
    now = now or datetime.now(UTC)
    result = result if result is not None else FlushResult()
    async with conn.transaction():
        partitions = {w.key.partition for w in closable.windows} | set(closable.checkpoints)
        await check_epochs(conn, policy.usage_topic, {p: epochs[p] for p in partitions})

        if not all(w.fully_reserved for w in closable.windows):
            raise RuntimeError("flush of windows with unreserved events")  # a caller bug
        await confirm(conn, sorted({t for w in closable.windows for t in w.tokens}))
        fresh = [w for w in closable.windows if w.events]
        result.events_new = sum(len(w.events) for w in fresh)
        aggregates = await _aggregate(conn, fresh, policy, result)
        if aggregates:
            await _insert_aggregates(conn, aggregates, policy)
            changes = await _debit(conn, aggregates, policy, now, result)
            await _write_outbox(conn, aggregates, policy)
            result.thresholds_crossed = [t for c in changes for t in c.crossed()]
        await store_offsets(conn, policy.usage_topic, closable.checkpoints)
    return result


async def flush_committed(conn: asyncpg.Connection | asyncpg.Pool, closable: Closable) -> bool:
    """Did the flush of `closable` commit? For a flush whose COMMIT went unanswered.

    Its window tokens are inserted into `flush_tokens` by that flush's transaction and by
    nothing else, so all present = it committed, none present = it did not. A flush without
    windows wrote only checkpoints, which are idempotent to write again: False.
    """
    tokens = sorted({t for w in closable.windows for t in w.tokens})
    if not tokens:
        return False
    found = await confirmed(conn, tokens)
    if 0 < found < len(tokens):  # atomicity says never; re-applying would debit twice
        raise RuntimeError(f"flush half-committed? {found} of {len(tokens)} tokens confirmed")
    return found == len(tokens)


async def _aggregate(
    conn: asyncpg.Connection,
    fresh: list[WindowBuffer],
    policy: FlushPolicy,
    result: FlushResult,
) -> list[_Aggregate]:
    if not fresh:
        return []
    # A window can appear twice in one flush (its regular and its late buffer, or two
    # partitions when a producer mis-keyed): one aggregate per window.
    merged: dict[tuple[str, str, int], WindowBuffer] = {}
    for w in fresh:
        k = (w.key.customer, w.key.meter, w.key.start_ms)
        if k in merged:
            both = WindowBuffer(merged[k].key, merged[k].late)
            both.absorb(merged[k])
            both.absorb(w)  # reserved events of one flush never share a key
            merged[k] = both
        else:
            merged[k] = w
    keys = list(merged)
    rows = await conn.fetch(
        PREVIOUS_VALUES, [k[0] for k in keys], [k[1] for k in keys], [ms_to_dt(k[2]) for k in keys]
    )
    previous = {
        (r["customer_id"], r["meter"], (r["window_start"] - EPOCH) // timedelta(milliseconds=1)): r
        for r in rows
    }
    aggregates = []
    for k, w in merged.items():
        meter = policy.meters[k[1]]
        prev_row = previous.get(k)
        prev = None
        seq = 0
        if prev_row is not None:
            seq = prev_row["seq"] + 1
            prev = WindowValue(prev_row["window_value"],
                               (prev_row["value_time_ms"], prev_row["value_offset"]))
        value, quantity = fold(meter.aggregation, w.events, prev, total=w.total)
        # Invariant 3: the window's debits add up to round(final value x rate) exactly,
        # however its events were split; never a sum of separately rounded deltas.
        credits = MONEY.subtract(
            debit_for(value.quantity, meter.credits_per_unit, policy.credit_places),
            prev_row["debited"] if prev_row is not None else 0)
        aggregates.append(_Aggregate(aggregate_id(*k, seq), w, seq, value, quantity, credits))
        result.events_by_meter[meter.key] += len(w.events)
        for bucket, n in w.time_counts.items():
            result.time_counts[bucket] += n
        result.corrections += seq > 0
    result.aggregates = len(aggregates)
    return aggregates


async def _insert_aggregates(
    conn: asyncpg.Connection, aggregates: list[_Aggregate], policy: FlushPolicy
) -> None:
    size = policy.window_size_ms
    cols: list[list[object]] = [[] for _ in range(15)]
    for a in aggregates:
        w = a.window
        k = w.key
        row = (a.id, k.customer, k.meter, ms_to_dt(k.start_ms), ms_to_dt(k.start_ms + size), a.seq,
               a.quantity, a.value.quantity, a.value.at[0], a.value.at[1], len(w.events), a.credits,
               k.partition, w.min_offset, w.max_offset)
        for col, v in zip(cols, row, strict=True):
            col.append(v)
    await conn.execute(INSERT_AGGREGATES, *cols)


async def _debit(
    conn: asyncpg.Connection,
    aggregates: list[_Aggregate],
    policy: FlushPolicy,
    now: datetime,
    result: FlushResult,
) -> list[BalanceChange]:
    """The aggregates' credits as ledger transfers: grants (or the receivable) -> usage for
    a debit, and the reversal of what paid the window for a credit-back (meterline.ledger)."""
    billable = [a for a in aggregates if a.credits != 0]
    if not billable:
        return []
    backs = [_window_of(a) for a in billable if a.credits < 0]
    paid = await paid_for_windows(conn, backs) if backs else {}
    books = await open_books(conn, (a.window.key.customer for a in billable),
                             [p.source.grant for ps in paid.values() for p in ps
                              if p.source.grant is not None])
    # Burn in a stable order: customer, window start, meter, seq.
    billable.sort(key=lambda a: (a.window.key.customer, a.window.key.start_ms, a.window.key.meter, a.seq))
    entries = []
    for a in billable:
        k = a.window.key
        book = books[k.customer]
        if a.credits > 0:
            transfers = book.use(a.credits, ms_to_dt(k.start_ms), now, USAGE_ACCOUNT, "usage")
        else:
            transfers = book.credit_back(MONEY.minus(a.credits), paid.get(_window_of(a), []), now)
        entries.append(Entry(k.customer, "debit", "usage", tuple(transfers), meter=k.meter,
                             aggregate_id=a.id))
        result.credits_debited = MONEY.add(result.credits_debited, a.credits)
    result.debits = len(billable)
    return await post(conn, books, entries, policy.balance_changes_topic, policy.thresholds)


def _window_of(a: _Aggregate) -> tuple[str, str, datetime]:
    return a.window.key.customer, a.window.key.meter, ms_to_dt(a.window.key.start_ms)


async def _write_outbox(
    conn: asyncpg.Connection, aggregates: list[_Aggregate], policy: FlushPolicy
) -> None:
    """usage.aggregates rows (the balance changes are the ledger's, written by `post`)."""
    topics, keys, payloads = [], [], []
    size = policy.window_size_ms
    for a in aggregates:
        k = a.window.key
        meter = policy.meters[k.meter]
        topics.append(policy.aggregates_topic)
        keys.append(k.customer)
        payloads.append(orjson.dumps({
            "id": a.id,
            "customer": k.customer,
            "meter": k.meter,
            "stripe_event_name": meter.stripe_event_name,
            "window_start": ms_to_dt(k.start_ms).isoformat(),
            "window_end": ms_to_dt(k.start_ms + size).isoformat(),
            "seq": a.seq,
            "correction": a.seq > 0,
            "quantity": decimal_text(as_decimal(a.quantity)),
            "window_value": decimal_text(as_decimal(a.value.quantity)),
            "credits": decimal_text(a.credits),
            "event_count": len(a.window.events),
        }))
    await conn.execute(INSERT_OUTBOX, topics, keys, payloads)
