"""The vocabulary between Stripe events and the ledger: what an event may decide.

`stripe_events` (pure) turns a Stripe event into one `Decision`: `Apply` with actions,
`Ignore`, or `Reject` with one `Reason`; `stripe_ledger` applies the actions in one
Postgres transaction. Frozen values only; Stripe times are Unix seconds as Stripe sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a Stripe event went to `stripe.events.dlq`: DLQ header, metric label, test name."""

    MALFORMED_JSON = "malformed_json"  # not UTF-8 JSON
    INVALID_EVENT = "invalid_event"  # not a Stripe event: id/type/created/data.object missing or mistyped
    INVALID_OBJECT = "invalid_object"  # the object lacks a field its event needs (id, period, amounts)
    INVALID_CREDITS = "invalid_credits"  # meterline_credits is not a positive plain decimal
    UNKNOWN_PLAN = "unknown_plan"  # a price maps to a plan key that is not in config
    UNKNOWN_CUSTOMER = "unknown_customer"  # no meterline customer for the Stripe customer
    CUSTOMER_CONFLICT = "customer_conflict"  # metadata names a customer linked to another Stripe customer
    APPLY_FAILED = "apply_failed"  # Postgres refused the change for good (data error)


@dataclass(frozen=True, slots=True)
class Catalog:
    """What the mapping needs from config: plan keys and price maps."""

    plans: frozenset[str]
    plan_by_price: Mapping[str, str]
    credits_by_price: Mapping[str, Decimal]
    credit_places: int = 6
    purchased_expiry_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class StripeEvent:
    id: str
    type: str
    created: int  # Unix seconds
    object: Mapping[str, Any]
    api_version: str | None = None


@dataclass(frozen=True, slots=True)
class CustomerRef:
    """Who the event is about: the Stripe customer id and, for an unmapped one, the
    meterline customer id the merchant put in the object's metadata."""

    stripe_customer: str | None
    meterline_hint: str | None


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurchaseGrant:
    """Credits bought once. `refs` are every Stripe id naming this purchase (session,
    invoice, payment intent): a second event for the same purchase finds the grant by any."""

    credits: Decimal
    source: str  # stripe_checkout | stripe_invoice
    source_ref: str  # the object's id
    refs: tuple[str, ...]
    purchased_at: int
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class PeriodAllocation:
    """A paid subscription period: the plan's included credits x `quantity` (seats) for
    [period_start, period_end)."""

    subscription: str
    plan_key: str
    period_start: int
    period_end: int
    invoice: str
    quantity: int = 1
    refs: tuple[str, ...] = ()  # the invoice's ids (invoice, payment intents): refunds find it


@dataclass(frozen=True, slots=True)
class SubscriptionSnapshot:
    subscription: str
    status: str
    plan_key: str | None
    period_start: int | None
    period_end: int | None
    ended_at: int | None
    quantity: int = 1  # the plan item's seats: included credits are per seat


@dataclass(frozen=True, slots=True)
class PaymentOutcome:
    paid: bool
    invoice: str


@dataclass(frozen=True, slots=True)
class ChargeRefund:
    """A charge's refund state; `amount_refunded` is cumulative (it only grows)."""

    charge: str
    payment_intent: str | None
    invoice: str | None
    amount: int
    amount_refunded: int


Action = PurchaseGrant | PeriodAllocation | SubscriptionSnapshot | PaymentOutcome | ChargeRefund
# Actions that change credits or plans: without a meterline customer they cannot apply.
_NEED_CUSTOMER = (PurchaseGrant, PeriodAllocation, SubscriptionSnapshot)


@dataclass(frozen=True, slots=True)
class Apply:
    event: StripeEvent
    customer: CustomerRef
    actions: tuple[Action, ...]

    @property
    def needs_customer(self) -> bool:
        """False when only past-due bookkeeping or a refund (found through its grant) is at stake."""
        return any(isinstance(a, _NEED_CUSTOMER) for a in self.actions)


@dataclass(frozen=True, slots=True)
class Ignore:
    event: StripeEvent
    why: str


@dataclass(frozen=True, slots=True)
class Reject:
    reason: Reason
    detail: str
    event_id: str | None = None
    event_type: str | None = None


Decision = Apply | Ignore | Reject
