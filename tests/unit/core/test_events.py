"""meterline.core.events: parsing and validating CloudEvents usage records.

Every `Reason` is produced at least once through `EventValidator.parse_record`.
"""

from __future__ import annotations

import calendar
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from meterline.config import MeterConfig
from meterline.core.credits import debit_for
from meterline.core.events import (
    EventValidator,
    Limits,
    ParsedRecords,
    Reason,
    Rejection,
    dedupe_key,
    parse_time_ms,
    to_quantity,
)

MISSING = object()  # marks an attribute to leave out of the event


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch milliseconds computed independently of the code under test."""
    return calendar.timegm((year, month, day, hour, minute, second)) * 1000


NOW_MS = utc_ms(2026, 11, 21, 17, 5, 0)
LATENESS_MS = 35 * 24 * 3600 * 1000
SKEW_MS = 300_000
LIMITS = Limits(
    max_message_bytes=2048, max_batch_events=4, max_lateness_ms=LATENESS_MS, max_future_skew_ms=SKEW_MS
)
METERS = {
    "llm_tokens": MeterConfig(
        key="llm_tokens", event_type="llm_tokens", aggregation="sum", value_property="tokens",
        credits_per_unit=Decimal("0.00002"),
    ),
    "api_request": MeterConfig(
        key="api_calls", event_type="api_request", aggregation="count", credits_per_unit=Decimal("0.001"),
    ),
}


def event(**attrs: Any) -> dict[str, Any]:
    """A valid `llm_tokens` event; keyword arguments replace (or, with MISSING, remove) attributes."""
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "//api/eu-1",
        "type": "llm_tokens",
        "subject": "cus_1",
        "time": "2026-11-21T17:04:59.500Z",
        "data": {"tokens": 42},
    }
    doc.update(attrs)
    return {k: v for k, v in doc.items() if v is not MISSING}


def raw(doc: Any) -> bytes:
    return orjson.dumps(doc)


def parse(
    value: bytes | None,
    *,
    known_customers: set[str] | None = None,
    now_ms: int = NOW_MS,
    offset: int = 7,
) -> ParsedRecords:
    return EventValidator(METERS, LIMITS, known_customers).parse_record(value, offset, now_ms)


def only_rejection(parsed: ParsedRecords) -> Rejection:
    assert parsed.accepted == []
    assert len(parsed.rejected) == 1
    return parsed.rejected[0]


def at_ms(ms: int) -> str:
    """An RFC 3339 UTC timestamp for epoch milliseconds (for boundary tests)."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


# --- accepted events --------------------------------------------------------------------


def test_valid_event_is_accepted_with_exact_fields() -> None:
    parsed = parse(raw(event()), offset=41)

    assert parsed.rejected == []
    [ev] = parsed.accepted
    assert ev.dedupe_key == dedupe_key("//api/eu-1", "evt-1")
    assert ev.customer == "cus_1"
    assert ev.meter == "llm_tokens"  # the meter key, not the CloudEvents type
    assert ev.time_ms == NOW_MS - 500
    assert ev.value == 42 and isinstance(ev.value, int)
    assert ev.offset == 41


def test_count_meter_counts_one_per_event_and_needs_no_data() -> None:
    parsed = parse(raw(event(type="api_request", data=MISSING)))

    [ev] = parsed.accepted
    assert ev.meter == "api_calls"
    assert ev.value == 1


def test_any_customer_is_accepted_when_known_customers_is_none() -> None:
    parsed = parse(raw(event(subject="cus_never_configured")), known_customers=None)

    assert [ev.customer for ev in parsed.accepted] == ["cus_never_configured"]


def test_known_customer_is_accepted_when_known_customers_is_a_set() -> None:
    parsed = parse(raw(event(subject="cus_1")), known_customers={"cus_1"})

    assert [ev.customer for ev in parsed.accepted] == ["cus_1"]


def test_a_string_value_beyond_stripes_15_significant_digits_is_rejected_with_the_reason() -> None:
    rejection = only_rejection(parse(raw(event(data={"tokens": "1234567890.123456"}))))  # 16

    assert rejection.reason is Reason.INVALID_VALUE
    assert "15 significant digits" in rejection.detail


def test_numeric_string_value_is_accepted_exactly() -> None:
    [ev] = parse(raw(event(data={"tokens": "1.5"}))).accepted

    assert ev.value == Decimal("1.5")


def test_float_value_is_accepted_as_its_shortest_decimal() -> None:
    [ev] = parse(raw(event(data={"tokens": 0.1}))).accepted

    assert ev.value == Decimal("0.1")


def test_event_exactly_at_max_lateness_is_accepted() -> None:
    parsed = parse(raw(event(time=at_ms(NOW_MS - LATENESS_MS))))

    assert parsed.rejected == []
    assert parsed.accepted[0].time_ms == NOW_MS - LATENESS_MS


def test_event_exactly_at_max_future_skew_is_accepted() -> None:
    parsed = parse(raw(event(time=at_ms(NOW_MS + SKEW_MS))))

    assert parsed.rejected == []
    assert parsed.accepted[0].time_ms == NOW_MS + SKEW_MS


def test_message_of_exactly_max_bytes_is_not_oversized() -> None:
    body = raw(event())
    padded = body + b" " * (LIMITS.max_message_bytes - len(body))
    assert len(padded) == LIMITS.max_message_bytes

    parsed = parse(padded)

    assert parsed.rejected == [] and len(parsed.accepted) == 1


# --- one test table per rejection reason --------------------------------------------------

OVERSIZED_MESSAGE = raw(event(data={"tokens": 1, "pad": "x" * LIMITS.max_message_bytes}))

REJECTED_MESSAGES = [
    # a message one byte over max_message_bytes is not even parsed
    pytest.param(OVERSIZED_MESSAGE, Reason.OVERSIZED, id="oversized-message"),
    # a JSON batch with more events than max_batch_events
    pytest.param(raw([event(id=f"e{i}") for i in range(LIMITS.max_batch_events + 1)]),
                 Reason.OVERSIZED, id="oversized-batch"),
    # invalid UTF-8 bytes (a UTF-16 BOM) before the JSON
    pytest.param(b"\xff\xfe{", Reason.NOT_UTF8, id="not-utf8-bom"),
    # a lone continuation byte inside a JSON string
    pytest.param(b'{"id": "\x80"}', Reason.NOT_UTF8, id="not-utf8-in-string"),
    # truncated JSON
    pytest.param(b'{"specversion": "1.0", ', Reason.MALFORMED_JSON, id="malformed-truncated"),
    # an empty (but present) message value
    pytest.param(b"", Reason.MALFORMED_JSON, id="malformed-empty-bytes"),
    # a Kafka tombstone (value None)
    pytest.param(None, Reason.MALFORMED_JSON, id="malformed-tombstone"),
    # NaN is not JSON: orjson rejects the literal
    pytest.param(raw(event())[:-2] + b', "x": NaN}', Reason.MALFORMED_JSON, id="malformed-nan-literal"),
    # neither is Infinity
    pytest.param(b'{"specversion": "1.0", "data": {"tokens": Infinity}}', Reason.MALFORMED_JSON,
                 id="malformed-infinity-literal"),
    # 1e400 overflows a double: orjson refuses it ("number is infinity when parsed as double")
    pytest.param(b'{"specversion": "1.0", "data": {"tokens": 1e400}}', Reason.MALFORMED_JSON,
                 id="malformed-1e400"),
    # and so does -1e400
    pytest.param(b'{"data": {"tokens": -1e400}}', Reason.MALFORMED_JSON, id="malformed-minus-1e400"),
    # deeper than max_json_depth (64 here), as a batch and as one event's data
    pytest.param(b"[" * 300 + b"]" * 300, Reason.TOO_DEEP, id="too-deep-300-brackets"),
    pytest.param(raw(event(data={"tokens": 1, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})),
                 Reason.TOO_DEEP, id="too-deep-data-65-levels"),
    # a JSON document that is not an object
    pytest.param(b'"just a string"', Reason.INVALID_ENVELOPE, id="envelope-string"),
    pytest.param(b"42", Reason.INVALID_ENVELOPE, id="envelope-number"),
    pytest.param(b"null", Reason.INVALID_ENVELOPE, id="envelope-null"),
    # CloudEvents 0.3 and a missing / numeric specversion
    pytest.param(raw(event(specversion="0.3")), Reason.INVALID_ENVELOPE, id="envelope-specversion-0.3"),
    pytest.param(raw(event(specversion=MISSING)), Reason.INVALID_ENVELOPE, id="envelope-no-specversion"),
    pytest.param(raw(event(specversion=1.0)), Reason.INVALID_ENVELOPE, id="envelope-specversion-number"),
    # each required attribute missing
    pytest.param(raw(event(source=MISSING)), Reason.INVALID_ENVELOPE, id="envelope-no-source"),
    pytest.param(raw(event(id=MISSING)), Reason.INVALID_ENVELOPE, id="envelope-no-id"),
    pytest.param(raw(event(type=MISSING)), Reason.INVALID_ENVELOPE, id="envelope-no-type"),
    pytest.param(raw(event(subject=MISSING)), Reason.INVALID_ENVELOPE, id="envelope-no-subject"),
    # ... or empty
    pytest.param(raw(event(source="")), Reason.INVALID_ENVELOPE, id="envelope-empty-source"),
    pytest.param(raw(event(id="")), Reason.INVALID_ENVELOPE, id="envelope-empty-id"),
    pytest.param(raw(event(type="")), Reason.INVALID_ENVELOPE, id="envelope-empty-type"),
    pytest.param(raw(event(subject="")), Reason.INVALID_ENVELOPE, id="envelope-empty-subject"),
    # ... or not a string
    pytest.param(raw(event(id=123)), Reason.INVALID_ENVELOPE, id="envelope-numeric-id"),
    # ... or longer than 512 characters
    pytest.param(raw(event(subject="c" * 513)), Reason.INVALID_ENVELOPE, id="envelope-subject-513-chars"),
    # a timestamp without UTC offset is ambiguous
    pytest.param(raw(event(time="2026-11-21T17:04:59")), Reason.INVALID_TIME, id="time-naive"),
    # a date alone has no offset either
    pytest.param(raw(event(time="2026-11-21")), Reason.INVALID_TIME, id="time-date-only"),
    # not a timestamp at all
    pytest.param(raw(event(time="yesterday")), Reason.INVALID_TIME, id="time-garbage"),
    # epoch seconds as a number are not RFC 3339
    pytest.param(raw(event(time=NOW_MS // 1000)), Reason.INVALID_TIME, id="time-number"),
    # time is required
    pytest.param(raw(event(time=MISSING)), Reason.INVALID_TIME, id="time-missing"),
    # negative quantities are never usage
    pytest.param(raw(event(data={"tokens": -1})), Reason.INVALID_VALUE, id="value-negative-int"),
    pytest.param(raw(event(data={"tokens": -0.5})), Reason.INVALID_VALUE, id="value-negative-float"),
    pytest.param(raw(event(data={"tokens": "-1"})), Reason.INVALID_VALUE, id="value-negative-string"),
    # JSON booleans are not 0/1
    pytest.param(raw(event(data={"tokens": True})), Reason.INVALID_VALUE, id="value-true"),
    pytest.param(raw(event(data={"tokens": False})), Reason.INVALID_VALUE, id="value-false"),
    # strings must be numbers, and finite ones
    pytest.param(raw(event(data={"tokens": "abc"})), Reason.INVALID_VALUE, id="value-string-abc"),
    pytest.param(raw(event(data={"tokens": "NaN"})), Reason.INVALID_VALUE, id="value-string-nan"),
    pytest.param(raw(event(data={"tokens": "Infinity"})), Reason.INVALID_VALUE, id="value-string-infinity"),
    # more significant digits than a Stripe meter event value may carry (15, issue 10.11)
    pytest.param(raw(event(data={"tokens": "0.30000000000000000001"})), Reason.INVALID_VALUE,
                 id="value-string-more-than-15-significant-digits"),
    # null, arrays and objects are not quantities
    pytest.param(raw(event(data={"tokens": None})), Reason.INVALID_VALUE, id="value-null"),
    pytest.param(raw(event(data={"tokens": [1]})), Reason.INVALID_VALUE, id="value-array"),
    # the configured value property is missing from data
    pytest.param(raw(event(data={"other": 1})), Reason.INVALID_VALUE, id="value-property-missing"),
    # data is missing altogether, or is not an object
    pytest.param(raw(event(data=MISSING)), Reason.INVALID_VALUE, id="value-no-data"),
    pytest.param(raw(event(data="42")), Reason.INVALID_VALUE, id="value-data-is-string"),
    # a type no meter is configured for
    pytest.param(raw(event(type="sms_sent")), Reason.UNKNOWN_METER, id="unknown-meter"),
    # one millisecond older than the maximum lateness
    pytest.param(raw(event(time=at_ms(NOW_MS - LATENESS_MS - 1))), Reason.TOO_OLD, id="too-old-by-1ms"),
    # year 0000: RFC 3339 allows it (datetime does not), and it is certainly too old
    pytest.param(raw(event(time="0000-01-01T00:00:00Z")), Reason.TOO_OLD, id="too-old-year-0"),
    # from 2020: far too old
    pytest.param(raw(event(time="2020-01-01T00:00:00Z")), Reason.TOO_OLD, id="too-old-2020"),
    # one millisecond beyond the allowed future skew
    pytest.param(raw(event(time=at_ms(NOW_MS + SKEW_MS + 1))), Reason.FUTURE_TIMESTAMP,
                 id="future-by-1ms"),
    # a day ahead
    pytest.param(raw(event(time="2026-11-22T17:05:00Z")), Reason.FUTURE_TIMESTAMP, id="future-a-day"),
]


@pytest.mark.parametrize(("value", "reason"), REJECTED_MESSAGES)
def test_bad_message_is_rejected_with_its_reason(value: bytes | None, reason: Reason) -> None:
    rejection = only_rejection(parse(value, offset=99))

    assert rejection.reason is reason
    assert rejection.offset == 99
    assert rejection.batch_index is None
    assert rejection.detail  # a human-readable explanation for the DLQ header


def test_every_reason_is_covered_by_the_rejection_table() -> None:
    # internal_error is never the validator's verdict: the pipeline sets it when handling a
    # record raises (tests/integration/test_intake_failures.py).
    covered = {p.values[1] for p in REJECTED_MESSAGES} | {Reason.UNKNOWN_CUSTOMER, Reason.INTERNAL_ERROR}
    assert covered == set(Reason)


def test_unknown_customer_is_rejected_when_known_customers_is_a_set() -> None:
    rejection = only_rejection(parse(raw(event(subject="cus_2")), known_customers={"cus_1"}))

    assert rejection.reason is Reason.UNKNOWN_CUSTOMER
    assert "cus_2" in rejection.detail


def test_unknown_customer_is_rejected_when_known_customers_is_empty() -> None:
    rejection = only_rejection(parse(raw(event()), known_customers=set()))

    assert rejection.reason is Reason.UNKNOWN_CUSTOMER


def test_rejected_single_message_keeps_the_original_bytes() -> None:
    # odd spacing and key order: a re-encoding would not reproduce these bytes
    original = (b'{ "type" : "llm_tokens", "specversion":"1.0", "id":"e", "source":"s",'
                b' "subject":"c", "time":"2026-11-21T17:04:59Z", "data":{"tokens": -3} }')

    rejection = only_rejection(parse(original))

    assert rejection.reason is Reason.INVALID_VALUE
    assert rejection.payload == original


@pytest.mark.parametrize(
    "original",
    [
        pytest.param(OVERSIZED_MESSAGE, id="oversized"),
        pytest.param(b"\xff\xfe{", id="not-utf8"),
        pytest.param(b"{nope", id="malformed"),
    ],
)
def test_undecodable_message_keeps_the_original_bytes(original: bytes) -> None:
    assert only_rejection(parse(original)).payload == original


def test_tombstone_rejection_has_empty_payload() -> None:
    assert only_rejection(parse(None)).payload == b""


def test_oversized_batch_is_rejected_whole_with_the_message_as_payload() -> None:
    message = raw([event(id=f"e{i}") for i in range(LIMITS.max_batch_events + 1)])

    rejection = only_rejection(parse(message))

    assert rejection.reason is Reason.OVERSIZED
    assert rejection.payload == message
    assert rejection.batch_index is None


def test_batch_accepts_good_events_and_rejects_bad_ones_individually() -> None:
    negative = event(id="e1", data={"tokens": -5})
    not_an_object = [1, 2]
    batch = [event(id="e0", data={"tokens": 3}), negative, event(id="e2", data={"tokens": "0.25"}),
             not_an_object]
    assert len(batch) == LIMITS.max_batch_events  # exactly at the limit is allowed

    parsed = parse(raw(batch), offset=12)

    assert [(ev.dedupe_key, ev.value, ev.offset) for ev in parsed.accepted] == [
        (dedupe_key("//api/eu-1", "e0"), 3, 12),
        (dedupe_key("//api/eu-1", "e2"), Decimal("0.25"), 12),
    ]
    assert [(r.reason, r.batch_index, r.offset) for r in parsed.rejected] == [
        (Reason.INVALID_VALUE, 1, 12),
        (Reason.INVALID_ENVELOPE, 3, 12),
    ]
    # each rejected member goes on its own, as its own bytes, not the whole batch
    assert parsed.rejected[0].payload == orjson.dumps(negative)
    assert orjson.loads(parsed.rejected[0].payload) == negative
    assert parsed.rejected[1].payload == b"[1,2]"


def test_rejected_batch_member_keeps_its_exact_bytes() -> None:
    # spacing, key order, escapes and number spellings as the producer wrote them; a
    # member nested 300 deep could not even be re-encoded (orjson writes 255 levels)
    member = b'{ "specversion" : "1.0", "id":"\u0065", "data" : {"tokens": -5.0E0} }'
    batch = b'[\n  ' + raw(event()) + b' ,\t' + member + b'\r\n]'

    parsed = parse(batch)

    assert len(parsed.accepted) == 1
    [rejection] = parsed.rejected
    assert (rejection.payload, rejection.batch_index) == (member, 1)


def test_batch_member_reasons_cover_time_and_meter_checks() -> None:
    batch = [event(id="a", type="nope"), event(id="b", time="2026-11-21T17:04:59"),
             event(id="c", time="2000-01-01T00:00:00Z")]

    parsed = parse(raw(batch))

    assert parsed.accepted == []
    assert [(r.batch_index, r.reason) for r in parsed.rejected] == [
        (0, Reason.UNKNOWN_METER), (1, Reason.INVALID_TIME), (2, Reason.TOO_OLD)]


def test_nesting_beyond_orjsons_own_limit_is_too_deep_not_malformed() -> None:
    # orjson stops at 1024 levels with its own error; that is still our too_deep
    validator = EventValidator(METERS, Limits(1_000_000, 4, LATENESS_MS, SKEW_MS, 1024))
    deep = b"[" * 1100 + b"]" * 1100

    [rejection] = validator.parse_record(deep, 3, NOW_MS).rejected

    assert (rejection.reason, rejection.payload) == (Reason.TOO_DEEP, deep)


def test_nesting_at_the_limit_is_accepted_one_more_level_is_too_deep() -> None:
    validator = EventValidator(METERS, Limits(1_000_000, 4, LATENESS_MS, SKEW_MS, 5))
    # the event object is level 1, data 2, then three arrays: 5 levels
    at_limit = raw(event(data={"tokens": 1, "x": [[[]]]}))
    over = raw(event(data={"tokens": 1, "x": [[[[]]]]}))

    assert len(validator.parse_record(at_limit, 0, NOW_MS).accepted) == 1
    assert [r.reason for r in validator.parse_record(over, 0, NOW_MS).rejected] == [Reason.TOO_DEEP]
    # in a batch the array is one more level
    assert [r.reason for r in validator.parse_record(b"[" + at_limit + b"]", 0, NOW_MS).rejected] == [
        Reason.TOO_DEEP]


def test_duplicate_object_keys_take_the_last_value() -> None:
    # RFC 8259 leaves duplicate names open; orjson, JSON.parse and Python's json keep the last
    body = raw(event())[:-1] + b',"subject":"cus_last","data":{"tokens":-1,"tokens":5}}'

    [ev] = parse(body).accepted

    assert (ev.customer, ev.value) == ("cus_last", 5)


def test_empty_batch_is_a_batch_of_no_events() -> None:
    # CloudEvents' batch format is a JSON array of events; [] carries none: nothing to bill,
    # nothing to dead-letter, and the schema (minItems 0) says the same.
    for empty in (b"[]", b" [ \n ] "):
        assert parse(empty) == ParsedRecords([], [])


# --- parse_time_ms ---------------------------------------------------------------------------

TIMES = [
    # UTC "Z" with milliseconds: exact, no float rounding
    ("2026-11-21T17:05:00.123Z", utc_ms(2026, 11, 21, 17, 5, 0) + 123),
    # "+00:00" is the same instant as "Z"
    ("2026-11-21T17:05:00.123+00:00", utc_ms(2026, 11, 21, 17, 5, 0) + 123),
    # "+02:00": two hours ahead of UTC, so the UTC instant is 15:05
    ("2026-11-21T17:05:00.123+02:00", utc_ms(2026, 11, 21, 15, 5, 0) + 123),
    # a negative offset with minutes: 17:05 at -05:30 is 22:35 UTC
    ("2026-11-21T17:05:00-05:30", utc_ms(2026, 11, 21, 22, 35, 0)),
    # an offset that crosses midnight into the previous UTC day
    ("2026-11-21T01:00:00.999+03:00", utc_ms(2026, 11, 20, 22, 0, 0) + 999),
    # no fraction: whole seconds
    ("2026-11-21T17:05:00Z", utc_ms(2026, 11, 21, 17, 5, 0)),
    # microseconds are truncated to the millisecond (floor), not rounded
    ("2026-11-21T17:05:00.123999Z", utc_ms(2026, 11, 21, 17, 5, 0) + 123),
    # nanosecond precision (Go's RFC3339Nano) is accepted and floored
    ("2026-11-21T17:05:00.123456789Z", utc_ms(2026, 11, 21, 17, 5, 0) + 123),
    # the epoch
    ("1970-01-01T00:00:00Z", 0),
    # the last millisecond before the epoch is -1
    ("1969-12-31T23:59:59.999Z", -1),
    # half a millisecond before the epoch floors to -1, not 0
    ("1969-12-31T23:59:59.9995Z", -1),
    # a leap day
    ("2028-02-29T12:00:00Z", utc_ms(2028, 2, 29, 12, 0, 0)),
    # year 0000 (RFC 3339's first year; datetime starts at 0001): one 400-year cycle before 0400
    ("0000-01-01T00:00:00Z", utc_ms(400, 1, 1) - 146_097 * 86_400_000),
    # year 0000 is a leap year, and an offset can move the instant into the year -1
    ("0000-02-29T00:00:00+01:00", utc_ms(400, 2, 28, 23) - 146_097 * 86_400_000),
    # the last representable instant, behind UTC: lands in year 10000
    ("9999-12-31T23:59:59-01:00", utc_ms(9999, 12, 31, 23, 59, 59) + 3_600_000),
]


@pytest.mark.parametrize(("text", "expected_ms"), TIMES)
def test_parse_time_ms_is_exact_to_the_millisecond(text: str, expected_ms: int) -> None:
    assert parse_time_ms(text) == expected_ms


BAD_TIMES = [
    # no offset: ambiguous local time
    "2026-11-21T17:05:00.123",
    # a date without time or offset
    "2026-11-21",
    # empty
    "",
    # month 13
    "2026-13-01T00:00:00Z",
    # not a date at all
    "tomorrow at noon",
]


@pytest.mark.parametrize("text", BAD_TIMES)
def test_parse_time_ms_rejects_timestamps_without_a_valid_offset(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time_ms(text)


def test_parse_time_ms_accepts_lower_case_t_and_z_as_rfc3339_allows() -> None:
    assert parse_time_ms("2026-11-21t17:05:00.123z") == utc_ms(2026, 11, 21, 17, 5, 0) + 123


# --- to_quantity -----------------------------------------------------------------------------

QUANTITIES = [
    # JSON integers stay ints
    (0, 0),
    (42, 42),
    # the largest quantity one event may carry
    (10**15, 10**15),
    # floats go through their shortest repr: 0.1 is exactly one tenth
    (0.1, Decimal("0.1")),
    (1.5, Decimal("1.5")),
    # small floats in exponent form
    (1e-7, Decimal("1E-7")),
    # a whole float is a Decimal equal to the integer
    (3.0, Decimal("3.0")),
    # numeric strings are parsed by Decimal: exact to every digit
    ("1.5", Decimal("1.5")),
    ("0.300000000000001", Decimal("0.300000000000001")),  # 15 significant digits: Stripe's most
    ("1000000000000000", Decimal("1000000000000000")),  # trailing zeros are not significant
    ("7", Decimal("7")),
    # negative zero is zero, not negative
    (-0.0, Decimal(0)),
    # 16-17 significant digits: a JSON number is a double, billed as its shortest decimal
    # (what JSON writers emit for it), exactly as schema-valid as any other number
    (0.12345678901234566, Decimal("0.12345678901234566")),
    (0.1 + 0.2, Decimal("0.30000000000000004")),
    # a whole double from 10^14 to 10^15 is an integer to the schema too
    (123456789012345.0, Decimal("123456789012345.0")),
]


@pytest.mark.parametrize(("raw_value", "expected"), QUANTITIES)
def test_to_quantity_is_exact(raw_value: Any, expected: int | Decimal) -> None:
    quantity = to_quantity(raw_value)

    assert quantity == expected
    assert type(quantity) is type(expected)


def test_to_quantity_of_float_point_one_is_exactly_one_tenth() -> None:
    assert to_quantity(0.1) == Decimal("0.1")
    assert to_quantity(0.1) != Decimal(0.1)  # the binary float's full expansion


BAD_QUANTITIES = [
    # strings must be plain decimal digits: no exponent, sign, spaces or separators
    "1e3",
    "-0",
    " 12 ",
    "1_000",
    # above the per-event cap (10**15): keeps sums x prices exact
    2**63 - 1,
    # a fraction from 10^14 up: a double keeps at most one fractional digit there
    123456789012345.67,
    # more than 15 digits before the point in a string (the schema's pattern)
    "0000000000000001",
    "1000000000000000.5",
    # booleans are ints in Python but not quantities
    True,
    False,
    # negatives
    -1,
    -0.5,
    "-1",
    "-0.000001",
    # non-finite floats (cannot come from orjson, but can from callers)
    float("nan"),
    float("inf"),
    float("-inf"),
    # non-numeric and non-finite strings
    "abc",
    "",
    "NaN",
    "nan",
    "sNaN",
    "Infinity",
    "-Infinity",
    # other JSON types
    None,
    [1],
    {"value": 1},
]


@pytest.mark.parametrize("raw_value", BAD_QUANTITIES)
def test_to_quantity_rejects_non_quantities(raw_value: Any) -> None:
    with pytest.raises(ValueError):
        to_quantity(raw_value)


def test_json_number_beyond_the_integer_range_is_rejected() -> None:
    # 2**64 + 1: one past the unsigned 64-bit range, decoded as a float above 10^15
    body = raw(event()).replace(b'"tokens":42', b'"tokens":18446744073709551617')
    parsed = parse(body)

    assert not parsed.accepted
    assert parsed.rejected[0].reason is Reason.INVALID_VALUE


def test_json_number_with_more_digits_than_a_double_is_billed_as_its_double() -> None:
    # RFC 8259 section 6: a JSON number is as precise as a binary64; 20 digits read as the
    # nearest double, billed as that double's shortest decimal. More precision: send a string.
    body = raw(event()).replace(b'"tokens":42', b'"tokens":0.12345678901234567891')
    [ev] = parse(body).accepted

    assert ev.value == Decimal("0.12345678901234568")


def test_numeric_string_keeps_every_digit() -> None:
    # 15 significant digits, the most a Stripe meter event value carries
    [ev] = parse(raw(event(data={"tokens": "0.000123456789012345"}))).accepted

    assert ev.value == Decimal("0.000123456789012345")


@pytest.mark.parametrize(
    "tokens",
    [
        # a plain JSON float that orjson decodes fine
        1e300,
        # a numeric string
        "1e30",
    ],
)
def test_accepted_value_can_always_be_debited(tokens: Any) -> None:
    parsed = parse(raw(event(data={"tokens": tokens})))

    if parsed.rejected:  # rejecting such a value (invalid_value) would be a valid fix too
        assert parsed.rejected[0].reason is Reason.INVALID_VALUE
        return
    [ev] = parsed.accepted
    credits = debit_for(ev.value, METERS["llm_tokens"].credits_per_unit, 6)
    assert credits > 0


# --- dedupe_key ------------------------------------------------------------------------------


def test_dedupe_key_separates_source_from_id() -> None:
    assert dedupe_key("a", "bc") != dedupe_key("ab", "c")


def test_dedupe_key_is_16_bytes_and_deterministic() -> None:
    key = dedupe_key("//api/eu-1", "evt-1")

    assert isinstance(key, bytes) and len(key) == 16
    assert key == dedupe_key("//api/eu-1", "evt-1")


def test_dedupe_key_differs_for_same_id_from_another_source() -> None:
    assert dedupe_key("//api/eu-1", "evt-1") != dedupe_key("//api/us-1", "evt-1")


def test_redelivered_event_at_another_offset_has_the_same_dedupe_key() -> None:
    first = parse(raw(event()), offset=1).accepted[0]
    again = parse(raw(event()), offset=500).accepted[0]

    assert first.dedupe_key == again.dedupe_key
    assert first.offset != again.offset
