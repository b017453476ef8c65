"""What a Stripe event means for the credits ledger. Pure: no Kafka, Postgres or HTTP.

`decide(raw, catalog)` turns the raw bytes of one Stripe v1 `event` into one of:
`Apply` (actions for the ledger), `Ignore` (acknowledged, counted, nothing to do) or
`Reject` (dead-letter it, with one reason code). The shell (`stripe_ledger`) applies the
actions in one transaction; the rules that need the database (which grant a purchase
already has, which snapshot is newest) are written there and in `plans`.

Events and what they do:

- `checkout.session.completed` with `mode=payment` and `payment_status` `paid` (or
  `no_payment_required`), and `checkout.session.async_payment_succeeded`: a purchase of
  `metadata.meterline_credits` credits (the session's metadata). `payment_status=unpaid`
  (a delayed payment method) waits for `async_payment_succeeded`.
- `invoice.paid`: clears past due; lines whose price is a credit pack (price metadata
  `meterline_credits` = credits per unit, or `ledger_consumer.credits_by_price`) make one
  purchase of `sum(credits per unit x quantity)`; non-proration subscription lines whose
  price is a plan (price metadata `meterline_plan`, or `ledger_consumer.plan_by_price`)
  on invoices with `billing_reason` `subscription_create`, `subscription_cycle` or
  `subscription_update` (a new period after an anchor reset) allocate that plan's
  credits for the line's `period`.
- `invoice.payment_failed`: flags the customer past due (unless a later invoice was paid).
- `customer.subscription.created|updated|deleted`: a snapshot of the subscription (status,
  plan, current period, `ended_at`), used for mid-period upgrades, cancellation and
  `customers.plan_key`.
- `charge.refunded`: the refunded share of the charge voids that share of every grant the
  charge paid for (its purchase, its invoice's plan allocation), pro rata.
- `charge.dispute.created|updated|closed` with `status` `lost` (the funds are gone): the
  disputed amount counts as refunded, so the disputed purchase's credits are voided the
  same way (its share of the charge when the charge is expanded; the whole charge when
  not, as card disputes are for the full amount). Other statuses change nothing: credits
  stay while a dispute is open or won.

Everything else is acknowledged and counted as ignored. The config maps win over price
metadata (a local fix needs no change in Stripe). Metadata values are strings of plain
decimal digits; a value with more decimals than `credit_decimal_places` is rejected, not
rounded. Both the classic object shapes and the 2025 ("basil") ones are read where
they differ (`invoice.parent.subscription_details`, `line.pricing.price_details`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeGuard

from meterline.billing.ledger_actions import (
    Action,
    Apply,
    Catalog,
    ChargeRefund,
    CustomerRef,
    Decision,
    Ignore,
    PaymentOutcome,
    PeriodAllocation,
    PurchaseGrant,
    Reason,
    Reject,
    StripeEvent,
    SubscriptionSnapshot,
)

METADATA_CREDITS = "meterline_credits"
METADATA_PLAN = "meterline_plan"
METADATA_CUSTOMER = "meterline_customer_id"

MAX_CREDITS = Decimal(10) ** 15
_PLAIN_DECIMAL = re.compile(r"^\d{1,16}(\.\d{1,12})?$")
ALLOCATING_BILLING_REASONS = frozenset({"subscription_create", "subscription_cycle",
                                        "subscription_update"})


class _Invalid(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Skip(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


# --- parsing -----------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_event(raw: bytes) -> StripeEvent | Reject:
    """Parse the v1 `event` envelope; numbers with a fraction become Decimal, never float."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_float=Decimal, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Reject(Reason.MALFORMED_JSON, str(exc)[:200])
    if not isinstance(doc, dict):
        return Reject(Reason.INVALID_EVENT, "not a JSON object")
    event_id, event_type, created = doc.get("id"), doc.get("type"), doc.get("created")
    eid = event_id if isinstance(event_id, str) and event_id else None
    etype = event_type if isinstance(event_type, str) and event_type else None
    if eid is None or etype is None:
        return Reject(Reason.INVALID_EVENT, "id and type must be non-empty strings", eid, etype)
    if not _is_int(created) or created < 0:
        return Reject(Reason.INVALID_EVENT, "created must be Unix seconds", eid, etype)
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return Reject(Reason.INVALID_EVENT, "data.object must be an object", eid, etype)
    version = doc.get("api_version")
    return StripeEvent(eid, etype, created, obj, version if isinstance(version, str) else None)


def decide(raw: bytes, catalog: Catalog) -> Decision:
    """The whole mapping: bytes in, one decision out. Never raises on bad input."""
    parsed = parse_event(raw)
    if isinstance(parsed, Reject):
        return parsed
    return decide_event(parsed, catalog)


def decide_event(event: StripeEvent, catalog: Catalog) -> Decision:
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return Ignore(event, "irrelevant_type")
    try:
        return handler(event, catalog)
    except _Skip as skip:
        return Ignore(event, skip.why)
    except _Invalid as bad:
        return Reject(bad.reason, bad.detail, event.id, event.type)


def type_label(event_type: str | None) -> str:
    """Bounded metric label: the types meterline handles, else 'other'."""
    return event_type if event_type in KNOWN_TYPES else "other"


# --- handlers ----------------------------------------------------------------------------


def _checkout(event: StripeEvent, cat: Catalog) -> Decision:
    s = event.object
    session_id = _required_str(s, "id")
    if s.get("mode") != "payment":
        raise _Skip("not_payment_mode")  # subscriptions are handled through their invoices
    if s.get("payment_status") not in ("paid", "no_payment_required"):
        raise _Skip("not_paid")  # a delayed method: async_payment_succeeded follows
    meta = _metadata(s)
    if METADATA_CREDITS not in meta:
        raise _Skip("no_credits")
    credits = _credits(meta[METADATA_CREDITS], f"metadata.{METADATA_CREDITS}", cat.credit_places)
    refs = _refs(session_id, _id_of(s.get("payment_intent")), _id_of(s.get("invoice")))
    grant = PurchaseGrant(credits, "stripe_checkout", session_id, refs, event.created,
                          _expiry(event.created, cat))
    return Apply(event, _customer(s, meta), (grant,))


def _invoice_paid(event: StripeEvent, cat: Catalog) -> Decision:
    inv = event.object
    invoice_id = _required_str(inv, "id")
    actions: list[Action] = [PaymentOutcome(True, invoice_id)]
    pack_credits = Decimal(0)
    allocations: dict[tuple[str, int], PeriodAllocation] = {}
    allocating = inv.get("billing_reason") in ALLOCATING_BILLING_REASONS
    refs = _refs(invoice_id, _id_of(inv.get("payment_intent")), *_invoice_payment_intents(inv))
    for line in _lines(inv):
        price_id, price_meta = _line_price(line)
        proration = _line_proration(line)
        plan = _plan_for(price_id, price_meta, cat)
        if plan is not None:
            if allocating and not proration and _is_subscription_line(line):
                sub = _line_subscription(line) or _invoice_subscription(inv)
                if sub is None:
                    raise _Invalid(Reason.INVALID_OBJECT, f"line {line.get('id')}: no subscription")
                start, end = _period(line.get("period"), f"line {line.get('id')} period")
                allocations.setdefault((sub, start), PeriodAllocation(
                    sub, plan, start, end, invoice_id, _quantity(line, f"line {line.get('id')}"),
                    refs))
            continue
        per_unit = _pack_credits(price_id, price_meta, cat)
        if per_unit is not None and not proration:
            pack_credits += per_unit * _quantity(line, f"line {line.get('id')}")
    if pack_credits > MAX_CREDITS:
        raise _Invalid(Reason.INVALID_CREDITS, "credit packs above 10^15 credits")
    if pack_credits > 0:
        actions.append(PurchaseGrant(pack_credits, "stripe_invoice", invoice_id, refs,
                                     event.created, _expiry(event.created, cat)))
    actions.extend(allocations.values())
    return Apply(event, _customer(inv, _metadata(inv)), tuple(actions))


def _invoice_failed(event: StripeEvent, cat: Catalog) -> Decision:
    inv = event.object
    invoice_id = _required_str(inv, "id")
    return Apply(event, _customer(inv, _metadata(inv)), (PaymentOutcome(False, invoice_id),))


def _subscription(event: StripeEvent, cat: Catalog) -> Decision:
    sub = event.object
    sub_id = _required_str(sub, "id")
    status = _required_str(sub, "status")
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    if not isinstance(data, list):
        raise _Invalid(Reason.INVALID_OBJECT, "items.data must be a list")
    planned = [(item, plan) for item in data if isinstance(item, dict)
               for plan in [_plan_for(*_item_price(item), cat)] if plan is not None]
    if not planned:
        raise _Skip("no_plan_price")
    item, plan = planned[0]
    raw_period = (sub.get("current_period_start"), sub.get("current_period_end"))
    if raw_period[0] is None:  # 2025 API versions keep the period on the items
        raw_period = (item.get("current_period_start"), item.get("current_period_end"))
    start, end = _period({"start": raw_period[0], "end": raw_period[1]}, "current period")
    ended_at = sub.get("ended_at")
    if ended_at is not None and not _is_int(ended_at):
        raise _Invalid(Reason.INVALID_OBJECT, "ended_at must be Unix seconds")
    if ended_at is None and (event.type == "customer.subscription.deleted" or status == "canceled"):
        ended_at = event.created
    snapshot = SubscriptionSnapshot(sub_id, status, plan, start, end, ended_at,
                                    _quantity(item, f"item {item.get('id')}"))
    return Apply(event, _customer(sub, _metadata(sub)), (snapshot,))


def _charge_refunded(event: StripeEvent, cat: Catalog) -> Decision:
    ch = event.object
    charge_id = _required_str(ch, "id")
    amount, refunded = ch.get("amount"), ch.get("amount_refunded")
    if not _is_int(amount) or amount <= 0 or not _is_int(refunded) or not 0 <= refunded <= amount:
        raise _Invalid(Reason.INVALID_OBJECT, "amount/amount_refunded must be integers, 0 <= refunded <= amount")
    refund = ChargeRefund(charge_id, _id_of(ch.get("payment_intent")), _id_of(ch.get("invoice")),
                          amount, refunded)
    return Apply(event, _customer(ch, _metadata(ch)), (refund,))


def _dispute(event: StripeEvent, cat: Catalog) -> Decision:
    dispute = event.object
    if dispute.get("status") != "lost":
        raise _Skip("dispute_not_lost")
    disputed = dispute.get("amount")
    if not _is_int(disputed) or disputed <= 0:
        raise _Invalid(Reason.INVALID_OBJECT, "dispute amount must be a positive integer")
    charge = dispute.get("charge")
    charge_id = _id_of(charge)
    if charge_id is None:
        raise _Invalid(Reason.INVALID_OBJECT, "dispute names no charge")
    amount = charge.get("amount") if isinstance(charge, dict) else None
    amount = amount if _is_int(amount) and amount >= disputed else disputed
    pi = _id_of(dispute.get("payment_intent")) or (
        _id_of(charge.get("payment_intent")) if isinstance(charge, dict) else None)
    lost = ChargeRefund(charge_id, pi, None, amount, disputed)
    return Apply(event, _customer(dispute, _metadata(dispute)), (lost,))


_HANDLERS = {
    "checkout.session.completed": _checkout,
    "checkout.session.async_payment_succeeded": _checkout,
    "invoice.paid": _invoice_paid,
    "invoice.payment_failed": _invoice_failed,
    "customer.subscription.created": _subscription,
    "customer.subscription.updated": _subscription,
    "customer.subscription.deleted": _subscription,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute,
    "charge.dispute.updated": _dispute,
    "charge.dispute.closed": _dispute,
}
KNOWN_TYPES = frozenset(_HANDLERS)


# --- field readers ------------------------------------------------------------------------


def _quantity(obj: Mapping[str, Any], where: str) -> int:
    """A line's or subscription item's quantity (seats, packs): a whole number, default 1."""
    quantity = obj.get("quantity", 1)
    if quantity is None:
        return 1
    if not _is_int(quantity) or quantity < 0:
        raise _Invalid(Reason.INVALID_OBJECT, f"{where}: bad quantity")
    return quantity


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _id_of(v: object) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(v, str) and v:
        return v
    if isinstance(v, dict) and isinstance(v.get("id"), str) and v["id"]:
        return str(v["id"])
    return None


def _required_str(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise _Invalid(Reason.INVALID_OBJECT, f"{key} must be a non-empty string")
    return v


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _customer(obj: Mapping[str, Any], meta: Mapping[str, Any]) -> CustomerRef:
    hint = meta.get(METADATA_CUSTOMER)
    return CustomerRef(_id_of(obj.get("customer")),
                       hint if isinstance(hint, str) and hint else None)


def _refs(*ids: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in ids if i))


def _expiry(at: int, cat: Catalog) -> int | None:
    return None if cat.purchased_expiry_seconds is None else at + cat.purchased_expiry_seconds


def _credits(raw: object, where: str, places: int) -> Decimal:
    """A credits amount from metadata (a string) or config: positive, plain, not over-precise."""
    text = raw if isinstance(raw, str) else str(raw) if isinstance(raw, int | Decimal) else None
    if text is None or not _PLAIN_DECIMAL.match(text.strip()):
        raise _Invalid(Reason.INVALID_CREDITS, f"{where}: {str(raw)[:40]!r} is not a plain decimal")
    try:
        value = Decimal(text.strip())
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise _Invalid(Reason.INVALID_CREDITS, f"{where}: not a decimal") from None
    exponent = value.as_tuple().exponent
    if value <= 0 or value > MAX_CREDITS or (isinstance(exponent, int) and -exponent > places):
        raise _Invalid(Reason.INVALID_CREDITS,
                       f"{where}: {text!r} must be > 0, <= 10^15, at most {places} decimals")
    return value


def _period(raw: object, where: str) -> tuple[int, int]:
    start = raw.get("start") if isinstance(raw, dict) else None
    end = raw.get("end") if isinstance(raw, dict) else None
    if not _is_int(start) or not _is_int(end) or not start < end:
        raise _Invalid(Reason.INVALID_OBJECT, f"{where}: start < end, Unix seconds")
    return int(start), int(end)


def _invoice_payment_intents(inv: Mapping[str, Any]) -> list[str | None]:
    """The payment intents of an invoice's payments: Stripe's 2025+ shape (`payments`, an
    expandable list of invoice payments) has no `invoice.payment_intent`, and its charges no
    `charge.invoice`; a refund's charge names the payment intent, found here."""
    payments = inv.get("payments")
    data = payments.get("data") if isinstance(payments, dict) else None
    if not isinstance(data, list):
        return []
    out = []
    for p in data:
        payment = p.get("payment") if isinstance(p, dict) else None
        if isinstance(payment, dict):
            out.append(_id_of(payment.get("payment_intent")))
    return out


def _lines(inv: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    lines = inv.get("lines")
    data = lines.get("data") if isinstance(lines, dict) else None
    if not isinstance(data, list):
        raise _Invalid(Reason.INVALID_OBJECT, "lines.data must be a list")
    return [line for line in data if isinstance(line, dict)]


def _line_price(line: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """(price id, price and product metadata) of an invoice line, classic or 2025 shape."""
    price = line.get("price")
    if isinstance(price, dict):
        return _id_of(price), _price_metadata(price)
    pricing = line.get("pricing")
    details = pricing.get("price_details") if isinstance(pricing, dict) else None
    if isinstance(details, dict):
        return _id_of(details.get("price")), {}
    return None, {}


def _item_price(item: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    price = item.get("price")
    if isinstance(price, dict):
        return _id_of(price), _price_metadata(price)
    return _id_of(price), {}


def _price_metadata(price: Mapping[str, Any]) -> Mapping[str, Any]:
    """The price's metadata over its product's (when the product is expanded)."""
    product = price.get("product")
    merged = dict(_metadata(product)) if isinstance(product, dict) else {}
    merged.update(_metadata(price))
    return merged


def _parent_details(line: Mapping[str, Any]) -> Mapping[str, Any]:
    parent = line.get("parent")
    if not isinstance(parent, dict):
        return {}
    for key in ("subscription_item_details", "invoice_item_details"):
        if isinstance(parent.get(key), dict):
            return dict(parent[key])
    return {}


def _line_proration(line: Mapping[str, Any]) -> bool:
    return bool(line.get("proration") or _parent_details(line).get("proration"))


def _is_subscription_line(line: Mapping[str, Any]) -> bool:
    parent = line.get("parent")
    if isinstance(parent, dict) and parent.get("type") == "subscription_item_details":
        return True
    return line.get("type") == "subscription"


def _line_subscription(line: Mapping[str, Any]) -> str | None:
    return _id_of(line.get("subscription")) or _id_of(_parent_details(line).get("subscription"))


def _invoice_subscription(inv: Mapping[str, Any]) -> str | None:
    if sub := _id_of(inv.get("subscription")):
        return sub
    parent = inv.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    return _id_of(details.get("subscription")) if isinstance(details, dict) else None


def _plan_for(price_id: str | None, meta: Mapping[str, Any], cat: Catalog) -> str | None:
    """The meterline plan a price stands for (config map first, then metadata), if any."""
    plan = cat.plan_by_price.get(price_id) if price_id else None
    if plan is None:
        raw = meta.get(METADATA_PLAN)
        plan = raw if isinstance(raw, str) and raw else None
    if plan is not None and plan not in cat.plans:
        raise _Invalid(Reason.UNKNOWN_PLAN, f"price {price_id}: plan {plan!r} is not configured")
    return plan


def _pack_credits(price_id: str | None, meta: Mapping[str, Any], cat: Catalog) -> Decimal | None:
    """Credits per unit if the price is a credit pack (config map first, then metadata)."""
    if price_id and price_id in cat.credits_by_price:
        return cat.credits_by_price[price_id]
    if METADATA_CREDITS in meta:
        return _credits(meta[METADATA_CREDITS], f"price {price_id} metadata.{METADATA_CREDITS}",
                        cat.credit_places)
    return None
