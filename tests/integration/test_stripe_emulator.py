"""The local Stripe Billing Meter emulator, driven through the official ``stripe`` SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import stripe

from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.devstack.stripe_emulator.signing import build_event, sign_payload

pytestmark = pytest.mark.integration

T0 = 1_760_000_040  # minute-aligned epoch seconds
DAY = 86_400


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Env:
    def __init__(self, emulator: StripeEmulator, client: stripe.StripeClient, url: str,
                 clock: FakeClock) -> None:
        self.emulator, self.client, self.url, self.clock = emulator, client, url, clock

    async def customer_and_meter(self) -> tuple[str, str]:
        cus = await self.client.v1.customers.create_async({"email": "a@example.com"})
        meter = await self.client.v1.billing.meters.create_async({
            "display_name": "API calls", "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        })
        return cus.id, meter.id

    async def summary(self, meter_id: str, customer: str) -> Any:
        result = await self.client.v1.billing.meters.event_summaries.list_async(
            meter_id, {"customer": customer, "start_time": T0 - DAY, "end_time": T0 + 600})
        assert len(result.data) == 1
        return result.data[0]


EnvFactory = Callable[..., AbstractAsyncContextManager[Env]]


@pytest.fixture
def make_env() -> EnvFactory:
    @asynccontextmanager
    async def factory(**kwargs: Any) -> AsyncIterator[Env]:
        clock = FakeClock()
        emulator = StripeEmulator(clock=clock, seed=7, **kwargs)
        runner = await serve("127.0.0.1", 0, emulator)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        http = stripe.AIOHTTPClient()
        client = stripe.StripeClient(
            "sk_test_x", base_addresses={"api": url, "meter_events": url},
            max_network_retries=0, http_client=http)
        try:
            yield Env(emulator, client, url, clock)
        finally:
            await http.close_async()
            await runner.cleanup()

    return factory


async def test_customer_and_meter_round_trip(make_env: EnvFactory) -> None:
    async with make_env() as env:
        cus_id, meter_id = await env.customer_and_meter()
        cus = await env.client.v1.customers.retrieve_async(cus_id)
        meters = await env.client.v1.billing.meters.list_async()

    assert cus.email == "a@example.com" and cus_id.startswith("cus_")
    assert [m.id for m in meters.data] == [meter_id]
    assert meters.data[0].default_aggregation.formula == "sum"
    assert meters.data[0].customer_mapping.event_payload_key == "stripe_customer_id"


async def test_v1_event_accepted_and_duplicate_identifier_refused_like_stripe(
    make_env: EnvFactory,
) -> None:
    async with make_env() as env:
        cus, meter = await env.customer_and_meter()
        params = {"event_name": "api_calls", "identifier": "win-1",
                  "payload": {"stripe_customer_id": cus, "value": "12.345"}, "timestamp": T0 - 60}
        first = await env.client.v1.billing.meter_events.create_async(params)
        with pytest.raises(stripe.InvalidRequestError) as err:
            await env.client.v1.billing.meter_events.create_async(
                {**params, "payload": {"stripe_customer_id": cus, "value": "999"}})
        summary = await env.summary(meter, cus)

    assert first.identifier == "win-1" and first.timestamp == T0 - 60
    assert err.value.http_status == 400
    assert "An event already exists with identifier win-1" in str(err.value.user_message)
    assert err.value.headers is not None and err.value.headers.get("Stripe-Should-Retry") == "false"
    assert Decimal(str(summary.aggregated_value)) == Decimal("12.345")
    assert len(env.emulator.events) == 1


async def test_concurrent_v1_calls_for_one_customer_and_meter_get_429(
    make_env: EnvFactory,
) -> None:
    async with make_env(latency_seconds=0.2) as env:
        cus, _ = await env.customer_and_meter()

        def call(i: int) -> Any:
            return env.client.v1.billing.meter_events.create_async({
                "event_name": "api_calls", "identifier": f"c-{i}", "timestamp": T0 - 60,
                "payload": {"stripe_customer_id": cus, "value": "1"}})

        results = await asyncio.gather(call(1), call(2), return_exceptions=True)

    refused = [r for r in results if isinstance(r, stripe.RateLimitError)]
    assert len(refused) == 1 and len(env.emulator.events) == 1


async def test_dropped_event_is_forgotten(make_env: EnvFactory) -> None:
    async with make_env() as env:
        cus, meter = await env.customer_and_meter()
        params = {"event_name": "api_calls", "identifier": "gone-1", "timestamp": T0 - 60,
                  "payload": {"stripe_customer_id": cus, "value": "5"}}
        await env.client.v1.billing.meter_events.create_async(params)
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{env.url}/_emulator/events/gone-1") as resp:
                assert resp.status == 200
            async with http.delete(f"{env.url}/_emulator/events/gone-1") as resp:
                assert resp.status == 404
        assert (await env.summary(meter, cus)).aggregated_value == 0
        await env.client.v1.billing.meter_events.create_async(params)  # accepted again
        assert (await env.summary(meter, cus)).aggregated_value == 5


async def test_unknown_customer_rejected_with_code(make_env: EnvFactory) -> None:
    async with make_env() as env:
        await env.customer_and_meter()
        with pytest.raises(stripe.InvalidRequestError) as err:
            await env.client.v1.billing.meter_events.create_async({
                "event_name": "api_calls", "payload": {"stripe_customer_id": "cus_nope",
                                                       "value": "1"}})
        with pytest.raises(stripe.InvalidRequestError) as missing:
            await env.client.v1.customers.retrieve_async("cus_nope")

    assert err.value.code == "meter_event_customer_not_found"
    assert err.value.http_status == 400
    assert missing.value.code == "resource_missing" and missing.value.http_status == 404


async def test_timestamp_outside_window_rejected(make_env: EnvFactory) -> None:
    async with make_env() as env:
        cus, _ = await env.customer_and_meter()
        codes = []
        for ts in (T0 - 40 * DAY, T0 + 600):
            with pytest.raises(stripe.InvalidRequestError) as err:
                await env.client.v1.billing.meter_events.create_async({
                    "event_name": "api_calls", "timestamp": ts,
                    "payload": {"stripe_customer_id": cus, "value": "1"}})
            codes.append(err.value.code)
        with pytest.raises(stripe.InvalidRequestError) as bad_value:
            await env.client.v1.billing.meter_events.create_async({
                "event_name": "api_calls", "payload": {"stripe_customer_id": cus, "value": "1e9"}})

    assert codes == ["timestamp_too_far_in_past", "timestamp_in_future"]
    assert bad_value.value.code == "meter_event_invalid_value"
    assert env.emulator.events == []


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


async def test_v2_stream_of_100_events_sums_exactly(make_env: EnvFactory) -> None:
    values = [Decimal(f"{i}.{i:03d}") for i in range(100)]
    async with make_env() as env:
        cus, meter = await env.customer_and_meter()
        session = await env.client.v2.billing.meter_event_session.create_async()
        events = [{"event_name": "api_calls", "identifier": f"ev-{i}", "timestamp": _iso(T0 - i),
                   "payload": {"stripe_customer_id": cus, "value": str(v)}}
                  for i, v in enumerate(values)]
        await env.client.v2.billing.meter_event_stream.create_async(
            {"events": events}, {"api_key": session.authentication_token})
        # a replayed batch is deduplicated by identifier
        await env.client.v2.billing.meter_event_stream.create_async(
            {"events": events[:10]}, {"api_key": session.authentication_token})
        summary = await env.summary(meter, cus)
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{env.url}/v1/billing/meters/{meter}/event_summaries",
                params={"customer": cus, "start_time": T0 - DAY, "end_time": T0 + 600},
                headers={"Authorization": "Bearer sk_test_x"},
            ) as resp:
                raw = json.loads(await resp.text(), parse_float=Decimal)
            async with http.get(f"{env.url}/_emulator/events") as resp:
                accepted = (await resp.json())["data"]

    assert session.expires_at > session.created
    assert len(accepted) == 100
    assert raw["data"][0]["aggregated_value"] == sum(values, Decimal(0))
    assert Decimal(str(summary.aggregated_value)) == sum(values, Decimal(0))


async def test_v2_stream_rejects_oversized_batch_and_reports_bad_events(
    make_env: EnvFactory,
) -> None:
    async with make_env() as env:
        cus, _ = await env.customer_and_meter()
        session = await env.client.v2.billing.meter_event_session.create_async()
        opts = {"api_key": session.authentication_token}
        ev = {"event_name": "api_calls", "payload": {"stripe_customer_id": cus, "value": "1"}}
        with pytest.raises(stripe.InvalidRequestError):
            await env.client.v2.billing.meter_event_stream.create_async({"events": [ev] * 101},
                                                                        opts)
        await env.client.v2.billing.meter_event_stream.create_async({"events": [
            ev, {**ev, "payload": {"stripe_customer_id": "cus_nope", "value": "1"}}]}, opts)

    assert len(env.emulator.events) == 1
    assert [r["code"] for r in env.emulator.error_reports] == ["meter_event_customer_not_found"]


async def test_v2_expired_or_unknown_session_rejected(make_env: EnvFactory) -> None:
    async with make_env() as env:
        cus, _ = await env.customer_and_meter()
        session = await env.client.v2.billing.meter_event_session.create_async()
        env.clock.now += 15 * 60 + 1
        body = {"events": [{"event_name": "api_calls",
                            "payload": {"stripe_customer_id": cus, "value": "1"}}]}
        with pytest.raises(stripe.TemporarySessionExpiredError) as expired:
            await env.client.v2.billing.meter_event_stream.create_async(
                body, {"api_key": session.authentication_token})
        with pytest.raises(stripe.AuthenticationError):
            await env.client.v2.billing.meter_event_stream.create_async(
                body, {"api_key": "mes_tok_unknown"})

    assert expired.value.http_status == 401
    assert expired.value.code == "billing_meter_event_session_expired"
    assert env.emulator.events == []


async def test_rate_limit_exceeded(make_env: EnvFactory) -> None:
    async with make_env(rate_limit_per_second=3) as env:
        for _ in range(3):
            await env.client.v1.customers.create_async()
        with pytest.raises(stripe.RateLimitError) as err:
            await env.client.v1.customers.create_async()
        env.clock.now += 1  # the bucket refills on the injected clock
        await env.client.v1.customers.create_async()

    assert err.value.http_status == 429
    assert err.value.json_body["error"]["code"] == "rate_limit"


async def test_failure_injection_raises_api_error(make_env: EnvFactory) -> None:
    async with make_env(failure_rate=1.0) as env:
        with pytest.raises(stripe.APIError) as err:
            await env.client.v1.customers.create_async()

    assert err.value.http_status == 500
    assert err.value.json_body["error"]["type"] == "api_error"


def test_sign_payload_round_trips_through_construct_event() -> None:
    secret = "whsec_test_secret"
    payload = build_event("billing.meter.error_report_triggered", {"object": "billing.meter"},
                          event_id="evt_1", created=int(time.time()))
    header = sign_payload(payload, secret, int(time.time()))

    event = stripe.Webhook.construct_event(payload, header, secret)

    assert event.id == "evt_1" and event.type == "billing.meter.error_report_triggered"
    tampered = payload.replace(b"evt_1", b"evt_2")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, header, secret)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, "whsec_other")
