"""Stripe-compatible webhook signing (the ``Stripe-Signature`` header) and delivery.

The header format is ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<payload>")>``,
which is what ``stripe.Webhook.construct_event`` verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp


def sign_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """Return a ``Stripe-Signature`` header value for ``payload`` signed at ``timestamp``."""
    signed = f"{int(timestamp)}.".encode() + payload
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"t={int(timestamp)},v1={digest}"


def build_event(event_type: str, obj: dict[str, Any], *, event_id: str, created: int) -> bytes:
    """Serialise a minimal v1 ``event`` object (snapshot payload) around ``obj``."""
    event = {
        "id": event_id,
        "object": "event",
        "api_version": None,
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def deliver_webhook(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes,
    secret: str,
    timestamp: int | None = None,
) -> int:
    """POST a signed webhook payload to ``url``; returns the HTTP status."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Stripe-Signature": sign_payload(payload, secret, ts),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    async with session.post(url, data=payload, headers=headers) as resp:
        return resp.status
