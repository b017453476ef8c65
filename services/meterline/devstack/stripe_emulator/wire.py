"""Wire helpers for the emulator: Stripe form decoding, exact-Decimal JSON, error bodies."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from aiohttp import web

_KEY_PART = re.compile(r"\[([^\]]*)\]")


def parse_form(items: Any) -> dict[str, Any]:
    """Decode Stripe's v1 bracket form keys (``payload[stripe_customer_id]=cus_1``) into
    nested dicts. Array keys (``expand[0]``) become dicts keyed by the index string."""
    out: dict[str, Any] = {}
    for raw_key, value in items:
        head, _, rest = raw_key.partition("[")
        parts = [head] + (_KEY_PART.findall("[" + rest) if rest else [])
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


def dumps(obj: Any) -> str:
    """JSON-encode ``obj``, emitting ``Decimal`` as an exact JSON number (never via float)."""
    if isinstance(obj, Decimal):
        text = format(obj, "f")
        return text if text not in ("-0", "") else "0"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def json_response(body: Any, status: int = 200, request_id: str = "") -> web.Response:
    headers = {"Request-Id": request_id} if request_id else None
    return web.Response(
        text=dumps(body), status=status, content_type="application/json", headers=headers
    )


class StripeHTTPError(Exception):
    """Raised by handlers; rendered as ``{"error": {...}}`` with Stripe's field names."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - Stripe's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"type": type, "message": message}
        if code is not None:
            self.body["code"] = code
        if param is not None:
            self.body["param"] = param
        self.headers = headers or {}

    def response(self, request_id: str) -> web.Response:
        resp = json_response({"error": self.body}, self.status, request_id)
        resp.headers.update(self.headers)
        return resp
