"""Grants, manual adjustments, voids and expiry, as transfers (each in one transaction).

Every function locks through `open_books` first (the lock order), decides the
transfers on the locked `CustomerBook`, and writes them with `post`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from meterline.core.credits import BalanceChange, Grant
from meterline.core.money import MONEY
from meterline.ledger.accounts import ISSUER_ACCOUNT, ZERO, CustomerBook
from meterline.ledger.book import Entry, close_grants, open_books, post

# remaining starts at 0: the grant account is credited by its issuing transfer, now or, for
# a grant taking effect later, when it does (issued_at NULL until then)
INSERT_GRANT = """
INSERT INTO grants (customer_id, amount, remaining, priority, effective_at, expires_at, source,
                    source_ref, issued_at)
VALUES ($1, $2, 0, $3, $4::timestamptz, $5, $6, $7,
        CASE WHEN $4::timestamptz <= $8::timestamptz THEN $8::timestamptz END)
ON CONFLICT (source, source_ref) DO NOTHING
RETURNING id, effective_at, issued_at
"""

# `INSERT_GRANT` for many grants in one statement (config grants at start-up)
INSERT_GRANTS = """
INSERT INTO grants (customer_id, amount, remaining, priority, effective_at, expires_at, source,
                    source_ref, issued_at)
SELECT t.c, t.a, 0, t.p, t.e, t.x, t.s, t.r, CASE WHEN t.e <= $8::timestamptz THEN $8::timestamptz END
FROM unnest($1::text[], $2::numeric[], $3::int[], $4::timestamptz[], $5::timestamptz[],
            $6::text[], $7::text[]) AS t(c, a, p, e, x, s, r)
ON CONFLICT (source, source_ref) DO NOTHING
RETURNING id, source, source_ref, effective_at, issued_at
"""

PENDING_CUSTOMERS = """
SELECT DISTINCT customer_id FROM grants WHERE issued_at IS NULL AND effective_at <= $1
"""
# what a pending grant issues: its amount less what was voided before it took effect
PENDING_GRANTS = """
SELECT id, customer_id, amount - voided_before_issue AS amount, priority, effective_at,
       expires_at, source FROM grants
WHERE customer_id = ANY($1::text[]) AND issued_at IS NULL AND effective_at <= $2
ORDER BY customer_id, id
"""
MARK_ISSUED = "UPDATE grants SET issued_at = $2 WHERE id = ANY($1::bigint[])"

DUE_CUSTOMERS = """
SELECT DISTINCT customer_id FROM grants WHERE expires_at <= $1 AND expired_at IS NULL
"""

# grant_in_force (migration 006): issued minus voided, what the grant adds to `granted`
DUE_GRANTS = """
SELECT g.id, g.customer_id, grant_in_force(g.id) AS in_force FROM grants g
WHERE g.customer_id = ANY($1::text[]) AND g.expires_at <= $2 AND g.expired_at IS NULL
ORDER BY g.customer_id, g.id
"""

GRANT_CUSTOMER = "SELECT customer_id, expired_at FROM grants WHERE id = $1"
PENDING_GRANT_FOR_UPDATE = """
SELECT amount - voided_before_issue AS unvoided FROM grants
WHERE id = $1 AND issued_at IS NULL FOR UPDATE
"""
VOID_BEFORE_ISSUE = "UPDATE grants SET voided_before_issue = voided_before_issue + $2 WHERE id = $1"


# The reason of a plan period's allocation (config or Stripe): issuing it starts a new period
# for the customer's thresholds (they fire once per crossing *per period*).
PLAN_ALLOCATION_REASON = "plan_allocation"


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
    conn: asyncpg.Connection, req: GrantRequest, balance_topic: str, thresholds: tuple[int, ...],
    now: datetime | None = None,
) -> int | None:
    """Grant credits once per (source, source_ref); return the grant id, or None if already granted."""
    applied = await apply_grant_change(conn, req, balance_topic, thresholds, now)
    return None if applied is None else applied[0]


async def apply_grant_change(
    conn: asyncpg.Connection, req: GrantRequest, balance_topic: str, thresholds: tuple[int, ...],
    now: datetime | None = None,
) -> tuple[int, BalanceChange] | None:
    """`apply_grant` that also returns the balance change (its ledger entry id, balance after).
    A grant that takes effect later gets an entry without transfers now (the grant is on
    record, the balance unchanged) and is issued by `issue_due_grants` when it does.

    Transfers: issuer -> grant (the amount), then grant -> receivable for whatever
    overage the customer owes (a debt is settled by the next credits that arrive)."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        books = await open_books(conn, [req.customer])
        row = await conn.fetchrow(
            INSERT_GRANT, req.customer, req.amount, req.priority, req.effective_at or now,
            req.expires_at, req.source, req.source_ref, now)
        if row is None:
            return None
        grant = Grant(row["id"], ZERO, req.priority, row["effective_at"], req.expires_at)
        entry = (_issue(books[req.customer], grant, req.amount, req.reason)
                 if row["issued_at"] is not None
                 else Entry(req.customer, "grant", "grant_scheduled", (), grant_id=grant.id))
        [change] = await post(conn, books, [entry], balance_topic, thresholds)
        return grant.id, change


async def apply_grants(
    conn: asyncpg.Connection, reqs: Sequence[GrantRequest], balance_topic: str,
    thresholds: tuple[int, ...], now: datetime | None = None,
) -> int:
    """`apply_grant` for many requests in one transaction: their customers locked once in the
    ledger's order, one insert, one `post` (config grants for thousands of customers at
    start-up cost one round of locks, not one transaction each). Returns how many were new."""
    if not reqs:
        return 0
    now = now or datetime.now(UTC)
    by_ref = {(r.source, r.source_ref): r for r in reqs}
    async with conn.transaction():
        books = await open_books(conn, [r.customer for r in reqs])
        rows = await conn.fetch(
            INSERT_GRANTS, [r.customer for r in reqs], [r.amount for r in reqs],
            [r.priority for r in reqs], [r.effective_at or now for r in reqs],
            [r.expires_at for r in reqs], [r.source for r in reqs],
            [r.source_ref for r in reqs], now)
        entries = []
        for row in sorted(rows, key=lambda r: r["id"]):
            req = by_ref[(row["source"], row["source_ref"])]
            grant = Grant(row["id"], ZERO, req.priority, row["effective_at"], req.expires_at)
            entries.append(_issue(books[req.customer], grant, req.amount, req.reason)
                           if row["issued_at"] is not None
                           else Entry(req.customer, "grant", "grant_scheduled", (),
                                      grant_id=grant.id))
        await post(conn, books, entries, balance_topic, thresholds)
        return len(rows)


def _issue(book: CustomerBook, grant: Grant, amount: Decimal, reason: str) -> Entry:
    return Entry(book.customer, "grant", reason, tuple(book.issue(grant, amount, reason)),
                 grant_id=grant.id, granted_delta=amount,
                 starts_period=reason == PLAN_ALLOCATION_REASON)


async def issue_due_grants(
    conn: asyncpg.Connection, now: datetime, balance_topic: str, thresholds: tuple[int, ...]
) -> int:
    """Issue the grants whose `effective_at` has come (issuer -> grant, settling the
    receivable first, exactly as a grant effective at once); return how many."""
    async with conn.transaction():
        customers = [r["customer_id"] for r in await conn.fetch(PENDING_CUSTOMERS, now)]
        if not customers:
            return 0
        books = await open_books(conn, customers)
        due = await conn.fetch(PENDING_GRANTS, customers, now)  # under the locks
        entries = [_issue(books[r["customer_id"]],
                          Grant(r["id"], ZERO, r["priority"], r["effective_at"], r["expires_at"]),
                          r["amount"], "grant_effective") if r["amount"] > 0
                   else Entry(r["customer_id"], "grant", "grant_effective_voided", (),
                              grant_id=r["id"])  # voided in full before it took effect
                   for r in due]
        await conn.execute(MARK_ISSUED, [r["id"] for r in due], now)
        await post(conn, books, entries, balance_topic, thresholds)
        return len(due)


async def apply_adjustment(
    conn: asyncpg.Connection,
    customer: str,
    amount: Decimal,
    reason: str,
    balance_topic: str,
    thresholds: tuple[int, ...],
    now: datetime,
) -> BalanceChange:
    """Take `-amount` credits off a customer (amount < 0): grants -> issuer in burn-down
    order (so expiry never writes off credits an adjustment already removed), and
    receivable -> issuer for what no grant covers (the balance goes below zero).
    Not idempotent by itself: the caller records its idempotency key in the transaction."""
    if amount >= 0:
        raise ValueError("an adjustment removes credits: amount must be negative")
    async with conn.transaction():
        books = await open_books(conn, [customer])
        transfers = books[customer].use(-amount, now, now, ISSUER_ACCOUNT, "adjustment")
        [change] = await post(conn, books, [Entry(customer, "adjustment", reason,
                                                  tuple(transfers))], balance_topic, thresholds)
        return change


async def void_grant_credits(
    conn: asyncpg.Connection, grant_id: int, credits: Decimal, reason: str,
    balance_topic: str, thresholds: tuple[int, ...],
) -> Decimal:
    """grant -> issuer for up to `credits` of what the grant still holds (e.g. a refunded
    purchase); return what was voided. Credits already used stay used; an expired grant
    holds nothing. `granted` drops by what is voided, as if the grant had been that much
    smaller. A grant that has not taken effect yet moves nothing: up to its unvoided amount
    is recorded as voided before issue (an entry without transfers), and it issues only
    the rest when it takes effect. Not idempotent by itself: the caller records its key."""
    async with conn.transaction():
        row = await conn.fetchrow(GRANT_CUSTOMER, grant_id)
        books = await open_books(conn, [row["customer_id"]], [grant_id])
        # under the customer's lock, which issuing takes too: pending now stays pending
        pending = await conn.fetchrow(PENDING_GRANT_FOR_UPDATE, grant_id)
        if pending is not None:
            taken = min(credits, pending["unvoided"])
            if taken <= 0:
                return ZERO
            await conn.execute(VOID_BEFORE_ISSUE, grant_id, taken)
            await post(conn, books, [Entry(row["customer_id"], "void", reason, (),
                                           grant_id=grant_id)], balance_topic, thresholds)
            return taken
        transfers = books[row["customer_id"]].void(grant_id, credits, reason)
        if not transfers:
            return ZERO
        taken = transfers[0].amount
        await post(conn, books, [Entry(row["customer_id"], "void", reason, tuple(transfers),
                                       grant_id=grant_id, granted_delta=-taken)],
                   balance_topic, thresholds)
        return taken


async def expire_grants(
    conn: asyncpg.Connection, now: datetime, balance_topic: str, thresholds: tuple[int, ...]
) -> int:
    """The ledger's clock: first issue the grants that took effect (`issue_due_grants`),
    then close every grant past its expiry: grant -> expired for what it still holds (only
    that: the part that paid a debt or usage is gone already), and `granted` drops by
    what the grant had put in force (issued minus voided), used up or not. Returns how
    many grants expired. Locks in the ledger's order, so it never deadlocks a flush."""
    await issue_due_grants(conn, now, balance_topic, thresholds)
    async with conn.transaction():
        customers = [r["customer_id"] for r in await conn.fetch(DUE_CUSTOMERS, now)]
        if not customers:
            return 0
        seen = [r["id"] for r in await conn.fetch(DUE_GRANTS, customers, now)]
        books = await open_books(conn, customers, seen)
        # read again under the locks: voids committed meanwhile count
        due = [r for r in await conn.fetch(DUE_GRANTS, customers, now)
               if r["id"] in books[r["customer_id"]].grants]
        entries = []
        for r in due:
            transfers = books[r["customer_id"]].expire(r["id"])
            entries.append(Entry(r["customer_id"], "expiry", "expiry", tuple(transfers),
                                 grant_id=r["id"], granted_delta=MONEY.minus(r["in_force"])))
        await close_grants(conn, [r["id"] for r in due], now)
        await post(conn, books, entries, balance_topic, thresholds)
        return len(due)
