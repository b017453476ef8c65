"""Grants into the ledger: idempotent grants, plan allocations, expiry write-offs, config sync.

Every function here changes balances only through ledger entries, in one
transaction, and publishes the change through the outbox.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson

from meterline.config import PlanConfig, Settings
from meterline.core.credits import BalanceChange, Grant, burn_down

INSERT_GRANT = """
INSERT INTO grants (customer_id, amount, remaining, priority, effective_at, expires_at, source, source_ref)
VALUES ($1, $2, $2, $3, $4, $5, $6, $7)
ON CONFLICT (source, source_ref) DO NOTHING
RETURNING id
"""

LOCK_BALANCE = """
INSERT INTO balances (customer_id) VALUES ($1)
ON CONFLICT (customer_id) DO UPDATE SET customer_id = excluded.customer_id
RETURNING balance, granted
"""

APPLY_TO_BALANCE = """
UPDATE balances SET balance = balance + $2, granted = granted + $3, updated_at = now()
WHERE customer_id = $1
"""

INSERT_ENTRY = """
INSERT INTO ledger_entries (customer_id, kind, amount, grant_id, reason, overage)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id
"""

LOCK_USABLE_GRANTS = """
SELECT id, remaining, priority, effective_at, expires_at FROM grants
WHERE customer_id = $1 AND remaining > 0 ORDER BY id FOR UPDATE
"""

SET_REMAINING = """
UPDATE grants g SET remaining = u.remaining
FROM unnest($1::bigint[], $2::numeric[]) AS u (id, remaining) WHERE g.id = u.id
"""

INSERT_ALLOCATIONS = """
INSERT INTO debit_allocations (ledger_entry_id, grant_id, credits)
SELECT $1, * FROM unnest($2::bigint[], $3::numeric[])
"""

EXPIRED = """
SELECT id, customer_id, amount, remaining FROM grants
WHERE expires_at <= $1 AND remaining > 0 ORDER BY customer_id, id FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class GrantRequest:
    customer: str
    amount: Decimal
    source: str
    source_ref: str
    priority: int = 10
    effective_at: datetime | None = None
    expires_at: datetime | None = None
    reason: str = "grant"


async def apply_grant(
    conn: asyncpg.Connection, req: GrantRequest, balance_topic: str, thresholds: tuple[int, ...]
) -> int | None:
    """Grant credits once per (source, source_ref); return the grant id, or None if already granted."""
    applied = await apply_grant_change(conn, req, balance_topic, thresholds)
    return None if applied is None else applied[0]


async def apply_grant_change(
    conn: asyncpg.Connection, req: GrantRequest, balance_topic: str, thresholds: tuple[int, ...]
) -> tuple[int, BalanceChange] | None:
    """`apply_grant` that also returns the balance change (its ledger entry id, balance after)."""
    async with conn.transaction():
        grant_id = await conn.fetchval(
            INSERT_GRANT, req.customer, req.amount, req.priority,
            req.effective_at or datetime.now(UTC), req.expires_at, req.source, req.source_ref)
        if grant_id is None:
            return None
        change = await _ledger_change(conn, req.customer, "grant", req.amount, req.amount,
                                      grant_id, req.reason, balance_topic, thresholds)
        return int(grant_id), change


async def apply_adjustment(
    conn: asyncpg.Connection,
    customer: str,
    amount: Decimal,
    reason: str,
    balance_topic: str,
    thresholds: tuple[int, ...],
    now: datetime,
) -> BalanceChange:
    """Take `-amount` credits off a customer (amount < 0) as one `adjustment` ledger entry.

    The credits come out of the usable grants in burn-down order, exactly as a
    debit would take them; otherwise an expiry would later write off credits an
    adjustment had already removed. What no grant covers takes the balance below
    zero and is recorded as the entry's overage. Not idempotent by itself: the
    caller records its idempotency key in the same transaction.
    """
    if amount >= 0:
        raise ValueError("an adjustment removes credits: amount must be negative")
    async with conn.transaction():
        await conn.fetchrow(LOCK_BALANCE, customer)  # balance before grants, as the flush does
        grants = [Grant(r["id"], r["remaining"], r["priority"], r["effective_at"], r["expires_at"])
                  for r in await conn.fetch(LOCK_USABLE_GRANTS, customer)]
        burn, updated = burn_down(grants, -amount, now)
        taken = {g for g, _ in burn.allocations}
        await conn.execute(SET_REMAINING, [g.id for g in updated if g.id in taken],
                           [g.remaining for g in updated if g.id in taken])
        change = await _ledger_change(conn, customer, "adjustment", amount, Decimal(0), None,
                                      reason, balance_topic, thresholds, overage=burn.overage)
        if burn.allocations:
            await conn.execute(INSERT_ALLOCATIONS, change.ledger_entry_ids[-1],
                               [g for g, _ in burn.allocations], [c for _, c in burn.allocations])
        return change


async def _ledger_change(
    conn: asyncpg.Connection,
    customer: str,
    kind: str,
    amount: Decimal,
    granted_delta: Decimal,
    grant_id: int | None,
    reason: str,
    balance_topic: str,
    thresholds: tuple[int, ...],
    overage: Decimal = Decimal(0),
) -> BalanceChange:
    row = await conn.fetchrow(LOCK_BALANCE, customer)
    entry_id = await conn.fetchval(INSERT_ENTRY, customer, kind, amount, grant_id, reason, overage)
    await conn.execute(APPLY_TO_BALANCE, customer, amount, granted_delta)
    change = BalanceChange(customer, row["balance"], row["balance"] + amount,
                           row["granted"] + granted_delta, reason, (entry_id,), thresholds)
    await conn.execute(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
        balance_topic, customer, orjson.dumps(change.to_message()))
    return change


async def expire_grants(
    conn: asyncpg.Connection, now: datetime, balance_topic: str, thresholds: tuple[int, ...]
) -> int:
    """Write off the remainders of expired grants; return how many grants expired."""
    async with conn.transaction():
        rows = await conn.fetch(EXPIRED, now)
        for r in rows:
            await conn.execute("UPDATE grants SET remaining = 0 WHERE id = $1", r["id"])
            await _ledger_change(conn, r["customer_id"], "expiry", -r["remaining"], -r["amount"],
                                 r["id"], "expiry", balance_topic, thresholds)
        return len(rows)


async def void_grant_credits(
    conn: asyncpg.Connection, grant_id: int, credits: Decimal, reason: str,
    balance_topic: str, thresholds: tuple[int, ...],
) -> Decimal:
    """Take up to `credits` of a grant's remaining credits out of the ledger (a `void` entry,
    e.g. a refunded purchase); return what was voided. Credits already used stay used.

    The grant stops counting towards `granted` by what is voided, as if it had been
    that much smaller. Not idempotent by itself: the caller records its key.
    """
    async with conn.transaction():
        # the flush's lock order -- the customer's balance row, then its grants -- so a
        # refund racing a debit waits instead of deadlocking
        customer = await conn.fetchval("SELECT customer_id FROM grants WHERE id = $1", grant_id)
        await conn.execute("SELECT 1 FROM balances WHERE customer_id = $1 FOR UPDATE", customer)
        row = await conn.fetchrow(
            "SELECT customer_id, remaining FROM grants WHERE id = $1 FOR UPDATE", grant_id)
        take = min(row["remaining"], credits)
        if take <= 0:
            return Decimal(0)
        await conn.execute("UPDATE grants SET remaining = remaining - $2 WHERE id = $1",
                           grant_id, take)
        await _ledger_change(conn, row["customer_id"], "void", -take, -take, grant_id, reason,
                             balance_topic, thresholds)
        return Decimal(take)


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the plan period holding `now` (UTC calendar periods)."""
    now = now.astimezone(UTC)
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return start, start + timedelta(days=days)


def plan_grant_request(
    customer: str, plan: PlanConfig, amount: Decimal, start: datetime, end: datetime,
    source: str, source_ref: str,
) -> GrantRequest:
    """A plan's credits for the period [start, end): effective at its start, expiring at
    its end when the plan resets (rollover credits never expire)."""
    return GrantRequest(customer, amount, source, source_ref, plan.grant_priority, start,
                        end if plan.carryover == "reset" else None, reason="plan_allocation")


async def allocate_plan_periods(
    conn: asyncpg.Connection, settings: Settings, now: datetime
) -> int:
    """Grant each customer's plan credits for the current period, once; return grants made."""
    plans: dict[str, PlanConfig] = {p.key: p for p in settings.plans}
    # Customers whose plan comes from a Stripe subscription get their periods from Stripe
    # (meterline.billing), not from the calendar.
    rows = await conn.fetch(
        "SELECT id, plan_key FROM customers WHERE plan_key IS NOT NULL AND plan_source = 'config'")
    made = 0
    for r in rows:
        plan = plans.get(r["plan_key"])
        if plan is None or plan.included_credits <= 0:
            continue
        start, end = period_bounds(plan.period, now)
        req = plan_grant_request(r["id"], plan, plan.included_credits, start, end,
                                 "plan_allocation", f"{r['id']}:{plan.key}:{start.isoformat()}")
        if await apply_grant(conn, req, settings.kafka.balance_changes_topic,
                             settings.processor.thresholds_percent) is not None:
            made += 1
    return made


async def sync_plans(conn: asyncpg.Connection, settings: Settings) -> None:
    """Upsert the plans declared in config (customers.plan_key refers to them)."""
    for p in settings.plans:
        await conn.execute(
            """INSERT INTO plans (key, included_credits, period, carryover, overage, grant_priority)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (key) DO UPDATE SET included_credits = $2, period = $3, carryover = $4,
                   overage = $5, grant_priority = $6, updated_at = now()""",
            p.key, p.included_credits, p.period, p.carryover, p.overage, p.grant_priority)


async def sync_config(conn: asyncpg.Connection, settings: Settings) -> None:
    """Upsert the plans and customers declared in config and apply their config grants once."""
    await sync_plans(conn, settings)
    if settings.customers:
        await conn.executemany(
            """INSERT INTO customers (id, plan_key, stripe_customer_id) VALUES ($1, $2, $3)
               ON CONFLICT (id) DO UPDATE SET plan_key = CASE
                   WHEN customers.plan_source = 'stripe' THEN customers.plan_key ELSE $2 END,
                   stripe_customer_id = coalesce($3, customers.stripe_customer_id), updated_at = now()""",
            [(c.id, c.plan, c.stripe_customer_id) for c in settings.customers])
    for c in settings.customers:
        for g in c.grants:
            await apply_grant(
                conn,
                GrantRequest(c.id, g.amount, "config", f"{c.id}:{g.ref}", g.priority,
                             g.effective_at, g.expires_at, reason="config_grant"),
                settings.kafka.balance_changes_topic, settings.processor.thresholds_percent)
