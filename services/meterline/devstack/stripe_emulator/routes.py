"""HTTP handlers for :class:`meterline.devstack.stripe_emulator.emulator.StripeEmulator`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meterline.devstack.stripe_emulator.wire import StripeHTTPError, json_response, parse_form

if TYPE_CHECKING:
    from meterline.devstack.stripe_emulator.emulator import StripeEmulator

SESSION_TTL_SECONDS = 900
MAX_STREAM_EVENTS = 100

_FORMULAS = {"sum", "count", "last"}


def _missing(param: str) -> StripeHTTPError:
    return StripeHTTPError(400, f"Missing required param: {param}.", code="parameter_missing",
                           param=param)


def _int_param(params: Any, name: str, *, required: bool = True) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise _missing(name)
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise StripeHTTPError(400, f"Invalid integer: {raw}", param=name) from None


def _list(url: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "url": url}


def _parse_v2_timestamp(raw: Any, index: int) -> int | None:
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise StripeHTTPError(400, f"Invalid timestamp {raw!r}: expected RFC 3339.",
                              param=f"events[{index}].timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def register(app: web.Application, emu: StripeEmulator) -> None:  # noqa: C901 - route table
    async def create_customer(request: web.Request) -> web.Response:
        form = parse_form((await request.post()).items())
        cus = {"id": emu._id("cus_"), "object": "customer", "created": emu.now(),
               "email": form.get("email"), "name": form.get("name"),
               "description": form.get("description"), "metadata": form.get("metadata", {}),
               "livemode": False}
        emu.customers[cus["id"]] = cus
        return json_response(cus)

    async def get_customer(request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if cid not in emu.customers:
            raise StripeHTTPError(404, f"No such customer: '{cid}'", code="resource_missing",
                                  param="id")
        return json_response(emu.customers[cid])

    async def create_meter(request: web.Request) -> web.Response:
        form = parse_form((await request.post()).items())
        for name in ("display_name", "event_name"):
            if not form.get(name):
                raise _missing(name)
        formula = (form.get("default_aggregation") or {}).get("formula")
        if not formula:
            raise _missing("default_aggregation[formula]")
        if formula not in _FORMULAS:
            raise StripeHTTPError(400, f"Invalid default_aggregation[formula]: {formula}",
                                  code="parameter_invalid_string_enum",
                                  param="default_aggregation[formula]")
        if emu._meter_for(form["event_name"]) is not None:
            raise StripeHTTPError(400, f"An active meter with event_name "
                                  f"'{form['event_name']}' already exists.",
                                  code="resource_already_exists", param="event_name")
        mapping = form.get("customer_mapping") or {}
        now = emu.now()
        meter = {
            "id": emu._id("mtr_test_", 24), "object": "billing.meter", "created": now,
            "updated": now, "livemode": False, "status": "active",
            "status_transitions": {"deactivated_at": None},
            "display_name": form["display_name"], "event_name": form["event_name"],
            "event_time_window": form.get("event_time_window"),
            "default_aggregation": {"formula": formula},
            "customer_mapping": {
                "event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
                "type": mapping.get("type", "by_id")},
            "value_settings": {"event_payload_key":
                               (form.get("value_settings") or {}).get("event_payload_key",
                                                                      "value")},
        }
        emu.meters[meter["id"]] = meter
        return json_response(meter)

    async def list_meters(request: web.Request) -> web.Response:
        status = request.query.get("status")
        data = [m for m in reversed(emu.meters.values()) if not status or m["status"] == status]
        return json_response(_list("/v1/billing/meters", data))

    def _meter(request: web.Request) -> dict[str, Any]:
        mid = request.match_info["id"]
        if mid not in emu.meters:
            raise StripeHTTPError(404, f"No such billing meter: '{mid}'",
                                  code="resource_missing", param="id")
        return emu.meters[mid]

    async def get_meter(request: web.Request) -> web.Response:
        return json_response(_meter(request))

    async def create_meter_event(request: web.Request) -> web.Response:
        form = parse_form((await request.post()).items())
        payload = form.get("payload")
        meter = emu._meter_for(str(form.get("event_name")))
        if isinstance(payload, dict) and meter is not None:
            customer = payload.get(meter["customer_mapping"]["event_payload_key"])
            await emu.hold_customer_meter(str(customer), meter["event_name"])
        elif emu.latency_seconds or emu.latency_jitter_seconds:
            await asyncio.sleep(emu.latency())
        record = emu.ingest(form.get("event_name"), payload, form.get("identifier"),
                            _int_param(form, "timestamp", required=False), "v1")
        return json_response(record.to_stripe())

    async def event_summaries(request: web.Request) -> web.Response:
        meter = _meter(request)
        q = request.query
        customer = q.get("customer")
        if not customer:
            raise _missing("customer")
        start = _int_param(q, "start_time")
        end = _int_param(q, "end_time")
        assert start is not None and end is not None
        for name, val in (("start_time", start), ("end_time", end)):
            if val % 60:
                raise StripeHTTPError(400, f"{name} must be aligned with minute boundaries.",
                                      param=name)
        if end <= start:
            raise StripeHTTPError(400, "end_time must be after start_time.", param="end_time")
        window = q.get("value_grouping_window")
        step = {"hour": 3600, "day": 86_400}.get(window or "", end - start)
        if window and window not in ("hour", "day"):
            raise StripeHTTPError(400, f"Invalid value_grouping_window: {window}",
                                  code="parameter_invalid_string_enum",
                                  param="value_grouping_window")
        data = []
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            data.append({
                "id": f"mtrusum_{meter['id'][-12:]}{lo}", "object": "billing.meter_event_summary",
                "aggregated_value": emu.summarize(meter["id"], customer, lo, hi),
                "start_time": lo, "end_time": hi, "livemode": False, "meter": meter["id"]})
        data.reverse()  # newest window first
        return json_response(_list(f"/v1/billing/meters/{meter['id']}/event_summaries", data))

    async def create_session(request: web.Request) -> web.Response:
        now = emu.now()
        expires = now + SESSION_TTL_SECONDS
        token = emu._id("mes_tok_", 32)
        session = {"id": emu._id("mes_", 24), "object": "v2.billing.meter_event_session",
                   "authentication_token": token, "created": emu.iso(now),
                   "expires_at": emu.iso(expires), "livemode": False}
        emu.sessions[token] = {**session, "expires_at_epoch": expires}
        return json_response(session)

    async def meter_event_stream(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise StripeHTTPError(400, "Request body is not valid JSON.") from None
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            raise _missing("events")
        if len(events) > MAX_STREAM_EVENTS:
            raise StripeHTTPError(400, "events supports up to 100 events per request.",
                                  code="invalid_array_length", param="events")
        parsed = []
        for i, ev in enumerate(events):
            if not isinstance(ev, dict) or not ev.get("event_name") or "payload" not in ev:
                raise _missing(f"events[{i}].event_name/payload")
            parsed.append((ev, _parse_v2_timestamp(ev.get("timestamp"), i)))
        for ev, ts in parsed:  # v2 validation is asynchronous: bad events become error reports
            try:
                emu.ingest(ev["event_name"], ev["payload"], ev.get("identifier"), ts, "v2")
            except StripeHTTPError as exc:
                emu.error_reports.append({**exc.body, "event": ev, "reported_at": emu.now()})
        return json_response({})

    async def inspect_events(request: web.Request) -> web.Response:
        return json_response({"data": [e.to_inspection() for e in emu.events]})

    async def inspect_errors(request: web.Request) -> web.Response:
        return json_response({"data": emu.error_reports})

    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise StripeHTTPError(400, "Request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise StripeHTTPError(400, "Request body must be a JSON object.")
        return body

    # /_emulator routes bypass the middleware, so they render their own errors.
    async def create_webhook_endpoint(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            if not isinstance(body.get("url"), str) or not body["url"]:
                raise _missing("url")
            endpoint = emu.add_webhook_endpoint(body["url"], body.get("secret"),
                                                tuple(body.get("enabled_events") or ("*",)))
        except StripeHTTPError as exc:
            return exc.response("")
        return json_response(endpoint.to_stripe())

    async def trigger_event(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            event_type = body.pop("type", None)
            if not isinstance(event_type, str) or not event_type:
                raise _missing("type")
            event = emu.trigger(event_type, body)
        except StripeHTTPError as exc:
            return exc.response("")
        return json_response(event)

    async def inspect_webhook_attempts(request: web.Request) -> web.Response:
        return json_response({"data": emu.webhooks.attempts})

    async def drop_event(request: web.Request) -> web.Response:
        dropped = emu.drop_event(request.match_info["identifier"])
        return json_response({"deleted": dropped}, 200 if dropped else 404)

    app.router.add_post("/v1/customers", create_customer)
    app.router.add_get("/v1/customers/{id}", get_customer)
    app.router.add_post("/v1/billing/meters", create_meter)
    app.router.add_get("/v1/billing/meters", list_meters)
    app.router.add_get("/v1/billing/meters/{id}", get_meter)
    app.router.add_get("/v1/billing/meters/{id}/event_summaries", event_summaries)
    app.router.add_post("/v1/billing/meter_events", create_meter_event)
    app.router.add_post("/v2/billing/meter_event_session", create_session)
    app.router.add_post("/v2/billing/meter_event_stream", meter_event_stream)
    app.router.add_get("/_emulator/events", inspect_events)
    app.router.add_get("/_emulator/errors", inspect_errors)
    app.router.add_post("/_emulator/webhook_endpoints", create_webhook_endpoint)
    app.router.add_post("/_emulator/trigger", trigger_event)
    app.router.add_get("/_emulator/webhook_attempts", inspect_webhook_attempts)
    app.router.add_delete("/_emulator/events/{identifier}", drop_event)
