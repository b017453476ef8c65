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
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from meterline.config import MeterConfig

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

Quantity = int | Decimal


class Reason(StrEnum):
    """Why an event went to the dead-letter topic."""

    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
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
    payload: bytes  # the offending event (or the whole message when it could not be split)
    batch_index: int | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation limits; times are compared with the processing-time clock `now_ms`."""

    max_message_bytes: int
    max_batch_events: int
    max_lateness_ms: int
    max_future_skew_ms: int


@dataclass(slots=True)
class ParsedRecords:
    accepted: list[UsageEvent]
    rejected: list[Rejection]


def dedupe_key(source: str, event_id: str) -> bytes:
    """16-byte key for (source, id); NUL-separated so ("a", "bc") != ("ab", "c")."""
    return hashlib.blake2b(
        source.encode() + b"\x00" + event_id.encode(), digest_size=16
    ).digest()


# RFC 3339 date-time (section 5.6), the same pattern as schemas/usage-event.schema.json;
# fromisoformat alone would also take other ISO 8601 forms (week dates, "+0100", ...).
_RFC3339 = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
# A quantity sent as a string: plain decimal digits (no sign, exponent, spaces or "_").
_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_time_ms(text: str) -> int:
    """RFC 3339 timestamp with an explicit offset -> epoch milliseconds, exactly."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("not an RFC 3339 date-time with an offset")
    dt = datetime.fromisoformat(text.upper())  # RFC 3339 allows lower-case "t" and "z"
    if dt.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return (dt - EPOCH) // _MS


# One event's quantity may not exceed this: far above any real usage, and it keeps
# window sums times prices well inside Decimal's 28 significant digits.
MAX_QUANTITY = Decimal(10) ** 15
# JSON numbers arrive as binary floats; beyond 15 significant digits the decimal
# the producer wrote may not survive, and billing must be exact, so such values
# must be sent as strings.
_FLOAT_DIGITS = 15


def to_quantity(raw: Any) -> Quantity:
    """A JSON number or numeric string -> exact int/Decimal; raises ValueError if not valid.

    Floats go through their shortest repr, so `0.1` becomes Decimal("0.1"), not
    0.1000000000000000055…; a float with more digits than a double keeps is refused.
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
        text = repr(raw)
        value = Decimal(text)
        # len(text) <= 16 without an exponent means at most 15 digits; else count the
        # significant ones (a trailing ".0" or zeros carry no precision)
        if (len(text) > 16 or "e" in text) and len(value.normalize().as_tuple().digits) > _FLOAT_DIGITS:
            raise ValueError("number has more digits than JSON numbers keep exactly; send a string")
    elif isinstance(raw, str):
        if not _DECIMAL_TEXT.fullmatch(raw):
            raise ValueError("a quantity string must be plain decimal digits, like \"12.5\"")
        try:
            value = Decimal(raw)
        except InvalidOperation as exc:
            raise ValueError("not a number") from exc
        if not value.is_finite():
            raise ValueError("not finite")
    else:
        raise ValueError(f"{type(raw).__name__} is not a number")
    if value < 0:
        raise ValueError("negative")
    if value > MAX_QUANTITY:
        raise ValueError(f"larger than {MAX_QUANTITY:.0e}")
    return value


class EventValidator:
    """Validates events against the configured meters, customers and time limits."""

    def __init__(
        self,
        meters: dict[str, MeterConfig],
        limits: Limits,
        known_customers: set[str] | None = None,
    ) -> None:
        self._meters = meters  # by CloudEvents `type`
        self._limits = limits
        # None = any customer accepted; a set = only these (require_known_customers).
        self.known_customers = known_customers
        self._times: dict[str, int] = {}

    def parse_record(self, value: bytes | None, offset: int, now_ms: int) -> ParsedRecords:
        """Parse one Kafka message: a single event or a CloudEvents JSON batch (array)."""
        out = ParsedRecords([], [])
        if value is None or len(value) > self._limits.max_message_bytes:
            size = 0 if value is None else len(value)
            out.rejected.append(
                Rejection(Reason.OVERSIZED if value else Reason.MALFORMED_JSON,
                          f"message is {size} bytes (limit {self._limits.max_message_bytes})"
                          if value else "empty message", offset, value or b"")
            )
            return out
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            out.rejected.append(_undecodable(value, offset, exc))
            return out
        if isinstance(doc, list):
            if not doc:
                out.rejected.append(Rejection(Reason.INVALID_ENVELOPE, "empty batch", offset, value))
                return out
            if len(doc) > self._limits.max_batch_events:
                out.rejected.append(Rejection(
                    Reason.OVERSIZED,
                    f"batch has {len(doc)} events (limit {self._limits.max_batch_events})",
                    offset, value))
                return out
            for index, item in enumerate(doc):
                self._accept(item, offset, now_ms, out, index)
        else:
            self._accept(doc, offset, now_ms, out, None, value)
        return out

    def _accept(
        self,
        doc: Any,
        offset: int,
        now_ms: int,
        out: ParsedRecords,
        index: int | None,
        raw: bytes | None = None,
    ) -> None:
        try:
            out.accepted.append(self._validate(doc, offset, now_ms))
        except _Invalid as bad:
            # A single-event message goes to the DLQ byte for byte; a batch member re-encoded.
            payload = raw if raw is not None else orjson.dumps(doc)
            out.rejected.append(Rejection(bad.reason, bad.detail, offset, payload, index))

    def _validate(self, doc: Any, offset: int, now_ms: int) -> UsageEvent:
        if not isinstance(doc, dict):
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
        if not isinstance(time_text, str):
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
        if time_ms < now_ms - self._limits.max_lateness_ms:
            raise _Invalid(Reason.TOO_OLD, f"time {time_text} is older than the maximum lateness")
        if time_ms > now_ms + self._limits.max_future_skew_ms:
            raise _Invalid(Reason.FUTURE_TIMESTAMP, f"time {time_text} is too far in the future")
        if meter.aggregation == "count":
            value: Quantity = 1
        else:
            data = doc.get("data")
            if not isinstance(data, dict) or meter.value_property not in data:
                raise _Invalid(Reason.INVALID_VALUE, f"data.{meter.value_property} is missing")
            try:
                value = to_quantity(data[meter.value_property])
            except ValueError as exc:
                raise _Invalid(Reason.INVALID_VALUE, f"data.{meter.value_property}: {exc}") from None
        return UsageEvent(dedupe_key(source, event_id), subject, meter.key, time_ms, value, offset)


def _envelope_problem(doc: dict[str, Any]) -> str:
    for name in ("source", "id", "type", "subject"):
        attr = doc.get(name)
        if not isinstance(attr, str) or not attr or len(attr) > 512:
            return f"{name} must be a non-empty string (max 512)"
    return "invalid attributes"


class _Invalid(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _undecodable(value: bytes, offset: int, exc: Exception) -> Rejection:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return Rejection(Reason.NOT_UTF8, f"not UTF-8: {uexc.reason} at byte {uexc.start}", offset, value)
    return Rejection(Reason.MALFORMED_JSON, f"not JSON: {exc}", offset, value)
