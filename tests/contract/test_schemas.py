"""Contract tests: the JSON Schemas in schemas/ against the code that reads and writes the messages.

Pure and fast (no broker, no database):

- every schema is a valid draft 2020-12 schema, fully described, with examples that
  validate;
- every example usage event is accepted by the real validator
  (`EventValidator.parse_record`, configured like the processor from the dev config);
- events generated from the schema's rules are schema-valid *and* accepted, and
  events breaking a required field are rejected by both, with the expected reason;
- `usage.aggregates` and `billing.balance-changes` payloads built by the real code
  (`storage/flush.py` `_write_outbox`, `core/credits.py` `BalanceChange.to_message`)
  validate against their schemas;
- the docs (schemas/README.md, schemas/dlq-headers.md) name every topic, reason and
  header the code uses.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from meterline.config import MeterConfig, Settings, load_settings
from meterline.core.credits import BalanceChange, Grant, debit_for, decimal_text, depleted
from meterline.core.events import (
    EventValidator,
    Limits,
    Reason,
    Rejection,
    UsageEvent,
    dedupe_key,
    parse_time_ms,
)
from meterline.core.windows import OpenWindows, WindowBuffer, WindowValue, fold
from meterline.ledger.accounts import USAGE_ACCOUNT, ZERO, CustomerBook
from meterline.ledger.book import transfer_message
from meterline.processor.dlq import dlq_headers
from meterline.processor.pipeline import policy_from
from meterline.storage import flush

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "schemas"
DEV_CONFIG = ROOT / "services" / "meterline" / "devstack" / "dev-config.yaml"
DEPLOY_CONFIG = ROOT / "deploy" / "meterline.yaml"

EVENT_SCHEMA = "usage-event.schema.json"
BATCH_SCHEMA = "usage-event-batch.schema.json"
AGGREGATE_SCHEMA = "usage-aggregate.schema.json"
BALANCE_SCHEMA = "balance-change.schema.json"


def load_config(path: Path, **overrides: Any) -> Settings:
    """`load_settings(path)` without the shell's METERLINE_* and connection overrides."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("METERLINE_") and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    with mock.patch.dict(os.environ, env, clear=True):
        return load_settings(path, **overrides)


# --- schemas -----------------------------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    p.name: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.schema.json"))
}
REGISTRY: Registry = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema)) for schema in SCHEMAS.values()
)

# jsonschema checks "date-time" only with an optional package; check it here (calendar
# validity: the schemas' patterns already pin the RFC 3339 shape).
FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    # RFC 3339 years start at 0000, datetime's at 0001; the calendar repeats every 400 years
    text = "0400" + instance[4:] if instance.startswith("0000") else instance
    return datetime.fromisoformat(text.upper()).tzinfo is not None


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(SCHEMAS[name], registry=REGISTRY, format_checker=FORMATS)


VALIDATORS = {name: _validator(name) for name in SCHEMAS if name in {
    EVENT_SCHEMA, BATCH_SCHEMA, AGGREGATE_SCHEMA, BALANCE_SCHEMA}}
EVENT = VALIDATORS.get(EVENT_SCHEMA)
# As a producer's validator may see it: `format` as annotation only, patterns must do the work.
EVENT_WITHOUT_FORMATS = (Draft202012Validator(SCHEMAS[EVENT_SCHEMA], registry=REGISTRY)
                         if EVENT_SCHEMA in SCHEMAS else None)
BATCH = VALIDATORS.get(BATCH_SCHEMA)
AGGREGATE = VALIDATORS.get(AGGREGATE_SCHEMA)
BALANCE = VALIDATORS.get(BALANCE_SCHEMA)


def assert_valid(validator: Draft202012Validator | None, instance: object) -> None:
    assert validator is not None, "schema file missing"
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def is_valid(validator: Draft202012Validator | None, instance: object) -> bool:
    assert validator is not None, "schema file missing"
    return validator.is_valid(instance)


# --- the processor's validator, configured from the dev config ----------------------

DEV = load_config(DEV_CONFIG)
DEPLOY = load_config(DEPLOY_CONFIG)
METER_BY_TYPE: dict[str, MeterConfig] = DEV.meter_for_type()
NOW_MS = int(datetime(2026, 11, 21, 17, 5, tzinfo=UTC).timestamp()) * 1000
LATENESS_MS = int(DEV.processor.max_lateness_days * 86_400_000)
SKEW_MS = DEV.processor.max_future_skew_ms


def processor_validator(settings: Settings) -> EventValidator:
    """Built exactly as `processor.pipeline.Pipeline` builds it."""
    return EventValidator(settings.meter_for_type(), Limits.from_config(settings.processor))


VALIDATOR = processor_validator(DEV)


def expected_value(doc: dict[str, Any]) -> Decimal:
    meter = METER_BY_TYPE[doc["type"]]
    if meter.aggregation == "count":
        return Decimal(1)
    raw = doc["data"][meter.value_property]
    return Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)


def check_accepted(doc: dict[str, Any], got: UsageEvent, time_ms: int | None = None) -> None:
    assert got.customer == doc["subject"]
    assert got.meter == METER_BY_TYPE[doc["type"]].key
    assert got.dedupe_key == dedupe_key(doc["source"], doc["id"])
    assert got.value == expected_value(doc)
    if time_ms is not None:
        assert got.time_ms == time_ms


# --- schema files ---------------------------------------------------------------------


def test_every_contract_file_is_present() -> None:
    assert {EVENT_SCHEMA, BATCH_SCHEMA, AGGREGATE_SCHEMA, BALANCE_SCHEMA} <= set(SCHEMAS)
    assert (SCHEMA_DIR / "dlq-headers.md").is_file()
    assert (SCHEMA_DIR / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = SCHEMAS[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("/" + name)
    assert schema.get("title") and schema.get("description")
    assert isinstance(schema.get("examples"), list) and schema["examples"]


def _property_schemas(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    """Every (path, subschema) under a `properties` or `$defs` keyword, recursively."""
    if isinstance(node, dict):
        for keyword in ("properties", "$defs"):
            for name, sub in (node.get(keyword) or {}).items():
                yield f"{path}/{keyword}/{name}", sub
        for key, sub in node.items():
            # conditions (if/then/else/not) only restate constraints on described properties
            if key not in ("examples", "if", "then", "else", "not"):
                yield from _property_schemas(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _property_schemas(sub, f"{path}/{i}")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_property_is_described(name: str) -> None:
    undescribed = [path for path, sub in _property_schemas(SCHEMAS[name])
                   if not (isinstance(sub, dict) and sub.get("description"))]
    assert not undescribed


EXAMPLES = [(name, i) for name in sorted(SCHEMAS) for i in range(len(SCHEMAS[name].get("examples", [])))]


@pytest.mark.parametrize(("name", "index"), EXAMPLES, ids=[f"{n}[{i}]" for n, i in EXAMPLES])
def test_example_validates(name: str, index: int) -> None:
    assert_valid(VALIDATORS[name], SCHEMAS[name]["examples"][index])


# --- examples against the real processor -------------------------------------------------


def _example_ids(name: str) -> list[int]:
    return list(range(len(SCHEMAS.get(name, {}).get("examples", []))))


@pytest.mark.parametrize("index", _example_ids(EVENT_SCHEMA))
def test_example_event_is_accepted_by_the_processor(index: int) -> None:
    doc = SCHEMAS[EVENT_SCHEMA]["examples"][index]
    parsed = VALIDATOR.parse_record(orjson.dumps(doc), 11, parse_time_ms(doc["time"]) + 1_000)
    assert parsed.rejected == []
    (event,) = parsed.accepted
    check_accepted(doc, event)
    assert event.offset == 11


@pytest.mark.parametrize("index", _example_ids(BATCH_SCHEMA))
def test_example_batch_is_accepted_by_the_processor(index: int) -> None:
    batch = SCHEMAS[BATCH_SCHEMA]["examples"][index]
    now_ms = max(parse_time_ms(doc["time"]) for doc in batch) + 1_000
    parsed = VALIDATOR.parse_record(orjson.dumps(batch), 12, now_ms)
    assert parsed.rejected == []
    assert len(parsed.accepted) == len(batch)
    for doc, event in zip(batch, parsed.accepted, strict=True):
        check_accepted(doc, event)
        assert_valid(EVENT, doc)


def _data_rules(schema: dict[str, Any]) -> dict[str, str]:
    """event type -> required value property, from the event schema's per-type rules."""
    rules = {}
    for clause in schema.get("allOf", []):
        event_type = clause["if"]["properties"]["type"]["const"]
        data = clause["then"]["properties"]["data"]
        (prop,) = data["required"]
        assert data["properties"][prop]["$ref"] == "#/$defs/quantity"
        rules[event_type] = prop
    return rules


@pytest.mark.parametrize("config", [DEV_CONFIG, DEPLOY_CONFIG], ids=["dev", "deploy"])
def test_event_schema_meter_catalogue_matches_config(config: Path) -> None:
    meters = load_config(config).meters
    schema = SCHEMAS[EVENT_SCHEMA]
    assert set(schema["properties"]["type"]["enum"]) == {m.event_type for m in meters}
    assert _data_rules(schema) == {
        m.event_type: m.value_property for m in meters if m.aggregation != "count"}


def test_batch_limits_agree_with_the_processor() -> None:
    schema = SCHEMAS[BATCH_SCHEMA]
    assert schema["maxItems"] == DEV.processor.max_batch_events == DEPLOY.processor.max_batch_events
    event = SCHEMAS[EVENT_SCHEMA]["examples"][0]
    too_many = [event] * (schema["maxItems"] + 1)
    assert not is_valid(BATCH, too_many)
    parsed = VALIDATOR.parse_record(orjson.dumps(too_many), 0, NOW_MS)
    assert parsed.accepted == [] and [r.reason for r in parsed.rejected] == [Reason.OVERSIZED]
    # An empty array is a batch of no events, for both: nothing billed, nothing dead-lettered.
    assert is_valid(BATCH, [])
    parsed = VALIDATOR.parse_record(b"[]", 0, NOW_MS)
    assert parsed.accepted == [] and parsed.rejected == []


# --- generated events ----------------------------------------------------------------------

_CHARS = st.characters(exclude_categories=["Cs"])  # JSON text cannot hold lone surrogates
attribute_text = st.text(_CHARS, min_size=1, max_size=512)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(_CHARS, max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(_CHARS, max_size=8), inner, max_size=3),
    max_leaves=8,
)
_RESERVED = set(SCHEMAS.get(EVENT_SCHEMA, {}).get("properties", {})) | {"data_base64"}
extension_names = st.from_regex(r"\A[a-z][a-z0-9]{0,19}\Z").filter(lambda n: n not in _RESERVED)


@st.composite
def rfc3339_times(draw: st.DrawFn) -> tuple[str, int]:
    """(RFC 3339 text within the lateness/skew limits around NOW_MS, its epoch ms)."""
    utc_s = draw(st.integers((NOW_MS - LATENESS_MS) // 1000 + 1, (NOW_MS + SKEW_MS) // 1000 - 1))
    fraction = draw(st.text("0123456789", max_size=9))
    offset_min = draw(st.one_of(st.just(0), st.integers(-(23 * 60 + 59), 23 * 60 + 59)))
    local = datetime(1970, 1, 1) + timedelta(seconds=utc_s + offset_min * 60)
    text = local.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt")) + local.strftime("%H:%M:%S")
    if fraction:
        text += "." + fraction
    if offset_min == 0 and draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "z", "-00:00"]))
    else:
        hours, minutes = divmod(abs(offset_min), 60)
        text += f"{'-' if offset_min < 0 else '+'}{hours:02d}:{minutes:02d}"
    return text, utc_s * 1000 + int((fraction + "000")[:3])  # precision below 1 ms is truncated


@st.composite
def quantities(draw: st.DrawFn) -> int | float | str:
    """A quantity as the schema's $defs/quantity allows it."""
    kind = draw(st.sampled_from(["integer", "string", "number"]))
    if kind == "integer":
        return draw(st.one_of(st.integers(0, 10**15), st.sampled_from([0, 1, 10**15])))
    if kind == "string":
        whole = draw(st.one_of(st.integers(0, 10**15 - 1).map(str), st.just(str(10**15))))
        if whole == str(10**15):
            zeros = draw(st.text("0", max_size=4))
            return whole + ("." + zeros if zeros else "")
        whole = "0" * draw(st.integers(0, 15 - len(whole))) + whole
        fraction = draw(st.text("0123456789", max_size=12))
        # at most 15 significant digits: the most a Stripe meter event value carries
        while fraction and len(Decimal(f"{whole}.{fraction}").normalize().as_tuple().digits) > 15:
            fraction = fraction[:-1]
        return whole + ("." + fraction if fraction else "")
    # Any double the schema allows: with a fraction below 1e14 (16-17 significant digits
    # included), or whole up to 1e15.
    return draw(st.one_of(
        st.floats(min_value=0, max_value=1e14, exclude_max=True),
        st.integers(0, 10**15).map(float),
        st.builds(lambda m, k: float(Decimal(m).scaleb(-k)), st.integers(1, 10**17), st.integers(1, 20))
        .filter(lambda f: f < 1e14),
    ))


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """(event following usage-event.schema.json within the time limits, its epoch ms)."""
    meter = draw(st.sampled_from(DEV.meters))
    time_text, time_ms = draw(rfc3339_times())
    doc: dict[str, Any] = dict(draw(st.dictionaries(extension_names, json_values, max_size=3)))
    doc.update({
        "specversion": "1.0",
        "id": draw(attribute_text),
        "source": draw(attribute_text),
        "type": meter.event_type,
        "subject": draw(attribute_text),
        "time": time_text,
    })
    if draw(st.booleans()):
        doc["datacontenttype"] = "application/json"
    if draw(st.booleans()):
        doc["dataschema"] = "https://schemas.example.com/usage/v1.json"
    if meter.aggregation == "count":
        if draw(st.booleans()):
            doc["data"] = draw(json_values)
    else:
        prop = meter.value_property
        assert prop is not None
        extra = draw(st.dictionaries(st.text(_CHARS, max_size=8), json_values, max_size=3))
        doc["data"] = {**extra, prop: draw(quantities())}
    return doc, time_ms


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(valid_events())
def test_generated_events_are_schema_valid_and_accepted(case: tuple[dict[str, Any], int]) -> None:
    doc, time_ms = case
    assert_valid(EVENT, doc)
    parsed = VALIDATOR.parse_record(orjson.dumps(doc), 3, NOW_MS)
    assert parsed.rejected == []
    (event,) = parsed.accepted
    check_accepted(doc, event, time_ms)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_events(), min_size=1, max_size=6))
def test_generated_batches_are_schema_valid_and_accepted(cases: list[tuple[dict[str, Any], int]]) -> None:
    batch = [doc for doc, _ in cases]
    assert_valid(BATCH, batch)
    parsed = VALIDATOR.parse_record(orjson.dumps(batch), 4, NOW_MS)
    assert parsed.rejected == []
    assert len(parsed.accepted) == len(batch)
    for (doc, time_ms), event in zip(cases, parsed.accepted, strict=True):
        check_accepted(doc, event, time_ms)


_WRONG_TYPES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(_CHARS, max_size=3), max_size=2),
    st.dictionaries(st.text(_CHARS, max_size=3), st.integers(-9, 9), max_size=2),
)
_BAD_TIMES = [
    "2026-11-21T17:04:00",  # no offset
    "2026-11-21",
    "17:04:00Z",
    "2026-11-21T17:04:60Z",  # leap second: RFC 3339 has it, meterline refuses it
    "2026-13-01T00:00:00Z",
    "2026-11-21T24:00:00Z",
    "2026-02-30T00:00:00Z",  # the pattern allows it; only format "date-time" catches it
    "2026-11-21T17:04:00+24:00",
    "1795280640",
    "",
    "yesterday",
]
_CALENDAR_ONLY = {"2026-02-30T00:00:00Z"}
_BAD_VALUES = st.one_of(
    st.integers(-(2**63), -1),
    st.integers(10**15 + 1, 2**63 - 1),
    st.floats(max_value=-1e-6, allow_infinity=False),
    st.floats(min_value=1.001e15, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.sampled_from(["-1", "-0.5", "1e16", "1000000000000000.1", "NaN", "Infinity", "-inf", "", "0x10", "1,5"]),
    st.text(string.ascii_letters + " ,;:-", min_size=1, max_size=10),
    st.lists(st.integers(0, 5), max_size=2),
    st.dictionaries(st.text(_CHARS, max_size=3), st.integers(0, 9), max_size=2),
)


def _unknown_type(text: str) -> str:
    return text if text not in METER_BY_TYPE else text + "?"


@st.composite
def invalid_events(draw: st.DrawFn) -> tuple[dict[str, Any], Reason]:
    """A valid event with one required field broken, and the reason meterline must give."""
    doc, _ = draw(valid_events())
    meter = METER_BY_TYPE[doc["type"]]
    fields = ["specversion", "id", "source", "type", "subject", "time"]
    if meter.aggregation != "count":
        fields.append("data")
    field = draw(st.sampled_from(fields))
    if field == "specversion":
        bad = draw(st.one_of(st.just(None), _WRONG_TYPES, st.text(_CHARS, max_size=5)))
        if bad == "1.0":
            bad = "1.0.0"
        reason = Reason.INVALID_ENVELOPE
    elif field == "time":
        bad = draw(st.one_of(st.just(None), _WRONG_TYPES, st.sampled_from(_BAD_TIMES)))
        reason = Reason.INVALID_TIME
    elif field == "data":
        kind = draw(st.sampled_from(["absent", "not-an-object", "no-value", "bad-value"]))
        if kind == "absent":
            bad = None
        elif kind == "not-an-object":
            bad = draw(st.one_of(st.lists(st.integers(0, 9), max_size=2), st.text(_CHARS, max_size=5),
                                 st.integers(0, 9)))
        elif kind == "no-value":
            bad = {"other": 1}
        else:
            bad = {meter.value_property: draw(_BAD_VALUES)}
        reason = Reason.INVALID_VALUE
    else:
        choices = [st.just(None), _WRONG_TYPES, st.just(""), st.text(_CHARS, min_size=513, max_size=600)]
        reason = Reason.INVALID_ENVELOPE
        if field == "type" and draw(st.booleans()):
            choices = [st.text(_CHARS, min_size=1, max_size=511).map(_unknown_type)]
            reason = Reason.UNKNOWN_METER
        bad = draw(st.one_of(*choices))
    if bad is None and draw(st.booleans()):
        del doc[field]
    else:
        doc[field] = bad
    return doc, reason


@FAST
@given(invalid_events())
def test_events_breaking_a_required_field_are_rejected_by_both(case: tuple[dict[str, Any], Reason]) -> None:
    doc, reason = case
    assert not is_valid(EVENT, doc)
    parsed = VALIDATOR.parse_record(orjson.dumps(doc), 5, NOW_MS)
    assert parsed.accepted == []
    assert [(r.reason, r.offset, r.batch_index) for r in parsed.rejected] == [(reason, 5, None)]
    assert parsed.rejected[0].payload == orjson.dumps(doc)  # single events go to the DLQ as sent


def _base_event(**changes: Any) -> dict[str, Any]:
    doc = {"specversion": "1.0", "id": "evt-1", "source": "contract-test", "type": "llm_tokens",
           "subject": "cust_00001", "time": "2026-11-21T17:04:00Z", "data": {"tokens": 10}}
    doc.update(changes)
    return doc


_MISSING = object()


def _broken(field: str, value: Any) -> dict[str, Any]:
    doc = _base_event()
    if value is _MISSING:
        del doc[field]
    else:
        doc[field] = value
    return doc


def _broken_events() -> list[tuple[str, dict[str, Any], Reason]]:
    """Every required field broken every way, next to the reason the processor must give."""
    cases = []
    wrong = [("missing", _MISSING), ("null", None), ("number", 1), ("bool", True), ("list", ["x"]),
             ("object", {"x": 1}), ("empty", ""), ("too-long", "x" * 513)]
    for field in ("specversion", "id", "source", "type", "subject"):
        cases += [(f"{field}-{label}", _broken(field, bad), Reason.INVALID_ENVELOPE) for label, bad in wrong]
    cases += [("specversion-0.3", _base_event(specversion="0.3"), Reason.INVALID_ENVELOPE),
              ("specversion-1.0-number", _base_event(specversion=1.0), Reason.INVALID_ENVELOPE),
              ("type-unknown", _base_event(type="no.such.meter"), Reason.UNKNOWN_METER)]
    cases += [(f"time-{label}", _broken("time", bad), Reason.INVALID_TIME)
              for label, bad in [("missing", _MISSING), ("null", None), ("epoch-ms", 1795280640000),
                                 *((t or "empty", t) for t in _BAD_TIMES)]]
    bad_data = [("missing", _MISSING), ("null", None), ("list", [10]), ("string", "10"),
                ("no-value", {"other": 10})]
    bad_values = [-1, -0.5, 10**15 + 1, 1.5e15, True, None, "-1", "NaN", "Infinity", "abc", "",
                  "1000000000000000.1", "1e16", [10], {"n": 10}]
    cases += [(f"data-{label}", _broken("data", bad), Reason.INVALID_VALUE) for label, bad in bad_data]
    cases += [(f"value-{v!r}", _base_event(data={"tokens": v}), Reason.INVALID_VALUE) for v in bad_values]
    return cases


BROKEN = _broken_events()


@pytest.mark.parametrize(("doc", "reason"), [(d, r) for _, d, r in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_each_broken_required_field_is_rejected_by_both(doc: dict[str, Any], reason: Reason) -> None:
    assert is_valid(EVENT, _base_event())
    assert not is_valid(EVENT, doc)
    if doc.get("time") not in _CALENDAR_ONLY:
        assert not is_valid(EVENT_WITHOUT_FORMATS, doc)
    parsed = VALIDATOR.parse_record(orjson.dumps(doc), 0, NOW_MS)
    assert parsed.accepted == []
    assert [r.reason for r in parsed.rejected] == [reason]


@pytest.mark.parametrize(("time", "reason"), [
    (datetime.fromtimestamp((NOW_MS - LATENESS_MS) / 1000 - 1, UTC).isoformat(), Reason.TOO_OLD),
    (datetime.fromtimestamp((NOW_MS + SKEW_MS) / 1000 + 1, UTC).isoformat(), Reason.FUTURE_TIMESTAMP),
])
def test_time_limits_are_the_processors_not_the_schemas(time: str, reason: Reason) -> None:
    """Lateness and skew depend on the processor's clock: schema-valid, still dead-lettered."""
    doc = _base_event(time=time)
    assert is_valid(EVENT, doc)
    assert [r.reason for r in VALIDATOR.parse_record(orjson.dumps(doc), 0, NOW_MS).rejected] == [reason]


# Forms the schema refuses that Python's parsers would take (fromisoformat: other ISO 8601
# forms; Decimal(): signs, exponents, spaces, "_"): the processor refuses them as well.
_NON_RFC3339_TIMES = ["2026-11-21 17:04:00Z", "20261121T170400Z", "2026-11-21T17Z",
                      "2026-11-21T17:04Z", "2026-11-21T17:04:00+0100", "2026-11-21T17:04:00,5Z",
                      "2026-W47-6T17:04:00Z"]
_NON_DECIMAL_TEXT = ["1e3", " 12 ", "1_000", "+5", "-0", "1E15"]


@pytest.mark.parametrize(("doc", "reason"),
                         [(_base_event(time=t), Reason.INVALID_TIME) for t in _NON_RFC3339_TIMES]
                         + [(_base_event(data={"tokens": v}), Reason.INVALID_VALUE)
                            for v in _NON_DECIMAL_TEXT],
                         ids=_NON_RFC3339_TIMES + _NON_DECIMAL_TEXT)
def test_processor_rejects_what_the_schema_rejects(doc: dict[str, Any], reason: Reason) -> None:
    assert not is_valid(EVENT, doc)
    parsed = VALIDATOR.parse_record(orjson.dumps(doc), 0, NOW_MS)
    assert parsed.accepted == []
    assert [r.reason for r in parsed.rejected] == [reason]


def test_integral_json_number_at_or_above_1e14_with_a_fraction_part() -> None:
    body = b'{"specversion":"1.0","id":"evt-1","source":"s","type":"llm_tokens","subject":"c",' \
           b'"time":"2026-11-21T17:04:00Z","data":{"tokens":100000000000000.0}}'
    assert is_valid(EVENT, orjson.loads(body))
    assert VALIDATOR.parse_record(body, 0, NOW_MS).rejected == []


# --- outgoing messages built by the real code ------------------------------------------------


def run_to_completion(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never really waits (its I/O is faked) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine waited for real I/O")


class RecordingConnection:
    """Stands in for the asyncpg connection `_write_outbox` writes through."""

    def __init__(self) -> None:
        self.executed: list[tuple[str, tuple[Any, ...]]] = []

    async def execute(self, query: str, *args: Any) -> str:
        self.executed.append((query, args))
        return "INSERT"


def outbox_messages(aggregates: list[Any], policy: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(topic, key, payload) of the `usage.aggregates` outbox rows the real `_write_outbox`
    writes (the balance changes are written by the ledger's `post`, from `to_message`)."""
    conn = RecordingConnection()
    run_to_completion(flush._write_outbox(conn, aggregates, policy))  # type: ignore[arg-type]
    ((query, (topics, keys, payloads)),) = conn.executed
    assert query == flush.INSERT_OUTBOX
    return [(t, k, orjson.loads(p)) for t, k, p in zip(topics, keys, payloads, strict=True)]


def aggregates_of(buffers: tuple[WindowBuffer, ...], policy: Any,
                  previous: dict[tuple[str, str, int], tuple[int, WindowValue]]) -> list[Any]:
    """Window aggregates as `flush._aggregate` makes them, with the previous values given
    here instead of read from Postgres."""
    out = []
    for buf in buffers:
        k = buf.key
        meter = policy.meters[k.meter]
        seq, prev = previous.get((k.customer, k.meter, k.start_ms), (0, None))
        value, quantity = fold(meter.aggregation, buf.events, prev)
        out.append(SimpleNamespace(
            id=flush.aggregate_id(k.customer, k.meter, k.start_ms, seq), window=buf, seq=seq,
            value=value, quantity=quantity,
            credits=debit_for(quantity, meter.credits_per_unit, policy.credit_places),
            events=buf.events,
        ))
    return out


_EXTRA_METERS = [
    {"key": "peak_seats", "event_type": "seats", "aggregation": "max", "value_property": "seats",
     "credits_per_unit": "0.5", "stripe_event_name": None},
    {"key": "storage_gb", "event_type": "storage", "aggregation": "latest", "value_property": "gb",
     "credits_per_unit": "0.0003", "stripe_event_name": "storage_gb"},
]
# Every aggregation, several window sizes (sub-second ones put microseconds in the timestamps).
POLICIES = {
    size: policy_from(load_config(
        DEV_CONFIG, processor={"window_size_ms": size},
        meters=[m.model_dump() for m in DEV.meters] + _EXTRA_METERS))
    for size in (250, 1_000, 5_000, 60_000)
}
CUSTOMERS = ["cust_00001", "cust_00042", "acme-corp/eu"]
decimals = st.builds(lambda m, k: Decimal(m).scaleb(k), st.integers(0, 10**15), st.integers(-9, 3))
signed_decimals = st.builds(lambda m, k: Decimal(m).scaleb(k), st.integers(-(10**15), 10**15), st.integers(-6, 3))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from(sorted(POLICIES)),
    raw=st.lists(st.tuples(st.sampled_from(CUSTOMERS), st.sampled_from(range(5)),
                           st.integers(0, 180_000), st.one_of(st.integers(0, 10**15), decimals,
                                                              st.just(Decimal("-0")))),
                 min_size=1, max_size=25),
    prior=st.one_of(st.none(), st.tuples(st.integers(1, 5), decimals, st.integers(0, 180_000))),
    balance=signed_decimals,
    granted=decimals,
)
def test_outbox_payloads_from_the_real_code_match_their_schemas(
    size: int, raw: list[tuple[str, int, int, Any]], prior: tuple[int, Decimal, int] | None,
    balance: Decimal, granted: Decimal,
) -> None:
    policy = POLICIES[size]
    meters = list(policy.meters.values())
    events = []
    for i, (customer, m, dt_ms, value) in enumerate(raw):
        meter = meters[m % len(meters)]
        events.append(UsageEvent(dedupe_key("contract", str(i)), customer, meter.key, NOW_MS + dt_ms,
                                 1 if meter.aggregation == "count" else value, 100 + i))
    windows = OpenWindows(size, 0)
    windows.assign(0, 100)
    windows.add(0, events, 100 + len(events), NOW_MS)
    buffers = windows.take_closable(NOW_MS + 10**9).windows
    previous = {}
    if prior is not None:  # every window has been published before: these are corrections
        seq, value, at = prior
        previous = {(b.key.customer, b.key.meter, b.key.start_ms): (seq, WindowValue(value, (NOW_MS + at, 7)))
                    for b in buffers}
    aggregates = aggregates_of(buffers, policy, previous)
    by_customer: dict[str, list[Any]] = {}
    for a in aggregates:
        if a.credits != 0:
            by_customer.setdefault(a.window.key.customer, []).append(a)
    changes = [
        BalanceChange(customer, balance, balance - sum((a.credits for a in aggs), Decimal(0)), granted,
                      "usage", tuple(range(1000, 1000 + len(aggs))), policy.thresholds,
                      usage_transfers(customer, aggs, granted))
        for customer, aggs in by_customer.items()
    ]

    messages = outbox_messages(aggregates, policy)
    assert len(messages) == len(aggregates)
    for (topic, key, payload), a in zip(messages, aggregates, strict=False):
        assert topic == policy.aggregates_topic and key == a.window.key.customer
        assert_valid(AGGREGATE, payload)
        start = datetime.fromisoformat(payload["window_start"])
        end = datetime.fromisoformat(payload["window_end"])
        assert end - start == timedelta(milliseconds=size)
        assert (payload["id"], payload["seq"], payload["event_count"]) == (a.id, a.seq, len(a.window.events))
        assert Decimal(payload["quantity"]) == a.quantity and Decimal(payload["credits"]) == a.credits
    for change in changes:
        payload = orjson.loads(orjson.dumps(change.to_message()))  # as `post` writes it
        assert_valid(BALANCE, payload)


def usage_transfers(customer: str, aggregates: list[Any], granted: Decimal,
                    ) -> tuple[dict[str, object], ...]:
    """The transfers the ledger decides for these aggregates, from one grant of `granted`."""
    at = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    book = CustomerBook(customer, {1: Grant(1, granted, 10, at - timedelta(days=1), None)}, ZERO)
    moves = []
    for a in aggregates:
        if a.credits > 0:
            moves += book.use(a.credits, at, at, USAGE_ACCOUNT, "usage")
        else:
            moves += book.credit_back(-a.credits, [], at)
    return tuple(transfer_message(i, t) for i, t in enumerate(moves, start=1))


@settings(max_examples=60, deadline=None)
@given(
    before=signed_decimals, after=signed_decimals, granted=decimals,
    reason=st.sampled_from(SCHEMAS[BALANCE_SCHEMA]["properties"]["reason"]["examples"]),
    entry_ids=st.lists(st.integers(1, 2**63 - 1), unique=True, max_size=5),
    thresholds=st.lists(st.integers(1, 100), unique=True, max_size=6).map(lambda t: tuple(sorted(t))),
)
def test_balance_change_messages_match_their_schema(
    before: Decimal, after: Decimal, granted: Decimal, reason: str,
    entry_ids: list[int], thresholds: tuple[int, ...],
) -> None:
    message = BalanceChange("cust_00042", before, after, granted, reason, tuple(entry_ids),
                            thresholds).to_message()
    payload: dict[str, Any] = orjson.loads(orjson.dumps(message))  # as written to the outbox
    assert_valid(BALANCE, payload)
    assert Decimal(payload["delta"]) == Decimal(payload["balance_after"]) - Decimal(payload["balance_before"])
    assert payload["ledger_entry_id"] == (entry_ids[-1] if entry_ids else None)
    assert set(payload["thresholds_crossed"]) <= set(thresholds)


# --- examples of outgoing messages are what the code would write -------------------------------


@pytest.mark.parametrize("index", _example_ids(AGGREGATE_SCHEMA))
def test_example_aggregate_is_consistent_with_the_code(index: int) -> None:
    example = SCHEMAS[AGGREGATE_SCHEMA]["examples"][index]
    meter = next(m for m in DEPLOY.meters if m.key == example["meter"])
    start = datetime.fromisoformat(example["window_start"])
    start_ms = (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    end = datetime.fromisoformat(example["window_end"])
    assert end - start == timedelta(milliseconds=DEPLOY.processor.window_size_ms)
    assert example["id"] == flush.aggregate_id(example["customer"], meter.key, start_ms, example["seq"])
    assert example["stripe_event_name"] == meter.stripe_event_name
    assert example["correction"] == (example["seq"] > 0)
    assert example["credits"] == decimal_text(debit_for(
        Decimal(example["quantity"]), meter.credits_per_unit, DEPLOY.processor.credit_decimal_places))


@pytest.mark.parametrize("index", _example_ids(BALANCE_SCHEMA))
def test_example_balance_change_is_consistent_with_the_code(index: int) -> None:
    example = SCHEMAS[BALANCE_SCHEMA]["examples"][index]
    before, after = Decimal(example["balance_before"]), Decimal(example["balance_after"])
    assert Decimal(example["delta"]) == after - before
    assert example["ledger_entry_id"] == (example["ledger_entry_ids"] or [None])[-1]
    assert example["depleted"] == depleted(before, after)
    assert set(example["thresholds_crossed"]) <= set(DEPLOY.processor.thresholds_percent)


# --- docs name everything the code uses --------------------------------------------------------


def test_dlq_doc_names_every_reason_and_header() -> None:
    doc = (SCHEMA_DIR / "dlq-headers.md").read_text()
    for reason in Reason:
        assert f"`{reason.value}`" in doc, reason
    rejection = Rejection(Reason.INVALID_VALUE, "data.tokens: negative", 17, b"{}", batch_index=3)
    for name, _ in dlq_headers(rejection, DEV.kafka.usage_topic, 2):
        assert f"`{name}`" in doc, name
    assert f"`{DEV.kafka.usage_dlq_topic}`" in doc


def test_topic_readme_names_every_topic_and_schema() -> None:
    readme = (SCHEMA_DIR / "README.md").read_text()
    k = DEPLOY.kafka
    for topic in (k.usage_topic, k.usage_dlq_topic, k.aggregates_topic, k.balance_changes_topic):
        assert f"`{topic}`" in readme, topic
    for name in [*SCHEMAS, "dlq-headers.md"]:
        assert f"`{name}`" in readme, name
    assert "`meterline.outbox_id`" in readme
