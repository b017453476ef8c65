"""Usage events: parse CloudEvents 1.0 JSON (single or batch) and validate them.

Pure: no Kafka, Postgres or Faust. `parse_record` turns one Kafka message
value into accepted `UsageEvent`s and `Rejection`s; every bad-input class has
exactly one `Reason`, which is also the DLQ header, the metric label and the
test name.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from meterline.config import MeterConfig, ProcessorConfig
from meterline.core.json_text import member_bytes, nests_deeper_than

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

Quantity = int | Decimal


class Reason(StrEnum):
    """Why an event went to the dead-letter topic."""

    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    TOO_DEEP = "too_deep"  # JSON nested deeper than processor.max_json_depth
    INVALID_ENVELOPE = "invalid_envelope"  # not a CloudEvents 1.0 object, attribute missing/mistyped
    INVALID_TIME = "invalid_time"
    INVALID_VALUE = "invalid_value"  # value missing, not a number, negative, NaN or infinite
    UNKNOWN_METER = "unknown_meter"
    UNKNOWN_CUSTOMER = "unknown_customer"
    TOO_OLD = "too_old"  # older than the maximum lateness (Stripe's 35 days by default)
    FUTURE_TIMESTAMP = "future_timestamp"
    INTERNAL_ERROR = "internal_error"  # handling the record raised (a meterline bug): see processor/pipeline.py


class UsageEvent(NamedTuple):
    """One accepted event, reduced to what billing needs.

    A NamedTuple rather than a frozen dataclass: immutable all the same, and built
    in C — one is built per event on the hot path.
    """

    dedupe_key: bytes  # 16 bytes: blake2b(source, id) — CloudEvents' own uniqueness rule
    customer: str
    meter: str
    time_ms: int
    value: Quantity
    offset: int


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    offset: int
    # The offending bytes exactly as they arrived, never re-encoded: the whole message, or
    # a batch member's own byte span (see `member_spans`). Re-encoding could fail (orjson
    # writes at most 255 levels, reads 1024) and would change what the producer sent.
    payload: bytes
    batch_index: int | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation limits; times are compared with the processing-time clock `now_ms`."""

    max_message_bytes: int
    max_batch_events: int
    max_lateness_ms: int
    max_future_skew_ms: int
    max_json_depth: int = 64

    @classmethod
    def from_config(cls, p: ProcessorConfig) -> Limits:
        """The processor's limits from its config (one place, for the pipeline and the tests)."""
        return cls(p.max_message_bytes, p.max_batch_events, int(p.max_lateness_days * 86_400_000),
                   p.max_future_skew_ms, p.max_json_depth)


@dataclass(slots=True)
class ParsedRecords:
    accepted: list[UsageEvent]
    rejected: list[Rejection]


def dedupe_key(source: str, event_id: str) -> bytes:
    """16-byte key for (source, id); NUL-separated so ("a", "bc") != ("ab", "c")."""
    return hashlib.blake2b(f"{source}\x00{event_id}".encode(), digest_size=16).digest()


# RFC 3339 date-time (section 5.6), the same pattern as schemas/usage-event.schema.json
# (a contract test compares them); fromisoformat alone would also take other ISO 8601
# forms (week dates, "+0100", ...).
_RFC3339 = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
# A quantity sent as a string: the pattern of `$defs/quantity` in usage-event.schema.json
# (plain digits, at most 15 before the point, or exactly 10^15; no sign, exponent or "_").
_DECIMAL_TEXT = re.compile(r"[0-9]{1,15}(\.[0-9]+)?|1000000000000000(\.0+)?")
# The Gregorian calendar repeats every 400 years (146,097 days): year 0000, which RFC 3339
# allows and `datetime` cannot hold, is parsed as year 0400 and moved back one cycle.
_CYCLE_MS = 146_097 * 86_400_000


def parse_time_ms(text: str) -> int:
    """RFC 3339 timestamp with an explicit offset -> epoch milliseconds, exactly."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("not an RFC 3339 date-time with an offset")
    if text.startswith("0000"):
        return parse_time_ms("0400" + text[4:]) - _CYCLE_MS
    dt = datetime.fromisoformat(text.upper())  # RFC 3339 allows lower-case "t" and "z"
    if dt.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return (dt - EPOCH) // _MS


# One event's quantity may not exceed this: far above any real usage, and it keeps
# window sums times prices well inside Decimal's 28 significant digits.
MAX_QUANTITY = Decimal(10) ** 15
# A JSON number with a fraction must be below this: from 10^14 up a double keeps at most
# one fractional digit, so the producer's decimals would silently change.
_FRACTION_BELOW = 1e14
# A quantity string claims exactness; Stripe refuses meter event values with more
# significant digits than this (API 2026-04-22), so such a string is refused at intake.
_STRIPE_DIGITS = 15


def to_quantity(raw: Any) -> Quantity:
    """A JSON number or numeric string -> exact int/Decimal; raises ValueError if not valid.

    A JSON number is an IEEE double (RFC 8259 section 6): it is taken as the shortest
    decimal that denotes that double (`repr`), which is what JSON writers emit for a
    double — so `0.1` is Decimal("0.1"), not 0.1000000000000000055…, and
    `0.12345678901234566` is billed as written. A literal with more digits than a
    double keeps reads as its nearest double; such quantities must be strings.
    """
    if type(raw) is int and 0 <= raw <= MAX_QUANTITY:  # the common case, first
        return raw
    if isinstance(raw, bool):
        raise ValueError("boolean is not a quantity")
    if isinstance(raw, int):
        value: Quantity = raw
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError("not finite")
        if raw >= _FRACTION_BELOW and not raw.is_integer():
            raise ValueError("a JSON number with a fraction must be below 1e14; send a string")
        value = Decimal(repr(raw))
    elif isinstance(raw, str):
        if not _DECIMAL_TEXT.fullmatch(raw):
            raise ValueError("a quantity string must be plain decimal digits, like \"12.5\", "
                             "at most 15 before the point")
        value = Decimal(raw)
        # refused here, with the reason, rather than rounded silently downstream
        if len(value.normalize().as_tuple().digits) > _STRIPE_DIGITS:
            raise ValueError(f"more than {_STRIPE_DIGITS} significant digits (Stripe meter"
                             " events carry at most 15): round it, or report in a larger unit")
    else:
        raise ValueError(f"{type(raw).__name__} is not a number")
    if value < 0:
        raise ValueError("negative")
    if value > MAX_QUANTITY:
        raise ValueError(f"larger than {MAX_QUANTITY:.0e}")
    return value


class EventValidator:
    """Validates events against the configured meters, customers and time limits.

    The contract it keeps is schemas/usage-event.schema.json plus the processor-only
    rules listed there (time limits, known customers, sizes, nesting depth);
    tests/contract/test_schemas.py generates events from both sides to hold them equal.
    Duplicate object keys: orjson keeps the last one, as JSON.parse and Python's json do
    (RFC 8259 leaves it open); finding them would cost a second pass over every message.
    """

    def __init__(
        self,
        meters: dict[str, MeterConfig],
        limits: Limits,
        known_customers: set[str] | None = None,
    ) -> None:
        self._limits = limits
        # By CloudEvents `type`: (meter key, value property, or None for count meters).
        self._meters = {t: (m.key, None if m.aggregation == "count" else m.value_property)
                        for t, m in meters.items()}
        # None = any customer accepted; a set = only these (require_known_customers).
        self.known_customers = known_customers
        self._times: dict[str, int] = {}

    def parse_record(self, value: bytes | None, offset: int, now_ms: int) -> ParsedRecords:
        """Parse one Kafka message: a single event or a CloudEvents JSON batch (array).

        Never raises for any input. Message-level checks come first, in this order:
        oversized, not_utf8, too_deep, malformed_json; then each event on its own.
        """
        limits = self._limits
        if value is None or len(value) > limits.max_message_bytes:
            size = 0 if value is None else len(value)
            return _whole(Rejection(
                Reason.OVERSIZED if value else Reason.MALFORMED_JSON,
                f"message is {size} bytes (limit {limits.max_message_bytes})" if value else "empty message",
                offset, value or b""))
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return _whole(_undecodable(value, offset, exc, limits.max_json_depth))
        depth = limits.max_json_depth
        if type(doc) is dict:  # the common case: one event per message
            # Openers bound the depth from above: one count saves the exact check.
            if value.count(b"{") + value.count(b"[") > depth and nests_deeper_than(value, depth):
                return _whole(_too_deep(value, offset, depth))
            try:
                return ParsedRecords([self._validate(doc, offset, now_ms - limits.max_lateness_ms,
                                                     now_ms + limits.max_future_skew_ms)], [])
            except _Invalid as bad:
                return _whole(Rejection(bad.reason, bad.detail, offset, value))
        if type(doc) is not list:
            return _whole(Rejection(
                Reason.INVALID_ENVELOPE, f"event is a JSON {type(doc).__name__}, not an object", offset, value))
        if len(doc) > limits.max_batch_events:
            return _whole(Rejection(
                Reason.OVERSIZED, f"batch has {len(doc)} events (limit {limits.max_batch_events})", offset, value))
        if nests_deeper_than(value, depth):
            return _whole(_too_deep(value, offset, depth))
        out = ParsedRecords([], [])
        # An empty array is a batch of no events: nothing to bill, nothing lost.
        validate = self._validate
        accepted = out.accepted
        oldest_ms, newest_ms = now_ms - limits.max_lateness_ms, now_ms + limits.max_future_skew_ms
        invalid: list[tuple[int, _Invalid]] = []
        for index, item in enumerate(doc):
            try:
                accepted.append(validate(item, offset, oldest_ms, newest_ms))
            except _Invalid as bad:
                invalid.append((index, bad))
        if invalid:  # each rejected member goes as its own bytes, found once per message
            members = member_bytes(value, doc, invalid[-1][0] + 1)
            out.rejected = [Rejection(bad.reason, bad.detail, offset, members[i], i) for i, bad in invalid]
        return out

    def _validate(self, doc: Any, offset: int, oldest_ms: int, newest_ms: int) -> UsageEvent:
        if type(doc) is not dict:
            raise _Invalid(Reason.INVALID_ENVELOPE, f"event is a JSON {type(doc).__name__}, not an object")
        if doc.get("specversion") != "1.0":
            raise _Invalid(Reason.INVALID_ENVELOPE, "specversion must be \"1.0\"")
        source, event_id, event_type, subject = (
            doc.get("source"), doc.get("id"), doc.get("type"), doc.get("subject"))
        if not (type(source) is str and type(event_id) is str and type(event_type) is str
                and type(subject) is str and 0 < len(source) <= 512 and 0 < len(event_id) <= 512
                and 0 < len(event_type) <= 512 and 0 < len(subject) <= 512):
            raise _Invalid(Reason.INVALID_ENVELOPE, _envelope_problem(doc))
        meter = self._meters.get(event_type)
        if meter is None:
            raise _Invalid(Reason.UNKNOWN_METER, f"no meter for type {event_type!r}")
        if self.known_customers is not None and subject not in self.known_customers:
            raise _Invalid(Reason.UNKNOWN_CUSTOMER, f"unknown customer {subject!r}")
        time_text = doc.get("time")
        if type(time_text) is not str:
            raise _Invalid(Reason.INVALID_TIME, "time must be an RFC 3339 string")
        time_ms = self._times.get(time_text)
        if time_ms is None:
            try:
                time_ms = parse_time_ms(time_text)
            except ValueError as exc:
                raise _Invalid(Reason.INVALID_TIME, f"time {time_text!r}: {exc}") from None
            if len(self._times) > 50_000:  # producers batch events sharing timestamps
                self._times.clear()
            self._times[time_text] = time_ms
        if time_ms < oldest_ms:
            raise _Invalid(Reason.TOO_OLD, f"time {time_text} is older than the maximum lateness")
        if time_ms > newest_ms:
            raise _Invalid(Reason.FUTURE_TIMESTAMP, f"time {time_text} is too far in the future")
        key, prop = meter
        if prop is None:  # a count meter: data is not read
            value: Quantity = 1
        else:
            data = doc.get("data")
            if type(data) is not dict or prop not in data:
                raise _Invalid(Reason.INVALID_VALUE, f"data.{prop} is missing")
            raw = data[prop]
            if type(raw) is int and 0 <= raw <= MAX_QUANTITY:
                value = raw
            else:
                try:
                    value = to_quantity(raw)
                except ValueError as exc:
                    raise _Invalid(Reason.INVALID_VALUE, f"data.{prop}: {exc}") from None
        # tuple.__new__ directly: the NamedTuple's own __new__ is a Python frame per event.
        return _new_event(UsageEvent, (dedupe_key(source, event_id), subject, key, time_ms, value, offset))


_new_event = tuple.__new__


def _envelope_problem(doc: dict[str, Any]) -> str:
    for name in ("source", "id", "type", "subject"):
        attr = doc.get(name)
        if not isinstance(attr, str) or not attr or len(attr) > 512:
            return f"{name} must be a non-empty string (max 512)"
    return "invalid attributes"


class _Invalid(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _whole(rejection: Rejection) -> ParsedRecords:
    """The whole message rejected: its bytes go to the DLQ as they came."""
    return ParsedRecords([], [rejection])


def _too_deep(value: bytes, offset: int, limit: int) -> Rejection:
    return Rejection(Reason.TOO_DEEP, f"JSON nests deeper than {limit} levels", offset, value)


def _undecodable(value: bytes, offset: int, exc: Exception, depth_limit: int) -> Rejection:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return Rejection(Reason.NOT_UTF8, f"not UTF-8: {uexc.reason} at byte {uexc.start}", offset, value)
    # orjson reads at most 1024 levels and says so; the configured limit is never above it.
    if str(exc).startswith("depth limit exceeded"):
        return _too_deep(value, offset, depth_limit)
    return Rejection(Reason.MALFORMED_JSON, f"not JSON: {exc}", offset, value)
