"""Signature, freshness and envelope rules of the webhook bridge (pure; time passed in).

Signatures are built the way Stripe builds them (`meterline.devstack.stripe_emulator.signing.sign_payload`),
and the official SDK's verifier is the oracle for every case both of us judge.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import stripe

from meterline.devstack.stripe_emulator.signing import build_event, sign_payload
from meterline.webhooks.intake import (
    Outcome,
    WebhookRejected,
    admit,
    parse_event,
    parse_signature_header,
    partition_key,
)
from meterline.webhooks.signing_secrets import SigningSecrets

NOW = 1_800_000_000
TOLERANCE = 300
OLD, NEW = "whsec_old", "whsec_new"
SECRETS = SigningSecrets([OLD, NEW])  # mid-rotation: both active
BODY = build_event("invoice.paid", {"object": "invoice", "id": "in_1", "customer": "cus_1"},
                   event_id="evt_1", created=NOW)


def v1(payload: bytes, secret: str, t: int) -> str:
    """Just the hex signature of a Stripe header."""
    return sign_payload(payload, secret, t).split(",v1=")[1]


def judge(payload: bytes, header: str | None, secrets: SigningSecrets = SECRETS) -> Outcome:
    try:
        admit(payload, header, secrets, now=NOW, tolerance_seconds=TOLERANCE)
    except WebhookRejected as rejected:
        return rejected.outcome
    return Outcome.ACCEPTED


# (header, expected outcome); the body is BODY unless the case says otherwise.
SIGNATURE_CASES = {
    "valid": (sign_payload(BODY, OLD, NOW), Outcome.ACCEPTED),
    # the second configured secret signs: a rotation in progress
    "rotated_secret": (sign_payload(BODY, NEW, NOW), Outcome.ACCEPTED),
    # Stripe sends one v1 per active secret; one of ours matching is enough
    "several_v1_one_right": (
        f"t={NOW},v1={v1(BODY, 'whsec_gone', NOW)},v1={v1(BODY, NEW, NOW)}", Outcome.ACCEPTED),
    # schemes we do not know (v0 is Stripe's test-mode scheme) are ignored, not fatal
    "unknown_scheme_beside_v1": (
        f"t={NOW},v0=abc,v1={v1(BODY, OLD, NOW)}", Outcome.ACCEPTED),
    "exactly_tolerance_old": (sign_payload(BODY, OLD, NOW - TOLERANCE), Outcome.ACCEPTED),
    "exactly_tolerance_ahead": (sign_payload(BODY, OLD, NOW + TOLERANCE), Outcome.ACCEPTED),
    "expired": (sign_payload(BODY, OLD, NOW - TOLERANCE - 1), Outcome.EXPIRED),
    "future_timestamp": (sign_payload(BODY, OLD, NOW + TOLERANCE + 1), Outcome.FUTURE_TIMESTAMP),
    "wrong_secret": (sign_payload(BODY, "whsec_attacker", NOW), Outcome.BAD_SIGNATURE),
    # a valid signature moved to another timestamp: t is part of what is signed
    "timestamp_swapped": (f"t={NOW + 1},v1={v1(BODY, OLD, NOW)}", Outcome.BAD_SIGNATURE),
    # forged and old: authenticity is judged first, so never "expired"
    "wrong_secret_and_expired": (
        sign_payload(BODY, "whsec_attacker", NOW - 10_000), Outcome.BAD_SIGNATURE),
    "uppercase_hex": (f"t={NOW},v1={v1(BODY, OLD, NOW).upper()}", Outcome.BAD_SIGNATURE),
    "missing_header": (None, Outcome.MISSING_SIGNATURE),
    "empty_header": ("", Outcome.MISSING_SIGNATURE),
    "no_timestamp": (f"v1={v1(BODY, OLD, NOW)}", Outcome.MALFORMED_SIGNATURE),
    "non_numeric_timestamp": (f"t=soon,v1={v1(BODY, OLD, NOW)}", Outcome.MALFORMED_SIGNATURE),
    "signed_timestamp": (f"t=+{NOW},v1={v1(BODY, OLD, NOW)}", Outcome.MALFORMED_SIGNATURE),
    "two_timestamps": (
        f"t={NOW},t={NOW - 5},v1={v1(BODY, OLD, NOW)}", Outcome.MALFORMED_SIGNATURE),
    "no_v1": (f"t={NOW},v0={v1(BODY, OLD, NOW)}", Outcome.MALFORMED_SIGNATURE),
    "empty_v1": (f"t={NOW},v1=", Outcome.MALFORMED_SIGNATURE),
    "not_key_value": ("garbage", Outcome.MALFORMED_SIGNATURE),
    "non_ascii": (f"t={NOW},v1=é{v1(BODY, OLD, NOW)[1:]}", Outcome.MALFORMED_SIGNATURE),
}


@pytest.mark.parametrize(("header", "expected"), SIGNATURE_CASES.values(), ids=SIGNATURE_CASES)
def test_signature_matrix(header: str | None, expected: Outcome) -> None:
    assert judge(BODY, header) is expected


def test_tampered_body_is_bad_signature() -> None:
    header = sign_payload(BODY, OLD, NOW)
    tampered = BODY.replace(b"cus_1", b"cus_2")

    assert judge(tampered, header) is Outcome.BAD_SIGNATURE


def test_one_extra_byte_is_bad_signature() -> None:
    header = sign_payload(BODY, OLD, NOW)

    assert judge(BODY + b" ", header) is Outcome.BAD_SIGNATURE


def test_a_retired_secret_is_bad_signature() -> None:
    header = sign_payload(BODY, OLD, NOW)

    assert judge(BODY, header, SigningSecrets([NEW])) is Outcome.BAD_SIGNATURE


BODY_CASES = {
    "non_json": b"id=evt_1&type=invoice.paid",
    "json_array": b'[{"id":"evt_1","type":"invoice.paid"}]',
    "json_string": b'"evt_1"',
    "no_id": b'{"type":"invoice.paid"}',
    "no_type": b'{"id":"evt_1"}',
    "numeric_id": b'{"id":1,"type":"invoice.paid"}',
    "empty_type": b'{"id":"evt_1","type":""}',
    # signed over the raw bytes, so the signature holds; JSON must be UTF-8
    "not_utf8": b'{"id":"evt_\xff","type":"invoice.paid"}',
}


@pytest.mark.parametrize("payload", BODY_CASES.values(), ids=BODY_CASES)
def test_authentic_but_malformed_body_is_malformed_body(payload: bytes) -> None:
    assert judge(payload, sign_payload(payload, OLD, NOW)) is Outcome.MALFORMED_BODY


def test_malformed_body_with_a_bad_signature_is_bad_signature() -> None:
    """An unauthenticated body is never even parsed."""
    assert judge(b"not json", sign_payload(b"not json", "whsec_x", NOW)) is Outcome.BAD_SIGNATURE


def test_header_parse_keeps_every_v1_and_the_timestamp() -> None:
    assert parse_signature_header(f"t={NOW},v1=aa,v0=bb,v1=cc") == (NOW, (b"aa", b"cc"))


# --- the official SDK agrees ------------------------------------------------------------

ORACLE_CASES: dict[str, Callable[[int], str]] = {
    "valid": lambda now: sign_payload(BODY, OLD, now),
    "several_v1_one_right": lambda now: f"t={now},v1={'0' * 64},v1={v1(BODY, OLD, now)}",
    "expired": lambda now: sign_payload(BODY, OLD, now - TOLERANCE - 5),
    "wrong_secret": lambda now: sign_payload(BODY, "whsec_attacker", now),
    "timestamp_swapped": lambda now: f"t={now - 1},v1={v1(BODY, OLD, now)}",
    "no_v1": lambda now: f"t={now},v0=abc",
    "no_timestamp": lambda now: f"v1={v1(BODY, OLD, now)}",
}


@pytest.mark.parametrize("make_header", ORACLE_CASES.values(), ids=ORACLE_CASES)
def test_verdict_matches_the_stripe_sdk(make_header: Callable[[int], str]) -> None:
    now = int(time.time())
    header = make_header(now)
    try:
        stripe.WebhookSignature.verify_header(BODY, header, OLD, tolerance=TOLERANCE)
        sdk_accepts = True
    except stripe.SignatureVerificationError:
        sdk_accepts = False
    try:
        admit(BODY, header, SigningSecrets([OLD]), now=now, tolerance_seconds=TOLERANCE)
        we_accept = True
    except WebhookRejected:
        we_accept = False

    assert we_accept is sdk_accepts


# --- envelope and partition key ---------------------------------------------------------

def event(obj: object) -> dict[str, object]:
    return {"id": "evt_9", "type": "x.y", "data": {"object": obj}}


KEY_CASES = {
    "customer_id_on_the_object": (event({"object": "invoice", "customer": "cus_1"}), "cus_1"),
    "expanded_customer": (event({"object": "charge", "customer": {"id": "cus_2"}}), "cus_2"),
    "the_object_is_a_customer": (event({"object": "customer", "id": "cus_3"}), "cus_3"),
    # e.g. checkout.session.completed for a guest: spread by event id
    "null_customer": (event({"object": "checkout.session", "customer": None}), "evt_9"),
    "no_customer_field": (event({"object": "product", "id": "prod_1"}), "evt_9"),
    "object_not_a_mapping": (event("cus_4"), "evt_9"),
    # v2 thin events carry related_object, not data.object
    "thin_event": ({"id": "evt_9", "type": "x.y", "related_object": {"id": "cus_5"}}, "evt_9"),
}


@pytest.mark.parametrize(("body", "key"), KEY_CASES.values(), ids=KEY_CASES)
def test_partition_key(body: dict[str, object], key: str) -> None:
    assert partition_key(body, "evt_9") == key


def test_parse_event_reads_the_envelope() -> None:
    parsed = parse_event(b'{"id":"evt_1","type":"invoice.paid","api_version":"2025-01-27.acacia",'
                         b'"data":{"object":{"customer":"cus_7"}}}')

    assert (parsed.event_id, parsed.event_type, parsed.api_version, parsed.key) == (
        "evt_1", "invoice.paid", "2025-01-27.acacia", "cus_7")


def test_parse_event_without_api_version() -> None:
    assert parse_event(BODY).api_version is None
