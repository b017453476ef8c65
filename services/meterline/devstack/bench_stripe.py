"""`meterline bench --stripe`: Stripe sink throughput and debit -> Stripe lag, against the emulator.

Embedded broker and Postgres (or KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL), the emulator and
the sink as subprocesses (they share the machine's cores with the feeder, as in `dev`).
The feeder stands in for processor + relay: it writes `window_aggregates` rows (the debit
commit) and publishes the same aggregates to the aggregates topic, at a steady rate.

Per transport, two phases (coalescing off, so one aggregate = one Stripe event):

* **throughput**: fed faster than the sink's configured rate, so the sink's token bucket is
  the limit; reports the median per-second rate of events Stripe accepted over the phase
  and its ratio to the configured rate (target >= 95 %).
* **lag**: fed at half the configured rate; reports p50/p99 of debit commit -> Stripe
  accepted (the sink's `meterline_debit_to_stripe_latency_seconds`).

Both check exactness: Stripe's per-(customer, meter) totals equal the fed aggregates', and
no aggregate reached Stripe twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from confluent_kafka import Producer

from meterline.config import Settings, load_settings
from meterline.devstack.bench import histogram_buckets, quantile, run_bench, servers
from meterline.devstack.dev import Services, write_config
from meterline.devstack.dev_stripe import emulator_events
from meterline.devstack.embedded import _free_port
from meterline.devstack.topics import ensure_topics
from meterline.kafka.security import librdkafka_config
from meterline.storage.db import migrate, with_database
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.transport import Stripe

LAG = "meterline_debit_to_stripe_latency_seconds"
METERS = ("api_calls", "llm_tokens", "gpu_seconds")


class Feeder:
    """Writes aggregates as the processor (rows) and the relay (messages) would."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, customers: list[str]) -> None:
        self.settings, self.pool, self.customers = settings, pool, customers
        self.producer = Producer(librdkafka_config(settings.kafka, **{"linger.ms": 5}))
        self.n = 0
        self.expected: Counter[tuple[str, str]] = Counter()

    def _next(self, base: datetime) -> dict[str, Any]:
        """Aggregate i: a distinct window per (customer, meter), so none coalesce."""
        i = self.n
        self.n += 1
        customer = self.customers[i % len(self.customers)]
        meter = METERS[(i // len(self.customers)) % len(METERS)]
        window = base - timedelta(seconds=5 * (i // (len(self.customers) * len(METERS))))
        quantity = Decimal(i % 97 + 1) / 4
        self.expected[(customer, meter)] += quantity  # type: ignore[assignment]
        ident = hashlib.blake2b(f"bench|{i}".encode(), digest_size=12).hexdigest()
        return {"id": f"agg_{ident}", "customer": customer, "meter": meter,
                "window_start": window.isoformat(),
                "window_end": (window + timedelta(seconds=5)).isoformat(),
                "seq": i, "correction": False, "quantity": str(quantity),
                "window_value": str(quantity), "credits": "0", "event_count": 1}

    async def feed(self, rate: float, seconds: float) -> int:
        """`rate` aggregates/s for `seconds`, in 50 ms ticks; returns how many were fed."""
        start, fed = time.monotonic(), 0
        window = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
        window -= timedelta(seconds=window.second % 5)
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(rate * elapsed) - fed
            if due > 0:
                batch = [self._next(window) for _ in range(due)]
                async with self.pool.acquire() as conn:
                    await conn.executemany(
                        """INSERT INTO window_aggregates (id, customer_id, meter, window_start,
                               window_end, seq, quantity, window_value, event_count, credits,
                               kafka_partition, first_offset, last_offset)
                           VALUES ($1, $2, $3, $4::timestamptz, $4::timestamptz + interval '5 s', $5, $6, $6, 1, 0, 0, 0, 0)""",
                        [(a["id"], a["customer"], a["meter"],
                      datetime.fromisoformat(a["window_start"]), a["seq"],
                          Decimal(a["quantity"])) for a in batch])
                for a in batch:
                    self.producer.produce(self.settings.kafka.aggregates_topic, orjson.dumps(a),
                                          a["customer"].encode())
                self.producer.poll(0)
                fed += due
            await asyncio.sleep(0.05)
        self.producer.flush(10)
        return fed


async def run_transport(transport: str, rate: float, seconds: float, customers: int,
                        bootstrap: str, server_dsn: str, workdir: Path) -> dict[str, Any]:
    tag = f"{transport}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "bench_stripe_{tag}"')
    await admin.close()
    dsn = with_database(server_dsn, f"bench_stripe_{tag}")
    prefix = f"bench-stripe-{tag}."
    emulator_url = f"http://127.0.0.1:{_free_port()}"
    extra = {
        "kafka": {"aggregates_topic": prefix + "usage.aggregates",
                  "aggregates_dlq_topic": prefix + "usage.aggregates.dlq"},
        "stripe": {"api_base": emulator_url, "transport": transport,
                   "rate_limit_per_second": rate, "coalesce_interval_seconds": 0,
                   "seal_grace_seconds": 0, "poll_interval_ms": 50,
                   "metrics_port": _free_port(), "consumer_group": prefix + "sink"},
    }
    tdir = workdir / tag
    tdir.mkdir()
    settings = load_settings(write_config(tdir, bootstrap, dsn, 0, extra))
    await migrate(dsn)
    ensure_topics(settings)
    services = Services(tdir / "meterline.yaml", tdir)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    names = [f"cust_{i:05d}" for i in range(customers)]
    # v2 carries up to 100 events per request: feed events at 100x the request rate
    per_request = 100 if transport == "v2" else 1
    events_rate = rate * per_request
    out: dict[str, Any] = {"transport": transport, "configured_requests_per_second": rate}
    try:
        services.start("stripe-emulator", "--port", emulator_url.rsplit(":", 1)[1], "--rate", "0")
        api = Stripe("sk_test_bench", emulator_url, 10)
        for _ in range(100):
            try:
                await ensure_meters(api.client, settings)
                break
            except Exception:  # noqa: BLE001 - the emulator is still starting
                await asyncio.sleep(0.1)
        await ensure_customers(api.client, pool, names)
        await api.close()
        services.start("stripe-sink")
        feeder = Feeder(settings, pool, names)
        port = settings.stripe.metrics_port

        print(f"[stripe {transport}] throughput: feeding {events_rate * 1.25:,.0f} events/s "
              f"for {seconds:.0f} s against a {rate:,.0f} requests/s limit", file=sys.stderr)
        t0 = time.time()
        fed = await feeder.feed(events_rate * 1.25, seconds)
        await _drain(pool, feeder, services, timeout=seconds * 3 + 30)
        per_second = Counter(int(e["created"]) for e in emulator_events(settings)
                             if e["created"] >= t0)
        steady = [per_second.get(int(t0) + s, 0) for s in range(2, int(seconds) - 1)]
        achieved = statistics.median(steady) if steady else 0.0
        out["throughput"] = {
            "fed": fed, "accepted_events_per_second_median": achieved,
            "accepted_requests_per_second_median": achieved / per_request,
            "ratio_to_configured": round(achieved / per_request / rate, 3)}

        print(f"[stripe {transport}] lag: feeding {events_rate / 2:,.0f} events/s for "
              f"{seconds:.0f} s", file=sys.stderr)
        before = histogram_buckets(port, LAG)
        fed2 = await feeder.feed(events_rate / 2, seconds)
        await _drain(pool, feeder, services, timeout=seconds * 2 + 30)
        after = histogram_buckets(port, LAG)
        out["lag"] = {"fed": fed2,
                      "debit_to_stripe_p50_seconds": _round(quantile(before, after, 0.5)),
                      "debit_to_stripe_p99_seconds": _round(quantile(before, after, 0.99))}
        out |= await _exactness(settings, feeder, pool)
    finally:
        services.stop()
        await pool.close()
    return out


async def _drain(pool: asyncpg.Pool, feeder: Feeder, services: Services, timeout: float) -> None:
    """Wait until every fed aggregate is in an accepted report (a cheap count in Postgres,
    not a download of every event from the emulator, which competes with the sink)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        async with pool.acquire() as conn:
            done = await conn.fetchval(
                "SELECT count(*) FROM stripe_report_items i JOIN stripe_reports r"
                " ON r.id = i.report_id WHERE r.status = 'accepted'")
        if done >= feeder.n:
            return
        await asyncio.sleep(0.5)


async def _exactness(settings: Settings, feeder: Feeder, pool: asyncpg.Pool) -> dict[str, Any]:
    """Stripe's total vs what was fed (a duplicate makes it larger, a loss smaller), and the
    aggregates no accepted report carries."""
    events = emulator_events(settings)
    want_total = sum(feeder.expected.values(), Decimal(0))
    got_total = sum((Decimal(str(e["value"])) for e in events), Decimal(0))
    async with pool.acquire() as conn:
        not_accepted = await conn.fetchval(
            """SELECT count(*) FROM window_aggregates a
               LEFT JOIN stripe_report_items i ON i.aggregate_id = a.id
               LEFT JOIN stripe_reports r ON r.id = i.report_id
               WHERE r.status IS DISTINCT FROM 'accepted'""")
    return {"aggregates_fed": feeder.n, "stripe_events": len(events),
            "aggregates_not_accepted": not_accepted,
            "stripe_total": str(got_total), "fed_total": str(want_total),
            "stripe_total_equals_fed_total": got_total == want_total}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


async def _main(args: argparse.Namespace, stack: contextlib.ExitStack,
                workdir: Path) -> dict[str, Any]:
    bootstrap, server_dsn = servers(stack, workdir)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    transports = ["v1", "v2"] if args.stripe_transport == "both" else [args.stripe_transport]
    for t in transports:
        rate = args.stripe_rate if t == "v1" else args.stripe_v2_rate
        results[t] = await run_transport(t, rate, args.stripe_seconds, args.customers,
                                         bootstrap, server_dsn, workdir)
        print(orjson.dumps(results[t]).decode(), file=sys.stderr)
    results["exact"] = all(results[t]["stripe_total_equals_fed_total"]
                           and results[t]["aggregates_not_accepted"] == 0 for t in transports)
    return results


def run(args: argparse.Namespace) -> int:
    return run_bench(args, _main, "meterline-bench-stripe-", lambda r: bool(r["exact"]))
