"""Plan allocations and config sync: which grants to make, made through `meterline.ledger`.

Every credit change here goes through the ledger (transfers, balances, outbox in
one transaction); this module only decides plan periods and config grants.
"""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from meterline.billing.plans import upgrade_credits
from meterline.config import PlanConfig, Settings
from meterline.ledger import PLAN_ALLOCATION_REASON, GrantRequest, apply_grant, apply_grants

__all__ = [
    "allocate_plan_periods", "period_bounds", "periods_to_allocate", "plan_grant_request",
    "sync_config", "sync_plans",
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
                        end if plan.carryover == "reset" else None, reason=PLAN_ALLOCATION_REASON)


# Each config customer's latest allocated period, its base plan and the plans seen in it.
LATEST_PERIODS = """
SELECT c.id, c.plan_key, p.period_start, p.plan_key AS base_plan,
       ARRAY(SELECT ch.plan_key FROM config_plan_changes ch
             WHERE ch.customer_id = c.id AND ch.period_start = p.period_start) AS seen
FROM customers c
LEFT JOIN LATERAL (SELECT period_start, plan_key FROM config_plan_periods
                   WHERE customer_id = c.id ORDER BY period_start DESC LIMIT 1) p ON true
WHERE c.plan_key IS NOT NULL AND c.plan_source = 'config'
"""
INSERT_PERIOD = """
INSERT INTO config_plan_periods (customer_id, period_start, period_end, plan_key, base_credits)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id, period_start) DO NOTHING RETURNING plan_key
"""
SEE_PLAN = """
INSERT INTO config_plan_changes (customer_id, period_start, plan_key, seen_at)
VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id, period_start, plan_key) DO NOTHING
"""
PERIOD_FOR_UPDATE = """
SELECT period_end, plan_key, base_credits, upgrade_credits FROM config_plan_periods
WHERE customer_id = $1 AND period_start = $2 FOR UPDATE
"""
PERIOD_CHANGES = """
SELECT extract(epoch FROM seen_at)::bigint AS at, plan_key FROM config_plan_changes
WHERE customer_id = $1 AND period_start = $2
"""
SET_UPGRADE = """
UPDATE config_plan_periods SET upgrade_credits = $3 WHERE customer_id = $1 AND period_start = $2
"""


def periods_to_allocate(
    period: str, carryover: str, last_start: datetime | None, now: datetime,
) -> list[tuple[datetime, datetime]]:
    """The periods a config customer is owed at `now`: the current one, and for a rollover
    plan every period missed since the last allocated one (no processor ran then; rollover
    credits would still be theirs). A reset plan's missed periods expired unused anyway."""
    current = period_bounds(period, now)
    if carryover != "rollover" or last_start is None or last_start >= current[0]:
        return [current]
    out = []
    start, end = period_bounds(period, last_start)
    while end <= current[0]:
        start, end = period_bounds(period, end)
        out.append((start, end))
    return out or [current]


async def allocate_plan_periods(
    conn: asyncpg.Connection, settings: Settings, now: datetime
) -> int:
    """Grant each config customer's plan credits for the periods it is owed, once; a plan
    changed in the config mid-period is prorated exactly like a Stripe upgrade
    (billing.plans: the highest plan reached so far, integrated over the period, minus the
    base; a lower plan waits for the next period). Returns the grants made."""
    plans: dict[str, PlanConfig] = {p.key: p for p in settings.plans}
    made = 0
    # Customers whose plan comes from a Stripe subscription get their periods from Stripe
    # (meterline.billing), not from the calendar.
    for r in await conn.fetch(LATEST_PERIODS):
        plan = plans.get(r["plan_key"])
        if plan is None:
            continue
        periods = periods_to_allocate(plan.period, plan.carryover, r["period_start"], now)
        if len(periods) == 1 and periods[0][0] == r["period_start"] and plan.key in r["seen"]:
            continue  # the current period is allocated and this plan already counted: no-op
        for start, end in periods:
            made += await _allocate_period(conn, settings, r["id"], plan, plans, start, end, now)
    return made


async def _allocate_period(
    conn: asyncpg.Connection, settings: Settings, customer: str, plan: PlanConfig,
    plans: dict[str, PlanConfig], start: datetime, end: datetime, now: datetime,
) -> int:
    topic, thresholds = settings.kafka.balance_changes_topic, settings.processor.thresholds_percent
    made = 0
    async with conn.transaction():
        if await conn.fetchval(INSERT_PERIOD, customer, start, end, plan.key,
                               plan.included_credits) is not None and plan.included_credits > 0:
            req = plan_grant_request(customer, plan, plan.included_credits, start, end,
                                     "plan_allocation", f"{customer}:{plan.key}:{start.isoformat()}")
            made += await apply_grant(conn, req, topic, thresholds, now) is not None
        await conn.execute(SEE_PLAN, customer, start, plan.key, max(now, start))
        period = await conn.fetchrow(PERIOD_FOR_UPDATE, customer, start)
        changes = [(r["at"], plans[r["plan_key"]].included_credits)
                   for r in await conn.fetch(PERIOD_CHANGES, customer, start)
                   if r["plan_key"] in plans]
        target = upgrade_credits(period["base_credits"], int(start.timestamp()),
                                 int(period["period_end"].timestamp()), changes,
                                 settings.processor.credit_decimal_places)
        owed = target - period["upgrade_credits"]
        base_plan = plans.get(period["plan_key"], plan)
        if owed > 0:
            # the period's own plan terms (priority, reset/rollover), as on the Stripe path
            req = replace(plan_grant_request(customer, base_plan, owed, start, period["period_end"],
                                             "plan_allocation",
                                             f"{customer}:{start.isoformat()}:upgrade:{target}"),
                          reason="plan_upgrade")
            made += await apply_grant(conn, req, topic, thresholds, now) is not None
            await conn.execute(SET_UPGRADE, customer, start, target)
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
    await apply_grants(
        conn, [GrantRequest(c.id, g.amount, "config", f"{c.id}:{g.ref}", g.priority,
                            g.effective_at, g.expires_at, reason="config_grant")
               for c in settings.customers for g in c.grants],
        settings.kafka.balance_changes_topic, settings.processor.thresholds_percent)
