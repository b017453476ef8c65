"""`meterline bench --bridge`: webhook bridge requests/s and latency, signatures checked.

1. Kafka: `KAFKA_BOOTSTRAP_SERVERS`, else the embedded broker; a fresh `stripe.events` topic.
2. The bridge: `meterline webhook-bridge` as a subprocess, as it runs in production
   (`--bridge-in-process` serves it from the bench's own event loop instead).
3. `--bridge-requests` Stripe-shaped events (1-3 KiB, 500 customers), signed the way
   Stripe signs them before the clock starts, POSTed with `--bridge-concurrency` in flight
   from one aiohttp client; latency is measured per request at the client.
4. The topic is read back message by message: `lost` = accepted event ids missing from
   it, `body_mismatches` = messages whose value differs from the bytes sent.

Load generator, bridge and broker share the machine's cores, so the figures are a floor.
Exit status 0 only when every request got 200 and nothing accepted is missing or altered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from meterline.config import Settings, load_settings
from meterline.devstack.bench import quantile
from meterline.devstack.dev import read_topic
from meterline.devstack.embedded import EmbeddedKafka, create_topics
from meterline.devstack.stripe_emulator.signing import build_event, sign_payload

SECRET = "whsec_bench_" + uuid.uuid4().hex
DURATION = "meterline_webhook_request_duration_seconds"
EVENT_TYPES = ("invoice.paid", "invoice.payment_failed", "customer.subscription.updated",
               "charge.succeeded", "customer.updated", "checkout.session.completed")


@dataclass
class LoadResult:
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted_ids: set[str] = field(default_factory=set)


def make_events(n: int, run_id: str, seed: int = 7) -> list[tuple[str, bytes]]:
    """(event id, body) pairs shaped like Stripe snapshot events, some without a customer."""
    rng = random.Random(seed)
    now = int(time.time())
    events = []
    for i in range(n):
        event_id = f"evt_bench_{run_id}_{i}"
        event_type = rng.choice(EVENT_TYPES)
        customer = f"cus_{rng.randrange(500):05d}"
        obj: dict[str, Any] = {"id": f"obj_{run_id}_{i}", "object": event_type.rsplit(".", 1)[0].split(".")[-1],
                               "customer": customer if rng.random() > 0.05 else None,
                               "amount": rng.randrange(100, 1_000_000), "currency": "usd",
                               "metadata": {"note": "x" * rng.randrange(800, 2800)}}
        if event_type == "customer.updated":
            obj = {"id": customer, "object": "customer", "email": f"{customer}@example.com"}
        events.append((event_id, build_event(event_type, obj, event_id=event_id, created=now)))
    return events


async def fire(url: str, events: list[tuple[str, bytes]], concurrency: int) -> LoadResult:
    """POST every event once, `concurrency` at a time; signatures made before timing starts."""
    now = int(time.time())
    signed = [(eid, body, sign_payload(body, SECRET, now)) for eid, body in events]
    result = LoadResult(seconds=0.0)
    next_index = iter(range(len(signed)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in next_index:
                eid, body, header = signed[i]
                started = time.perf_counter()
                async with session.post(url, data=body, headers={
                        "Content-Type": "application/json", "Stripe-Signature": header}) as resp:
                    await resp.read()
                result.latencies_s.append(time.perf_counter() - started)
                result.statuses[resp.status] += 1
                if resp.status == 200:
                    result.accepted_ids.add(eid)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BridgeProcess:
    """`meterline webhook-bridge` in a subprocess, the way it runs in production."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, base_url: str, timeout_s: float = 30) -> None:
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meterline.cli", "-c", str(self.config), "webhook-bridge"],
                env={**os.environ, "STRIPE_WEBHOOK_SECRETS": SECRET}, stdout=out,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self._proc.returncode}: {self._tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    base_url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"bridge not ready after {timeout_s:.0f} s: {self._tail()}")

    def stop(self) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), then the exit code."""
        if self._proc is None:
            return None
        self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


async def _server_quantiles(base_url: str) -> dict[str, float | None]:
    """p50/p99 of accepted requests from the bridge's own histogram (bucket-interpolated)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as r:
        text = await r.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == DURATION + "_bucket" and s.labels.get("outcome") == "accepted":
                buckets[float(s.labels["le"])] = s.value
    return {f"p{int(q * 100)}": (None if (v := quantile({}, buckets, q)) is None
                                 else round(v * 1000, 2)) for q in (0.5, 0.99)}


def _settings_file(workdir: Path, bootstrap: str, topic: str, port: int) -> Path:
    path = workdir / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "stripe_events_topic": topic},
        "webhook_bridge": {"host": "127.0.0.1", "port": port},
    }))
    return path


async def _measure(args: argparse.Namespace, settings: Settings, base_url: str) -> dict[str, Any]:
    url = base_url + "/webhooks/stripe"
    run_id = uuid.uuid4().hex[:6]
    warmup = make_events(min(500, max(1, args.bridge_requests // 10)), run_id + "w", seed=1)
    events = make_events(args.bridge_requests, run_id)
    warm = await fire(url, warmup, args.bridge_concurrency)
    load = await fire(url, events, args.bridge_concurrency)
    server = await _server_quantiles(base_url)
    sent = dict(events + warmup)
    found = await asyncio.to_thread(read_topic, settings.kafka,
                                    settings.kafka.stripe_events_topic, 3.0)
    on_topic: dict[str, int] = Counter()
    mismatches = 0
    for m in found:
        raw_id = dict(m.headers() or []).get("stripe-event-id") or b""
        eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        on_topic[eid] += 1
        mismatches += m.value() != sent.get(eid)
    accepted = load.accepted_ids | warm.accepted_ids
    return {
        "requests": len(events),
        "concurrency": args.bridge_concurrency,
        "seconds": round(load.seconds, 3),
        "requests_per_second": round(len(events) / load.seconds, 1),
        "latency_ms": {"p50": percentile_ms(load.latencies_s, 0.5),
                       "p99": percentile_ms(load.latencies_s, 0.99),
                       "max": round(max(load.latencies_s) * 1000, 2)},
        "server_latency_ms": server,
        "status_counts": {str(k): v for k, v in sorted(load.statuses.items())},
        "warmup_requests": len(warmup),
        "accepted_including_warmup": len(accepted),
        "distinct_on_topic": len(on_topic),
        "duplicates_on_topic": sum(n - 1 for n in on_topic.values()),
        "lost": len(accepted - set(on_topic)),
        "body_mismatches": mismatches,
        "mean_body_bytes": round(sum(len(b) for _, b in events) / len(events)),
    }


async def _measure_in_process(args: argparse.Namespace, settings: Settings,
                              base_url: str) -> dict[str, Any]:
    from meterline.webhooks.bridge import start_bridge
    from meterline.webhooks.signing_secrets import SigningSecrets

    running = await start_bridge(settings, SigningSecrets([SECRET]))
    try:
        return await _measure(args, settings, base_url)
    finally:
        await running.stop()


def _bench(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> dict[str, Any]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or stack.enter_context(
        EmbeddedKafka(workdir / "kafka")).bootstrap_servers
    topic = f"bench-bridge-{uuid.uuid4().hex[:6]}.stripe.events"
    create_topics(bootstrap, {topic: 4})
    port = _free_port()
    config = _settings_file(workdir, bootstrap, topic, port)
    settings = load_settings(config)
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()},
                               "bridge": "in-process" if args.bridge_in_process else "subprocess"}
    if args.bridge_in_process:
        results.update(asyncio.run(_measure_in_process(args, settings, base_url)))
        return results
    bridge = BridgeProcess(config, workdir / "bridge.log")
    try:
        bridge.start(base_url)
        results.update(asyncio.run(_measure(args, settings, base_url)))
    finally:
        results["bridge_exit_code"] = bridge.stop()
    return results


def run(args: argparse.Namespace) -> int:
    """`meterline bench --bridge`; prints JSON (and writes it to --json)."""
    workdir = Path(tempfile.mkdtemp(prefix="meterline-bench-bridge-"))
    try:
        with contextlib.ExitStack() as stack:
            results = _bench(args, stack, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = {
        "requests_per_second_at_least_2000": results["requests_per_second"] >= 2000,
        "p99_under_50_ms": results["latency_ms"]["p99"] < 50,
        "nothing_lost": results["lost"] == 0,
    }
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2).decode()
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    print(text)
    ok = (results["lost"] == 0 and results["body_mismatches"] == 0
          and set(results["status_counts"]) == {"200"})
    return 0 if ok else 1
