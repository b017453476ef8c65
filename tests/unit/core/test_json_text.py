"""meterline.core.json_text: batch member bytes and nesting depth, read from the JSON text.

Both are pinned against the decoded value (orjson/json) for arbitrary JSON written
in arbitrary ways: spacing, escapes, strings full of brackets and quotes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.json_text import member_bytes, nests_deeper_than

# Strings are where a scan goes wrong: bias them toward brackets, quotes and backslashes.
tricky_text = st.text(st.one_of(st.sampled_from('[]{}",:\\/ \n\t'), st.characters(exclude_categories=["Cs"])),
                      max_size=12)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), tricky_text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=30,
)
spacing = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


def depth(value: Any) -> int:
    """Reference: levels of arrays/objects in a decoded value (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@st.composite
def written(draw: st.DrawFn, value: Any) -> bytes:
    """`value` as one of several JSON writers would write it."""
    style = draw(st.sampled_from(["orjson", "ascii", "spaced"]))
    if style == "orjson":
        return orjson.dumps(value)
    if style == "ascii":  # \\uXXXX escapes for everything non-ASCII, as Python's json does
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False, indent=draw(st.sampled_from([None, 1, 2])),
                      separators=(draw(spacing) + "," + draw(spacing), ":" + draw(spacing))).encode()


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(json_values, max_size=8), spacing, spacing)
def test_member_bytes_are_each_members_exact_text(data: st.DataObject, members: list[Any],
                                                  before: str, after: str) -> None:
    texts = [data.draw(written(m)) for m in members]
    sep = data.draw(spacing).encode() + b"," + data.draw(spacing).encode()
    batch = before.encode() + b"[" + data.draw(spacing).encode() + sep.join(texts) + b"]" + after.encode()
    assert orjson.loads(batch) == members

    assert member_bytes(batch) == texts


def test_member_bytes_of_an_empty_array_is_empty() -> None:
    assert member_bytes(b"[]") == [] and member_bytes(b" [ \n ] ") == []


def test_member_bytes_refuses_what_is_not_an_array() -> None:
    with pytest.raises(ValueError):
        member_bytes(b'"[1, 2]"')


@settings(max_examples=400, deadline=None)
@given(st.data(), json_values, st.integers(1, 8))
def test_nests_deeper_than_agrees_with_the_decoded_value(data: st.DataObject, value: Any, limit: int) -> None:
    text = data.draw(written(value))

    assert nests_deeper_than(text, limit) == (depth(value) > limit)


@pytest.mark.parametrize(("text", "limit", "deeper"), [
    # 300 arrays, the smallest trigger
    (b"[" * 300 + b"]" * 300, 299, True),
    (b"[" * 300 + b"]" * 300, 300, False),
    # brackets inside strings are not nesting, even unbalanced ones
    (b'{"a": "[[[[[[", "b": "}}}}"}', 1, False),
    # a string that hides an odd run of quotes behind escapes
    (b'[["\\"[\\"", "\\\\"], "]]"]', 2, False),
    (b'[["\\"[\\"", "\\\\"], "]]"]', 1, True),
    # scalars do not nest
    (b"42", 1, False),
])
def test_nests_deeper_than_examples(text: bytes, limit: int, deeper: bool) -> None:
    assert nests_deeper_than(text, limit) is deeper
