"""Plan allocations and config sync: which grants to make, made through `meterline.ledger`.

Every credit change here goes through the ledger (transfers, balances, outbox in
one transaction); this module only decides plan periods and config grants.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from meterline.config import PlanConfig, Settings

# The ledger's grant and expiry entry points, re-exported for callers that predate it
# (the processor's maintenance loop imports expiry from here).
from meterline.ledger import (
    GrantRequest,
    apply_adjustment,
    apply_grant,
    apply_grant_change,
    expire_grants,
    void_grant_credits,
)

__all__ = [
    "GrantRequest", "allocate_plan_periods", "apply_adjustment", "apply_grant",
    "apply_grant_change", "expire_grants", "period_bounds", "plan_grant_request", "sync_config",
    "sync_plans", "void_grant_credits",
]


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
