"""Check the ledger's invariants (package docstring) against the database.

Read-only; run it in one repeatable-read transaction for a consistent picture.
Used by the property tests after every step and by `meterline dev` at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg

from meterline.core.credits import debit_for

# 1: grant accounts == Σ their transfers (one pass over transfers, not one per grant)
GRANT_DRIFT = """
WITH moved AS (
    SELECT grant_id, sum(delta) AS summed FROM (
        SELECT to_grant AS grant_id, amount AS delta FROM transfers WHERE to_grant IS NOT NULL
        UNION ALL
        SELECT from_grant, -amount FROM transfers WHERE from_grant IS NOT NULL
    ) m GROUP BY grant_id
)
SELECT g.id, g.customer_id, g.remaining, coalesce(m.summed, 0) AS summed
FROM grants g LEFT JOIN moved m ON m.grant_id = g.id
WHERE $1::text IS NULL OR g.customer_id = $1
"""

# 1: receivable == Σ its transfers, balance == Σ grants − receivable, granted == issued − voided
# of the grants not expired
CUSTOMER_DRIFT = """
WITH debt AS (
    SELECT customer_id,
           sum(CASE WHEN from_account = 'receivable' THEN amount ELSE -amount END) AS debt
    FROM transfers WHERE 'receivable' IN (from_account, to_account)
      AND ($1::text IS NULL OR customer_id = $1)
    GROUP BY customer_id
), held AS (
    SELECT customer_id, sum(remaining) AS held,
           sum(grant_in_force(id)) FILTER (WHERE expired_at IS NULL) AS in_force
    FROM grants WHERE $1::text IS NULL OR customer_id = $1 GROUP BY customer_id
)
SELECT b.customer_id, b.balance, b.receivable, b.granted, coalesce(d.debt, 0) AS debt,
       coalesce(h.held, 0) AS held, coalesce(h.in_force, 0) AS in_force
FROM balances b LEFT JOIN debt d USING (customer_id) LEFT JOIN held h USING (customer_id)
WHERE $1::text IS NULL OR b.customer_id = $1
"""

# 2: an expired grant holds nothing
EXPIRED_HOLDING = """
SELECT id, customer_id, remaining FROM grants
WHERE expired_at IS NOT NULL AND remaining <> 0 AND ($1::text IS NULL OR customer_id = $1)
"""

# 3: per window, the aggregates' credits, the net transfers into usage, and the final value
WINDOWS = """
SELECT a.customer_id, a.meter, a.window_start, sum(a.credits) AS credits,
       (array_agg(a.window_value ORDER BY a.seq DESC))[1] AS final_value,
       coalesce(sum(t.net), 0) AS transferred
FROM window_aggregates a
LEFT JOIN LATERAL (
    SELECT sum(CASE WHEN to_account = 'usage' THEN amount ELSE -amount END) AS net
    FROM transfers WHERE aggregate_id = a.id
) t ON true
WHERE $1::text IS NULL OR a.customer_id = $1
GROUP BY a.customer_id, a.meter, a.window_start
"""

# 4: every account summed, derived from transfers: zero
TOTAL = """
SELECT (SELECT coalesce(sum(remaining), 0) FROM grants)
     - (SELECT coalesce(sum(receivable), 0) FROM balances)
     + coalesce(sum(amount) FILTER (WHERE to_account IN ('usage', 'expired', 'issuer')), 0)
     - coalesce(sum(amount) FILTER (WHERE from_account IN ('usage', 'expired', 'issuer')), 0)
       AS all_accounts
FROM transfers
"""


@dataclass(slots=True)
class Audit:
    violations: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.violations


async def audit(
    conn: asyncpg.Connection, rates: Mapping[str, Decimal], places: int,
    customer: str | None = None, limit: int = 20,
) -> Audit:
    """Check invariants 1-4 (1-3 for one `customer` when given; 4 is about everyone);
    `rates` are the meters' credits per unit (by meter key)."""
    found = Audit()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for r in await conn.fetch(GRANT_DRIFT, customer):
            if r["remaining"] != r["summed"]:
                found.violations.append(
                    f"1: grant {r['id']} holds {r['remaining']}, its transfers sum to {r['summed']}")
        for r in await conn.fetch(CUSTOMER_DRIFT, customer):
            c = r["customer_id"]
            if r["receivable"] != r["debt"]:
                found.violations.append(
                    f"1: {c} receivable {r['receivable']} != transfers {r['debt']}")
            if r["balance"] != r["held"] - r["receivable"]:
                found.violations.append(
                    f"1: {c} balance {r['balance']} != grants {r['held']} - receivable "
                    f"{r['receivable']}")
            if r["granted"] != r["in_force"]:
                found.violations.append(f"1: {c} granted {r['granted']} != {r['in_force']}")
        for r in await conn.fetch(EXPIRED_HOLDING, customer):
            found.violations.append(f"2: expired grant {r['id']} of {r['customer_id']} holds "
                                    f"{r['remaining']}")
        for r in await conn.fetch(WINDOWS, customer):
            rate = rates.get(r["meter"])
            where = f"{r['customer_id']}/{r['meter']}@{r['window_start'].isoformat()}"
            if rate is not None and r["credits"] != debit_for(r["final_value"], rate, places):
                found.violations.append(
                    f"3: window {where} debited {r['credits']}, final value worth "
                    f"{debit_for(r['final_value'], rate, places)}")
            if r["transferred"] != r["credits"]:
                found.violations.append(
                    f"3: window {where} credits {r['credits']} but transfers {r['transferred']}")
        total = await conn.fetchrow(TOTAL)
        if total["all_accounts"] != 0:
            found.violations.append(f"4: all accounts sum to {total['all_accounts']}")
    del found.violations[limit:]
    return found
