"""One contract: usage-event.schema.json accepts exactly what `EventValidator` accepts.

Property tests draw documents from the validator's rules (every required attribute
valid, wrong or absent, quantities of every JSON type and size) and check the schema
and the processor give the same verdict, both ways; the rules the schema cannot
express (the processor's clock, known customers, sizes, nesting depth) are kept out
of the draw and tested on their own. Also: the patterns are the same strings in the
schema and the code, the batch schema resolves offline, duplicate keys read the same
everywhere, and the docs name every topic and balance-change reason the code uses.
"""

from __future__ import annotations

import ast
import json
import string
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from meterline.core import events
from meterline.core.events import Reason
from meterline.devstack.topics import topic_partitions

from .test_schemas import (
    _BAD_TIMES,
    _CHARS,
    BATCH_SCHEMA,
    DEPLOY,
    DEV,
    EVENT,
    EVENT_SCHEMA,
    NOW_MS,
    ROOT,
    SCHEMA_DIR,
    SCHEMAS,
    VALIDATOR,
    is_valid,
    json_values,
    quantities,
    rfc3339_times,
)

EVENT_DOC = SCHEMAS[EVENT_SCHEMA]
BATCH_DOC = SCHEMAS[BATCH_SCHEMA]


def test_schema_patterns_are_the_validators_patterns() -> None:
    """The two regular expressions of the contract are one text each, not two copies."""
    assert EVENT_DOC["properties"]["time"]["pattern"] == f"^{events._RFC3339.pattern}$"
    (string_form,) = [f for f in EVENT_DOC["$defs"]["quantity"]["anyOf"] if f.get("type") == "string"]
    assert string_form["pattern"] == f"^({events._DECIMAL_TEXT.pattern})$"


def test_batch_schema_validates_on_its_own_offline() -> None:
    # No registry, no retrieval: the event schema is bundled in the batch schema.
    standalone = Draft202012Validator(BATCH_DOC)
    for example in BATCH_DOC["examples"]:
        standalone.validate(example)
    assert not standalone.is_valid([{"specversion": "1.0"}])
    assert BATCH_DOC["$defs"]["usage-event"] == EVENT_DOC, (
        "copy usage-event.schema.json into usage-event-batch.schema.json's $defs/usage-event")
    assert BATCH_DOC["items"]["$ref"] == EVENT_DOC["$id"]


# --- differential: documents drawn from the validator's rules -----------------------------

_METER_TYPES = sorted(m.event_type for m in DEV.meters)
_VALUE_PROPERTY = {m.event_type: m.value_property for m in DEV.meters if m.aggregation != "count"}
_ABSENT = object()

any_json = st.one_of(json_values, st.floats(allow_nan=False, allow_infinity=False))
valid_attribute = st.text(_CHARS, min_size=1, max_size=20)
wrong_attribute = st.one_of(st.just(""), st.text(_CHARS, min_size=513, max_size=520), any_json,
                            st.just(_ABSENT))
wrong_quantity = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # any double: negative, huge, fractions >= 1e14
    st.integers(-(2**63), 2**64 - 1),  # orjson writes up to u64
    st.text("0123456789.", min_size=1, max_size=22),
    # digit strings around the schema's 15-digit/10^15 edges, leading zeros included
    st.builds(lambda zeros, n, fraction: "0" * zeros + str(n) + fraction,
              st.integers(0, 4), st.integers(10**14 - 2, 10**16), st.sampled_from(["", ".5", ".0", ".000"])),
    st.text(string.digits + ".-+eE_ ", max_size=6), st.booleans(), st.none(), json_values,
)
wrong_time = st.one_of(st.sampled_from(_BAD_TIMES), st.text(_CHARS, max_size=25), any_json, st.just(_ABSENT))
# Mostly valid: a document breaks one or two rules at a time, so every rule gets to decide.
mostly_valid = st.sampled_from([True, True, True, False])


@st.composite
def drawn_events(draw: st.DrawFn) -> dict[str, Any]:
    """A document near a usage event: each attribute valid (3 in 4) or wrong or absent."""
    def pick(valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> Any:
        return draw(valid if draw(mostly_valid) else wrong)

    doc: dict[str, Any] = {
        "specversion": pick(st.just("1.0"), any_json | st.just(_ABSENT)),
        "id": pick(valid_attribute, wrong_attribute),
        "source": pick(valid_attribute, wrong_attribute),
        "subject": pick(valid_attribute, wrong_attribute),
        "type": pick(st.sampled_from(_METER_TYPES), valid_attribute | wrong_attribute),
        "time": pick(rfc3339_times().map(lambda t: t[0]), wrong_time),
    }
    event_type = doc["type"]
    prop = _VALUE_PROPERTY.get(event_type) if isinstance(event_type, str) else None
    extra = draw(st.dictionaries(st.text(_CHARS, max_size=6), json_values, max_size=2))
    data = {**extra, prop or "value": pick(quantities(), wrong_quantity)}
    doc["data"] = data if draw(mostly_valid) else draw(any_json | st.just(_ABSENT))
    return {k: v for k, v in doc.items() if v is not _ABSENT}


def _verdicts(text: bytes) -> tuple[bool, bool, list[Reason]]:
    """(schema says valid, processor accepted, processor's reasons) for one message."""
    parsed = VALIDATOR.parse_record(text, 0, NOW_MS)
    return is_valid(EVENT, orjson.loads(text)), bool(parsed.accepted), [r.reason for r in parsed.rejected]


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(drawn_events())
def test_schema_and_processor_agree_on_documents_drawn_from_the_validators_rules(doc: dict[str, Any]) -> None:
    schema_valid, accepted, reasons = _verdicts(orjson.dumps(doc))
    assert schema_valid == accepted, (schema_valid, reasons)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(drawn_events(), st.data())
def test_duplicate_keys_read_the_same_in_the_schema_and_the_processor(doc: dict[str, Any],
                                                                      data: st.DataObject) -> None:
    """A member written twice: the last one counts, for orjson, Python's json and the processor."""
    name = data.draw(st.sampled_from(sorted(doc)))
    earlier = data.draw(any_json)
    text = orjson.dumps(doc)
    text = b"{" + orjson.dumps(name) + b":" + orjson.dumps(earlier) + b"," + text[1:]
    assert orjson.loads(text) == json.loads(text) == doc
    schema_valid, accepted, reasons = _verdicts(text)
    assert schema_valid == accepted, (schema_valid, reasons)
    if reasons:  # the DLQ keeps what was sent, both members
        assert VALIDATOR.parse_record(text, 0, NOW_MS).rejected[0].payload == text


def test_year_zero_is_a_time_the_schema_takes_and_the_processor_calls_too_old() -> None:
    doc = {"specversion": "1.0", "id": "e", "source": "s", "type": "api_request", "subject": "c",
           "time": "0000-01-01T00:00:00Z"}
    assert is_valid(EVENT, doc)
    assert [r.reason for r in VALIDATOR.parse_record(orjson.dumps(doc), 0, NOW_MS).rejected] == [
        Reason.TOO_OLD]


def test_sixteen_and_seventeen_digit_numbers_are_accepted_by_both() -> None:
    for number in (b"0.12345678901234566", b"0.30000000000000004", b"1234567890123.4568"):
        text = (b'{"specversion":"1.0","id":"e","source":"s","type":"llm_tokens","subject":"c",'
                b'"time":"2026-11-21T17:04:00Z","data":{"tokens":' + number + b"}}")
        assert _verdicts(text) == (True, True, [])
        assert str(VALIDATOR.parse_record(text, 0, NOW_MS).accepted[0].value) == number.decode()


# --- the docs name what the code uses -----------------------------------------------------------


def test_topic_readme_names_every_topic_meterline_topics_creates() -> None:
    readme = (SCHEMA_DIR / "README.md").read_text()
    topics = topic_partitions(DEPLOY)
    table_rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for topic in topics:
        assert any(row.startswith(f"| `{topic}` |") for row in table_rows), topic
    numbers = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
    assert f"creates all {numbers[len(topics)]}" in readme


_REASON_ARGUMENT = {"BalanceChange": 4, "_ledger_change": 6, "Entry": 2}  # 0-based position of `reason`


def _reason_literals(node: ast.AST) -> list[ast.expr]:
    """Expressions that `node` makes a balance change's reason."""
    if isinstance(node, ast.Call):
        found = [kw.value for kw in node.keywords if kw.arg == "reason"]
        index = _REASON_ARGUMENT.get(getattr(node.func, "id", getattr(node.func, "attr", "")))
        if index is not None and len(node.args) > index:
            found.append(node.args[index])
        return found
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "reason":
        return [node.value] if node.value is not None else []
    if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith("_REASON") for t in node.targets):
        return [node.value]
    return []


def _balance_change_reasons_in_code() -> set[str]:
    """String literals the code passes as a balance change's `reason`.

    Found syntactically: `reason="..."` keywords, `reason: str = "..."` defaults,
    `*_REASON = "..."` constants, and the literal reason argument of
    `BalanceChange(...)`, `_ledger_change(...)` and the ledger's `Entry(...)`.
    """
    found: set[str] = set()
    for path in (ROOT / "services" / "meterline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            found |= {e.value for e in _reason_literals(node)
                      if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return found


def test_balance_change_schema_lists_every_reason_the_code_writes() -> None:
    reason = SCHEMAS["balance-change.schema.json"]["properties"]["reason"]
    in_code = _balance_change_reasons_in_code()
    assert {"usage", "expiry", "manual_grant"} <= in_code  # the scan sees the code at all
    missing = in_code - set(reason["examples"])
    assert not missing, f"add {sorted(missing)} to balance-change.schema.json reason (examples and description)"
    for value in reason["examples"]:
        assert f'\\"{value}\\"' in json.dumps(reason["description"]), value
