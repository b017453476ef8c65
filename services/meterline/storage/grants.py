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
from meterline.core.credits import BalanceChange

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
INSERT INTO ledger_entries (customer_id, kind, amount, grant_id, reason)
VALUES ($1, $2, $3, $4, $5) RETURNING id
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
    async with conn.transaction():
        grant_id = await conn.fetchval(
            INSERT_GRANT, req.customer, req.amount, req.priority,
            req.effective_at or datetime.now(UTC), req.expires_at, req.source, req.source_ref)
        if grant_id is None:
            return None
        await _ledger_change(conn, req.customer, "grant", req.amount, req.amount, grant_id,
                             req.reason, balance_topic, thresholds)
        return int(grant_id)


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
) -> None:
    row = await conn.fetchrow(LOCK_BALANCE, customer)
    entry_id = await conn.fetchval(INSERT_ENTRY, customer, kind, amount, grant_id, reason)
    await conn.execute(APPLY_TO_BALANCE, customer, amount, granted_delta)
    change = BalanceChange(customer, row["balance"], row["balance"] + amount,
                           row["granted"] + granted_delta, reason, (entry_id,), thresholds)
    await conn.execute(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
        balance_topic, customer, orjson.dumps(change.to_message()))


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


async def allocate_plan_periods(
    conn: asyncpg.Connection, settings: Settings, now: datetime
) -> int:
    """Grant each customer's plan credits for the current period, once; return grants made."""
    plans: dict[str, PlanConfig] = {p.key: p for p in settings.plans}
    rows = await conn.fetch("SELECT id, plan_key FROM customers WHERE plan_key IS NOT NULL")
    made = 0
    for r in rows:
        plan = plans.get(r["plan_key"])
        if plan is None or plan.included_credits <= 0:
            continue
        start, end = period_bounds(plan.period, now)
        req = GrantRequest(
            r["id"], plan.included_credits, "plan_allocation",
            f"{r['id']}:{plan.key}:{start.isoformat()}", plan.grant_priority, start,
            end if plan.carryover == "reset" else None, reason="plan_allocation")
        if await apply_grant(conn, req, settings.kafka.balance_changes_topic,
                             settings.processor.thresholds_percent) is not None:
            made += 1
    return made


async def sync_config(conn: asyncpg.Connection, settings: Settings) -> None:
    """Upsert the plans and customers declared in config and apply their config grants once."""
    for p in settings.plans:
        await conn.execute(
            """INSERT INTO plans (key, included_credits, period, carryover, overage, grant_priority)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (key) DO UPDATE SET included_credits = $2, period = $3, carryover = $4,
                   overage = $5, grant_priority = $6, updated_at = now()""",
            p.key, p.included_credits, p.period, p.carryover, p.overage, p.grant_priority)
    if settings.customers:
        await conn.executemany(
            """INSERT INTO customers (id, plan_key, stripe_customer_id) VALUES ($1, $2, $3)
               ON CONFLICT (id) DO UPDATE SET plan_key = $2,
                   stripe_customer_id = coalesce($3, customers.stripe_customer_id), updated_at = now()""",
            [(c.id, c.plan, c.stripe_customer_id) for c in settings.customers])
    for c in settings.customers:
        for g in c.grants:
            await apply_grant(
                conn,
                GrantRequest(c.id, g.amount, "config", f"{c.id}:{g.ref}", g.priority,
                             g.effective_at, g.expires_at, reason="config_grant"),
                settings.kafka.balance_changes_topic, settings.processor.thresholds_percent)
