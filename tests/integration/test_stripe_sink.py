"""The Stripe sink against the local Stripe emulator, the real broker and Postgres.

Aggregates are produced straight onto the aggregates topic here (the full path from usage
events through the processor and relay is in tests/e2e/test_stripe_end_to_end.py), with
matching `window_aggregates` rows, so each test controls exactly what Stripe should get.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from meterline.config import Settings
from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.stripe import reports
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.reports import STRIPE_AGE_MARGIN_SECONDS, STRIPE_MAX_AGE_SECONDS
from meterline.stripe.sink import StripeSink, start_sink, stop_sink
from meterline.stripe.transport import MeterEvent, Stripe, V1Transport

from .harness import read_messages, wait_until

pytestmark = pytest.mark.integration

METERS = [
    {"key": "api_calls", "event_type": "api_request", "aggregation": "count",
     "credits_per_unit": "0.001", "stripe_event_name": "api_calls"},
    {"key": "gpu_seconds", "event_type": "gpu_usage", "aggregation": "sum",
     "value_property": "seconds", "credits_per_unit": "0.01", "stripe_event_name": "gpu_seconds"},
    {"key": "internal", "event_type": "internal", "aggregation": "count",
     "credits_per_unit": "0"},  # not billed through Stripe
]


@dataclass
class Env:
    settings: Settings
    emulator: StripeEmulator
    url: str
    pool: asyncpg.Pool
    stripe_ids: dict[str, str]

    def produce(self, aggregates: list[dict[str, Any]]) -> None:
        p = Producer({"bootstrap.servers": self.settings.kafka.bootstrap_servers})
        for a in aggregates:
            p.produce(self.settings.kafka.aggregates_topic, orjson.dumps(a), a["customer"].encode())
        assert p.flush(10) == 0

    async def record_aggregates(self, aggregates: list[dict[str, Any]]) -> None:
        """The `window_aggregates` rows the processor would have written (the ledger side)."""
        async with self.pool.acquire() as conn:
            await conn.executemany(
                """INSERT INTO window_aggregates (id, customer_id, meter, window_start, window_end,
                       seq, quantity, window_value, event_count, credits, kafka_partition,
                       first_offset, last_offset)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 1, 0, 0, 0, 0)""",
                [(a["id"], a["customer"], a["meter"], datetime.fromisoformat(a["window_start"]),
                  datetime.fromisoformat(a["window_end"]), a["seq"], Decimal(a["quantity"]))
                 for a in aggregates])

    def stripe_totals(self) -> dict[tuple[str, str], Decimal]:
        by_stripe = {v: k for k, v in self.stripe_ids.items()}
        out: dict[tuple[str, str], Decimal] = {}
        for e in self.emulator.events:
            key = (by_stripe[e.customer], e.event_name)
            out[key] = out.get(key, Decimal(0)) + e.value
        return out


def aggregate(customer: str, meter: str, window_start: datetime, quantity: str,
              seq: int = 0) -> dict[str, Any]:
    ident = hashlib.blake2b(f"{customer}|{meter}|{window_start}|{seq}".encode(),
                            digest_size=12).hexdigest()
    return {"id": f"agg_{ident}", "customer": customer, "meter": meter,
            "window_start": window_start.isoformat(),
            "window_end": (window_start + timedelta(seconds=1)).isoformat(),
            "seq": seq, "correction": seq > 0, "quantity": quantity, "window_value": quantity,
            "credits": "0", "event_count": 1}


def ledger_totals(aggs: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = {}
    for a in aggs:
        if a["meter"] == "internal":
            continue
        key = (a["customer"], a["meter"])
        out[key] = out.get(key, Decimal(0)) + Decimal(a["quantity"])
    return out


@pytest.fixture
def sink_env(pipeline_settings: Callable[..., Settings]) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(customers: list[str], *, emulator: StripeEmulator | None = None,
                   unmapped: dict[str, str] | None = None, **stripe: Any) -> AsyncIterator[Env]:
        emu = emulator or StripeEmulator(seed=1)
        runner = await serve("127.0.0.1", 0, emu)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        settings = pipeline_settings(
            customers=[{"id": c, "stripe_customer_id": (unmapped or {}).get(c)} for c in customers],
            meters=METERS,
            stripe={"api_base": url, "coalesce_interval_seconds": 2, "seal_grace_seconds": 0.3,
                    "retry_base_seconds": 0.05, "retry_max_seconds": 0.5,
                    "poll_interval_ms": 50, "metrics_port": 0,
                    "consumer_group": f"sink-{url[-5:]}", **stripe})
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
        assert pool is not None
        api = Stripe("sk_test_x", url, 10)
        try:
            await ensure_meters(api.client, settings)
            async with pool.acquire() as conn:
                await conn.executemany("INSERT INTO customers (id, stripe_customer_id) VALUES ($1, $2)",
                                       [(c, (unmapped or {}).get(c)) for c in customers])
            ids = await ensure_customers(api.client, pool, customers)
            yield Env(settings, emu, url, pool, ids)
        finally:
            await api.close()
            await pool.close()
            await runner.cleanup()

    return make


async def _running(settings: Settings) -> tuple[StripeSink, asyncio.Task[None]]:
    return await start_sink(settings)


def windows(n: int, start: datetime | None = None) -> list[datetime]:
    t0 = start or datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    t0 = t0 - timedelta(seconds=t0.second % 2)
    return [t0 + timedelta(seconds=i) for i in range(n)]


@pytest.mark.parametrize("transport", ["v1", "v2"])
async def test_coalesced_reports_reach_stripe_exactly(
    sink_env: Callable[..., Any], transport: str,
) -> None:
    customers = ["c1", "c2", "c3"]
    async with sink_env(customers, transport=transport) as env:
        ws = windows(6)
        aggs = [aggregate(c, m, w, q)
                for c in customers for m, q in (("api_calls", "3"), ("gpu_seconds", "0.1"),
                                                ("internal", "9"))
                for w in ws]
        await env.record_aggregates(aggs)
        env.produce(aggs + aggs[:5])  # a redelivered prefix changes nothing
        sink, task = await start_sink(env.settings)
        try:
            want = ledger_totals(aggs)
            await wait_until(lambda: asyncio.sleep(0, env.stripe_totals() == want), timeout=20,
                             what="Stripe totals equal the ledger")
            async with env.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT status, aggregate_count, identifier FROM stripe_reports")
            lag = {"group": env.settings.stripe.consumer_group,
                   "topic": env.settings.kafka.aggregates_topic, "partition": "0"}
            await wait_until(lambda: asyncio.sleep(0, REGISTRY.get_sample_value(
                "meterline_consumer_lag_seconds", lag) == 0.0), timeout=10,
                what="the sink publishes lag in seconds, 0 once caught up")
        finally:
            await stop_sink(sink, task)
    # 6 one-second windows in 2-second buckets: 3 reports per (customer, billed meter)
    assert len(rows) == len(customers) * 2 * 3
    assert {r["status"] for r in rows} == {"accepted"}
    assert {r["aggregate_count"] for r in rows} == {2}
    assert all(r["identifier"].startswith("mlc_") for r in rows)
    assert len(env.emulator.events) == len(rows)
    assert env.stripe_totals()[("c1", "gpu_seconds")] == Decimal("0.6")  # exact, not 0.6000000001


async def test_unknown_stripe_customer_goes_to_dlq_with_stripes_error(
    sink_env: Callable[..., Any],
) -> None:
    async with sink_env(["good", "ghost"], unmapped={"ghost": "cus_doesnotexist"},
                        coalesce_interval_seconds=0) as env:
        [w] = windows(1)
        aggs = [aggregate("good", "api_calls", w, "5"), aggregate("ghost", "api_calls", w, "7")]
        await env.record_aggregates(aggs)
        env.produce(aggs)
        sink, task = await start_sink(env.settings)
        try:
            async def settled() -> bool:
                async with env.pool.acquire() as conn:
                    statuses = await conn.fetch("SELECT customer_id, status, error_code, identifier"
                                                " FROM stripe_reports")
                return sorted(r["status"] for r in statuses) == ["accepted", "rejected"]
            await wait_until(settled, timeout=20, what="one report accepted, one rejected")
            async with env.pool.acquire() as conn:
                ghost = await conn.fetchrow(
                    "SELECT * FROM stripe_reports WHERE customer_id = 'ghost'")
        finally:
            await stop_sink(sink, task)
        dlq = read_messages(env.settings.kafka.bootstrap_servers,
                            env.settings.kafka.aggregates_dlq_topic)
    assert ghost["error_code"] == "meter_event_customer_not_found"
    assert "No such customer" in ghost["last_error"]
    assert ghost["identifier"] == aggs[1]["id"]  # one aggregate: its id is the identifier
    [msg] = dlq
    assert msg.headers["meterline.reason"] == b"meter_event_customer_not_found"
    assert msg.headers["meterline.stripe.error_code"] == b"meter_event_customer_not_found"
    body = orjson.loads(msg.value or b"")
    assert body["aggregate_ids"] == [aggs[1]["id"]] and body["value"] == "7"
    assert env.stripe_totals() == {("good", "api_calls"): Decimal(5)}


async def test_reconciler_finds_and_repairs_dropped_reports(
    sink_env: Callable[..., Any], tmp_path: Any,
) -> None:
    from meterline.stripe.reconcile import Reconciler

    customers = ["c1", "c2"]
    async with sink_env(customers, coalesce_interval_seconds=0) as env:
        settings = env.settings.model_copy(update={"reconcile": env.settings.reconcile.model_copy(
            update={"settle_seconds": 0, "report_dir": str(tmp_path)})})
        ws = windows(4)
        aggs = [aggregate(c, "gpu_seconds", w, "1.25") for c in customers for w in ws]
        await env.record_aggregates(aggs)
        env.produce(aggs)
        want = ledger_totals(aggs)
        api = Stripe("sk_test_x", env.url, 10)
        sink, task = await start_sink(env.settings)
        try:
            await wait_until(lambda: asyncio.sleep(0, env.stripe_totals() == want), timeout=20,
                             what="Stripe totals equal the ledger")
            rec = Reconciler(settings, env.pool, api)
            clean = await rec.run_once(resubmit=True)
            assert clean.max_variance == 0 and not clean.flagged and len(clean.rows) == 2

            # Stripe loses one accepted event; the sink loses all record of another aggregate.
            assert env.emulator.drop_event(aggs[0]["id"])
            async with env.pool.acquire() as conn:
                rid = await conn.fetchval("SELECT report_id FROM stripe_report_items"
                                          " WHERE aggregate_id = $1", aggs[5]["id"])
                await conn.execute("DELETE FROM stripe_report_items WHERE report_id = $1", rid)
                await conn.execute("DELETE FROM stripe_reports WHERE id = $1", rid)
            env.emulator.drop_event(aggs[5]["id"])

            found = await rec.run_once(resubmit=True)
            by = {r.customer: r for r in found.rows}
            assert {r.customer for r in found.flagged} == {"c1", "c2"}
            assert by["c1"].stripe == Decimal("3.75") and by["c1"].ledger == Decimal("5.00")
            assert by["c1"].variance == Decimal("0.25")
            assert by["c1"].resubmitted_reports == 4  # all its accepted reports, sent again
            assert by["c2"].unreported_aggregates == 1

            await wait_until(lambda: asyncio.sleep(0, env.stripe_totals() == want), timeout=20,
                             what="the repair to reach Stripe")
            repaired = await rec.run_once(resubmit=True)
        finally:
            await stop_sink(sink, task)
            await api.close()
    assert repaired.max_variance == 0 and not repaired.flagged
    # what Stripe already had was answered "already exists": still one event per aggregate
    assert sorted(e.identifier for e in env.emulator.events) == sorted(a["id"] for a in aggs)
    json_path, csv_path = repaired.write(tmp_path)
    assert "max_variance" in json_path.read_text() and "c2,gpu_seconds" in csv_path.read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


async def test_v2_session_renewed_before_expiry_and_after_stripe_says_expired() -> None:
    from meterline.stripe.transport import MeterEvent, V2Transport

    clock = FakeClock()
    emu = StripeEmulator(clock=clock, seed=3)
    runner = await serve("127.0.0.1", 0, emu)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    api = Stripe("sk_test_x", url, 10)
    try:
        settings = Settings.model_validate({"meters": METERS[:1]})
        await ensure_meters(api.client, settings)
        cus = (await api.client.v1.customers.create_async({"name": "c"})).id

        def batch(tag: str, n: int) -> list[MeterEvent]:
            return [MeterEvent(f"{tag}-{i}", "api_calls", "stripe_customer_id", cus, "value",
                               Decimal(1), int(clock.now) - 60) for i in range(n)]

        early = V2Transport(api, refresh_margin=60, clock=clock)
        assert {r.kind for r in await early.send(batch("a", 100))} == {"accepted"}
        clock.now += 14.5 * 60  # inside the refresh margin: renewed before Stripe refuses it
        assert {r.kind for r in await early.send(batch("b", 10))} == {"accepted"}
        assert early.sessions_opened == 2 and not emu.error_reports

        # No margin and a session Stripe already expired (clock skew): 401, renew, repeat.
        late = V2Transport(api, refresh_margin=0, clock=lambda: 0.0)
        assert {r.kind for r in await late.send(batch("c", 5))} == {"accepted"}
        clock.now += 16 * 60
        assert {r.kind for r in await late.send(batch("d", 5))} == {"accepted"}
        assert late.sessions_opened == 2
    finally:
        await api.close()
        await runner.cleanup()
    assert len(emu.events) == 120 and {e.source for e in emu.events} == {"v2"}


async def test_malformed_aggregates_go_to_the_dlq_and_the_partition_keeps_flowing(
    sink_env: Callable[..., Any],
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from meterline import metrics

    async with sink_env(["c1"], coalesce_interval_seconds=0) as env:
        [w] = windows(1)
        good = aggregate("c1", "api_calls", w, "4")
        await env.record_aggregates([good])
        k = env.settings.kafka
        p = Producer({"bootstrap.servers": k.bootstrap_servers})
        for bad in (b"\xff not json", orjson.dumps({"id": "agg_x", "meter": "api_calls"})):
            p.produce(k.aggregates_topic, bad, b"c1", partition=0)
        p.produce(k.aggregates_topic, orjson.dumps(good), b"c1", partition=0)
        assert p.flush(10) == 0
        counted = metrics.DLQ_MESSAGES.labels(k.aggregates_dlq_topic, "malformed_aggregate")
        before = counted._value.get()  # noqa: SLF001 - prometheus-client has no public read
        sink, task = await start_sink(env.settings)
        try:
            await wait_until(lambda: asyncio.sleep(0, env.stripe_totals() == {
                ("c1", "api_calls"): Decimal(4)}), timeout=20, what="the good aggregate in Stripe")
            await asyncio.sleep(1.5)  # one more offset commit round
        finally:
            await stop_sink(sink, task)
        dlq = read_messages(k.bootstrap_servers, k.aggregates_dlq_topic)
        c = Consumer({"bootstrap.servers": k.bootstrap_servers,
                      "group.id": env.settings.stripe.consumer_group})
        [committed] = c.committed([TopicPartition(k.aggregates_topic, 0)], timeout=10)
        c.close()
    assert [m.headers["meterline.reason"] for m in dlq] == [b"malformed_aggregate"] * 2
    assert sorted(m.headers["meterline.original.offset"] for m in dlq) == [b"0", b"1"]
    assert dlq[0].value == b"\xff not json"  # the original bytes, untouched
    assert counted._value.get() - before == 2  # noqa: SLF001
    assert committed.offset == 3  # past the bad messages and the accepted one


async def _finished(env: Env, n: int) -> list[asyncpg.Record]:
    async with env.pool.acquire() as conn:
        rows = await conn.fetch("SELECT status, error_code, last_error FROM stripe_reports")
    return list(rows) if len(rows) == n and all(
        r["status"] in ("accepted", "rejected") for r in rows) else []


@pytest.mark.parametrize("transport", ["v1", "v2"])
async def test_report_values_fit_stripes_15_significant_digits_and_the_rest_is_carried(
    sink_env: Callable[..., Any], transport: str,
) -> None:
    # 17 significant digits each (quantities accepted at intake as a double's shortest
    # decimal), and sums of them coalesced into 2-second buckets: 4 reports of 16-17 digits
    quantities = ["12345678.901234567", "0.000000001", "98765432.123456789", "1.5",
                  "7.0000000000000001", "3", "99999999999999.95", "0.03"]
    async with sink_env(["c1"], transport=transport) as env:
        aggs = [aggregate("c1", "gpu_seconds", w, q)
                for w, q in zip(windows(len(quantities)), quantities, strict=True)]
        await env.record_aggregates(aggs)
        env.produce(aggs)
        sink, task = await start_sink(env.settings)
        try:
            await wait_until(lambda: _finished(env, 4), timeout=20, what="4 reports finished")
            async with env.pool.acquire() as conn:
                rows = await conn.fetch("SELECT status, error_code, last_error FROM stripe_reports")
                carry = await conn.fetchval(
                    "SELECT carry FROM stripe_report_carry WHERE customer_id = 'c1'")
        finally:
            await stop_sink(sink, task)
    assert [(r["status"], r["error_code"]) for r in rows] == [("accepted", None)] * 4, rows
    assert env.emulator.error_reports == []  # v2 validates later: nothing was dropped
    sent = [e.value for e in env.emulator.events]
    assert len(sent) == 4
    assert all(len(v.normalize().as_tuple().digits) <= 15 for v in sent), sent
    ledger = ledger_totals(aggs)[("c1", "gpu_seconds")]
    # Stripe holds the ledger's total but for the carry not sent yet, which is below half a
    # unit of the last report's 15th digit
    assert env.stripe_totals()[("c1", "gpu_seconds")] + carry == ledger
    last = max(env.emulator.events, key=lambda e: e.timestamp).value  # 1E+14 at 0.1 a unit
    assert carry != 0 and abs(carry) <= Decimal(10) ** (last.adjusted() - 14) / 2


async def test_the_emulator_refuses_values_of_more_than_15_significant_digits_like_stripe(
    sink_env: Callable[..., Any],
) -> None:
    async with sink_env(["c1"]) as env:
        transport = V1Transport(Stripe("sk_test_x", env.url, 10))
        try:
            [ok], [refused] = [await transport.send([MeterEvent(
                f"ev_{value}", "gpu_seconds", "stripe_customer_id", env.stripe_ids["c1"], "value",
                Decimal(value), int(time.time()))]) for value in ("123456789012.345",
                                                                  "123456789012.3456")]
        finally:
            await transport.close()
    assert ok.kind == "accepted"
    assert (refused.kind, refused.code) == ("reject", "meter_event_invalid_value")


async def test_reports_of_events_accepted_5_s_inside_the_35_days_are_not_refused(
    sink_env: Callable[..., Any],
) -> None:
    """A 60 s bucket can start up to 59 s before its events: for usage accepted 5 s inside
    meterline's 35 days (max lateness), the bucket start lies past Stripe's limit; the report
    is stamped inside it (`reports.stripe_timestamp`) and Stripe takes it."""
    async with sink_env(["c1"], coalesce_interval_seconds=60) as env:
        while True:  # a window 5 s inside the limit whose 60 s bucket starts before the limit
            limit = int(time.time()) - STRIPE_MAX_AGE_SECONDS
            window = limit + 5 + 1  # +1: the second the test itself takes
            if window % 60 > 6 + 5:  # the bucket starts > 5 s before the limit
                break
            await asyncio.sleep(1)
        start = datetime.fromtimestamp(window, UTC)
        assert reports.bucket_of(start, 60) < datetime.fromtimestamp(limit, UTC)
        aggs = [aggregate("c1", "api_calls", start, "2"),
                aggregate("c1", "api_calls", start + timedelta(seconds=1), "3")]
        await env.record_aggregates(aggs)
        env.produce(aggs)
        sink, task = await start_sink(env.settings)
        try:
            [row] = await wait_until(lambda: _finished(env, 1), timeout=20, what="report finished")
        finally:
            await stop_sink(sink, task)
    assert (row["status"], row["error_code"]) == ("accepted", None), row["last_error"]
    [event] = env.emulator.events
    assert event.value == 5
    # stamped at the oldest instant Stripe takes (its margin for the request's own time):
    # seconds after the bucket's start, the same billing period
    assert 0 <= event.timestamp - limit <= STRIPE_AGE_MARGIN_SECONDS + 20
