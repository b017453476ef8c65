"""What the bridge accepts: Stripe's signature over the raw bytes, then a minimal event envelope.

Pure: no HTTP, no Kafka, time passed in. Stripe signs each delivery attempt as

    Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, b"<t>." + raw body)>[,v1=...]

with one `v1` entry per active secret (several while a secret is being rolled).
A request is authentic when any `v1` entry matches the HMAC under any configured
secret, compared in constant time. It is fresh when `t` lies within the tolerance
of our clock on either side: `stripe.WebhookSignature.verify_header` only bounds
the past, but a signature dated far ahead would stay replayable for that long.

Why not `stripe.WebhookSignature.verify_header` itself: it decodes the body to str
(non-UTF-8 raises UnicodeDecodeError rather than a verification error), tells
"expired" from "forged" only in its message text, reads the wall clock directly,
and does not bound future timestamps. tests/unit/webhooks uses it as the oracle:
both must agree on every signature they both judge.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from meterline.webhooks.signing_secrets import SigningSecrets


class Outcome(StrEnum):
    """How one webhook request ended: the metric label, the response body and the test names."""

    ACCEPTED = "accepted"                        # 200: durably in Kafka
    TOO_LARGE = "too_large"                      # 413: body over webhook_bridge.max_body_bytes
    MISSING_SIGNATURE = "missing_signature"      # 400: no Stripe-Signature header
    MALFORMED_SIGNATURE = "malformed_signature"  # 400: header without one numeric t and a v1
    BAD_SIGNATURE = "bad_signature"              # 400: no v1 matches any secret (forged, tampered)
    EXPIRED = "expired"                          # 400: authentic, but t older than the tolerance
    FUTURE_TIMESTAMP = "future_timestamp"        # 400: authentic, but t further ahead than it
    MALFORMED_BODY = "malformed_body"            # 400: not a JSON object with string id and type
    KAFKA_UNAVAILABLE = "kafka_unavailable"      # 503: not acknowledged in time; Stripe retries


class WebhookRejected(Exception):
    """The request is not a valid, fresh, authentic Stripe event."""

    def __init__(self, outcome: Outcome, detail: str = "") -> None:
        super().__init__(f"{outcome.value}: {detail}" if detail else outcome.value)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """The few envelope fields the bridge routes by; the raw body travels unchanged."""

    event_id: str
    event_type: str
    api_version: str | None
    # Kafka key: the Stripe customer the event is about, else the event id (see partition_key).
    key: str


_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def parse_signature_header(header: str | None) -> tuple[int, tuple[bytes, ...]]:
    """(t, the `v1` signatures) of a Stripe-Signature header; other schemes are ignored."""
    if header is None or not header.strip():
        raise WebhookRejected(Outcome.MISSING_SIGNATURE)
    if not header.isascii():
        raise WebhookRejected(Outcome.MALFORMED_SIGNATURE, "non-ASCII header")
    timestamps: list[str] = []
    signatures: list[bytes] = []
    for item in header.split(","):
        name, sep, value = item.partition("=")
        if sep and name == "t":
            timestamps.append(value)
        elif sep and name == "v1" and value:
            signatures.append(value.encode())
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise WebhookRejected(Outcome.MALFORMED_SIGNATURE, "need exactly one numeric t=")
    if not signatures:
        raise WebhookRejected(Outcome.MALFORMED_SIGNATURE, "no v1= signature")
    return int(timestamps[0]), tuple(signatures)


def verify_signature(
    payload: bytes, header: str | None, secrets: SigningSecrets, *, now: float,
    tolerance_seconds: int,
) -> int:
    """Check `header` against the raw `payload`; return its timestamp or raise WebhookRejected.

    Authenticity is checked before freshness, so `expired` always means "really from
    Stripe, but old" (a replay or a skewed clock), never a forgery.
    """
    timestamp, signatures = parse_signature_header(header)
    signed = b"%d." % timestamp + payload
    expected = [hmac.new(key, signed, hashlib.sha256).hexdigest().encode() for key in secrets.keys]
    if not any(hmac.compare_digest(e, s) for e in expected for s in signatures):
        raise WebhookRejected(Outcome.BAD_SIGNATURE)
    if timestamp < now - tolerance_seconds:
        raise WebhookRejected(Outcome.EXPIRED, f"signed {now - timestamp:.0f} s ago")
    if timestamp > now + tolerance_seconds:
        raise WebhookRejected(Outcome.FUTURE_TIMESTAMP, f"signed {timestamp - now:.0f} s ahead")
    return timestamp


def parse_event(payload: bytes) -> StripeEvent:
    """The envelope of a Stripe event; the body must be a JSON object with string `id` and `type`."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise WebhookRejected(Outcome.MALFORMED_BODY, "not JSON") from exc
    if not isinstance(event, dict):
        raise WebhookRejected(Outcome.MALFORMED_BODY, "not a JSON object")
    event_id, event_type = event.get("id"), event.get("type")
    if not (isinstance(event_id, str) and event_id and isinstance(event_type, str) and event_type):
        raise WebhookRejected(Outcome.MALFORMED_BODY, "no string id and type")
    api_version = event.get("api_version")
    return StripeEvent(
        event_id=event_id,
        event_type=event_type,
        api_version=api_version if isinstance(api_version, str) else None,
        key=partition_key(event, event_id),
    )


def partition_key(event: dict[str, Any], event_id: str) -> str:
    """The Stripe customer id the event concerns, so one customer's events share a partition.

    `data.object.customer` (an id, or an expanded customer object), or the object's own
    id when the object is a customer (`customer.*` events); else the event id, which
    spreads customer-less events (and v2 thin events, which carry no `data.object`).
    """
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return event_id
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    if isinstance(customer, str) and customer:
        return customer
    if obj.get("object") == "customer" and isinstance(obj.get("id"), str) and obj["id"]:
        return str(obj["id"])
    return event_id


def admit(
    payload: bytes, header: str | None, secrets: SigningSecrets, *, now: float,
    tolerance_seconds: int,
) -> StripeEvent:
    """Verify, then parse: the body of an unauthenticated request is never even decoded."""
    verify_signature(payload, header, secrets, now=now, tolerance_seconds=tolerance_seconds)
    return parse_event(payload)
