"""Every service rides out a Postgres crash, exhausted connection slots and a broker freeze
longer than the producers' message timeout — without a restart (issue 9).

One scenario, the services as subprocesses (processor, outbox relay, Stripe sink, ledger
consumer) under a steady load with bad input mixed in (so dead letters are in flight),
through three outages in sequence:

1. Postgres immediate shutdown (`pg_ctl stop -m immediate`: a crash) for 20 s, then started
   again on the same data directory and socket;
2. every Postgres connection slot held by the test for 20 s;
3. the broker frozen (SIGSTOP) for longer than `kafka.producer_message_timeout_ms`, so
   in-flight messages time out and idempotent producers are fenced.

Then: no service exited, the ledger is exact, the DLQ holds every bad input, Stripe (the
emulator) equals the ledger, and each service says it is ready and alive again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import orjson
import pytest
from confluent_kafka import Producer

from integration.harness import (
    Sender,
    assert_exact,
    assert_ledger_integrity,
    db_pool,
    fleet,
    read_dlq,
    read_messages,
    wait_for_ledger,
    wait_for_owners,
    wait_until,
)
from meterline.config import Settings
from meterline.devstack.dev import scrape
from meterline.devstack.embedded import EmbeddedKafka, EmbeddedPostgres
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.stripe_emulator import objects
from meterline.devstack.stripe_emulator.emulator import serve
from meterline.storage.db import with_database
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.transport import Stripe

from .test_stripe_end_to_end import stripe_by_meter, wait_for_stripe_to_equal_ledger

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CUSTOMERS = 20
OUTAGE_S = 20
MESSAGE_TIMEOUT_MS = 3000
FREEZE_S = 8  # > message timeout: in-flight messages expire, producers get fenced


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def _send_purchase(settings: Settings, stripe_customer: str) -> None:
    """A Stripe checkout of 100 credits on `stripe.events`, as the webhook bridge writes it."""
    session = objects.checkout_session(
        "cs_outage", customer=stripe_customer, amount_total=5000, created=1_790_000_000,
        payment_intent="pi_outage", invoice=None, metadata={"meterline_credits": "100"})
    event = objects.event("checkout.session.completed", session, event_id="evt_cs_outage",
                          created=1_790_000_000)
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    producer.produce(settings.kafka.stripe_events_topic, orjson.dumps(event),
                     stripe_customer.encode(), headers=[
                         ("stripe-event-type", b"checkout.session.completed"),
                         ("stripe-event-id", b"evt_cs_outage")])
    assert producer.flush(10) == 0


async def _grab(server_dsn: str, held: list[asyncpg.Connection]) -> None:
    """Open connections, 16 at a time, until the server refuses one."""
    while True:
        got = await asyncio.gather(*(asyncpg.connect(server_dsn, timeout=5) for _ in range(16)),
                                   return_exceptions=True)
        held += [c for c in got if isinstance(c, asyncpg.Connection)]
        if any(isinstance(c, BaseException) for c in got):
            return


async def _hold_every_slot(server_dsn: str) -> list[asyncpg.Connection]:
    """Take every connection slot, then end the other clients' sessions and take theirs
    too: whoever needs a new connection now finds none (`too many clients`)."""
    held: list[asyncpg.Connection] = []
    for _ in range(3):
        await _grab(server_dsn, held)
        await held[0].execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> ALL($1::int[])",
            [c.get_server_pid() for c in held])
    await _grab(server_dsn, held)
    return held


async def test_every_service_rides_out_postgres_crash_slot_exhaustion_and_broker_freeze(
    pipeline_settings: Callable[..., Settings],
    embedded_kafka: EmbeddedKafka | None,
    embedded_postgres: EmbeddedPostgres | None,
    tmp_path: Path,
    unique_topic_prefix: str,
) -> None:
    if embedded_kafka is None or embedded_postgres is None:
        pytest.skip("needs the embedded broker and Postgres to freeze and crash them")
    from meterline.devstack.stripe_emulator.emulator import StripeEmulator

    emu = StripeEmulator(seed=3)
    runner = await serve("127.0.0.1", 0, emu)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ports = {name: _free_port() for name in ("processor", "relay", "sink", "ledger")}
    settings = pipeline_settings(
        customers=CUSTOMERS,
        kafka={"producer_message_timeout_ms": MESSAGE_TIMEOUT_MS},
        processor={"metrics_port": ports["processor"]},
        relay={"metrics_port": ports["relay"]},
        stripe={"api_base": url, "coalesce_interval_seconds": 2, "seal_grace_seconds": 0.5,
                "retry_base_seconds": 0.05, "retry_max_seconds": 1, "poll_interval_ms": 50,
                "lease_seconds": 5, "metrics_port": ports["sink"],
                "consumer_group": f"{unique_topic_prefix}stripe-sink"},
        ledger_consumer={"metrics_port": ports["ledger"],
                         "consumer_group": f"{unique_topic_prefix}ledger"})
    api = Stripe("sk_test_x", url, 10)
    held: list[asyncpg.Connection] = []
    try:
        async with db_pool(settings.database_url) as pool:
            await ensure_meters(api.client, settings)
            await ensure_customers(api.client, pool, customer_ids(CUSTOMERS))
            with fleet(settings, tmp_path, "w1") as services:
                services.service("relay", "relay")
                services.service("sink", "stripe-sink")
                services.service("ledger", "ledger-consumer")
                await wait_for_owners(pool, settings, {"w1"}, workers=services)
                gen = LoadGenerator(settings, customer_ids(CUSTOMERS), duplicates=0.05, late=0,
                                    invalid=0.05, seed=17)
                buyer = await pool.fetchval(
                    "SELECT stripe_customer_id FROM customers WHERE id = $1", "cust_00001")
                with Sender(gen, rate=800) as sender:
                    await asyncio.sleep(3)
                    # 1. Postgres crash; a purchase arrives meanwhile (the ledger consumer
                    #    must keep retrying it, not skip it or exit)
                    embedded_postgres.crash()
                    try:
                        await asyncio.sleep(2)
                        _send_purchase(settings, buyer)
                        await asyncio.sleep(OUTAGE_S - 2)
                    finally:
                        embedded_postgres.recover()
                    # 2. every connection slot taken (before the services reconnect)
                    held = await _hold_every_slot(with_database(settings.database_url, "postgres"))
                    not_ready: set[str] = set()
                    try:
                        for _ in range(OUTAGE_S):
                            await asyncio.sleep(1)
                            not_ready |= {n for n in ("relay", "sink", "processor")
                                          if _probe(ports[n], "/readyz")[0] == 503}
                        services.check_alive()
                    finally:
                        for conn in held:
                            await conn.close()
                        held = []
                    await asyncio.sleep(3)
                    # 3. broker freeze past the producers' message timeout
                    embedded_kafka.freeze()
                    try:
                        # an outbox row surely in flight (windows may all be flushed already)
                        await pool.execute(
                            "INSERT INTO outbox (topic, key, payload) VALUES ($1, 'probe', $2)",
                            settings.kafka.balance_changes_topic, b'{"probe": true}')
                        await asyncio.sleep(FREEZE_S)
                    finally:
                        embedded_kafka.thaw()
                    await asyncio.sleep(3)
                    sender.stop()  # every message acknowledged, or the sender's error raised
                snap = await wait_for_ledger(pool, gen, timeout=120, workers=services,
                                             settle=1.5, stall=60)
                if snap.events_debited != gen.stats.events_sent:
                    # Say whose loss it is: the test's own load producer, or meterline.
                    on_broker = len(read_messages(settings.kafka.bootstrap_servers,
                                                  settings.kafka.usage_topic))
                    proc = {k: v for k, v in scrape(ports["processor"]).items() if k.startswith((
                        "meterline_flush_failures_total", "meterline_last_flush_commit",
                        "meterline_owned_partitions", "meterline_pending_events",
                        "meterline_consumer_lag_messages", "meterline_producer_replacements",
                        "meterline_records_in_total", "meterline_loop_failures_total",
                        "meterline_dependency_up"))}
                    # Where is it stuck? Faust's worker logs every task's stack on SIGUSR1.
                    services.procs["w1"].send_signal(signal.SIGUSR1)
                    await asyncio.sleep(3)
                    pytest.fail(f"debited {snap.events_debited} of {gen.stats.events_sent} events;"
                                f" usage messages on the broker: {on_broker} of"
                                f" {gen.stats.messages_sent} sent; processor: {proc};"
                                f" /healthz {_probe(ports['processor'], '/healthz')};"
                                f" task stacks in {services.workdir / 'w1.log'}")
                assert_exact(snap, gen)
                await assert_ledger_integrity(pool, gen.stats.events_sent)
                want = await wait_for_stripe_to_equal_ledger(pool, settings, emu, services)

                async def all_ready() -> bool:
                    return all(_probe(ports[n], "/readyz")[0] == 200
                               for n in ("relay", "sink", "ledger", "processor"))
                await wait_until(all_ready, timeout=30, what="every service ready again",
                                 workers=services)
                services.check_alive()
                live = {n: _probe(ports[n], "/healthz")[0]
                        for n in ("relay", "sink", "ledger", "processor")}
                seen = {n: scrape(ports[n]) for n in ("relay", "sink", "processor", "ledger")}
                unsent = await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                granted = await pool.fetchval(
                    "SELECT sum(amount) FROM grants WHERE customer_id = $1"
                    " AND source = 'stripe_checkout'", "cust_00001")
                dlq = read_dlq(settings.kafka.bootstrap_servers, settings.kafka.usage_dlq_topic)
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                await conn.close()
        await api.close()
        await runner.cleanup()
    assert services.gone == [(n, 0) for n, _ in services.gone]  # only our clean stop, no exit
    assert live == {"relay": 200, "sink": 200, "ledger": 200, "processor": 200}
    assert not_ready == {"relay", "sink", "processor"}, \
        "holding every slot must make them not ready"
    # the processor waited Postgres out in its flush loop, and no loop failed unexpectedly
    assert seen["processor"].get("meterline_dependency_retries_total:dependency=postgres", 0) > 0
    assert seen["processor"].get("meterline_loop_failures_total", 0) == 0, seen["processor"]
    assert stripe_by_meter(emu) == want
    assert sum(dlq.values()) >= gen.stats.invalid_sent > 0  # every bad input dead-lettered
    for name in ("relay", "sink"):  # each waited out the database, not exited
        assert seen[name].get(
            "meterline_dependency_retries_total:dependency=postgres", 0) > 0, name
    # the purchase made during the crash was applied once it came back
    assert seen["ledger"].get("meterline_dependency_retries_total:dependency=postgres", 0) > 0
    assert seen["ledger"].get(
        "meterline_ledger_consumer_events_total:outcome=applied", 0) == 1, seen["ledger"]
    assert granted == 100
    # the relay's producer timed out in the freeze and was replaced, not retried forever;
    # every outbox row is out
    assert unsent == 0
    assert seen["relay"].get("meterline_producer_replacements_total:client=relay", 0) >= 1
