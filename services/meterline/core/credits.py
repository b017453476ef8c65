"""Credits: rounding, grant burn-down and threshold crossings. Pure, Decimal only.

Rules (the Stripe credit-grant / OpenMeter rule):
- a window aggregate's debit is `quantity * credits_per_unit`, rounded half-even
  to `places` decimals, once per aggregate (never per event);
- a debit burns the grants usable at debit time — effective, not expired, with
  remaining credits — by priority (lower number first), then earliest expiry
  (never-expiring last), then earliest effective, then grant id;
- whatever no grant covers is overage: the balance goes negative by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from meterline.core.events import Quantity
from meterline.core.money import MONEY
from meterline.core.windows import as_decimal

ZERO = Decimal(0)


def round_credits(amount: Decimal, places: int) -> Decimal:
    """Half-even (banker's) rounding to `places` decimals; exact for already-short values."""
    return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN, context=MONEY)


def decimal_text(amount: Decimal) -> str:
    """Plain decimal notation for messages ("0.000002", never "2E-6")."""
    return format(amount, "f")


def debit_for(quantity: Quantity, credits_per_unit: Decimal, places: int) -> Decimal:
    return round_credits(MONEY.multiply(as_decimal(quantity), credits_per_unit), places)


@dataclass(frozen=True, slots=True)
class Grant:
    id: int
    remaining: Decimal
    priority: int
    effective_at: datetime
    expires_at: datetime | None

    def usable_at(self, at: datetime) -> bool:
        return (
            self.remaining > 0
            and self.effective_at <= at
            and (self.expires_at is None or self.expires_at > at)
        )


def burn_order(grant: Grant) -> tuple[int, int, datetime, datetime, int]:
    never = grant.expires_at is None
    return (grant.priority, 1 if never else 0, grant.expires_at or grant.effective_at,
            grant.effective_at, grant.id)


@dataclass(frozen=True, slots=True)
class Burn:
    """How one debit was covered."""

    allocations: tuple[tuple[int, Decimal], ...]  # (grant id, credits taken)
    overage: Decimal


def burn_down(grants: Sequence[Grant], amount: Decimal, at: datetime) -> tuple[Burn, list[Grant]]:
    """Cover `amount` from `grants`; return the burn and the grants with updated remainders.

    A negative amount (a `latest` correction crediting back) burns nothing and
    reduces overage only through the balance; it is returned as negative overage.
    """
    if amount <= 0:
        return Burn((), amount), list(grants)
    left = amount
    allocations: list[tuple[int, Decimal]] = []
    updated = {g.id: g for g in grants}
    for g in sorted((g for g in grants if g.usable_at(at)), key=burn_order):
        if left == 0:
            break
        take = min(g.remaining, left)
        allocations.append((g.id, take))
        updated[g.id] = replace(g, remaining=g.remaining - take)
        left -= take
    return Burn(tuple(allocations), left), [updated[g.id] for g in grants]


def thresholds_crossed(
    before: Decimal, after: Decimal, granted: Decimal, thresholds: Sequence[int]
) -> tuple[int, ...]:
    """Usage thresholds (percent of `granted` consumed) crossed going from `before` to `after`.

    Consumption is `granted - balance`; a threshold t is crossed when
    consumption moves from below t% to at or above it. No grants, no thresholds.
    """
    if granted <= 0 or after >= before:
        return ()
    used_before = (granted - before) * 100
    used_after = (granted - after) * 100
    return tuple(t for t in thresholds if used_before < t * granted <= used_after)


def thresholds_reached(balance: Decimal, granted: Decimal, thresholds: Sequence[int]) -> frozenset[int]:
    """The thresholds t whose t% of `granted` is consumed at `balance` (none without grants)."""
    if granted <= 0:
        return frozenset()
    used = MONEY.multiply(MONEY.subtract(granted, balance), 100)
    return frozenset(t for t in thresholds if used >= MONEY.multiply(t, granted))


def threshold_fires(
    fired: frozenset[int] | None, before: Decimal, after: Decimal, granted_before: Decimal,
    granted_after: Decimal, thresholds: Sequence[int],
) -> tuple[tuple[int, ...], frozenset[int]]:
    """(thresholds this change fires, the fired set after it). The rule, once per crossing:

    - a threshold fires when the share consumed (`granted - balance` over `granted`, each
      at its own moment) reaches it while it is armed, and is then disarmed;
    - it re-arms only when a change *raises the balance* (a top-up, a credit-back, the next
      period's allocation) and leaves the share below it: the balance really recovered;
    - so a change that only moves the base — an expiry, a used-up grant leaving `granted`
      — never re-fires a threshold, and one crossing fires once.
    - a plan period's allocation starts over (`fired` passed empty by `ledger.book.post`):
      once per crossing *per period*.

    `fired` None (not known yet, e.g. books migrated from before this rule): the thresholds
    reached before this change count as fired."""
    if fired is None:
        fired = thresholds_reached(before, granted_before, thresholds)
    reached = thresholds_reached(after, granted_after, thresholds)
    if after > before:
        fired = fired & reached
    return tuple(sorted(reached - fired)), fired | reached


def depleted(before: Decimal, after: Decimal) -> bool:
    """True when this change took the balance from positive to zero or below."""
    return before > 0 >= after


@dataclass(frozen=True, slots=True)
class BalanceChange:
    customer: str
    balance_before: Decimal
    balance_after: Decimal
    granted: Decimal
    reason: str
    ledger_entry_ids: tuple[int, ...]
    thresholds: Sequence[int]
    # the transfers behind it: {"id", "from", "to", "amount", "reason"} (ledger.book)
    transfers: tuple[dict[str, object], ...] = ()
    # thresholds fired by the ledger's once-per-crossing rule (`threshold_fires`); None:
    # the stateless crossing of before/after at `granted`
    fired: tuple[int, ...] | None = None

    @property
    def delta(self) -> Decimal:
        return self.balance_after - self.balance_before

    def crossed(self) -> tuple[int, ...]:
        if self.fired is not None:
            return self.fired
        return thresholds_crossed(self.balance_before, self.balance_after, self.granted, self.thresholds)

    def to_message(self) -> dict[str, object]:
        """The `billing.balance-changes` payload (schemas/balance-change.schema.json)."""
        return {
            "customer": self.customer,
            "balance_before": decimal_text(self.balance_before),
            "balance_after": decimal_text(self.balance_after),
            "delta": decimal_text(self.delta),
            "reason": self.reason,
            "ledger_entry_id": self.ledger_entry_ids[-1] if self.ledger_entry_ids else None,
            "ledger_entry_ids": list(self.ledger_entry_ids),
            "thresholds_crossed": list(self.crossed()),
            "depleted": depleted(self.balance_before, self.balance_after),
            "granted": decimal_text(self.granted),
            "transfers": list(self.transfers),
        }
