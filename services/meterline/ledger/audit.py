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

# 1: grant accounts == Σ their transfers
GRANT_DRIFT = """
SELECT g.id, g.customer_id, g.remaining,
       coalesce((SELECT sum(amount) FROM transfers WHERE to_grant = g.id), 0)
     - coalesce((SELECT sum(amount) FROM transfers WHERE from_grant = g.id), 0) AS summed
FROM grants g
WHERE $1::text IS NULL OR g.customer_id = $1
"""

# 1: receivable == Σ its transfers, balance == Σ grants − receivable, granted == issued − voided
# of the grants not expired
CUSTOMER_DRIFT = """
SELECT b.customer_id, b.balance, b.receivable, b.granted,
       coalesce((SELECT sum(amount) FROM transfers t
                 WHERE t.customer_id = b.customer_id AND from_account = 'receivable'), 0)
     - coalesce((SELECT sum(amount) FROM transfers t
                 WHERE t.customer_id = b.customer_id AND to_account = 'receivable'), 0) AS debt,
       coalesce((SELECT sum(remaining) FROM grants g WHERE g.customer_id = b.customer_id), 0)
           AS held,
       coalesce((SELECT sum(grant_in_force(g.id)) FROM grants g
                 WHERE g.customer_id = b.customer_id AND g.expired_at IS NULL), 0) AS in_force
FROM balances b
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
