"""A small, faithful local emulator of Stripe's Billing Meter API, driven by the official SDK.

Point ``stripe.StripeClient("sk_test_x", base_addresses={"api": url, "meter_events": url})``
at it (``stripe.api_base`` alone does not redirect the v2 meter event stream).

Emulated:
  * ``POST /v1/customers``, ``GET /v1/customers/{id}``
  * ``POST|GET /v1/billing/meters``, ``GET /v1/billing/meters/{id}`` (formulas sum/count/last)
  * ``POST /v1/billing/meter_events`` -- form-encoded; validated *synchronously* (400
    ``invalid_request_error`` with Stripe's meter error-report codes: ``no_meter``,
    ``meter_event_no_customer_defined``, ``meter_event_customer_not_found``,
    ``meter_event_value_not_found``, ``meter_event_invalid_value`` (also for > 15 significant
    digits), ``timestamp_too_far_in_past``
    (> 35 days), ``timestamp_in_future`` (> 5 min)). A repeated ``identifier`` within 24 h
    returns the original event and is counted once.
  * ``POST /v2/billing/meter_event_session`` (15 min token) and
    ``POST /v2/billing/meter_event_stream`` (JSON, <= 100 events, Bearer session token;
    unknown token -> 401, expired -> 401 ``temporary_session_expired``). As in Stripe, v2
    events are validated *asynchronously*: a well-formed request returns ``{}`` and invalid
    events are dropped and recorded as error reports (``GET /_emulator/errors``).
  * ``GET /v1/billing/meters/{id}/event_summaries`` (``customer``, minute-aligned
    ``start_time``/``end_time``, optional ``value_grouping_window`` hour/day).
  * Injection: token-bucket rate limit (429 ``rate_limit``), random 429s and 500 ``api_error``,
    fixed plus random latency, an injectable clock and a seedable RNG (IDs, failures).
  * Stripe's one-concurrent-call rule: a v1 meter event call for a (customer, meter) that
    already has one in flight gets 429.
  * ``GET /_emulator/events`` / ``/_emulator/errors``: non-Stripe inspection endpoints.
  * Webhooks (test helpers, not Stripe API): ``POST /_emulator/webhook_endpoints`` (JSON
    ``url``, ``secret``, ``enabled_events``) and ``POST /_emulator/trigger`` (JSON ``type``
    plus the object's parameters, see ``triggers.build_object``) build Stripe-shaped
    events (``objects``) and POST them signed like Stripe, retrying non-2xx with backoff;
    ``GET /_emulator/webhook_attempts`` lists attempts. In Python: ``add_webhook_endpoint``,
    ``trigger``, ``send_event`` and ``await emulator.webhooks.drain()``.

Not emulated: meter deactivate/reactivate/update, meter event adjustments (cancel), the v2
``meter_event`` (non-stream) endpoint, dimensions/``event_time_window``, pagination
(``limit``/``starting_after``; ``has_more`` is always false), idempotency keys (the SDK's
``Idempotency-Key`` header is ignored; only meter ``identifier`` dedupe exists), Connect
accounts, livemode, API versions, webhooks for error reports (use ``sign_payload``), and
eventual consistency of summaries (events are summarised immediately). Values are Decimal.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from meterline.devstack.stripe_emulator import objects, routes
from meterline.devstack.stripe_emulator.signing import sign_payload
from meterline.devstack.stripe_emulator.triggers import WebhookEndpoint, WebhookSender, build_object
from meterline.devstack.stripe_emulator.wire import StripeHTTPError

__all__ = ["MeterEventRecord", "StripeEmulator", "run", "serve", "sign_payload"]

DAY = 86_400
MAX_SIGNIFICANT_DIGITS = 15  # meter event values, Stripe API 2026-04-22 on
PAST_LIMIT_SECONDS = 35 * DAY
FUTURE_LIMIT_SECONDS = 300
DEDUPE_WINDOW_SECONDS = DAY
_NUMERIC = re.compile(r"^-?\d+(\.\d+)?$")


@dataclass
class MeterEventRecord:
    identifier: str
    event_name: str
    meter_id: str
    customer: str
    value: Decimal
    timestamp: int
    created: int
    payload: dict[str, str]
    source: str  # "v1" | "v2"

    def to_stripe(self) -> dict[str, Any]:
        return {
            "object": "billing.meter_event",
            "created": self.created,
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": self.payload,
            "timestamp": self.timestamp,
        }

    def to_inspection(self) -> dict[str, Any]:
        return {**self.to_stripe(), "meter": self.meter_id, "customer": self.customer,
                "value": self.value, "source": self.source}


@dataclass
class _TokenBucket:
    rate: float
    tokens: float
    updated: float
    capacity: float = field(init=False)

    def __post_init__(self) -> None:
        self.capacity = max(1.0, self.rate)
        self.tokens = min(self.tokens, self.capacity)

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class StripeEmulator:
    """In-memory Stripe billing state plus an aiohttp app serving it (see module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        rate_limit_per_second: float | None = None,
        failure_rate: float = 0.0,
        throttle_rate: float = 0.0,
        latency_seconds: float = 0.0,
        latency_jitter_seconds: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.clock = clock
        self.failure_rate = failure_rate
        self.throttle_rate = throttle_rate
        # injected failures so far, by HTTP status (tests check they really happened)
        self.injected: dict[int, int] = {429: 0, 500: 0}
        self.latency_seconds = latency_seconds
        self.latency_jitter_seconds = latency_jitter_seconds
        self._in_flight: set[tuple[str, str]] = set()
        self.random = random.Random(seed)
        self.customers: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.events: list[MeterEventRecord] = []
        self.error_reports: list[dict[str, Any]] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        self._by_identifier: dict[str, tuple[MeterEventRecord, int]] = {}
        self.webhooks = WebhookSender(clock)
        self.webhook_events: list[dict[str, Any]] = []
        self._bucket = (
            _TokenBucket(rate_limit_per_second, rate_limit_per_second, clock())
            if rate_limit_per_second else None
        )

    # -- helpers -----------------------------------------------------------------------------
    def now(self) -> int:
        return int(self.clock())

    def _id(self, prefix: str, n: int = 14) -> str:
        alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        return prefix + "".join(self.random.choice(alphabet) for _ in range(n))

    def _meter_for(self, event_name: str) -> dict[str, Any] | None:
        for meter in self.meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    # -- core ingestion (shared by v1 and v2) ----------------------------------------------------
    def ingest(
        self, event_name: Any, payload: Any, identifier: str | None, timestamp: int | None,
        source: str,
    ) -> MeterEventRecord:
        """Validate and record one meter event, or raise ``StripeHTTPError`` (400).

        A repeated ``identifier`` within 24 h is refused the way Stripe refuses it on v1
        (400, "An event already exists with identifier ...", ``Stripe-Should-Retry: false``)
        and counted once; the v2 stream drops it silently (its validation is asynchronous).
        """
        now = self.now()
        if identifier:
            seen = self._by_identifier.get(identifier)
            if seen and now - seen[1] < DEDUPE_WINDOW_SECONDS:
                if source == "v2":
                    return seen[0]
                raise StripeHTTPError(
                    400, f"An event already exists with identifier {identifier}.",
                    param="identifier", headers={"Stripe-Should-Retry": "false"})
        if not isinstance(event_name, str) or not event_name:
            raise StripeHTTPError(400, "Missing required param: event_name.",
                                  code="parameter_missing", param="event_name")
        if not isinstance(payload, dict):
            raise StripeHTTPError(400, "Missing required param: payload.",
                                  code="parameter_missing", param="payload")
        ts = now if timestamp is None else timestamp
        if ts < now - PAST_LIMIT_SECONDS:
            raise StripeHTTPError(400, "Timestamp must be within the past 35 calendar days.",
                                  code="timestamp_too_far_in_past", param="timestamp")
        if ts > now + FUTURE_LIMIT_SECONDS:
            raise StripeHTTPError(400, "Timestamp must be no more than 5 minutes in the future.",
                                  code="timestamp_in_future", param="timestamp")
        meter = self._meter_for(event_name)
        if meter is None:
            raise StripeHTTPError(400, f"No active meter was found for event_name {event_name!r}.",
                                  code="no_meter", param="event_name")
        ckey = meter["customer_mapping"]["event_payload_key"]
        vkey = meter["value_settings"]["event_payload_key"]
        customer = payload.get(ckey)
        if not customer:
            raise StripeHTTPError(400, f"Payload is missing the customer key {ckey!r}.",
                                  code="meter_event_no_customer_defined", param=f"payload[{ckey}]")
        if customer not in self.customers:
            raise StripeHTTPError(400, f"No such customer: '{customer}'",
                                  code="meter_event_customer_not_found", param=f"payload[{ckey}]")
        raw = payload.get(vkey)
        if raw is None:
            raise StripeHTTPError(400, f"Payload is missing the value key {vkey!r}.",
                                  code="meter_event_value_not_found", param=f"payload[{vkey}]")
        try:
            if not _NUMERIC.match(str(raw)):
                raise InvalidOperation
            value = Decimal(str(raw))
        except InvalidOperation:
            raise StripeHTTPError(400, f"Value {raw!r} is not a valid number.",
                                  code="meter_event_invalid_value",
                                  param=f"payload[{vkey}]") from None
        if len(value.normalize().as_tuple().digits) > MAX_SIGNIFICANT_DIGITS:  # since 2026-04-22
            raise StripeHTTPError(400, f"Value {raw!r} has more than {MAX_SIGNIFICANT_DIGITS}"
                                  " significant digits.", code="meter_event_invalid_value",
                                  param=f"payload[{vkey}]")
        record = MeterEventRecord(
            identifier=identifier or self._id("", 24), event_name=event_name,
            meter_id=meter["id"], customer=customer, value=value, timestamp=ts, created=now,
            payload={str(k): str(v) for k, v in payload.items()}, source=source,
        )
        self.events.append(record)
        self._by_identifier[record.identifier] = (record, now)
        return record

    def drop_event(self, identifier: str) -> bool:
        """Forget an accepted event and its identifier, as if Stripe had never received it
        (test hook for the reconciler's repair path)."""
        seen = self._by_identifier.pop(identifier, None)
        if seen is None:
            return False
        self.events.remove(seen[0])
        return True

    async def hold_customer_meter(self, customer: str, event_name: str) -> None:
        """Stripe allows one concurrent v1 meter-event call per (customer, meter): while one
        is in flight (its latency), a second is refused with 429 ``rate_limit``."""
        key = (customer, event_name)
        if key in self._in_flight:
            raise StripeHTTPError(
                429, "Too many concurrent requests for this customer and meter.",
                code="rate_limit")
        self._in_flight.add(key)
        try:
            await asyncio.sleep(self.latency())
        finally:
            self._in_flight.discard(key)

    def latency(self) -> float:
        """Injected latency of one request: fixed part plus uniform random jitter."""
        jitter = self.random.uniform(0, self.latency_jitter_seconds) if self.latency_jitter_seconds else 0
        return self.latency_seconds + jitter

    # -- webhooks (test helpers, see triggers.py) ------------------------------------------------
    def add_webhook_endpoint(self, url: str, secret: str | None = None,
                             enabled_events: tuple[str, ...] = ("*",)) -> WebhookEndpoint:
        """Register a URL to receive signed events (like a Dashboard webhook endpoint)."""
        endpoint = WebhookEndpoint(self._id("we_", 24), url, secret or self._id("whsec_", 32),
                                   enabled_events)
        self.webhooks.endpoints.append(endpoint)
        return endpoint

    def trigger(self, event_type: str, params: dict[str, Any] | None = None, *,
                event_id: str | None = None, created: int | None = None) -> dict[str, Any]:
        """Build a Stripe-shaped `event_type` event from `params` and deliver it; return it."""
        obj = build_object(self, event_type, dict(params or {}))
        event = objects.event(event_type, obj, event_id=event_id or self._id("evt_", 24),
                              created=self.now() if created is None else created)
        self.send_event(event)
        return event

    def send_event(self, event: dict[str, Any]) -> int:
        """Deliver an already-built event (e.g. to replay one, or reorder a lifecycle)."""
        self.webhook_events.append(event)
        return self.webhooks.send(event)

    def summarize(self, meter_id: str, customer: str, start: int, end: int) -> Decimal:
        formula = self.meters[meter_id]["default_aggregation"]["formula"]
        hits = [e for e in self.events
                if e.meter_id == meter_id and e.customer == customer and start <= e.timestamp < end]
        if formula == "count":
            return Decimal(len(hits))
        if formula == "last":
            return max(hits, key=lambda e: (e.timestamp, e.created)).value if hits else Decimal(0)
        return sum((e.value for e in hits), Decimal(0))

    # -- HTTP ----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        routes.register(app, self)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        request_id = self._id("req_")
        if request.path.startswith("/_emulator"):
            return await handler(request)
        try:
            # v1 meter events take their latency while holding the (customer, meter) slot
            if request.path != "/v1/billing/meter_events" and (
                    self.latency_seconds or self.latency_jitter_seconds):
                await asyncio.sleep(self.latency())
            if self._bucket is not None and not self._bucket.take(self.clock()):
                raise StripeHTTPError(
                    429, "Request rate limit exceeded. Please retry after a short delay.",
                    code="rate_limit")
            if self.throttle_rate > 0 and self.random.random() < self.throttle_rate:
                self.injected[429] += 1
                raise StripeHTTPError(
                    429, "Request rate limit exceeded (injected).", code="rate_limit")
            if self.failure_rate > 0 and self.random.random() < self.failure_rate:
                self.injected[500] += 1
                raise StripeHTTPError(500, "An unknown error occurred (injected).",
                                      type="api_error", headers={"Stripe-Should-Retry": "true"})
            self._authenticate(request)
            response = await handler(request)
        except StripeHTTPError as exc:
            return exc.response(request_id)
        response.headers["Request-Id"] = request_id
        return response

    def _authenticate(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if request.path == "/v2/billing/meter_event_stream":
            session = self.sessions.get(token)
            if session is None:
                raise StripeHTTPError(401, "Invalid meter event session token.",
                                      code="invalid_api_key")
            if self.now() >= session["expires_at_epoch"]:
                raise StripeHTTPError(401, "The meter event session has expired.",
                                      type="temporary_session_expired",
                                      code="billing_meter_event_session_expired")
        elif not token.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_")):
            raise StripeHTTPError(401, f"Invalid API Key provided: {token[:12]}***",
                                  code="invalid_api_key")

    def iso(self, epoch: int) -> str:
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")


async def serve(host: str, port: int, emulator: StripeEmulator) -> web.AppRunner:
    """Start ``emulator`` on ``host:port`` (0 = ephemeral); the bound port is
    ``runner.addresses[0][1]``. Call ``await runner.cleanup()`` to stop."""
    runner = web.AppRunner(emulator.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run(host: str, port: int, rate: float, failure_rate: float) -> None:
    """Blocking entry point for ``meterline stripe-emulator`` (rate <= 0 disables limiting)."""

    async def _main() -> None:
        emulator = StripeEmulator(rate_limit_per_second=rate if rate > 0 else None,
                                  failure_rate=failure_rate)
        runner = await serve(host, port, emulator)
        print(f"stripe emulator listening on http://{host}:{runner.addresses[0][1]}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        pass
