"""The two hot paths: a customer's balance, and "may this customer use this meter now?".

Each answers from ONE statement of primary-key lookups and short index range
scans (customers, plans, balances by key; open grants by the partial index;
a period's usage and the recent burn from `usage_hourly`, a few rows per
hour), on a connection of the long-lived pool.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from meterline.api.context import ApiContext, context
from meterline.api.wire import ApiError, customer_id, json_response, only_query
from meterline.core.depletion import project
from meterline.core.entitlements import decide, units_covered

ZERO = Decimal(0)
# The balance lists at most this many open grants, in burn-down order.
MAX_GRANTS = 100

# $1 customer, $2 now, $3 burn-rate span start. A customer is known when it has a
# customers row or a balances row (usage of a customer not declared anywhere).
BALANCE = f"""
SELECT c.id IS NOT NULL OR b.customer_id IS NOT NULL AS known,
       c.plan_key, p.overage, p.period, c.past_due, c.past_due_since, c.stripe_customer_id,
       b.balance, b.granted, b.updated_at, ps.start AS period_start, ps.end AS period_end,
       ARRAY(SELECT ROW(g.id, g.amount, g.remaining, g.priority, g.effective_at, g.expires_at,
                        g.source)
             FROM grants g WHERE g.customer_id = k.id
              AND (g.remaining > 0 OR g.issued_at IS NULL)  -- open, or scheduled
             ORDER BY g.priority, g.expires_at IS NULL, g.expires_at, g.effective_at, g.id
             LIMIT {MAX_GRANTS}) AS grants,
       ARRAY(SELECT ROW(u.meter, sum(u.quantity), sum(u.credits), sum(u.event_count)::bigint)
             FROM usage_hourly u
             WHERE u.customer_id = k.id AND u.hour >= ps.start AND u.hour < ps.end
             GROUP BY u.meter ORDER BY u.meter) AS period_usage,
       (SELECT coalesce(sum(u.credits), 0) FROM usage_hourly u
         WHERE u.customer_id = k.id AND u.hour >= $3 AND u.hour <= $2) AS burned
FROM (SELECT $1::text AS id) k
LEFT JOIN customers c ON c.id = k.id
LEFT JOIN plans p ON p.key = c.plan_key
LEFT JOIN balances b ON b.customer_id = k.id
CROSS JOIN LATERAL (
    SELECT date_trunc(coalesce(p.period, 'month'), $2::timestamptz, 'UTC') AS start) s0
CROSS JOIN LATERAL (
    SELECT s0.start,
           (s0.start AT TIME ZONE 'UTC' + ('1 ' || coalesce(p.period, 'month'))::interval)
               AT TIME ZONE 'UTC' AS end) ps
"""

ENTITLEMENT = """
SELECT c.id IS NOT NULL OR b.customer_id IS NOT NULL AS known,
       c.plan_key, p.overage, coalesce(c.past_due, false) AS past_due, b.balance
FROM (SELECT $1::text AS id) k
LEFT JOIN customers c ON c.id = k.id
LEFT JOIN plans p ON p.key = c.plan_key
LEFT JOIN balances b ON b.customer_id = k.id
"""


def customer_not_found(customer: str) -> ApiError:
    return ApiError(404, "customer_not_found", f"no customer {customer!r}")


def burn_span_start(now: datetime, lookback_seconds: int) -> datetime:
    """Start of the burn-rate span: `lookback` before now, down to a whole (rollup) hour."""
    return (now - timedelta(seconds=lookback_seconds)).replace(minute=0, second=0, microsecond=0)


async def get_balance(request: web.Request) -> web.Response:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request)
    now = ctx.clock()
    since = burn_span_start(now, ctx.settings.api.burn_rate_lookback_seconds)
    row = await ctx.pool.fetchrow(BALANCE, customer, now, since)
    if row is None or not row["known"]:
        raise customer_not_found(customer)
    return json_response(balance_body(ctx, customer, row, now, since))


def balance_body(ctx: ApiContext, customer: str, row: asyncpg.Record, now: datetime,
                 since: datetime) -> dict[str, Any]:
    balance = row["balance"] if row["balance"] is not None else ZERO
    places = ctx.settings.processor.credit_decimal_places
    projection = project(balance, row["burned"], since, now, places)
    usage = [{"meter": m, "quantity": q, "credits": c, "event_count": n}
             for m, q, c, n in row["period_usage"]]
    return {
        "customer": customer,
        "balance": balance,
        "granted": row["granted"] if row["granted"] is not None else ZERO,
        "plan": _plan(row),
        "past_due": bool(row["past_due"]),
        "past_due_since": row["past_due_since"],
        "stripe_customer_id": row["stripe_customer_id"],
        "grants": [_grant(g, now) for g in row["grants"]],
        "period": {
            "start": row["period_start"],
            "end": row["period_end"],
            "credits_used": sum((u["credits"] for u in usage), ZERO),
            "usage": usage,
        },
        "burn_rate": {
            "credits_per_hour": projection.burn_rate_per_hour,
            "since": since,
        },
        "projected_depletion": {"status": projection.status, "at": projection.depletes_at},
        "updated_at": row["updated_at"],
        "as_of": now,
    }


def _plan(row: asyncpg.Record) -> dict[str, Any] | None:
    if row["plan_key"] is None:
        return None
    return {"key": row["plan_key"], "overage": row["overage"], "period": row["period"]}


def _grant(g: tuple[Any, ...], now: datetime) -> dict[str, Any]:
    gid, amount, remaining, priority, effective_at, expires_at, source = g
    if expires_at is not None and expires_at <= now:
        status = "expired"  # its remainder is written off by the next expiry run
    elif effective_at > now:
        status = "scheduled"
    else:
        status = "active"
    return {"id": gid, "amount": amount, "remaining": remaining, "priority": priority,
            "source": source, "effective_at": effective_at, "expires_at": expires_at,
            "status": status}


async def get_entitlement(request: web.Request) -> web.Response:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request)
    meter = ctx.meters.get(request.match_info["meter"])
    if meter is None:
        raise ApiError(404, "meter_not_found", f"no meter {request.match_info['meter']!r}")
    row = await ctx.pool.fetchrow(ENTITLEMENT, customer)
    if row is None or not row["known"]:
        raise customer_not_found(customer)
    balance = row["balance"] if row["balance"] is not None else ZERO
    policy = ctx.settings.billing.past_due_policy
    answer = decide(balance, row["overage"], row["past_due"], policy)
    return json_response({
        "customer": customer,
        "meter": meter.key,
        "allowed": answer.allowed,
        "reason": answer.reason,
        "in_overage": answer.in_overage,
        "balance": balance,
        "plan": row["plan_key"],
        "overage_policy": row["overage"],
        "past_due": row["past_due"],
        "past_due_policy": policy,
        "credits_per_unit": meter.credits_per_unit,
        "units_remaining": units_covered(balance, meter.credits_per_unit),
        "checked_at": ctx.clock(),
    })
