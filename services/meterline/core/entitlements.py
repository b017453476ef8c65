"""Entitlement: may this customer use a meter now? Pure rules, Decimal only.

The answer a paywall acts on (the rule of the credits model in the README):

- a customer whose Stripe invoice payment failed (past due) is refused while
  `billing.past_due_policy` is `block`;
- a customer whose balance is at or below zero is refused when their plan's
  overage policy is `block`; with `allow` (or no plan) usage goes on and is
  billed as overage;
- everyone else may use the meter.

Past due is checked first: topping up credits does not help a customer who
has to pay an invoice, so that is the reason a paywall should show.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

OveragePolicy = Literal["allow", "block"]
PastDuePolicy = Literal["allow", "block"]

# Reason codes: the same words are in the API answer and the OpenAPI document.
WITHIN_BALANCE = "within_balance"
OVERAGE_ALLOWED = "overage_allowed"
BALANCE_EXHAUSTED = "balance_exhausted"
PAST_DUE = "past_due"


@dataclass(frozen=True, slots=True)
class Entitlement:
    allowed: bool
    reason: str
    # allowed although the balance is at or below zero: the usage will be billed as overage
    in_overage: bool


def decide(
    balance: Decimal,
    overage: OveragePolicy | None,
    past_due: bool,
    past_due_policy: PastDuePolicy,
) -> Entitlement:
    """The entitlement answer; `overage` None means the customer has no plan (never blocked)."""
    exhausted = balance <= 0
    if past_due and past_due_policy == "block":
        return Entitlement(False, PAST_DUE, False)
    if exhausted and overage == "block":
        return Entitlement(False, BALANCE_EXHAUSTED, False)
    if exhausted:
        return Entitlement(True, OVERAGE_ALLOWED, True)
    return Entitlement(True, WITHIN_BALANCE, False)


def units_covered(balance: Decimal, credits_per_unit: Decimal) -> Decimal | None:
    """Whole units of a meter the balance still pays for; None for a free meter (no limit).

    A paywall shows "about N requests left"; it is rounded down so that it never
    promises a unit the balance cannot cover.
    """
    if credits_per_unit <= 0:
        return None
    if balance <= 0:
        return Decimal(0)
    return (balance / credits_per_unit).to_integral_value(rounding=ROUND_FLOOR)
