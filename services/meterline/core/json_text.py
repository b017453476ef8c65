"""Facts about JSON *text* that a decoded value no longer shows: a batch member's exact
bytes, and how deeply the text nests.

Pure, and only ever called on text orjson has already accepted (valid JSON, valid
UTF-8): that is what lets a scan skip strings with one regex and trust every other
structural character.

Why bytes and not re-encoding: a rejected batch member goes to the DLQ exactly as
the producer wrote it. `orjson.dumps` of the decoded member would reorder nothing
but could still fail (it writes at most 255 levels while `orjson.loads` reads 1024)
and would change number spellings and escapes.
"""

from __future__ import annotations

import re
from typing import Any

# One JSON string (escapes included) or one structural character of the array/object
# grammar. Inside accepted JSON, a `"` outside a string always opens one.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)
_QUOTE, _COMMA = ord('"'), ord(",")
_OPENERS = frozenset(b"[{")
_JSON_WHITESPACE = b" \t\n\r"


# The comma between two object members, braces included: `}`, JSON whitespace, `,`,
# JSON whitespace, `{`. Every boundary between two object members looks like this;
# text inside a member (a string, a nested array of objects) can look like it too.
_OBJECT_BOUNDARY = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")


def member_bytes(batch: bytes, members: list[Any], first: int) -> list[bytes]:
    """The bytes of the first `first` members of the JSON array `batch`, surrounding
    whitespace removed.

    Precondition: `members` is `orjson.loads(batch)`. Called only when a member is
    rejected, never on the accept path.

    Fast path, when every member is an object (a batch of events): split at the
    boundaries `_OBJECT_BOUNDARY` finds, in one C pass. Each of the len(members) - 1
    real boundaries is found, and matches never overlap, so finding exactly that many
    proves none was found inside a member: the pieces are the members. Otherwise one
    exact scan.
    """
    if all(type(m) is dict for m in members):
        inner = batch[batch.index(b"[") + 1:batch.rindex(b"]")].strip(_JSON_WHITESPACE)
        parts = _OBJECT_BOUNDARY.split(inner)
        if len(parts) == len(members):  # the braces the split took are put back
            last = len(parts) - 1
            return [(b"{" if i else b"") + parts[i] + (b"}" if i < last else b"") for i in range(first)]
    return _scan_members(batch)[:first]


def _scan_members(batch: bytes) -> list[bytes]:
    """`member_bytes` by one pass over every string and structural character."""
    members: list[bytes] = []
    depth = 0
    start = 0
    for token in _TOKEN.finditer(batch):
        c = batch[token.start()]
        if c == _QUOTE:
            continue
        if c in _OPENERS:
            depth += 1
            if depth == 1:
                start = token.end()
        elif c == _COMMA:
            if depth == 1:
                members.append(batch[start:token.start()].strip(_JSON_WHITESPACE))
                start = token.end()
        else:
            depth -= 1
            if depth == 0:
                last = batch[start:token.start()].strip(_JSON_WHITESPACE)
                if last or members:  # "[]" has no member; "[1]" has one
                    members.append(last)
                return members
    raise ValueError("not a JSON array")


# Keep only what decides nesting (brackets and the string delimiters around them);
# "[" and "]" are mapped onto "{" and "}": in valid JSON they pair up the same way.
_BRACKETS = bytes.maketrans(b"[]", b"{}")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"\\[]{}')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nests_deeper_than(text: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects more than `limit` levels deep.

    Precondition: `text` is JSON orjson accepted. Fast path (C-speed byte passes):
    drop everything but brackets and quotes; a string without brackets or escapes
    leaves `""`, which is removed. If no quote or backslash is left, what remains is
    exactly the structure, and each `replace("{}", "")` pass peels one level.
    A string holding a bracket or an escape always leaves a quote behind (an odd run
    of quotes), and then strings are cut out with the regex instead — exact, slower.
    """
    structure = text.translate(_BRACKETS, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in structure or b"\\" in structure:
        structure = _TOKEN.sub(_without_strings, text).translate(_BRACKETS, _NOT_BRACKET)
    for _ in range(limit):
        if not structure:
            return False
        structure = structure.replace(b"{}", b"")
    return bool(structure)


def _without_strings(token: re.Match[bytes]) -> bytes:
    return b"" if token.group()[0] == _QUOTE else token.group()
