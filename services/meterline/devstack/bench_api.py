"""`meterline bench --api`: latency of the balance and entitlement endpoints under load.

Honest by construction:

- the API runs as its own process (`meterline api`), sharing the machine's cores with
  Postgres and with this load client, as it would share a small host;
- the load is **open loop**: request i is due at t0 + i / rate whatever happened to
  the ones before, and its latency is measured from that due time, so a stall shows
  up in the figures instead of silently delaying the next requests (no coordinated
  omission);
- the database is not empty: `--api-customers` customers with plans, grants and an
  hour of 5 s window aggregates each (`--api-windows`), so period usage and burn rate
  read real rollup rows.

Half the requests ask for a balance, half for an entitlement, for random customers.
The report (JSON) gives per endpoint p50/p90/p99/p99.9/max in milliseconds from the
client, the server's own p99 from its histogram, the achieved rate and the errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from meterline.config import Settings, load_settings
from meterline.devstack.bench import quantile, run_bench
from meterline.devstack.dev import write_config
from meterline.devstack.embedded import EmbeddedPostgres, _free_port
from meterline.ledger import GrantRequest, apply_grant
from meterline.storage.db import migrate, with_database
from meterline.storage.grants import sync_config

ENDPOINTS = {
    "balance": "/v1/customers/{id}/balance",
    "entitlement": "/v1/customers/{id}/entitlements/{meter}",
}
DURATION = "meterline_api_request_duration_seconds"


@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ENDPOINTS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    max_send_lag: float = 0.0


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already-sorted values."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.999999) - 1))
    return sorted_values[rank]


def customer_id(i: int) -> str:
    return f"bench_{i:05d}"


async def seed(settings: Settings, customers: int, windows: int) -> None:
    """Customers with plans and grants, past-due flags, and `windows` aggregates each."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await sync_config(conn, settings)
        plans = ["starter", "pro", None]
        await conn.executemany(
            "INSERT INTO customers (id, plan_key, past_due) VALUES ($1, $2, $3)",
            [(customer_id(i), plans[i % 3], i % 10 == 0) for i in range(customers)])
        for i in range(customers):
            await apply_grant(conn, GrantRequest(customer_id(i), Decimal(100 + i % 50), "bench",
                                                 f"{i}:welcome"),
                              settings.kafka.balance_changes_topic,
                              settings.processor.thresholds_percent)
        # an hour of 5 s windows per customer, ending now; the rollup trigger runs once
        await conn.execute(
            """INSERT INTO window_aggregates (id, customer_id, meter, window_start, window_end, seq,
                   quantity, window_value, event_count, credits, kafka_partition, first_offset,
                   last_offset)
               SELECT 'agg_' || c || '_' || w, 'bench_' || lpad(c::text, 5, '0'), 'api_calls',
                      date_trunc('second', now()) - w * interval '5 s',
                      date_trunc('second', now()) - w * interval '5 s' + interval '5 s', 0,
                      10, 10, 10, 0.01, c % 4, w, w
               FROM generate_series(0, $1 - 1) c, generate_series(1, $2) w""",
            customers, windows)
        # settle the bulk load first, so autovacuum and a checkpoint do not run mid-measurement
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def _request(http: aiohttp.ClientSession, url: str, endpoint: str, due: float,
                   samples: Samples) -> None:
    try:
        async with http.get(url) as r:
            await r.read()
            ok = r.status == 200
    except (TimeoutError, aiohttp.ClientError):
        ok = False
    if ok:
        samples.latencies[endpoint].append(time.perf_counter() - due)
    else:
        samples.errors[endpoint] += 1


async def drive(base: str, token: str, rate: float, seconds: float, customers: int,
                rng: random.Random) -> tuple[Samples, float]:
    """Offer `rate` requests/s for `seconds`, open loop; return samples and the wall time."""
    samples = Samples()
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=10)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(base_url=base, connector=connector, timeout=timeout,
                                     headers={"Authorization": f"Bearer {token}"}) as http:
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due_count = min(total, int((now - t0) * rate) + 1)
            while sent < due_count:
                due = t0 + sent / rate
                samples.max_send_lag = max(samples.max_send_lag, now - due)
                endpoint = "balance" if sent % 2 == 0 else "entitlement"
                cid = customer_id(rng.randrange(customers))
                url = (f"/v1/customers/{cid}/balance" if endpoint == "balance"
                       else f"/v1/customers/{cid}/entitlements/api_calls")
                task = asyncio.create_task(_request(http, url, endpoint, due, samples))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
        if tasks:
            await asyncio.wait(tasks)
        wall = time.perf_counter() - t0
    return samples, wall


def server_buckets(base: str) -> dict[str, dict[float, float]]:
    """The API's request-duration histogram buckets per route (cumulative counts)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == DURATION:
            for s in fam.samples:
                if s.name == DURATION + "_bucket":
                    out.setdefault(s.labels["route"], {})[float(s.labels["le"])] = s.value
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_api(config: Path, workdir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`meterline api` as a subprocess of its own session (the token only in its environment)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "meterline.cli", "-c", str(config), "api"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
            env={**os.environ, **env})


async def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (await asyncio.to_thread(log.read_text))[-3000:]
                raise RuntimeError(f"api exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError("the API did not become ready within 60 s")


def summarise(samples: Samples, wall: float, rate: float, before: dict[str, dict[float, float]],
              after: dict[str, dict[float, float]]) -> dict[str, Any]:
    endpoints: dict[str, Any] = {}
    for name, values in samples.latencies.items():
        values.sort()
        server_p99 = quantile(before.get(ENDPOINTS[name], {}), after.get(ENDPOINTS[name], {}), 0.99)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        endpoints[name] = {
            "requests_ok": len(values),
            "errors": samples.errors[name],
            "p50_ms": ms(percentile(values, 0.50)),
            "p90_ms": ms(percentile(values, 0.90)),
            "p99_ms": ms(percentile(values, 0.99)),
            "p999_ms": ms(percentile(values, 0.999)),
            "max_ms": ms(values[-1] if values else None),
            "server_p99_ms": ms(server_p99),
        }
    done = sum(len(v) for v in samples.latencies.values())
    errors = sum(samples.errors.values())
    return {
        "offered_rate": rate,
        "achieved_rate": round((done + errors) / wall, 1),
        "ok_rate": round(done / wall, 1),
        "errors": errors,
        "client_max_send_lag_ms": round(samples.max_send_lag * 1000, 3),
        "endpoints": endpoints,
    }


async def _main(args: argparse.Namespace, stack: contextlib.ExitStack,
                workdir: Path) -> dict[str, Any]:
    pg = stack.enter_context(EmbeddedPostgres(workdir / "pg"))
    db = f"bench_api_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg.server_dsn)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    dsn = with_database(pg.dsn, db)
    port = _free_port()
    config = write_config(workdir, "127.0.0.1:9", dsn, 0,
                          {"api": {"host": "127.0.0.1", "port": port}})
    settings = load_settings(config, database_url=dsn)
    await migrate(dsn)
    print(f"[api] seeding {args.api_customers} customers x {args.api_windows} windows",
          file=sys.stderr)
    t = time.monotonic()
    await seed(settings, args.api_customers, args.api_windows)
    seeded = time.monotonic() - t
    token = secrets.token_urlsafe(24)
    log = workdir / "api.log"
    proc = start_api(config, workdir, log, {"METERLINE_API_TOKENS": token, "DATABASE_URL": dsn})
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(7)
    try:
        await wait_ready(base, proc, log)
        if args.api_warmup > 0:
            print(f"[api] warm-up {args.api_warmup} s", file=sys.stderr)
            await drive(base, token, args.api_rate, args.api_warmup, args.api_customers, rng)
        before = server_buckets(base)
        load_before = os.getloadavg()[0]
        cpu0 = cpu_seconds(proc.pid)
        print(f"[api] measuring: {args.api_rate:,.0f} requests/s for {args.api_seconds} s",
              file=sys.stderr)
        samples, wall = await drive(base, token, args.api_rate, args.api_seconds,
                                    args.api_customers, rng)
        api_cpu = cpu_seconds(proc.pid) - cpu0
        load_after = os.getloadavg()[0]
        after = server_buckets(base)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "bench": "api",
        "customers": args.api_customers,
        "window_aggregates": args.api_customers * args.api_windows,
        "seed_seconds": round(seeded, 1),
        "seconds": args.api_seconds,
        "pool_size": settings.api.pool_size,
        "api_cpu_percent": round(api_cpu / wall * 100, 1),
        "cpus": os.cpu_count(),
        # 1-minute load average around the measurement: other work on the machine shows here
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_after, 2),
        **summarise(samples, wall, args.api_rate, before, after),
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of `meterline bench --api`; exit 1 when any request failed."""
    return run_bench(args, _main, "meterline-bench-api-", lambda r: r["errors"] == 0)
