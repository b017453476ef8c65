"""Usage over a time range and the ledger, page by page.

Usage counts a window aggregate in [from, to) by its window start. Whole
hours inside the range are read from the `usage_hourly` rollup, the partial
hours at either edge from the aggregates themselves, so a year-long range
costs about as much as a day and the totals are still exact.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from meterline.api.balance import customer_not_found
from meterline.api.context import context
from meterline.api.wire import (
    ApiError,
    customer_id,
    invalid,
    json_response,
    only_query,
    parse_int,
    time_range,
)
from meterline.ledger.accounts import Account

KNOWN = """
SELECT EXISTS (SELECT 1 FROM customers WHERE id = $1)
    OR EXISTS (SELECT 1 FROM balances WHERE customer_id = $1)
"""

# $1 customer, $2/$3 whole hours [h1, h2) from the rollup, $4/$5 the range [from, to),
# whose edges [from, h1) and [h2, to) come from the aggregates; $6 meter or NULL.
USAGE = """
SELECT meter, sum(quantity) AS quantity, sum(credits) AS credits,
       sum(event_count)::bigint AS event_count, sum(aggregates)::bigint AS aggregates
FROM (
    SELECT meter, quantity, credits, event_count, aggregates FROM usage_hourly
    WHERE customer_id = $1 AND hour >= $2 AND hour < $3 AND ($6::text IS NULL OR meter = $6)
    UNION ALL
    SELECT meter, quantity, credits, event_count, 1 FROM window_aggregates
    WHERE customer_id = $1 AND ($6::text IS NULL OR meter = $6)
      AND ((window_start >= $4 AND window_start < $2) OR (window_start >= $3 AND window_start < $5))
) u
GROUP BY meter ORDER BY meter
"""

# Newest first; the cursor is the id of the last entry of the previous page.
LEDGER = """
SELECT l.id, l.kind, l.amount, l.overage, l.meter, l.aggregate_id, l.grant_id, l.reason,
       l.created_at, m.note,
       ARRAY(SELECT ROW(t.id, t.from_account, t.from_grant, t.to_account, t.to_grant, t.amount,
                        t.reason, t.reverses)
             FROM transfers t WHERE t.entry_id = l.id ORDER BY t.id) AS transfers
FROM ledger_entries l
LEFT JOIN manual_credit_requests m ON m.ledger_entry_id = l.id
WHERE l.customer_id = $1 AND l.id < $2
ORDER BY l.id DESC
LIMIT $3
"""


async def ensure_known(conn: asyncpg.Pool | asyncpg.Connection, customer: str) -> None:
    if not await conn.fetchval(KNOWN, customer):
        raise customer_not_found(customer)


def whole_hours(frm: datetime, to: datetime) -> tuple[datetime, datetime]:
    """[h1, h2): the whole UTC hours inside [frm, to); empty (h1 = h2 = to) if there are none."""
    h1 = frm.replace(minute=0, second=0, microsecond=0)
    if h1 < frm:
        h1 += timedelta(hours=1)
    h2 = to.replace(minute=0, second=0, microsecond=0)
    return (h1, h2) if h1 < h2 else (to, to)


async def get_usage(request: web.Request) -> web.Response:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request, "from", "to", "meter")
    frm, to = time_range(request, ctx.clock())
    if to - frm > timedelta(days=ctx.settings.api.usage_max_days):
        raise invalid(f"from..to spans more than {ctx.settings.api.usage_max_days} days")
    meter = request.query.get("meter")
    if meter is not None and meter not in ctx.meters:
        raise ApiError(404, "meter_not_found", f"no meter {meter!r}")
    h1, h2 = whole_hours(frm, to)
    async with ctx.pool.acquire() as conn:
        await ensure_known(conn, customer)
        rows = await conn.fetch(USAGE, customer, h1, h2, frm, to, meter)
    meters = [{"meter": r["meter"], "quantity": r["quantity"], "credits": r["credits"],
               "event_count": r["event_count"], "aggregates": r["aggregates"]} for r in rows]
    return json_response({
        "customer": customer, "from": frm, "to": to, "meter": meter, "meters": meters,
        "total_credits": sum((m["credits"] for m in meters), Decimal(0)),
    })


async def get_ledger(request: web.Request) -> web.Response:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request, "limit", "cursor")
    api = ctx.settings.api
    limit = parse_int(request.query.get("limit"), "limit", api.ledger_page_size, 1,
                      api.ledger_max_page_size)
    cursor = parse_int(request.query.get("cursor"), "cursor", 2**63 - 1, 1, 2**63 - 1)
    async with ctx.pool.acquire() as conn:
        await ensure_known(conn, customer)
        rows = await conn.fetch(LEDGER, customer, cursor, limit + 1)
    entries = [_entry(r) for r in rows[:limit]]
    more = len(rows) > limit
    return json_response({
        "customer": customer,
        "entries": entries,
        "has_more": more,
        "next_cursor": str(entries[-1]["id"]) if more else None,
    })


def _entry(r: asyncpg.Record) -> dict[str, Any]:
    return {"id": r["id"], "kind": r["kind"], "amount": r["amount"], "overage": r["overage"],
            "meter": r["meter"], "aggregate_id": r["aggregate_id"], "grant_id": r["grant_id"],
            "reason": r["reason"], "note": r["note"], "created_at": r["created_at"],
            "transfers": [transfer_body(*t) for t in r["transfers"]]}


def transfer_body(transfer_id: int, from_kind: str, from_grant: int | None, to_kind: str,
                  to_grant: int | None, amount: Decimal, reason: str,
                  reverses: int | None) -> dict[str, Any]:
    """One transfer of a ledger entry, accounts named as on the balance-change topic."""
    return {"id": transfer_id, "from": str(Account(from_kind, from_grant)),
            "to": str(Account(to_kind, to_grant)), "amount": amount, "reason": reason,
            "reverses": reverses}
