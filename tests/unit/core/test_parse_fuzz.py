"""Fuzz target for `EventValidator.parse_record`: any bytes in, never an exception out.

Property, for every input: no exception; the result is accepted events and/or
rejections, each with a `Reason`; a whole-message rejection carries the message's
bytes unchanged; a rejected batch member carries a contiguous slice of the message
that decodes to that member. Inputs: random bytes, byte-level mutations of real
events and batches, and JSON *text* built to hit every rule (NaN/Infinity/1e400,
huge integers, 16-17 digit numbers, deep nesting, duplicate keys, invalid UTF-8,
lone surrogate escapes, tombstones, empty batches, mixed batches).

Deterministic in `make test` (derandomized, a fixed example count that runs about a
minute here). Longer and random on demand:

    METERLINE_FUZZ_EXAMPLES=500000 METERLINE_FUZZ_SEED=random make fuzz
"""

from __future__ import annotations

import os
import random
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from meterline.config import MeterConfig
from meterline.core.events import EventValidator, Limits, Reason, UsageEvent

NOW_MS = 1_795_280_700_000  # 2026-11-21T17:05:00Z
METERS = {
    "llm_tokens": MeterConfig(key="llm_tokens", event_type="llm_tokens", aggregation="sum",
                              value_property="tokens", credits_per_unit=Decimal("0.00002")),
    "api_request": MeterConfig(key="api_calls", event_type="api_request", aggregation="count",
                               credits_per_unit=Decimal("0.001")),
}
# Small limits, so that size, batch-length and depth rules are reached by small inputs.
VALIDATOR = EventValidator(METERS, Limits(max_message_bytes=4096, max_batch_events=8,
                                          max_lateness_ms=35 * 86_400_000, max_future_skew_ms=300_000,
                                          max_json_depth=6))
EXAMPLES = int(os.environ.get("METERLINE_FUZZ_EXAMPLES", "6000"))
SEED = os.environ.get("METERLINE_FUZZ_SEED", "")  # "" = derandomized; a number or "random"

# --- JSON text, written by hand so it can say what no encoder would --------------------------

numbers = st.sampled_from([
    b"0", b"-0", b"1", b"-1", b"42", b"1.5", b"0.1", b"0.12345678901234566", b"0.30000000000000004",
    b"1e3", b"1E-7", b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"18446744073709551617",
    b"123456789012345.67", b"1000000000000000", b"1000000000000001", b"00", b"1.", b".5", b"+1",
])
strings = st.one_of(
    st.text(max_size=10).map(orjson.dumps),
    st.sampled_from([b'"\\ud800"', b'"\\udc00x"', b'"\xff\xfe"', b'"\xc3"', b'"a\\"b"', b'"\\\\"',
                     b'"[{"', b'"}]"', b'"12.5"', b'"0000000000000001"', b'"-1"', b'"NaN"',
                     b'"2026-11-21T17:04:00Z"', b'"0000-01-01T00:00:00Z"', b'"2026-02-30T00:00:00Z"']),
)
scalars = st.one_of(numbers, strings, st.sampled_from([b"true", b"false", b"null"]))


def _array(items: list[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def _object(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


json_text = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4).map(_array)
    | st.lists(st.tuples(strings, inner), max_size=4).map(_object),
    max_leaves=12,
)
ATTRIBUTES = [b'"specversion"', b'"id"', b'"source"', b'"type"', b'"subject"', b'"time"', b'"data"']


@st.composite
def event_text(draw: st.DrawFn) -> bytes:
    """An event-shaped object: each attribute right, wrong, repeated or missing."""
    right = {
        b'"specversion"': b'"1.0"', b'"id"': orjson.dumps(draw(st.text(min_size=1, max_size=8))),
        b'"source"': b'"fuzz"', b'"type"': draw(st.sampled_from([b'"llm_tokens"', b'"api_request"'])),
        b'"subject"': b'"cust_1"', b'"time"': draw(st.sampled_from([b'"2026-11-21T17:04:00Z"',
                                                                   b'"2026-11-21T17:04:00.5+01:00"'])),
        b'"data"': _object([(b'"tokens"', draw(st.one_of(numbers, strings, st.just(b"7"))))]),
    }
    pairs = []
    for name in ATTRIBUTES:
        choice = draw(st.sampled_from(["right"] * 5 + ["wrong", "missing", "twice"]))
        if choice == "missing":
            continue
        if choice == "twice":
            pairs.append((name, draw(json_text)))
        pairs.append((name, right[name] if choice != "wrong" else draw(json_text)))
    pairs += draw(st.lists(st.tuples(strings, json_text), max_size=2))
    random.Random(draw(st.integers(0, 2**16))).shuffle(pairs)
    return _object(pairs)


def deep(depth: int, inner: bytes) -> bytes:
    return b'{"a":' * (depth // 2) + b"[" * (depth - depth // 2) + inner + b"]" * (depth - depth // 2) \
        + b"}" * (depth // 2)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """`base` with a few byte-level edits: flips, inserts, deletes, splices, truncation."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "splice", "truncate"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b",", b"\\", b"\xff", b"\x00",
                                                b" ", b"NaN", b"1e400", b'"x":1,']))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "splice":
            data[at:at] = data[draw(st.integers(0, len(data))):][:draw(st.integers(1, 40))]
        else:
            del data[at:]
    return bytes(data)


batch_text = st.lists(st.one_of(event_text(), json_text), max_size=10).map(_array)
messages = st.one_of(
    st.none(),
    st.binary(max_size=64),
    event_text(),
    batch_text,
    json_text,
    mutated(event_text()),
    mutated(batch_text),
    st.builds(deep, st.integers(1, 40), st.one_of(event_text(), scalars)),
    st.builds(lambda ws, body: ws + body + ws, st.sampled_from([b" ", b"\n\t", b"\xef\xbb\xbf"]), batch_text),
    st.builds(lambda n: b"[" + b" " * n + b"]", st.integers(0, 5000)),  # empty and oversized-by-padding
)


def check(value: bytes | None) -> None:
    parsed = VALIDATOR.parse_record(value, 17, NOW_MS)  # must not raise, whatever value is

    assert all(type(e) is UsageEvent and e.offset == 17 for e in parsed.accepted)
    for r in parsed.rejected:
        assert isinstance(r.reason, Reason) and r.detail and r.offset == 17
        assert type(r.payload) is bytes
    whole = [r for r in parsed.rejected if r.batch_index is None]
    members = [r for r in parsed.rejected if r.batch_index is not None]
    if whole:  # the message as it came, alone
        assert len(whole) == 1 and not members and not parsed.accepted
        assert whole[0].payload == (value or b"")
        return
    assert value is not None
    doc: Any = orjson.loads(value)  # anything not rejected whole is JSON
    if not isinstance(doc, list):
        assert len(parsed.accepted) == 1 and not members
        return
    assert len(parsed.accepted) + len(members) == len(doc)
    for r in members:  # a member's own bytes, never re-encoded
        assert r.payload in value and orjson.loads(r.payload) == doc[r.batch_index]


_settings = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     derandomize=not SEED, suppress_health_check=list(HealthCheck))


def test_parse_record_never_raises_and_keeps_raw_bytes() -> None:
    target = given(messages)(check)
    if SEED:
        chosen = random.randrange(2**32) if SEED == "random" else int(SEED)
        print(f"fuzz seed {chosen} (replay: METERLINE_FUZZ_SEED={chosen})")
        target = seed(chosen)(target)
    _settings(target)()
