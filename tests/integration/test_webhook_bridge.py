"""The webhook bridge against a real broker: 200 means on the topic, 503 means retry.

Each test runs its own bridge (ephemeral port) on its own topic and reads the topic
back message by message (never trusting high watermarks, which Tansu undercounts).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from confluent_kafka import Message
from prometheus_client import REGISTRY

from meterline.config import Settings, deep_merge
from meterline.devstack.dev import read_topic
from meterline.devstack.embedded import EmbeddedKafka, create_topics
from meterline.devstack.stripe_emulator.signing import build_event, sign_payload
from meterline.webhooks.bridge import RunningBridge, start_bridge
from meterline.webhooks.intake import Outcome
from meterline.webhooks.signing_secrets import SigningSecrets

pytestmark = pytest.mark.integration

OLD, NEW = "whsec_old_bridge", "whsec_new_bridge"
SECRETS = SigningSecrets([OLD, NEW])
MAX_BODY = 4096


@pytest.fixture
def bridge_settings(kafka_bootstrap: str, unique_topic_prefix: str) -> Callable[..., Settings]:
    """Factory: Settings for a bridge on this test's own `stripe.events` topic (created here)."""

    def make(**webhook_bridge: Any) -> Settings:
        settings = Settings.model_validate(deep_merge({
            "kafka": {"bootstrap_servers": kafka_bootstrap,
                      "stripe_events_topic": f"{unique_topic_prefix}stripe.events"},
            "webhook_bridge": {"max_body_bytes": MAX_BODY,
                               "readiness_probe_interval_ms": 200},
        }, {"webhook_bridge": webhook_bridge}))
        create_topics(kafka_bootstrap, {settings.kafka.stripe_events_topic: 4})
        return settings

    return make


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[RunningBridge, aiohttp.ClientSession]]:
    bridge = await start_bridge(settings, SECRETS, host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            yield bridge, session
    finally:
        await bridge.stop()


@pytest.fixture
async def bridge(
    bridge_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[RunningBridge, aiohttp.ClientSession]]:
    async with running(bridge_settings()) as pair:
        yield pair


def stripe_event(n: int, *, customer: str | None = "cus_42", event_type: str = "invoice.paid",
                 prefix: str = "evt_bridge_") -> bytes:
    obj: dict[str, Any] = {"object": "invoice", "id": f"in_{n}", "amount_paid": 1000 + n}
    if customer is not None:
        obj["customer"] = customer
    return build_event(event_type, obj, event_id=f"{prefix}{n}", created=int(time.time()))


async def post(session: aiohttp.ClientSession, url: str, body: bytes,
               secret: str = OLD) -> tuple[int, str]:
    """POST like Stripe: signed now, over exactly these bytes."""
    headers = {"Content-Type": "application/json; charset=utf-8",
               "Stripe-Signature": sign_payload(body, secret, int(time.time()))}
    async with session.post(url, data=body, headers=headers) as resp:
        return resp.status, (await resp.json())["outcome"]


async def messages(settings: Settings, quiet_seconds: float = 1.0) -> list[Message]:
    return await asyncio.to_thread(read_topic, settings.kafka.bootstrap_servers,
                                   settings.kafka.stripe_events_topic, quiet_seconds)


def header_map(message: Message) -> dict[str, Any]:
    return dict(message.headers() or [])


def event_ids(found: list[Message]) -> Counter[str]:
    return Counter(str((header_map(m)["stripe-event-id"] or b"").decode()) for m in found)


def count(outcome: Outcome) -> float:
    return REGISTRY.get_sample_value(
        "meterline_webhook_requests_total", {"outcome": outcome.value}) or 0.0


@pytest.fixture
def frozen(embedded_kafka: EmbeddedKafka | None) -> Iterator[EmbeddedKafka]:
    """The embedded broker, thawed again whatever the test does."""
    if embedded_kafka is None:
        pytest.skip("needs the embedded broker to freeze it (Kafka is external or a container)")
    try:
        yield embedded_kafka
    finally:
        embedded_kafka.thaw()


# --- accepted events ----------------------------------------------------------------------


async def test_accepted_events_land_with_customer_key_raw_body_and_headers(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    running_bridge, session = bridge
    invoice = stripe_event(1, customer="cus_42")
    customer = build_event("customer.updated", {"object": "customer", "id": "cus_7"},
                           event_id="evt_bridge_2", created=int(time.time()))
    no_customer = stripe_event(3, customer=None, event_type="product.created")
    # Stripe pretty-prints; the message must be these very bytes, not a re-serialisation
    versioned = json.dumps({
        "id": "evt_bridge_4", "object": "event", "api_version": "2025-01-27.acacia",
        "type": "customer.subscription.updated",
        "data": {"object": {"object": "subscription", "customer": "cus_42",
                            "description": "Zoë's plan \u00e9"}},
    }, indent=2, ensure_ascii=False).encode()

    statuses = [await post(session, running_bridge.webhook_url, body)
                for body in (invoice, customer, no_customer, versioned)]
    found = {header_map(m)["stripe-event-id"]: m
             for m in await messages(running_bridge.settings)}

    assert statuses == [(200, "accepted")] * 4
    assert {k: (m.key(), m.value()) for k, m in found.items()} == {
        b"evt_bridge_1": (b"cus_42", invoice),
        b"evt_bridge_2": (b"cus_7", customer),
        b"evt_bridge_3": (b"evt_bridge_3", no_customer),
        b"evt_bridge_4": (b"cus_42", versioned),
    }
    assert header_map(found[b"evt_bridge_1"]) == {
        "stripe-event-type": b"invoice.paid", "stripe-event-id": b"evt_bridge_1",
        "stripe-api-version": None}
    assert header_map(found[b"evt_bridge_4"])["stripe-api-version"] == b"2025-01-27.acacia"


async def test_replayed_event_id_is_accepted_again_and_published_again(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    """Stateless: the bridge does not remember event ids; the topic's consumer dedupes."""
    running_bridge, session = bridge
    body = stripe_event(1)

    first = await post(session, running_bridge.webhook_url, body)
    replay = await post(session, running_bridge.webhook_url, body, secret=NEW)

    assert first == replay == (200, "accepted")
    assert event_ids(await messages(running_bridge.settings)) == {"evt_bridge_1": 2}


# --- rejected requests --------------------------------------------------------------------

BODY = stripe_event(0, prefix="evt_rejected_")
NOT_JSON = b"<xml/>"
NO_TYPE = b'{"id":"evt_rejected_x"}'
# body, header signed at `now` (None = no header), status, outcome
REJECTIONS: dict[str, tuple[bytes, Callable[[int], str | None], int, Outcome]] = {
    "wrong_secret": (BODY, lambda now: sign_payload(BODY, "whsec_attacker", now), 400,
                     Outcome.BAD_SIGNATURE),
    "tampered_body": (BODY.replace(b"1000", b"9999"), lambda now: sign_payload(BODY, OLD, now),
                      400, Outcome.BAD_SIGNATURE),
    "expired": (BODY, lambda now: sign_payload(BODY, OLD, now - 3600), 400, Outcome.EXPIRED),
    "future_timestamp": (BODY, lambda now: sign_payload(BODY, OLD, now + 3600), 400,
                         Outcome.FUTURE_TIMESTAMP),
    "missing_signature": (BODY, lambda now: None, 400, Outcome.MISSING_SIGNATURE),
    "malformed_signature": (BODY, lambda now: "v1=deadbeef", 400, Outcome.MALFORMED_SIGNATURE),
    "malformed_body": (NOT_JSON, lambda now: sign_payload(NOT_JSON, OLD, now), 400,
                       Outcome.MALFORMED_BODY),
    "malformed_body_no_type": (NO_TYPE, lambda now: sign_payload(NO_TYPE, OLD, now), 400,
                               Outcome.MALFORMED_BODY),
    "too_large": (b"{" + b" " * MAX_BODY + b"}", lambda now: sign_payload(BODY, OLD, now), 413,
                  Outcome.TOO_LARGE),
}


async def post_raw(session: aiohttp.ClientSession, url: str, body: bytes,
                   make_header: Callable[[int], str | None]) -> tuple[int, str]:
    header = make_header(int(time.time()))
    headers = {"Stripe-Signature": header} if header is not None else {}
    async with session.post(url, data=body, headers=headers) as resp:
        return resp.status, (await resp.json())["outcome"]


@pytest.mark.parametrize(("body", "make_header", "status", "outcome"), REJECTIONS.values(),
                         ids=REJECTIONS)
async def test_rejected_request_answers_its_status_and_counts_its_reason(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
    body: bytes, make_header: Callable[[int], str | None], status: int, outcome: Outcome,
) -> None:
    running_bridge, session = bridge
    before = count(outcome)

    answer = await post_raw(session, running_bridge.webhook_url, body, make_header)

    assert answer == (status, outcome.value)
    assert count(outcome) == before + 1


async def test_rejected_requests_publish_nothing(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    running_bridge, session = bridge
    answers = [await post_raw(session, running_bridge.webhook_url, body, make_header)
               for body, make_header, _status, _outcome in REJECTIONS.values()]
    accepted = await post(session, running_bridge.webhook_url, stripe_event(1))

    assert all(status >= 400 for status, _ in answers)
    assert accepted == (200, "accepted")
    assert event_ids(await messages(running_bridge.settings)) == {"evt_bridge_1": 1}


async def test_chunked_body_over_the_limit_is_too_large(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    """No Content-Length to refuse up front: the limit still holds while reading."""
    running_bridge, session = bridge

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * MAX_BODY

    async with session.post(running_bridge.webhook_url, data=chunks(),
                            headers={"Stripe-Signature": "t=1,v1=00"}) as resp:
        assert resp.status == 413


async def test_only_post_is_allowed_on_the_webhook_path(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    running_bridge, session = bridge
    for method in ("GET", "PUT", "DELETE"):
        async with session.request(method, running_bridge.webhook_url) as resp:
            assert resp.status == 405, method


async def test_health_readiness_and_metrics_on_the_same_port(
    bridge: tuple[RunningBridge, aiohttp.ClientSession],
) -> None:
    running_bridge, session = bridge
    await post(session, running_bridge.webhook_url, stripe_event(1))
    async with session.get(running_bridge.url + "/healthz") as health:
        assert health.status == 200
    async with session.get(running_bridge.url + "/readyz") as ready:
        assert ready.status == 200
    async with session.get(running_bridge.url + "/metrics") as scrape:
        text = await scrape.text()
    assert 'meterline_webhook_requests_total{outcome="accepted"}' in text
    assert 'meterline_webhook_request_duration_seconds_bucket{le="0.05",outcome="accepted"}' in text
    assert "meterline_webhook_broker_ready 1.0" in text


# --- broker outage ------------------------------------------------------------------------


async def deliver_until_accepted(session: aiohttp.ClientSession, url: str, bodies: list[bytes],
                                 deadline_s: float) -> list[int]:
    """Retry each event (re-signed each time, as Stripe does) until 200; return attempts each."""
    attempts = [0] * len(bodies)
    deadline = time.monotonic() + deadline_s
    for i, body in enumerate(bodies):
        while True:
            attempts[i] += 1
            status, _ = await post(session, url, body)
            if status == 200:
                break
            assert time.monotonic() < deadline, f"event {i} not accepted after {deadline_s} s"
            await asyncio.sleep(0.2)
    return attempts


OUTAGE_S = 2.5


@pytest.mark.parametrize("message_timeout_ms", [60_000, 1_000], ids=[
    "messages_outlive_the_outage",
    # librdkafka expires in-flight idempotent messages mid-outage: the producer's epoch must
    # be bumped, and a broker that fences it instead (Tansu) gets a fresh producer
    "messages_expire_during_the_outage",
])
async def test_frozen_broker_answers_503_in_bounded_time_and_retries_land_after_thaw(
    bridge_settings: Callable[..., Settings], frozen: EmbeddedKafka, message_timeout_ms: int,
) -> None:
    delivery_timeout_s = 1.0
    settings = bridge_settings(delivery_timeout_ms=int(delivery_timeout_s * 1000),
                               message_timeout_ms=message_timeout_ms)
    bodies = [stripe_event(n, customer=f"cus_{n % 3}") for n in range(8)]
    async with running(settings) as (running_bridge, session):
        url = running_bridge.webhook_url
        assert await post(session, url, bodies[0]) == (200, "accepted")

        frozen.freeze()
        started = time.monotonic()
        during = await asyncio.gather(*(post(session, url, b) for b in bodies[1:]))
        waited = time.monotonic() - started
        async with session.get(running_bridge.url + "/readyz") as ready:
            ready_status = ready.status
        await asyncio.sleep(max(0.0, OUTAGE_S - waited))  # long enough to expire 1 s messages
        frozen.thaw()

        attempts = await deliver_until_accepted(session, url, bodies[1:], deadline_s=45)
        async with session.get(running_bridge.url + "/readyz") as ready:
            ready_after = ready.status

    assert during == [(503, "kafka_unavailable")] * 7
    assert waited < delivery_timeout_s + 1.5
    assert ready_status == 503
    assert ready_after == 200
    assert all(n >= 1 for n in attempts)
    # At least once: every event is there; the ones we gave up on may be there twice.
    ids = event_ids(await messages(settings, quiet_seconds=2.0))
    assert set(ids) == {f"evt_bridge_{n}" for n in range(8)}


# --- the service as deployed -------------------------------------------------------------


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # not listening yet


def test_cli_serves_until_sigterm_then_exits_cleanly_without_logging_secrets(
    bridge_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    settings = bridge_settings()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": settings.kafka.bootstrap_servers,
                  "stripe_events_topic": settings.kafka.stripe_events_topic},
        "webhook_bridge": {"host": "127.0.0.1", "port": port}}))
    log = tmp_path / "bridge.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meterline.cli", "-v", "-c", str(config), "webhook-bridge"],
            env={**os.environ, "STRIPE_WEBHOOK_SECRETS": f"whsec_cli_new,{OLD}"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while http("GET", base + "/readyz") != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        body = stripe_event(1)
        status = http("POST", base + "/webhooks/stripe", body,
                      {"Stripe-Signature": sign_payload(body, OLD, int(time.time()))})
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(15)

    assert status == 200
    assert exit_code == 0
    assert "whsec_" not in log.read_text()
    ids = event_ids(read_topic(settings.kafka.bootstrap_servers,
                               settings.kafka.stripe_events_topic, 1.0))
    assert ids == {"evt_bridge_1": 1}
