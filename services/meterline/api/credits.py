"""Manual grants and adjustments: `POST /v1/customers/{id}/grants`.

A positive amount is a grant (`meterline.ledger.apply_grant_change`, source
`manual`, idempotent by (source, source_ref) like every grant); a negative
amount is an `adjustment` ledger entry that takes credits out of the grants in
burn-down order (`meterline.ledger.apply_adjustment`). Either way the ledger
entry, the balance, the outbox balance-change message and the
`manual_credit_requests` row commit in one transaction.

Idempotency: the caller's `Idempotency-Key` header or the body's `ref` (one is
required: a retried money request must never apply twice). A repeat of the
same request answers 200 with the original result and `Idempotent-Replayed:
true`; a different request under a used key answers 409.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from meterline.api.balance import customer_not_found
from meterline.api.context import ApiContext, context
from meterline.api.wire import (
    ApiError,
    customer_id,
    invalid,
    json_body,
    json_response,
    only_query,
    parse_amount,
    parse_identifier,
    parse_time,
)
from meterline.core.credits import decimal_text
from meterline.ledger import GrantRequest, apply_adjustment, apply_grant_change
from meterline.metrics import API_MANUAL_CREDITS, LEDGER_GRANTS, THRESHOLD_CROSSINGS

FIELDS = {"amount", "reason", "ref", "priority", "effective_at", "expires_at"}
MAX_KEY_LENGTH = 255
MAX_REASON_LENGTH = 1000
# Ledger reasons (and balance-change message reasons) of manual changes.
GRANT_REASON = "manual_grant"
ADJUSTMENT_REASON = "adjustment"

EXISTS = "SELECT EXISTS (SELECT 1 FROM customers WHERE id = $1)"

PREVIOUS = """
SELECT customer_id, idempotency_key, fingerprint, kind, amount, note, grant_id, ledger_entry_id,
       balance_after, created_at
FROM manual_credit_requests WHERE customer_id = $1 AND idempotency_key = $2
"""

RECORD = """
INSERT INTO manual_credit_requests (customer_id, idempotency_key, fingerprint, kind, amount, note,
    grant_id, ledger_entry_id, balance_after, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING customer_id, idempotency_key, fingerprint, kind, amount, note, grant_id,
    ledger_entry_id, balance_after, created_at
"""


@dataclass(frozen=True, slots=True)
class ManualCredit:
    customer: str
    key: str
    amount: Decimal
    note: str
    priority: int
    effective_at: datetime | None
    expires_at: datetime | None

    def fingerprint(self) -> str:
        """What must match for a repeat to count as the same request (amount by value)."""
        canonical = orjson.dumps([
            decimal_text(self.amount.normalize()), self.note, self.priority,
            self.effective_at.isoformat() if self.effective_at else None,
            self.expires_at.isoformat() if self.expires_at else None,
        ])
        return hashlib.sha256(canonical).hexdigest()


def manual_ref(customer: str, key: str) -> str:
    """The grant's idempotency reference: length-prefixed, so (customer `a`, key `b:c`)
    and (customer `a:b`, key `c`) never share one (migration 006 rewrote older refs)."""
    return f"{len(customer)}:{customer}:{key}"


class _Raced(Exception):
    """Another request with the same key committed first: read its result instead."""


def parse_request(customer: str, body: dict[str, Any], header_key: str | None,
                  now: datetime) -> ManualCredit:
    """Validate the body; amount sign decides grant or adjustment."""
    unknown = set(body) - FIELDS
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    amount = parse_amount(body.get("amount"))
    note = parse_identifier(body.get("reason"), "reason", MAX_REASON_LENGTH).strip()
    if not note:
        raise invalid("reason: required")
    ref = body.get("ref")
    ref = None if ref is None else parse_identifier(ref, "ref", MAX_KEY_LENGTH)
    header = None if header_key is None else parse_identifier(
        header_key, "Idempotency-Key", MAX_KEY_LENGTH)
    if header and ref and header != ref:
        raise invalid("Idempotency-Key and ref differ: send one, or the same value")
    key = header or ref
    if key is None:
        raise invalid("an Idempotency-Key header or a ref is required")
    priority = body.get("priority", 10)
    if type(priority) is not int or not 0 <= priority <= 1_000_000:
        raise invalid("priority: an integer from 0 to 1000000")
    effective_at = _optional_time(body, "effective_at")
    expires_at = _optional_time(body, "expires_at")
    if amount < 0 and ({"priority", "effective_at", "expires_at"} & set(body)):
        raise invalid("priority, effective_at and expires_at apply to grants (positive amounts)")
    if expires_at is not None and expires_at <= max(effective_at or now, now):
        raise invalid("expires_at: must be in the future and after effective_at")
    return ManualCredit(customer, key, amount, note, priority, effective_at, expires_at)


def _optional_time(body: dict[str, Any], name: str) -> datetime | None:
    raw = body.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise invalid(f"{name}: an RFC 3339 date-time string")
    return parse_time(raw, name)


async def post_grant(request: web.Request) -> web.Response:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request)
    now = ctx.clock()
    req = parse_request(customer, await json_body(request), request.headers.get("Idempotency-Key"),
                        now)
    async with ctx.pool.acquire() as conn:
        for _ in range(3):
            try:
                row, crossed = await apply_manual_credit(conn, ctx, req, now)
            except (_Raced, asyncpg.UniqueViolationError):
                continue  # the other request has committed: the next try replays it
            replayed = crossed is None
            if crossed is not None:
                _count(row["kind"], crossed)
            return json_response(_body(row), 200 if replayed else 201,
                                 {"Idempotent-Replayed": "true" if replayed else "false"})
    raise ApiError(409, "idempotency_conflict", "a concurrent request holds this idempotency key")


async def apply_manual_credit(conn: asyncpg.Connection, ctx: ApiContext, req: ManualCredit,
                              now: datetime) -> tuple[asyncpg.Record, tuple[int, ...] | None]:
    """(the request's row, thresholds crossed; None if it had been applied before).

    One transaction: the request row commits with the ledger entry it made.
    """
    topic = ctx.settings.kafka.balance_changes_topic
    thresholds = ctx.settings.processor.thresholds_percent
    async with conn.transaction():
        previous = await conn.fetchrow(PREVIOUS, req.customer, req.key)
        if previous is not None:
            if previous["fingerprint"] != req.fingerprint():
                raise ApiError(409, "idempotency_key_reused",
                               "this idempotency key was used for a different request")
            return previous, None
        if not await conn.fetchval(EXISTS, req.customer):
            raise customer_not_found(req.customer)
        grant_id = None
        if req.amount > 0:
            applied = await apply_grant_change(conn, GrantRequest(
                req.customer, req.amount, "manual", manual_ref(req.customer, req.key), req.priority,
                req.effective_at, req.expires_at, reason=GRANT_REASON), topic, thresholds, now)
            if applied is None:
                raise _Raced()
            grant_id, change = applied
        else:
            change = await apply_adjustment(conn, req.customer, req.amount, ADJUSTMENT_REASON,
                                            topic, thresholds, now)
        row = await conn.fetchrow(
            RECORD, req.customer, req.key, req.fingerprint(),
            "grant" if req.amount > 0 else "adjustment", req.amount, req.note, grant_id,
            change.ledger_entry_ids[-1], change.balance_after, now)
        return row, change.crossed()


def _count(kind: str, crossed: tuple[int, ...]) -> None:
    API_MANUAL_CREDITS.labels(kind=kind).inc()
    if kind == "grant":
        LEDGER_GRANTS.labels("manual").inc()
    for threshold in crossed:
        THRESHOLD_CROSSINGS.labels(str(threshold)).inc()


def _body(row: asyncpg.Record) -> dict[str, Any]:
    return {"customer": row["customer_id"], "kind": row["kind"], "amount": row["amount"],
            "reason": row["note"], "idempotency_key": row["idempotency_key"],
            "grant_id": row["grant_id"], "ledger_entry_id": row["ledger_entry_id"],
            "balance_after": row["balance_after"], "created_at": row["created_at"]}
