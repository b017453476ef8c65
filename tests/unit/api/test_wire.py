"""Input parsing and JSON output: money as decimal strings, times as RFC 3339."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from meterline.api.wire import ApiError, dumps, parse_amount, parse_time


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-21T17:05:00Z", datetime(2026, 11, 21, 17, 5, tzinfo=UTC)),
    ("2026-11-21t17:05:00.123z", datetime(2026, 11, 21, 17, 5, 0, 123000, tzinfo=UTC)),
    ("2026-11-21T18:05:00+01:00", datetime(2026, 11, 21, 17, 5, tzinfo=UTC)),
    ("2026-11-21T18:05:00 01:00", datetime(2026, 11, 21, 17, 5, tzinfo=UTC)),  # "+" unescaped
])
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, "t") == expected


@pytest.mark.parametrize("text", [
    "2026-11-21T17:05:00", "2026-11-21 17:05:00Z", "2026-02-30T00:00:00Z", "2026-W47",
    "0000-01-01T00:00:00Z", "2026-11-21T17:05:00+0100", "x" * 50,
])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_time(text, "from")
    assert err.value.status == 400 and err.value.message.startswith("from:")


@pytest.mark.parametrize(("raw", "expected"), [
    ("12.5", Decimal("12.5")), ("-3", Decimal(-3)), ("0.000000000001", Decimal("1E-12")),
    ("999999999999999.999999999999", Decimal("999999999999999.999999999999")),
])
def test_parse_amount(raw: str, expected: Decimal) -> None:
    assert parse_amount(raw) == expected


@pytest.mark.parametrize("raw", [12.5, 3, "0", "-0.0", "1e3", "+1", " 1", "1.", ".5", "NaN",
                                 "Infinity", "1000000000000000", "1.0000000000001", None])
def test_parse_amount_refuses(raw: object) -> None:
    with pytest.raises(ApiError):
        parse_amount(raw)


def test_decimals_leave_as_plain_strings_and_times_in_utc() -> None:
    body = {"a": Decimal("2E-6"), "b": Decimal("-0.880000"), "t": datetime(2026, 1, 1, tzinfo=UTC)}
    assert orjson.loads(dumps(body)) == {"a": "0.000002", "b": "-0.880000",
                                         "t": "2026-01-01T00:00:00Z"}
