"""What goes over the wire: JSON bodies, the error shape, and parsing of inputs.

Money is Decimal end to end: amounts arrive as JSON strings of plain decimal
digits and leave as strings (never JSON numbers, which clients parse as
floats). Times are RFC 3339 with an explicit offset, in and out.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from meterline.core.credits import decimal_text
from meterline.core.events import EPOCH, parse_time_ms

JSON = "application/json"
# What one manual grant or adjustment may move: below 10^15 in absolute value, with at
# most 12 decimal places (the ledger's debits have at most 12: credit_decimal_places).
_AMOUNT = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,12})?")
# Customer ids and keys are compared, never interpreted; control characters are refused
# so they cannot forge lines in logs or CSV exports.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_ID_LENGTH = 512


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class StreamAborted(Exception):
    """A streamed response failed after its headers were sent; the connection must be dropped."""


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return decimal_text(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(body: Any) -> bytes:
    """JSON bytes; Decimals as plain decimal strings, datetimes as RFC 3339 in UTC ("Z")."""
    return orjson.dumps(body, default=_default, option=orjson.OPT_UTC_Z)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type=JSON, headers=headers)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def parse_time(text: str, name: str) -> datetime:
    """An RFC 3339 date-time with an offset, as an aware UTC datetime (millisecond precision).

    In a query string an unescaped "+" of the offset arrives as a space; it is
    read back as "+" rather than refused, since that is what the caller meant.
    """
    if len(text) > 40:
        raise invalid(f"{name}: not an RFC 3339 date-time")
    if len(text) >= 6 and text[-6] == " ":
        text = text[:-6] + "+" + text[-5:]
    try:
        ms = parse_time_ms(text)
    except ValueError:
        raise invalid(f"{name}: not an RFC 3339 date-time with an offset "
                      "(e.g. 2026-11-21T17:05:00Z)") from None
    try:
        return EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        raise invalid(f"{name}: out of range") from None


def parse_amount(raw: Any, name: str = "amount") -> Decimal:
    """A non-zero decimal string ("12.5", "-3"): below 10^15, at most 12 decimal places."""
    if not isinstance(raw, str) or not _AMOUNT.fullmatch(raw):
        raise invalid(f"{name}: a decimal string such as \"12.5\" or \"-3\" "
                      "(below 10^15, at most 12 decimal places)")
    try:
        amount = Decimal(raw)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise invalid(f"{name}: not a decimal") from None
    if amount == 0:
        raise invalid(f"{name}: must not be zero")
    return amount


def parse_identifier(raw: Any, name: str, max_length: int = MAX_ID_LENGTH) -> str:
    """A non-empty string without control characters, at most `max_length` characters."""
    if not isinstance(raw, str) or not raw or len(raw) > max_length or _CONTROL.search(raw):
        raise invalid(f"{name}: 1 to {max_length} characters, no control characters")
    return raw


def only_query(request: web.Request, *names: str) -> None:
    """Refuse query parameters the route does not know: a typo (`?form=`) must not be ignored."""
    unknown = set(request.query) - set(names)
    if unknown:
        raise invalid(f"unknown query parameter(s): {', '.join(sorted(unknown))}")


def customer_id(request: web.Request) -> str:
    return parse_identifier(request.match_info["id"], "customer id")


def parse_int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise invalid(f"{name}: an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise invalid(f"{name}: an integer from {low} to {high}")
    return value


def time_range(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    """`from`/`to` query parameters: default from = start of the current UTC month, to = now."""
    q = request.query
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    frm = parse_time(q["from"], "from") if "from" in q else start
    to = parse_time(q["to"], "to") if "to" in q else now
    if frm >= to:
        raise invalid("from must be before to")
    return frm, to


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (body size is capped by the app's client_max_size)."""
    if request.content_type != JSON:
        raise ApiError(415, "unsupported_media_type", "send application/json")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise invalid("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    return body
