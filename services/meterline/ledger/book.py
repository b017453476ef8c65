"""Locking customers' accounts and writing their transfers: the ledger's only I/O.

`open_books` is the one place that takes ledger locks, in the one order (see the
package docstring); `post` is the one place that writes transfers, and it moves
the cached balances (grants.remaining, balances.balance/receivable/granted) in
the same statement, by sums of the very rows it inserts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import orjson

from meterline.core.credits import BalanceChange, Grant, decimal_text, threshold_fires
from meterline.core.money import MONEY
from meterline.ledger.accounts import (
    ZERO,
    Account,
    CustomerBook,
    Paid,
    Transfer,
    grant_account,
    held_delta,
    overage_of,
)

ENSURE_BALANCES = """
INSERT INTO balances (customer_id) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING
"""

LOCK_BALANCES = """
SELECT customer_id, receivable, thresholds_fired FROM balances
WHERE customer_id = ANY($1::text[]) ORDER BY customer_id FOR UPDATE
"""

# Open grants (by the partial index grants_open_by_customer), plus any named ones
# (credit-back targets, a grant being voided or expired) of the same customers.
LOCK_GRANTS = """
SELECT id, customer_id, remaining, priority, effective_at, expires_at, expired_at FROM grants
WHERE id IN (SELECT id FROM grants WHERE customer_id = ANY($1::text[]) AND remaining > 0
             UNION ALL
             SELECT id FROM grants WHERE id = ANY($2::bigint[]) AND customer_id = ANY($1::text[]))
ORDER BY customer_id, id FOR UPDATE
"""

NEW_IDS = """
SELECT ARRAY(SELECT nextval('ledger_entries_id_seq') FROM generate_series(1, $1)) AS entries,
       ARRAY(SELECT nextval('transfers_id_seq') FROM generate_series(1, $2)) AS transfers
"""

# One statement: the entries, their transfers, and every cached balance they move, summed
# from the inserted transfer rows themselves (so a cache can never disagree with them).
POST = """
WITH entries AS (
    INSERT INTO ledger_entries (id, customer_id, kind, amount, overage, meter, aggregate_id,
                                grant_id, reason)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::numeric[], $5::numeric[],
                         $6::text[], $7::text[], $8::bigint[], $9::text[])
    RETURNING id
), moved AS (
    INSERT INTO transfers (id, entry_id, customer_id, from_account, from_grant, to_account,
                           to_grant, amount, reason, aggregate_id, reverses)
    SELECT * FROM unnest($10::bigint[], $11::bigint[], $12::text[], $13::text[], $14::bigint[],
                         $15::text[], $16::bigint[], $17::numeric[], $18::text[], $19::text[],
                         $20::bigint[])
    RETURNING customer_id, from_account, from_grant, to_account, to_grant, amount
), grant_moves AS (
    SELECT grant_id, sum(delta) AS delta FROM (
        SELECT to_grant AS grant_id, amount AS delta FROM moved WHERE to_grant IS NOT NULL
        UNION ALL
        SELECT from_grant, -amount FROM moved WHERE from_grant IS NOT NULL
    ) m GROUP BY grant_id
), grants_moved AS (
    UPDATE grants g SET remaining = g.remaining + d.delta
    FROM grant_moves d WHERE g.id = d.grant_id
    RETURNING g.id
), customer_moves AS (
    SELECT customer_id, sum(held) AS held, sum(owed) AS owed, sum(granted) AS granted FROM (
        SELECT customer_id,
               CASE WHEN to_account IN ('grant', 'receivable') THEN amount ELSE 0 END
             - CASE WHEN from_account IN ('grant', 'receivable') THEN amount ELSE 0 END AS held,
               CASE WHEN from_account = 'receivable' THEN amount ELSE 0 END
             - CASE WHEN to_account = 'receivable' THEN amount ELSE 0 END AS owed,
               0 AS granted
        FROM moved
        UNION ALL
        SELECT c, 0, 0, g FROM unnest($21::text[], $22::numeric[]) AS u (c, g)
    ) m GROUP BY customer_id
)
UPDATE balances b SET balance = b.balance + c.held, receivable = b.receivable + c.owed,
                      granted = b.granted + c.granted, updated_at = now()
FROM customer_moves c WHERE b.customer_id = c.customer_id
RETURNING b.customer_id, b.balance, b.granted, c.held
"""

INSERT_OUTBOX = """
INSERT INTO outbox (topic, key, payload) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
"""

# The thresholds fired and not re-armed (core.credits.threshold_fires), "50,75" per customer.
SET_FIRED = """
UPDATE balances b SET thresholds_fired = string_to_array(nullif(u.fired, ''), ',')::int[]
FROM unnest($1::text[], $2::text[]) AS u (customer_id, fired) WHERE b.customer_id = u.customer_id
"""

CLOSE_GRANTS = "UPDATE grants SET expired_at = $2 WHERE id = ANY($1::bigint[])"

# The transfers into `usage` that paid for a window's aggregates, minus their reversals.
PAID_FOR_WINDOWS = """
SELECT a.customer_id, a.meter, a.window_start, t.id, t.from_account, t.from_grant,
       t.amount - coalesce((SELECT sum(r.amount) FROM transfers r WHERE r.reverses = t.id), 0)
           AS unreversed
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS w (customer_id, meter, window_start)
JOIN window_aggregates a USING (customer_id, meter, window_start)
JOIN transfers t ON t.aggregate_id = a.id AND t.to_account = 'usage'
ORDER BY t.id
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One business event of one customer: linked transfers that commit together."""

    customer: str
    kind: str  # ledger_entries.kind: grant | debit | expiry | void | adjustment
    reason: str
    transfers: tuple[Transfer, ...]
    meter: str | None = None
    aggregate_id: str | None = None
    grant_id: int | None = None
    granted_delta: Decimal = ZERO  # how `granted` (the thresholds' base) moves
    # a plan period's allocation: the customer's thresholds start over (core.credits)
    starts_period: bool = False

    @property
    def amount(self) -> Decimal:
        """The entry's effect on the customer's balance (ledger_entries.amount, signed)."""
        return held_delta(self.transfers)


@dataclass(slots=True)
class Books:
    """The customers locked by `open_books` in this transaction: only they can be posted."""

    by_customer: dict[str, CustomerBook]

    def __getitem__(self, customer: str) -> CustomerBook:
        return self.by_customer[customer]


async def open_books(conn: asyncpg.Connection, customers: Iterable[str],
                     grants: Sequence[int] = ()) -> Books:
    """Lock customers' accounts in THE lock order: balances rows by customer id, then their
    grant rows by (customer id, grant id). Every ledger write goes through here, so two
    ledger transactions always meet on the lowest customer id first and never deadlock.
    Call it before inserting grants or writing anything else the transaction will lock."""
    ordered = sorted(set(customers))
    await conn.execute(ENSURE_BALANCES, ordered)
    rows = await conn.fetch(LOCK_BALANCES, ordered)
    books = {r["customer_id"]: CustomerBook(
        r["customer_id"], {}, r["receivable"],
        fired=None if r["thresholds_fired"] is None else frozenset(r["thresholds_fired"]))
        for r in rows}
    for r in await conn.fetch(LOCK_GRANTS, ordered, list(grants)):
        book = books[r["customer_id"]]
        book.grants[r["id"]] = Grant(r["id"], r["remaining"], r["priority"], r["effective_at"],
                                     r["expires_at"])
        if r["expired_at"] is not None:
            book.closed.add(r["id"])
    return Books(books)


async def paid_for_windows(
    conn: asyncpg.Connection, windows: Sequence[tuple[str, str, object]]
) -> dict[tuple[str, str, object], list[Paid]]:
    """What paid each window (customer, meter, window_start) so far, not yet reversed."""
    rows = await conn.fetch(PAID_FOR_WINDOWS, [w[0] for w in windows], [w[1] for w in windows],
                            [w[2] for w in windows])
    paid: dict[tuple[str, str, object], list[Paid]] = defaultdict(list)
    for r in rows:
        source = (grant_account(r["from_grant"]) if r["from_grant"] is not None
                  else Account(r["from_account"]))
        paid[(r["customer_id"], r["meter"], r["window_start"])].append(
            Paid(r["id"], source, r["unreversed"]))
    return paid


async def post(
    conn: asyncpg.Connection, books: Books, entries: Sequence[Entry], balance_topic: str,
    thresholds: tuple[int, ...],
) -> list[BalanceChange]:
    """Write `entries` (and their transfers) and publish one balance change per customer.

    Must run inside the transaction that opened `books`."""
    # an entry without transfers still records an event (an expiry of a used-up grant, a
    # grant scheduled for later, a void of one); other empty ones (a zero debit) are nothing
    entries = [e for e in entries
               if e.transfers or e.granted_delta or e.kind in ("expiry", "grant", "void")]
    if not entries:
        return []
    for e in entries:
        if e.customer not in books.by_customer:
            raise RuntimeError(f"ledger write for {e.customer!r} without its lock (open_books)")
    n_transfers = sum(len(e.transfers) for e in entries)
    ids = await conn.fetchrow(NEW_IDS, len(entries), n_transfers)
    entry_ids, transfer_ids = list(ids["entries"]), list(ids["transfers"])
    ecols: list[list[object]] = [[] for _ in range(9)]
    tcols: list[list[object]] = [[] for _ in range(11)]
    granted: dict[str, Decimal] = defaultdict(Decimal)
    by_customer: dict[str, list[tuple[int, Entry, list[int]]]] = defaultdict(list)
    next_transfer = iter(transfer_ids)
    for entry_id, e in zip(entry_ids, entries, strict=True):
        for col, v in zip(ecols, (entry_id, e.customer, e.kind, e.amount, overage_of(e.transfers),
                                  e.meter, e.aggregate_id, e.grant_id, e.reason), strict=True):
            col.append(v)
        mine = []
        for t in e.transfers:
            tid = next(next_transfer)
            mine.append(tid)
            row = (tid, entry_id, e.customer, t.source.kind, t.source.grant, t.target.kind,
                   t.target.grant, t.amount, t.reason, e.aggregate_id, t.reverses)
            for col, v in zip(tcols, row, strict=True):
                col.append(v)
        granted[e.customer] = MONEY.add(granted[e.customer], e.granted_delta)
        by_customer[e.customer].append((entry_id, e, mine))
    customers = sorted(granted)
    rows = await conn.fetch(POST, *ecols, *tcols, customers, [granted[c] for c in customers])
    after = {r["customer_id"]: r for r in rows}

    changes = []
    rearmed: dict[str, frozenset[int]] = {}
    for customer in customers:
        r = after[customer]
        posted = by_customer[customer]
        before = MONEY.subtract(r["balance"], r["held"])
        book = books[customer]
        new_period = any(e.starts_period for _, e, _ in posted)
        fires, fired = threshold_fires(frozenset() if new_period else book.fired, before,
                                       r["balance"],
                                       MONEY.subtract(r["granted"], granted[customer]),
                                       r["granted"], thresholds)
        if fired != book.fired:
            book.fired = rearmed[customer] = fired
        changes.append(BalanceChange(
            customer, before, r["balance"], r["granted"],
            posted[-1][1].reason, tuple(entry_id for entry_id, _, _ in posted), thresholds,
            tuple(transfer_message(tid, t) for _, e, tids in posted
                  for tid, t in zip(tids, e.transfers, strict=True)), fires))
    if rearmed:
        await conn.execute(SET_FIRED, list(rearmed),
                           [",".join(map(str, sorted(f))) for f in rearmed.values()])
    await conn.execute(INSERT_OUTBOX, [balance_topic] * len(changes), [c.customer for c in changes],
                       [orjson.dumps(c.to_message()) for c in changes])
    return changes


async def close_grants(conn: asyncpg.Connection, grant_ids: Sequence[int], at: object) -> None:
    """Mark grants expired (their accounts closed): done by expiry, with its transfers."""
    if grant_ids:
        await conn.execute(CLOSE_GRANTS, list(grant_ids), at)


def transfer_message(transfer_id: int, t: Transfer) -> dict[str, object]:
    """A transfer as the balance-change topic shows it (schemas/balance-change.schema.json)."""
    return {"id": transfer_id, "from": str(t.source), "to": str(t.target),
            "amount": decimal_text(t.amount), "reason": t.reason}
