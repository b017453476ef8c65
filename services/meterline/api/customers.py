"""`POST /v1/customers`: create a customer or update its plan and Stripe id mapping.

Fields left out of the body keep their value; `null` clears them. Billing
state (`past_due`) is not settable here: the Stripe ledger consumer owns it.
A plan change takes effect for entitlement checks at once; its included
credits arrive with the next plan allocation, as for any customer.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from meterline.api.context import context
from meterline.api.wire import (
    ApiError,
    invalid,
    json_body,
    json_response,
    only_query,
    parse_identifier,
)

FIELDS = {"id", "plan", "stripe_customer_id"}
MAX_CUSTOMER_ID = 200  # as config's customers[].id
MAX_STRIPE_ID = 255

# $4/$5: whether the body set plan / stripe_customer_id (else keep the stored value).
UPSERT = """
INSERT INTO customers (id, plan_key, stripe_customer_id) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET
    plan_key = CASE WHEN $4 THEN excluded.plan_key ELSE customers.plan_key END,
    stripe_customer_id = CASE WHEN $5 THEN excluded.stripe_customer_id
                              ELSE customers.stripe_customer_id END,
    updated_at = now()
RETURNING id, plan_key, stripe_customer_id, past_due, past_due_since, created_at, updated_at,
          (xmax = 0) AS created
"""

PLAN_EXISTS = "SELECT EXISTS (SELECT 1 FROM plans WHERE key = $1)"


async def post_customer(request: web.Request) -> web.Response:
    ctx = context(request)
    only_query(request)
    body = await json_body(request)
    unknown = set(body) - FIELDS
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    customer = parse_identifier(body.get("id"), "id", MAX_CUSTOMER_ID)
    plan = _nullable(body, "plan", 200)
    stripe_id = _nullable(body, "stripe_customer_id", MAX_STRIPE_ID)
    async with ctx.pool.acquire() as conn:
        if plan is not None and not await conn.fetchval(PLAN_EXISTS, plan):
            raise ApiError(422, "unknown_plan", f"no plan {plan!r}")
        try:
            row = await conn.fetchrow(UPSERT, customer, plan, stripe_id, "plan" in body,
                                      "stripe_customer_id" in body)
        except asyncpg.UniqueViolationError:
            raise ApiError(409, "stripe_customer_conflict",
                           "that stripe_customer_id is mapped to another customer") from None
        except asyncpg.ForeignKeyViolationError:  # the plan was deleted meanwhile
            raise ApiError(422, "unknown_plan", f"no plan {plan!r}") from None
    assert row is not None
    return json_response(customer_body(row), 201 if row["created"] else 200)


def _nullable(body: dict[str, Any], name: str, max_length: int) -> str | None:
    raw = body.get(name)
    return None if raw is None else parse_identifier(raw, name, max_length)


def customer_body(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "plan": row["plan_key"],
            "stripe_customer_id": row["stripe_customer_id"], "past_due": row["past_due"],
            "past_due_since": row["past_due_since"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}
