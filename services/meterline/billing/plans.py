"""Subscription plans from Stripe: periods, upgrades, cancellation, latest state. Pure.

Policy (the same final ledger whatever order Stripe delivers a lifecycle in):

- **A period's allocation comes from its paid invoice** (`invoice.paid`, a non-proration
  subscription line): the plan on that invoice, for the line's period, granted once per
  (subscription, period start). Subscription snapshots never allocate by themselves:
  a snapshot delivered early could show a plan the period did not start with.
- **Upgrade mid-period: the prorated difference is granted now.** For each time t the
  subscription reached a plan with more included credits than any before it in the
  period (starting from the invoice's plan), the customer gets
  `(new included - previous highest) x (period end - t) / (period length)`, rounded
  half-even once per period total. Equivalently: the integral over the period of the
  highest plan reached so far, minus the base. Adding a snapshot can only raise that
  highest-so-far curve, so the total is monotone in what has been delivered: the
  consumer grants `target - already granted` whenever it grows, and any delivery order
  ends on the same total. Upgrade credits take the period's own plan terms (priority;
  expiring at period end if that plan resets), so they too are independent of order.
- **Seats**: a plan's included credits are per unit of its subscription item: a period
  of 3 seats allocates 3x; a rise in seats mid-period is an upgrade (prorated like a
  bigger plan), a fall takes effect at the next period like a downgrade.
- **Downgrade: takes effect at the next period** (its invoice carries the lower price);
  nothing is taken back mid-period.
- **Cancellation stops future allocations**: no allocation for a period that starts at or
  after the subscription's `ended_at`. Credits of the current period stay (they were
  paid for; a `reset` plan's expire at period end anyway).
- **Latest state** (for `customers.plan_key` and `ended_at`): the snapshot with the
  greatest (terminal status, event created, event id). `canceled` is terminal in Stripe
  and wins whatever arrives after it; ties on `created` are broken by event id, so the
  choice never depends on arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Context, Decimal

from meterline.core.credits import round_credits

TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
# Statuses in which the subscription's plan is the customer's plan (entitlement policy).
PLAN_IN_FORCE_STATUSES = frozenset({"active", "trialing", "past_due"})

_EXACT = Context(prec=60)


def upgrade_credits(
    base_credits: Decimal,
    period_start: int,
    period_end: int,
    changes: Iterable[tuple[int, Decimal]],
    places: int,
) -> Decimal:
    """Credits owed for upgrades within [period_start, period_end), given the period's base
    allocation and every known (time, included credits of the plan then) of the period."""
    length = Decimal(period_end - period_start)
    highest = base_credits
    total = Decimal(0)
    for at, included in sorted(changes):
        if included <= highest:
            continue
        left = min(max(period_end - max(at, period_start), 0), period_end - period_start)
        total = _EXACT.add(total, _EXACT.divide(_EXACT.multiply(included - highest, Decimal(left)),
                                                length))
        highest = included
    return round_credits(total, places)


def seat_credits(included: Decimal, quantity: int) -> Decimal:
    """A period's included credits for `quantity` seats of a plan (included is per seat)."""
    return _EXACT.multiply(included, Decimal(quantity))


def allocation_allowed(period_start: int, ended_at: int | None) -> bool:
    """A canceled subscription gets nothing for periods starting at or after it ended."""
    return ended_at is None or period_start < ended_at


def snapshot_rank(status: str, created: int, event_id: str) -> tuple[int, int, str]:
    """Order of subscription snapshots: the greatest is the latest state."""
    return (1 if status in TERMINAL_STATUSES else 0, created, event_id)


def plan_in_force(status: str, plan_key: str | None) -> str | None:
    """The customer's plan while the subscription is in this status (None once it ends)."""
    return plan_key if status in PLAN_IN_FORCE_STATUSES else None
