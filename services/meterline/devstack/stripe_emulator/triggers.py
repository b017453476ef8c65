"""Emulated Stripe webhooks: endpoints, triggered billing events, signed delivery with retries.

Like Stripe: every event is POSTed to each enabled endpoint as JSON with a
`Stripe-Signature` header (`webhooks.sign_payload`, signed at each attempt with the
emulator's clock); a non-2xx answer or a connection error is retried with exponential
backoff (Stripe keeps trying for three days; here `max_attempts`, from
`retry_base_seconds`). Deliveries of different events run concurrently, so, as with
Stripe, arrival order is not guaranteed.

`build_object(emu, event_type, params)` turns a trigger request into the event's object
(see `TRIGGER_TYPES` and the emulator's module docstring for the parameters).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from meterline.devstack.stripe_emulator import objects
from meterline.devstack.stripe_emulator.signing import sign_payload
from meterline.devstack.stripe_emulator.wire import StripeHTTPError

if TYPE_CHECKING:
    from meterline.devstack.stripe_emulator.emulator import StripeEmulator

MONTH = 30 * 86_400
TRIGGER_TYPES = (
    "checkout.session.completed", "checkout.session.async_payment_succeeded",
    "invoice.paid", "invoice.payment_failed",
    "customer.subscription.created", "customer.subscription.updated",
    "customer.subscription.deleted", "charge.refunded",
)


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str
    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)

    def wants(self, event_type: str) -> bool:
        return "*" in self.enabled_events or event_type in self.enabled_events

    def to_stripe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "webhook_endpoint", "url": self.url,
                "enabled_events": list(self.enabled_events), "status": "enabled",
                "secret": self.secret}


@dataclass
class WebhookSender:
    """Signed delivery of events to the registered endpoints, with bounded retries."""

    clock: Callable[[], float]
    max_attempts: int = 5
    retry_base_seconds: float = 0.5
    timeout_seconds: float = 10.0
    endpoints: list[WebhookEndpoint] = field(default_factory=list)
    # one record per attempt: event id, endpoint id, attempt number, HTTP status or error
    attempts: list[dict[str, Any]] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, event: dict[str, Any]) -> int:
        """Schedule delivery of `event` to every endpoint that wants it; return how many.
        Needs a running event loop (the emulator's, or the test's)."""
        payload = json.dumps(event, separators=(",", ":")).encode()
        targets = [ep for ep in self.endpoints if ep.wants(event["type"])]
        loop = asyncio.get_running_loop()
        for ep in targets:
            task = loop.create_task(self._deliver(ep, event["id"], payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(targets)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every scheduled delivery has succeeded or used up its attempts."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)

    async def _deliver(self, ep: WebhookEndpoint, event_id: str, payload: bytes) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(1, self.max_attempts + 1):
                status: int | None = None
                error: str | None = None
                try:
                    status = await self._post(session, ep, payload)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = repr(exc)
                self.attempts.append({"event": event_id, "endpoint": ep.id, "attempt": attempt,
                                      "status": status, "error": error})
                if status is not None and 200 <= status < 300:
                    return
                if attempt < self.max_attempts:
                    await asyncio.sleep(self.retry_base_seconds * 2 ** (attempt - 1))

    async def _post(self, session: aiohttp.ClientSession, ep: WebhookEndpoint,
                    payload: bytes) -> int:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign_payload(payload, ep.secret, int(self.clock())),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        async with session.post(ep.url, data=payload, headers=headers) as resp:
            await resp.read()
            return resp.status


def _str(params: dict[str, Any], key: str, default: str | None = None) -> str | None:
    v = params.get(key, default)
    if v is not None and not isinstance(v, str):
        raise StripeHTTPError(400, f"Invalid string: {key}", param=key)
    return v


def _int(params: dict[str, Any], key: str, default: int | None = None) -> int | None:
    v = params.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise StripeHTTPError(400, f"Invalid integer: {key}", param=key)
    try:
        return int(v)
    except ValueError:
        raise StripeHTTPError(400, f"Invalid integer: {v}", param=key) from None


def _meta(params: dict[str, Any]) -> dict[str, str]:
    raw = params.get("metadata") or {}
    if not isinstance(raw, dict):
        raise StripeHTTPError(400, "Invalid object: metadata", param="metadata")
    return {str(k): str(v) for k, v in raw.items()}


def _price(emu: StripeEmulator, params: dict[str, Any], recurring: bool) -> dict[str, Any]:
    """A price from `price` (id), `plan` (-> metadata meterline_plan), `credits` (credits per
    unit -> metadata meterline_credits) and `unit_amount`."""
    meta: dict[str, str] = {}
    if plan := _str(params, "plan"):
        meta["meterline_plan"] = plan
    if (credits := params.get("credits")) is not None and not recurring:
        meta["meterline_credits"] = str(credits)
    return objects.price(_str(params, "price") or emu._id("price_", 24),
                         unit_amount=_int(params, "unit_amount", 1000) or 0, metadata=meta,
                         recurring_interval="month" if recurring else None)


def build_object(emu: StripeEmulator, event_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """The Stripe object a triggered `event_type` carries, built from `params`."""
    now = emu.now()
    customer = _str(params, "customer")
    if event_type.startswith("checkout.session."):
        meta = _meta(params)
        if (credits := params.get("credits")) is not None:
            meta["meterline_credits"] = str(credits)
        return objects.checkout_session(
            _str(params, "id") or emu._id("cs_test_", 24), customer=customer,
            amount_total=_int(params, "amount", 1000) or 0, created=now,
            payment_intent=_str(params, "payment_intent") or emu._id("pi_", 24), metadata=meta,
            invoice=_str(params, "invoice"), mode=_str(params, "mode", "payment") or "payment",
            payment_status=_str(params, "payment_status", "paid") or "paid")
    if event_type.startswith("invoice."):
        if customer is None:
            raise StripeHTTPError(400, "Missing required param: customer.", param="customer")
        sub = _str(params, "subscription")
        start = _int(params, "period_start", now) or now
        end = _int(params, "period_end", start + MONTH) or start + MONTH
        line = objects.invoice_line(emu._id("il_", 24), price_obj=_price(emu, params, sub is not None),
                                    period=(start, end), quantity=_int(params, "quantity", 1) or 1,
                                    subscription=sub)
        paid = event_type == "invoice.paid"
        return objects.invoice(
            _str(params, "invoice") or emu._id("in_", 24), customer=customer, lines=[line],
            created=now, billing_reason=_str(params, "billing_reason",
                                             "subscription_cycle" if sub else "manual") or "manual",
            subscription=sub, paid=paid, metadata=_meta(params),
            payment_intent=_str(params, "payment_intent") or emu._id("pi_", 24),
            attempt_count=_int(params, "attempt_count", 1) or 1)
    if event_type.startswith("customer.subscription."):
        if customer is None:
            raise StripeHTTPError(400, "Missing required param: customer.", param="customer")
        deleted = event_type.endswith(".deleted")
        start = _int(params, "period_start", now) or now
        end = _int(params, "period_end", start + MONTH) or start + MONTH
        return objects.subscription(
            _str(params, "subscription") or emu._id("sub_", 24), customer=customer,
            price_obj=_price(emu, params, True),
            status=_str(params, "status", "canceled" if deleted else "active") or "active",
            period=(start, end), created=now, item_id=emu._id("si_", 14),
            canceled_at=_int(params, "canceled_at", now if deleted else None),
            ended_at=_int(params, "ended_at", now if deleted else None), metadata=_meta(params))
    if event_type == "charge.refunded":
        amount = _int(params, "amount")
        if not amount:
            raise StripeHTTPError(400, "Missing required param: amount.", param="amount")
        return objects.charge(
            _str(params, "charge") or emu._id("ch_", 24), customer=customer, amount=amount,
            amount_refunded=_int(params, "amount_refunded", amount) or 0, created=now,
            payment_intent=_str(params, "payment_intent"), invoice=_str(params, "invoice"))
    raise StripeHTTPError(400, f"Unsupported trigger type: {event_type}", param="type")
