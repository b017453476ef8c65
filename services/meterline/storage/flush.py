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
4. burn the customers' grants (rows locked in customer order), append ledger
   entries and allocations, update balances;
5. write outbox rows (`usage.aggregates`, `billing.balance-changes`);
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
from meterline.core.credits import BalanceChange, Grant, burn_down, debit_for, decimal_text
from meterline.core.events import EPOCH
from meterline.core.windows import Closable, WindowBuffer, WindowValue, as_decimal, fold
from meterline.storage.checkpoints import check_epochs, store_offsets
from meterline.storage.dedupe import confirm


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


PREVIOUS_VALUES = """
SELECT DISTINCT ON (a.customer_id, a.meter, a.window_start)
       a.customer_id, a.meter, a.window_start, a.seq, a.window_value, a.value_time_ms, a.value_offset
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

ENSURE_BALANCES = """
INSERT INTO balances (customer_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""

LOCK_BALANCES = """
SELECT customer_id, balance, granted FROM balances
WHERE customer_id = ANY($1::text[]) ORDER BY customer_id FOR UPDATE
"""

LOCK_GRANTS = """
SELECT id, customer_id, remaining, priority, effective_at, expires_at FROM grants
WHERE customer_id = ANY($1::text[]) AND remaining > 0 ORDER BY customer_id, id FOR UPDATE
"""

INSERT_DEBITS = """
INSERT INTO ledger_entries (customer_id, kind, amount, overage, meter, aggregate_id, reason)
SELECT c, 'debit', a, o, m, g, 'usage'
FROM unnest($1::text[], $2::numeric[], $3::numeric[], $4::text[], $5::text[]) AS u (c, a, o, m, g)
RETURNING id, aggregate_id
"""

INSERT_ALLOCATIONS = """
INSERT INTO debit_allocations (ledger_entry_id, grant_id, credits)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::numeric[])
"""

UPDATE_GRANTS = """
UPDATE grants g SET remaining = u.remaining
FROM unnest($1::bigint[], $2::numeric[]) AS u (id, remaining) WHERE g.id = u.id
"""

UPDATE_BALANCES = """
UPDATE balances b SET balance = u.balance, updated_at = now()
FROM unnest($1::text[], $2::numeric[]) AS u (customer_id, balance) WHERE b.customer_id = u.customer_id
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
) -> FlushResult:
    """Write one flush atomically; raises FencedError (and writes nothing) if fenced off."""
    now = now or datetime.now(UTC)
    result = FlushResult()
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
            await _write_outbox(conn, aggregates, changes, policy)
            result.thresholds_crossed = [t for c in changes for t in c.crossed()]
        await store_offsets(conn, policy.usage_topic, closable.checkpoints)
    return result


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
        credits = debit_for(quantity, meter.credits_per_unit, policy.credit_places)
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
    billable = [a for a in aggregates if a.credits != 0]
    if not billable:
        return []
    customers = sorted({a.window.key.customer for a in billable})
    await conn.execute(ENSURE_BALANCES, customers)
    balances = {r["customer_id"]: r for r in await conn.fetch(LOCK_BALANCES, customers)}
    grants_by_customer: dict[str, list[Grant]] = defaultdict(list)
    for r in await conn.fetch(LOCK_GRANTS, customers):
        grants_by_customer[r["customer_id"]].append(
            Grant(r["id"], r["remaining"], r["priority"], r["effective_at"], r["expires_at"]))

    # Burn in a stable order: customer, window start, meter, seq.
    billable.sort(key=lambda a: (a.window.key.customer, a.window.key.start_ms, a.window.key.meter, a.seq))
    burns = []
    for a in billable:
        grants = grants_by_customer[a.window.key.customer]
        burn, grants_by_customer[a.window.key.customer] = burn_down(grants, a.credits, now)
        burns.append(burn)
    entries = await conn.fetch(
        INSERT_DEBITS,
        [a.window.key.customer for a in billable],
        [-a.credits for a in billable],
        [max(b.overage, Decimal(0)) for b in burns],
        [a.window.key.meter for a in billable],
        [a.id for a in billable],
    )
    entry_of = {r["aggregate_id"]: r["id"] for r in entries}
    alloc_entry, alloc_grant, alloc_credits = [], [], []
    for a, burn in zip(billable, burns, strict=True):
        for grant_id, credits in burn.allocations:
            alloc_entry.append(entry_of[a.id])
            alloc_grant.append(grant_id)
            alloc_credits.append(credits)
    if alloc_entry:
        await conn.execute(INSERT_ALLOCATIONS, alloc_entry, alloc_grant, alloc_credits)
        touched = {g for g in alloc_grant}
        final = [g for gs in grants_by_customer.values() for g in gs if g.id in touched]
        await conn.execute(UPDATE_GRANTS, [g.id for g in final], [g.remaining for g in final])

    changes = []
    by_customer: dict[str, list[_Aggregate]] = defaultdict(list)
    for a in billable:
        by_customer[a.window.key.customer].append(a)
    for customer, aggs in by_customer.items():
        before = balances[customer]["balance"]
        debited = sum((a.credits for a in aggs), Decimal(0))
        changes.append(BalanceChange(
            customer, before, before - debited, balances[customer]["granted"], "usage",
            tuple(entry_of[a.id] for a in aggs), policy.thresholds))
        result.credits_debited += debited
    await conn.execute(UPDATE_BALANCES, [c.customer for c in changes], [c.balance_after for c in changes])
    result.debits = len(billable)
    return changes


async def _write_outbox(
    conn: asyncpg.Connection,
    aggregates: list[_Aggregate],
    changes: list[BalanceChange],
    policy: FlushPolicy,
) -> None:
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
    for c in changes:
        topics.append(policy.balance_changes_topic)
        keys.append(c.customer)
        message = c.to_message()
        payloads.append(orjson.dumps(message))
    await conn.execute(INSERT_OUTBOX, topics, keys, payloads)
