"""The Stripe emulator's webhooks: signed like Stripe (the official SDK verifies them),
retried on non-2xx, and — through a minimal bridge into Kafka — applied by the ledger
consumer end to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
import stripe
from aiohttp import web
from confluent_kafka import Producer

from meterline.billing.consumer import start
from meterline.config import Settings
from meterline.devstack.embedded import EmbeddedKafka
from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.storage.grants import sync_config

pytestmark = pytest.mark.integration

SECRET = "whsec_test_secret"
Handler = Callable[[bytes, stripe.Event], Awaitable[int]]


class Receiver:
    """A webhook endpoint that verifies each delivery with `stripe.Webhook.construct_event`."""

    def __init__(self, secret: str, handle: Handler | None = None, fail_first: int = 0) -> None:
        self.secret, self.handle, self.fail_first = secret, handle, fail_first
        self.verified: list[stripe.Event] = []
        self.refused = 0
        self.attempts: dict[str, int] = {}

    async def __call__(self, request: web.Request) -> web.Response:
        payload = await request.read()
        try:
            event = stripe.Webhook.construct_event(
                payload.decode(), request.headers.get("Stripe-Signature", ""), self.secret,
                tolerance=300)
        except stripe.SignatureVerificationError:
            self.refused += 1
            return web.Response(status=400)
        n = self.attempts[event.id] = self.attempts.get(event.id, 0) + 1
        if n <= self.fail_first:
            return web.Response(status=500)  # Stripe must retry this
        self.verified.append(event)
        status = await self.handle(payload, event) if self.handle else 200
        return web.Response(status=status)


@asynccontextmanager
async def running(emulator: StripeEmulator, receiver: Receiver) -> AsyncIterator[tuple[str, str]]:
    """(emulator URL, receiver URL), both served on ephemeral ports."""
    app = web.Application()
    app.router.add_post("/webhook", receiver)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    emu_runner = await serve("127.0.0.1", 0, emulator)
    try:
        yield (f"http://127.0.0.1:{emu_runner.addresses[0][1]}",
               f"http://127.0.0.1:{runner.addresses[0][1]}/webhook")
    finally:
        await emu_runner.cleanup()
        await runner.cleanup()


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_emulator_signs_webhooks_like_stripe_and_retries_until_2xx() -> None:
    emulator = StripeEmulator(seed=7)
    emulator.webhooks.retry_base_seconds = 0.02
    receiver = Receiver(SECRET, fail_first=1)
    async with running(emulator, receiver) as (emu_url, hook_url), aiohttp.ClientSession() as http:
        endpoint = await post(http, f"{emu_url}/_emulator/webhook_endpoints",
                              {"url": hook_url, "secret": SECRET})
        sent = [
            await post(http, f"{emu_url}/_emulator/trigger", body) for body in (
                {"type": "checkout.session.completed", "customer": "cus_1", "credits": "1000"},
                {"type": "invoice.paid", "customer": "cus_1", "credits": "50", "quantity": 2},
                {"type": "invoice.payment_failed", "customer": "cus_1"},
                {"type": "customer.subscription.created", "customer": "cus_1", "plan": "pro"},
                {"type": "customer.subscription.deleted", "customer": "cus_1", "plan": "pro"},
                {"type": "charge.refunded", "customer": "cus_1", "amount": 5000},
            )]
        await wait_for(lambda: len(receiver.verified) == len(sent))

    assert endpoint["secret"] == SECRET
    assert receiver.refused == 0
    by_id = {e.id: e for e in receiver.verified}
    for ev in sent:
        got = by_id[ev["id"]]
        assert got.type == ev["type"]
        assert got.data.object.id == ev["data"]["object"]["id"]
    assert set(receiver.attempts.values()) == {2}  # each refused once with a 500, then delivered
    checkout = by_id[sent[0]["id"]].data.object
    assert (checkout.object, checkout.mode, checkout.payment_status) == (
        "checkout.session", "payment", "paid")
    assert checkout.metadata["meterline_credits"] == "1000"


async def test_a_wrong_secret_is_refused_and_retried_a_bounded_number_of_times() -> None:
    emulator = StripeEmulator(seed=7)
    emulator.webhooks.retry_base_seconds = 0.01
    receiver = Receiver("whsec_another_secret")
    async with running(emulator, receiver) as (_, hook_url):
        emulator.add_webhook_endpoint(hook_url, SECRET)
        event = emulator.trigger("invoice.paid", {"customer": "cus_1"})
        await emulator.webhooks.drain()

    attempts = [a for a in emulator.webhooks.attempts if a["event"] == event["id"]]
    assert [a["status"] for a in attempts] == [400] * emulator.webhooks.max_attempts
    assert receiver.refused == emulator.webhooks.max_attempts


async def test_signed_webhooks_reach_the_ledger_through_kafka(
    pipeline_settings: Callable[..., Settings], unique_topic_prefix: str,
    embedded_kafka: EmbeddedKafka | None,
) -> None:
    settings = pipeline_settings(
        [{"id": "acme"}], ledger_consumer={"consumer_group": f"{unique_topic_prefix}ledger"},
        # the embedded broker joins groups in ~half the session timeout; Kafka's minimum is 6 s
        kafka={"session_timeout_ms": 2000 if embedded_kafka is not None else 6000})
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                         "enable.idempotence": True, "acks": "all"})

    async def bridge(payload: bytes, event: stripe.Event) -> int:
        """The webhook bridge's contract, minimally: verified raw bytes into Kafka, then 2xx."""
        customer = json.loads(payload)["data"]["object"].get("customer")
        producer.produce(settings.kafka.stripe_events_topic, payload,
                         customer.encode() if customer else None,
                         headers=[("stripe-event-type", event.type.encode()),
                                  ("stripe-event-id", event.id.encode())])
        return 200 if producer.flush(10) == 0 else 503

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    async with pool.acquire() as conn:
        await sync_config(conn, settings)
    handle = await start(settings)
    emulator = StripeEmulator(seed=3)
    try:
        async with running(emulator, Receiver(SECRET, bridge)) as (_, hook_url):
            emulator.add_webhook_endpoint(hook_url, SECRET)
            emulator.trigger("checkout.session.completed", {
                "customer": "cus_acme", "credits": "1000",
                "metadata": {"meterline_customer_id": "acme"}})
            emulator.trigger("invoice.payment_failed", {"customer": "cus_acme"})
            await emulator.webhooks.drain()
            await wait_for(lambda: handle.consumer.records_done == 2, 30)

        row = await pool.fetchrow(
            """SELECT b.balance, c.past_due, c.stripe_customer_id FROM customers c
               JOIN balances b ON b.customer_id = c.id WHERE c.id = 'acme'""")
        assert tuple(row) == (1000, True, "cus_acme")
    finally:
        await handle.stop()
        await pool.close()
