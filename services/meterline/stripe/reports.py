"""The Stripe sink's state in Postgres: staged aggregates, reports, and their outcomes.

Life of a report (see migration 002 for the columns):

    stage   aggregates read from Kafka -> stripe_report_items (idempotent by aggregate id),
            added to the *open* report of their (customer, meter, bucket)
    seal    once the bucket is over (+ grace), the report's membership and identifier are
            fixed: open -> pending
    claim   a sink leases due reports: pending -> sending
    finish  accepted | rejected, or back to pending with a later next_attempt_at

Kafka offsets of usage.aggregates are committed only below the lowest offset whose report
is not finished (`unfinished_offset_floor`), so nothing Stripe has not accepted (or the DLQ
has not taken) is ever behind the committed offset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

import asyncpg

from meterline.core.money import MONEY, money_sum

UNFINISHED = ("open", "pending", "sending")


@dataclass(frozen=True, slots=True)
class Staged:
    """One window aggregate as the sink needs it."""

    aggregate_id: str
    customer: str
    meter: str
    event_name: str
    window_start: datetime
    quantity: Decimal
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    customer: str
    meter: str
    event_name: str
    bucket_start: datetime
    quantity: Decimal  # what Stripe is sent: the report's value fixed at sealing (stripe_value)
    identifier: str
    stripe_customer_id: str | None
    attempts: int
    aggregate_count: int


def bucket_of(window_start: datetime, interval_seconds: int) -> datetime:
    """Start of the coalescing bucket holding `window_start` (buckets are aligned to the
    epoch and divide a day, so one never straddles a day or month boundary)."""
    if interval_seconds <= 0:
        return window_start
    epoch = int(window_start.timestamp())
    return datetime.fromtimestamp(epoch - epoch % interval_seconds, UTC)


# Stripe refuses meter events whose timestamp is more than 35 days old.
STRIPE_MAX_AGE_SECONDS = 35 * 86_400
STRIPE_AGE_MARGIN_SECONDS = 60  # the request's own time in flight, clock skew


def stripe_timestamp(bucket_start: datetime, now: datetime, slack_seconds: int) -> int:
    """The meter event's timestamp: its bucket's start, unless that lies just past Stripe's
    35 days while its events do not. A bucket (and a 5 s window) starts up to
    `slack_seconds` before its events, so usage accepted seconds inside meterline's max
    lateness could be refused; it is stamped at the oldest instant Stripe takes instead
    (seconds later: the same billing period). A report older than that is not moved: Stripe
    refuses it and it is dead-lettered, as before."""
    start = int(bucket_start.timestamp())
    oldest = int(now.timestamp()) - STRIPE_MAX_AGE_SECONDS + STRIPE_AGE_MARGIN_SECONDS
    if start < oldest <= start + slack_seconds + STRIPE_AGE_MARGIN_SECONDS:
        return oldest
    return start


# Stripe refuses a meter event value with more than 15 significant digits (API 2026-04-22).
STRIPE_SIGNIFICANT_DIGITS = 15
_STRIPE_DIGITS = Context(prec=STRIPE_SIGNIFICANT_DIGITS, rounding=ROUND_HALF_EVEN)


def stripe_value(quantity: Decimal, carry: Decimal) -> tuple[Decimal, Decimal]:
    """(the value Stripe is sent for a report of `quantity`, the carry left for the next one).

    The rule: send `quantity + carry` rounded to 15 significant digits and carry what the
    rounding left out into the next report of the same customer and meter. Why not a
    per-meter unit or a refusal at intake: the ledger must stay exact to the last digit
    (credits are debited from the exact quantity), and a sum of 15-digit quantities can
    itself need 16; carrying keeps Stripe's total equal to the ledger's over time, off by
    at most half a unit of the last report's 15th digit, which the next report settles.
    Invariant: sent + new carry == quantity + carry, exactly."""
    owed = MONEY.add(quantity, carry)
    sent = _STRIPE_DIGITS.plus(owed).normalize(_STRIPE_DIGITS)
    return sent, MONEY.subtract(owed, sent)


async def stage(conn: asyncpg.Connection, items: Sequence[Staged], interval_seconds: int,
                seal_grace_seconds: float) -> int:
    """Record `items` (ignoring aggregates staged before) and add them to open reports.

    Returns how many were new. One transaction: a crash leaves all or nothing staged.
    """
    if not items:
        return 0
    async with conn.transaction():
        new = {r["aggregate_id"] for r in await conn.fetch(
            """
            INSERT INTO stripe_report_items (aggregate_id, customer_id, meter, window_start,
                                             quantity, kafka_partition, kafka_offset)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                 $5::numeric[], $6::int[], $7::bigint[])
            ON CONFLICT (aggregate_id) DO NOTHING
            RETURNING aggregate_id
            """,
            [i.aggregate_id for i in items], [i.customer for i in items],
            [i.meter for i in items], [i.window_start for i in items],
            [i.quantity for i in items], [i.partition for i in items],
            [i.offset for i in items],
        )}
        groups: dict[tuple[str, str, str, datetime], list[Staged]] = defaultdict(list)
        for i in items:
            if i.aggregate_id in new:
                new.discard(i.aggregate_id)  # a batch may carry one aggregate twice
                groups[(i.customer, i.meter, i.event_name,
                        bucket_of(i.window_start, interval_seconds))].append(i)
        if not groups:
            return 0
        keys = sorted(groups)  # one lock order for concurrent stagers of the same reports
        grace = timedelta(seconds=interval_seconds + seal_grace_seconds)
        rows = await conn.fetch(
            """
            INSERT INTO stripe_reports AS r (customer_id, meter, event_name, bucket_start, part,
                                             quantity, aggregate_count, seal_after)
            SELECT t.c, t.m, t.e, t.b,
                   COALESCE((SELECT max(part) + 1 FROM stripe_reports x
                             WHERE x.customer_id = t.c AND x.meter = t.m
                               AND x.bucket_start = t.b), 0),
                   t.q, t.n, t.b + $7::interval
            FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::numeric[],
                        $6::int[]) WITH ORDINALITY AS t(c, m, e, b, q, n, i)
            ORDER BY t.i
            ON CONFLICT (customer_id, meter, bucket_start) WHERE status = 'open'
            DO UPDATE SET quantity = r.quantity + EXCLUDED.quantity,
                          aggregate_count = r.aggregate_count + EXCLUDED.aggregate_count
            RETURNING r.id, r.customer_id, r.meter, r.bucket_start
            """,
            [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
            [k[3] for k in keys], [money_sum(g.quantity for g in groups[k]) for k in keys],
            [len(groups[k]) for k in keys], grace,
        )
        report_of = {(r["customer_id"], r["meter"], r["bucket_start"]): r["id"] for r in rows}
        ids, reports = [], []
        for (customer, meter, _event, bucket), members in groups.items():
            for m in members:
                ids.append(m.aggregate_id)
                reports.append(report_of[(customer, meter, bucket)])
        await conn.execute(
            """
            UPDATE stripe_report_items i SET report_id = t.r
            FROM unnest($1::text[], $2::bigint[]) AS t(a, r) WHERE i.aggregate_id = t.a
            """, ids, reports)
        return len(ids)


async def seal_due(conn: asyncpg.Connection, now: datetime) -> int:
    """open -> pending for reports whose bucket is over; fixes membership and identifier.

    The rows are locked first (skipping any a stager is adding to right now), and the
    identifier is computed by a later statement, so it sees every item that made it in.
    """
    async with conn.transaction():
        due = [r["id"] for r in await conn.fetch(
            "SELECT id FROM stripe_reports WHERE status = 'open' AND seal_after <= $1"
            " FOR UPDATE SKIP LOCKED", now)]
        if not due:
            return 0
        await conn.execute(
            """
            UPDATE stripe_reports r
            SET status = 'pending', sealed_at = $2, next_attempt_at = $2,
                identifier = CASE WHEN m.n = 1 THEN m.only_id
                                  ELSE 'mlc_' || md5(r.customer_id || '|' || r.meter || '|'
                                       || extract(epoch FROM r.bucket_start)::bigint || '|'
                                       || r.part) END
            FROM (SELECT report_id, count(*) AS n, min(aggregate_id) AS only_id
                  FROM stripe_report_items WHERE report_id = ANY($1::bigint[])
                  GROUP BY report_id) AS m
            WHERE r.id = m.report_id
            """, due, now)
        await _fix_reported_values(conn, due)
        return len(due)


async def _fix_reported_values(conn: asyncpg.Connection, sealed: Sequence[int]) -> None:
    """Set each sealed report's `reported_quantity` (`stripe_value`), carrying the rounding
    remainder from report to report of a (customer, meter) in bucket order. The carry rows
    are locked in (customer, meter) order, so concurrent sealers serialize per meter and
    never deadlock; inside the sealing transaction, so a value is fixed once for all tries."""
    rows = await conn.fetch(
        """SELECT id, customer_id, meter, quantity FROM stripe_reports
           WHERE id = ANY($1::bigint[]) AND status = 'pending'
           ORDER BY customer_id, meter, bucket_start, part""", sealed)
    if not rows:
        return
    pairs = sorted({(r["customer_id"], r["meter"]) for r in rows})
    customers, meters = [p[0] for p in pairs], [p[1] for p in pairs]
    await conn.execute(
        """INSERT INTO stripe_report_carry (customer_id, meter)
           SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING""",
        customers, meters)
    carry = {(r["customer_id"], r["meter"]): r["carry"] for r in await conn.fetch(
        """SELECT c.customer_id, c.meter, c.carry FROM stripe_report_carry c
           JOIN unnest($1::text[], $2::text[]) AS t(c, m) ON c.customer_id = t.c AND c.meter = t.m
           ORDER BY c.customer_id, c.meter FOR UPDATE OF c""", customers, meters)}
    sent = []
    for r in rows:
        key = (r["customer_id"], r["meter"])
        value, carry[key] = stripe_value(r["quantity"], carry[key])
        sent.append(value)
    await conn.execute(
        """UPDATE stripe_reports r SET reported_quantity = t.v
           FROM unnest($1::bigint[], $2::numeric[]) AS t(id, v) WHERE r.id = t.id""",
        [r["id"] for r in rows], sent)
    await conn.execute(
        """UPDATE stripe_report_carry c SET carry = t.v
           FROM unnest($1::text[], $2::text[], $3::numeric[]) AS t(c, m, v)
           WHERE c.customer_id = t.c AND c.meter = t.m""",
        customers, meters, [carry[p] for p in pairs])


async def claim(conn: asyncpg.Connection, limit: int, lease_seconds: float,
                transport: str) -> list[Claimed]:
    """Lease up to `limit` due reports, oldest first.

    A report whose (customer, meter) has another report in flight under a live lease is
    left for later: Stripe allows one concurrent meter-event call per customer and meter.
    The Stripe customer id is looked up now, so a mapping added after sealing is used.
    """
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT id FROM stripe_reports r
            WHERE ((status = 'pending' AND next_attempt_at <= now())
                   OR (status = 'sending' AND lease_until < now()))
              AND NOT EXISTS (SELECT 1 FROM stripe_reports s
                              WHERE s.customer_id = r.customer_id AND s.meter = r.meter
                                AND s.status = 'sending' AND s.lease_until >= now()
                                AND s.id <> r.id)
            ORDER BY next_attempt_at, id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        UPDATE stripe_reports r
        SET status = 'sending', attempts = r.attempts + 1, transport = $3,
            lease_until = now() + make_interval(secs => $2),
            stripe_customer_id = COALESCE(r.stripe_customer_id,
                (SELECT c.stripe_customer_id FROM customers c WHERE c.id = r.customer_id))
        FROM due WHERE r.id = due.id
        RETURNING r.id, r.customer_id, r.meter, r.event_name, r.bucket_start,
                  COALESCE(r.reported_quantity, r.quantity),
                  r.identifier, r.stripe_customer_id, r.attempts, r.aggregate_count
        """, limit, lease_seconds, transport)
    return sorted((Claimed(*r) for r in rows), key=lambda c: (c.bucket_start, c.id))


async def mark_accepted(conn: asyncpg.Connection, done: Sequence[tuple[int, str | None]]) -> None:
    if done:
        await conn.execute(
            """
            UPDATE stripe_reports r
            SET status = 'accepted', accepted_at = now(), lease_until = NULL,
                stripe_response_id = COALESCE(t.rid, r.stripe_response_id)
            FROM unnest($1::bigint[], $2::text[]) AS t(id, rid) WHERE r.id = t.id
            """, [d[0] for d in done], [d[1] for d in done])


async def mark_retry(conn: asyncpg.Connection,
                     retries: Sequence[tuple[int, float, str | None, str | None]]) -> None:
    """(report id, delay seconds, error code, message): back to pending, due after delay."""
    if retries:
        await conn.execute(
            """
            UPDATE stripe_reports r
            SET status = 'pending', lease_until = NULL,
                next_attempt_at = now() + make_interval(secs => t.delay),
                error_code = t.code, last_error = t.msg
            FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::text[]) AS t(id, delay, code, msg)
            WHERE r.id = t.id
            """, [r[0] for r in retries], [r[1] for r in retries],
            [r[2] for r in retries], [(r[3] or "")[:2000] for r in retries])


async def mark_rejected(conn: asyncpg.Connection,
                        rejected: Sequence[tuple[int, str | None, str | None]]) -> None:
    """(report id, error code, message): final; the DLQ holds a copy."""
    if rejected:
        await conn.execute(
            """
            UPDATE stripe_reports r
            SET status = 'rejected', lease_until = NULL, error_code = t.code, last_error = t.msg
            FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t(id, code, msg)
            WHERE r.id = t.id
            """, [r[0] for r in rejected], [r[1] for r in rejected],
            [(r[2] or "")[:2000] for r in rejected])


async def members(conn: asyncpg.Connection, report_id: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT aggregate_id FROM stripe_report_items WHERE report_id = $1 ORDER BY aggregate_id",
        report_id)
    return [r["aggregate_id"] for r in rows]


async def unfinished_offset_floor(conn: asyncpg.Connection) -> dict[int, int]:
    """Per partition, the lowest Kafka offset whose report Stripe has not finished with."""
    rows = await conn.fetch(
        """
        SELECT i.kafka_partition AS p, min(i.kafka_offset) AS o
        FROM stripe_reports r JOIN stripe_report_items i ON i.report_id = r.id
        WHERE r.status = ANY($1::text[]) AND i.kafka_partition IS NOT NULL
        GROUP BY i.kafka_partition
        """, list(UNFINISHED))
    return {r["p"]: r["o"] for r in rows}


async def backlog(conn: asyncpg.Connection) -> dict[str, Any]:
    """Unfinished reports by status and the age of the oldest sealed one (for metrics)."""
    rows = await conn.fetch(
        """
        SELECT status, count(*) AS n,
               extract(epoch FROM now() - min(sealed_at))::float8 AS oldest
        FROM stripe_reports WHERE status = ANY($1::text[]) GROUP BY status
        """, list(UNFINISHED))
    counts = {s: 0 for s in UNFINISHED}
    oldest = 0.0
    for r in rows:
        counts[r["status"]] = r["n"]
        if r["oldest"] is not None:
            oldest = max(oldest, r["oldest"])
    return {"counts": counts, "oldest_sealed_age_seconds": oldest}
