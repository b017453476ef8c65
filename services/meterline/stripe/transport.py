"""Sending meter events to Stripe through the official SDK: v1 calls or the v2 event stream.

Both transports turn whatever Stripe answers into a `Result` the sink can act on:

* ``accepted``: Stripe has the event. A v1 400 "An event already exists with identifier"
  is also acceptance -- our identifiers are deterministic, so Stripe holding one proves the
  usage was delivered by an earlier attempt.
* ``retry``: 429, 5xx, 401/403 (a bad key is an outage of ours, not bad data), network
  errors and timeouts; ``retry_after`` carries Stripe's ``Retry-After`` when it sent one.
  ``outage`` marks the failures that count towards the circuit breaker.
* ``reject``: any other 4xx (unknown customer, timestamp too old, no such meter ...),
  with Stripe's error code and message for the DLQ and the reports table.

The SDK's own retries are off (``max_network_retries=0``): retries are the sink's, persisted
in Postgres with backoff, so a restart never forgets one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

import stripe

from meterline.core.credits import decimal_text

# The SDK logs every request at INFO; a sink makes hundreds a second.
logging.getLogger("stripe").setLevel(logging.WARNING)

DUPLICATE_MESSAGE = "An event already exists with identifier"
MAX_STREAM_EVENTS = 100


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer_key: str
    stripe_customer_id: str
    value_key: str
    value: Decimal
    timestamp: int  # epoch seconds

    def payload(self) -> dict[str, str]:
        return {self.customer_key: self.stripe_customer_id, self.value_key: decimal_text(self.value)}


@dataclass(frozen=True, slots=True)
class Result:
    kind: Literal["accepted", "retry", "reject"]
    request_id: str | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    outage: bool = False
    duplicate: bool = False

    @property
    def outcome(self) -> str:
        """Label for `meterline_stripe_requests_total{outcome}`."""
        if self.kind == "accepted":
            return "duplicate" if self.duplicate else "accepted"
        if self.kind == "reject":
            return "rejected"
        return "rate_limited" if self.code == "rate_limit" else "retryable_error"


class Transport(Protocol):
    name: str
    batch_size: int

    async def send(self, events: Sequence[MeterEvent]) -> list[Result]:
        """One Stripe request; one Result per event, in order."""
        ...

    async def close(self) -> None: ...


class Stripe:
    """An async-capable SDK client and the HTTP session it owns (closed by `close`).

    `api_base` points both the v1 API and the v2 stream at one server (the emulator):
    `stripe.api_base` alone does not move the stream.
    """

    def __init__(self, api_key: str, api_base: str | None, timeout: float) -> None:
        bases: Any = {"api": api_base, "meter_events": api_base} if api_base else None
        self._http = stripe.AIOHTTPClient(timeout=timeout)
        self.client = stripe.StripeClient(
            api_key, base_addresses=bases, max_network_retries=0, http_client=self._http)

    async def close(self) -> None:
        await self._http.close_async()


def classify(exc: Exception) -> Result:
    """Map an SDK exception to what the sink should do with the event."""
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status or 0
        headers = exc.headers or {}
        err = exc.error
        code = (err.code if err is not None else None) or exc.code
        message = (err.message if err is not None else None) or exc.user_message or str(exc)
        request_id = exc.request_id or headers.get("Request-Id")
        if status == 400 and DUPLICATE_MESSAGE in str(message):
            return Result("accepted", request_id, code, message, duplicate=True)
        retry_after = _retry_after(headers)
        if isinstance(exc, stripe.APIConnectionError) or status >= 500 or status in (401, 403):
            return Result("retry", request_id, code or f"http_{status or 'network'}", message,
                          retry_after, outage=True)
        if status in (409, 429) or headers.get("Stripe-Should-Retry") == "true":
            return Result("retry", request_id, code or f"http_{status}", message, retry_after)
        return Result("reject", request_id, code or f"http_{status}", message)
    if isinstance(exc, TimeoutError | OSError):
        return Result("retry", None, "network", f"{type(exc).__name__}: {exc}", outage=True)
    # Anything else is a bug of ours: keep the event, retry later, and make noise.
    return Result("retry", None, "internal", f"{type(exc).__name__}: {exc}")


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("Retry-After") if headers else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _request_id(obj: Any) -> str | None:
    response = getattr(obj, "last_response", None)
    return getattr(response, "request_id", None)


class V1Transport:
    """`POST /v1/billing/meter_events`, one event per call (validated synchronously)."""

    name = "v1"
    batch_size = 1

    def __init__(self, api: Stripe) -> None:
        self.api = api
        self.client = api.client

    async def send(self, events: Sequence[MeterEvent]) -> list[Result]:
        (event,) = events
        try:
            created = await self.client.v1.billing.meter_events.create_async({
                "event_name": event.event_name,
                "identifier": event.identifier,
                "timestamp": event.timestamp,
                "payload": event.payload(),
            })
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            return [classify(exc)]
        return [Result("accepted", _request_id(created))]

    async def close(self) -> None:
        await self.api.close()


class V2Transport:
    """The v2 meter event stream: up to 100 events a call, authenticated by a meter event
    session token that lasts 15 minutes. The token is renewed `refresh_margin` seconds
    before it expires, and at once when Stripe says it expired (then the call is repeated).

    Stripe validates v2 events asynchronously: a 200 means "accepted for processing";
    events it later refuses show up as error reports, and in the reconciler's variance.
    """

    name = "v2"
    batch_size = MAX_STREAM_EVENTS

    def __init__(self, api: Stripe, refresh_margin: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.client = api.client
        self.refresh_margin = refresh_margin
        self.clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.sessions_opened = 0

    async def _session_token(self, *, renew: bool = False) -> str:
        async with self._lock:
            if renew or self._token is None or self.clock() >= self._expires_at - self.refresh_margin:
                session = await self.client.v2.billing.meter_event_session.create_async()
                self._token = session.authentication_token
                self._expires_at = _epoch(session.expires_at)
                self.sessions_opened += 1
            return self._token

    async def send(self, events: Sequence[MeterEvent]) -> list[Result]:
        body: Any = {"events": [{
            "event_name": e.event_name,
            "identifier": e.identifier,
            "timestamp": datetime.fromtimestamp(e.timestamp, UTC).isoformat().replace("+00:00", "Z"),
            "payload": e.payload(),
        } for e in events]}
        result: Result
        for renew in (False, True):
            try:
                token = await self._session_token(renew=renew)
                await self.client.v2.billing.meter_event_stream.create_async(
                    body, {"api_key": token})
                result = Result("accepted")
                break
            except stripe.StripeError as exc:
                result = classify(exc)
                if exc.http_status == 401 and not renew:
                    continue  # session expired or revoked: open a new one and repeat
                break
            except Exception as exc:  # noqa: BLE001 - classified, never swallowed
                result = classify(exc)
                break
        return [result] * len(events)

    async def close(self) -> None:
        await self.api.close()


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
