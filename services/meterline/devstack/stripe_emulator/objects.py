"""Stripe-shaped objects for emulated webhooks: checkout sessions, invoices, subscriptions,
charges, and the v1 `event` around them.

Only the fields meterline reads, plus the identifying ones, with Stripe's real names and
types (ids, Unix-second timestamps, amounts as integers in the currency's minor unit,
metadata as strings). The shapes are those of API version `API_VERSION` (before the
2025 "basil" changes that moved invoice subscription and price fields under `parent`
and `pricing`).
"""

from __future__ import annotations

from typing import Any

API_VERSION = "2024-06-20"
Json = dict[str, Any]


def event(event_type: str, obj: Json, *, event_id: str, created: int,
          previous_attributes: Json | None = None) -> Json:
    """A v1 `event` (snapshot payload) around `obj`."""
    data: Json = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id, "object": "event", "api_version": API_VERSION, "created": created,
        "data": data, "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": event_type,
    }


def price(price_id: str, *, unit_amount: int, metadata: dict[str, str] | None = None,
          recurring_interval: str | None = None, product: str = "prod_meterline") -> Json:
    return {
        "id": price_id, "object": "price", "active": True, "currency": "usd",
        "metadata": dict(metadata or {}), "product": product,
        "recurring": ({"interval": recurring_interval, "interval_count": 1, "usage_type": "licensed"}
                      if recurring_interval else None),
        "type": "recurring" if recurring_interval else "one_time", "unit_amount": unit_amount,
    }


def checkout_session(session_id: str, *, customer: str | None, amount_total: int, created: int,
                     payment_intent: str | None, metadata: dict[str, str] | None = None,
                     invoice: str | None = None, mode: str = "payment",
                     payment_status: str = "paid") -> Json:
    return {
        "id": session_id, "object": "checkout.session", "amount_total": amount_total,
        "client_reference_id": None, "created": created, "currency": "usd",
        "customer": customer, "invoice": invoice, "livemode": False,
        "metadata": dict(metadata or {}), "mode": mode, "payment_intent": payment_intent,
        "payment_status": payment_status, "status": "complete",
    }


def invoice_line(line_id: str, *, price_obj: Json, period: tuple[int, int], quantity: int = 1,
                 subscription: str | None = None, proration: bool = False) -> Json:
    """A line: `type` is `subscription` when it bills a subscription, else `invoiceitem`."""
    return {
        "id": line_id, "object": "line_item", "amount": price_obj["unit_amount"] * quantity,
        "currency": "usd", "metadata": {}, "period": {"start": period[0], "end": period[1]},
        "price": price_obj, "proration": proration, "quantity": quantity,
        "subscription": subscription, "type": "subscription" if subscription else "invoiceitem",
    }


def invoice(invoice_id: str, *, customer: str, lines: list[Json], created: int,
            billing_reason: str = "manual", subscription: str | None = None,
            payment_intent: str | None = None, paid: bool = True, attempt_count: int = 1,
            metadata: dict[str, str] | None = None) -> Json:
    total = sum(int(line["amount"]) for line in lines)
    return {
        "id": invoice_id, "object": "invoice", "amount_due": total,
        "amount_paid": total if paid else 0, "amount_remaining": 0 if paid else total,
        "attempt_count": attempt_count, "attempted": True, "billing_reason": billing_reason,
        "charge": None, "created": created, "currency": "usd", "customer": customer,
        "lines": {"object": "list", "data": lines, "has_more": False,
                  "url": f"/v1/invoices/{invoice_id}/lines"},
        "livemode": False, "metadata": dict(metadata or {}), "paid": paid,
        "payment_intent": payment_intent, "status": "paid" if paid else "open",
        "status_transitions": {"paid_at": created if paid else None},
        "subscription": subscription,
    }


def subscription(subscription_id: str, *, customer: str, price_obj: Json, status: str,
                 period: tuple[int, int], created: int, item_id: str, quantity: int = 1,
                 canceled_at: int | None = None, ended_at: int | None = None,
                 cancel_at_period_end: bool = False,
                 metadata: dict[str, str] | None = None) -> Json:
    item = {
        "id": item_id, "object": "subscription_item", "created": created,
        "price": price_obj, "quantity": quantity, "subscription": subscription_id,
    }
    return {
        "id": subscription_id, "object": "subscription",
        "cancel_at_period_end": cancel_at_period_end, "canceled_at": canceled_at,
        "created": created, "currency": "usd", "current_period_end": period[1],
        "current_period_start": period[0], "customer": customer, "ended_at": ended_at,
        "items": {"object": "list", "data": [item], "has_more": False,
                  "url": f"/v1/subscription_items?subscription={subscription_id}"},
        "livemode": False, "metadata": dict(metadata or {}), "status": status,
    }


def charge(charge_id: str, *, customer: str | None, amount: int, amount_refunded: int,
           created: int, payment_intent: str | None, invoice: str | None = None) -> Json:
    return {
        "id": charge_id, "object": "charge", "amount": amount, "amount_captured": amount,
        "amount_refunded": amount_refunded, "captured": True, "created": created,
        "currency": "usd", "customer": customer, "invoice": invoice, "livemode": False,
        "metadata": {}, "paid": True, "payment_intent": payment_intent,
        "refunded": amount_refunded == amount, "status": "succeeded",
    }
