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

# One JSON string (escapes included) or one structural character of the array/object
# grammar. Inside accepted JSON, a `"` outside a string always opens one.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)
_QUOTE, _COMMA = ord('"'), ord(",")
_OPENERS = frozenset(b"[{")
_JSON_WHITESPACE = b" \t\n\r"


def member_bytes(batch: bytes) -> list[bytes]:
    """The bytes of each member of the JSON array `batch`, surrounding whitespace removed.

    Precondition: `orjson.loads(batch)` returned a list. Costs one regex pass over
    the message; called only when a member is rejected, never on the accept path.
    """
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
