"""fit_dead_letter: a record too large for the DLQ becomes a truncated, identifiable copy."""

from __future__ import annotations

import hashlib

from meterline.processor.dlq import dead_letter_headers, fit_dead_letter

LIMIT = 10_000


def _headers(reason: str = "unknown_type") -> list[tuple[str, str | bytes | None]]:
    return dead_letter_headers(reason, "no meter", "usage.events", 2, 41)


def test_a_record_that_fits_is_left_alone() -> None:
    assert fit_dead_letter(b"cust", b"x" * 5000, _headers(), LIMIT) is None


def test_a_record_too_large_is_truncated_with_its_hash_length_and_origin() -> None:
    value = bytes(range(256)) * 100  # 25,600 bytes
    fitted = fit_dead_letter(b"cust", value, _headers(), LIMIT)
    assert fitted is not None
    key, copy, headers = fitted
    h = dict(headers)
    assert key == b"cust"
    assert value.startswith(copy) and 0 < len(copy) < LIMIT
    assert h["meterline.reason"] == b"oversized"
    assert h["meterline.original.reason"] == b"unknown_type"
    assert h["meterline.original.length"] == b"25600"
    assert h["meterline.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert (h["meterline.original.topic"], h["meterline.original.offset"]) == (
        b"usage.events", b"41")
    assert [n for n, _ in headers].count("meterline.reason") == 1
    size = len(copy) + len(key) + sum(len(n) + len(v or b"") for n, v in headers)
    assert size <= LIMIT


def test_a_huge_key_is_dropped_but_identified() -> None:
    key = b"k" * 6000
    fitted = fit_dead_letter(key, b"v" * 8000, _headers(), LIMIT)
    assert fitted is not None
    new_key, copy, headers = fitted
    h = dict(headers)
    assert new_key is None and copy == b"v" * 8000  # without the key the value fits
    assert h["meterline.original.key_length"] == b"6000"
    assert h["meterline.original.key_sha256"] == hashlib.sha256(key).hexdigest().encode()
