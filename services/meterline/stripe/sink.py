"""`meterline stripe-sink`: window aggregates from Kafka to Stripe meter events, exactly once.

Four loops share one process:

* **stage** -- consumes `usage.aggregates` and records each aggregate in Postgres, added to
  the open report of its (customer, meter, coalescing bucket). Malformed messages go to
  `usage.aggregates.dlq`. Offsets are committed to Kafka only below the lowest offset whose
  report is not finished, i.e. after Stripe accepted it or the DLQ took it.
* **seal** -- once a bucket is over (+ grace) its report's membership and identifier are
  fixed. One aggregate -> identifier = the aggregate id; several -> derived from the
  report's key. Whatever happens afterwards, that report is sent with that identifier.
* **send** -- leases due reports and sends them (v1: one call each, at most one in flight
  per (customer, meter); v2: up to 100 per stream call) through a token bucket and a
  circuit breaker. Accepted -> done. 429/5xx/network -> retried with exponential backoff
  and jitter (Stripe's Retry-After wins when longer). Other 4xx -> DLQ with Stripe's error,
  then rejected.
* **gauges** -- backlog and oldest unsent age for Prometheus.

Outages never end the sink: a Postgres error (crash, restart, no free connection slot)
or a broker error makes the loop that met it back off and retry the same step — a
fetched batch is staged before the next fetch, Stripe's verdicts are recorded before the
next claim — while `/readyz` says not ready (meterline.health). A loop stuck for longer
than `stall_after_s` turns `/healthz` red.

A crash anywhere is harmless: staging is idempotent by aggregate id, a report leased by a
dead sink is re-leased after `lease_seconds`, and re-sending an identifier Stripe already
has is answered "already exists", which counts as accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError as AIOKafkaError
from aiolimiter import AsyncLimiter
from circuitbreaker import CircuitBreaker, CircuitBreakerError

from meterline import metrics
from meterline.config import ConfigError, MeterConfig, Settings
from meterline.consumer_lag import ConsumerLag, publishing
from meterline.health import KAFKA, POSTGRES, Health
from meterline.kafka.security import aiokafka_config
from meterline.processor.dlq import DlqUnavailable, DlqWriter, dead_letter_headers
from meterline.storage.db import DATABASE_UNAVAILABLE, create_pool
from meterline.stripe import reports
from meterline.stripe.reports import Claimed, Staged
from meterline.stripe.transport import (
    MeterEvent,
    Result,
    Stripe,
    Transport,
    V1Transport,
    V2Transport,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

EMULATOR_KEY = "sk_test_meterline_emulator"

# Retried, never fatal: exception type -> the dependency it says is down.
POSTGRES_ERRORS = DATABASE_UNAVAILABLE
PG_OUTAGES: dict[type[BaseException], str] = dict.fromkeys(POSTGRES_ERRORS, POSTGRES)
KAFKA_OUTAGES: dict[type[BaseException], str] = {DlqUnavailable: KAFKA, AIOKafkaError: KAFKA}
OUTAGES = {**KAFKA_OUTAGES, **PG_OUTAGES}


class StripeOutage(Exception):
    """A failure that says Stripe (or our access to it) is down: trips the breaker."""


def stripe_api_key(settings: Settings) -> str:
    """`STRIPE_API_KEY`, or the first line of `STRIPE_API_KEY_FILE`; a placeholder test key
    when pointed at the emulator. Never logged."""
    key = os.environ.get("STRIPE_API_KEY", "").strip()
    path = os.environ.get("STRIPE_API_KEY_FILE")
    if not key and path:
        try:
            key = Path(path).read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"STRIPE_API_KEY_FILE: cannot read a key ({type(exc).__name__})") from None
    if key:
        return key
    if settings.stripe.api_base:
        return EMULATOR_KEY
    raise ConfigError("no Stripe API key: set STRIPE_API_KEY or STRIPE_API_KEY_FILE "
                      "(or stripe.api_base to use the emulator)")


def make_transport(settings: Settings) -> Transport:
    cfg = settings.stripe
    api = Stripe(stripe_api_key(settings), cfg.api_base, cfg.request_timeout_seconds)
    if cfg.transport == "v2":
        return V2Transport(api, cfg.session_refresh_margin_seconds)
    return V1Transport(api)


def backoff_delay(attempts: int, base: float, cap: float, retry_after: float | None,
                  rng: random.Random) -> float:
    """Full-jitter exponential backoff; Stripe's Retry-After is a floor, not a suggestion."""
    delay = rng.uniform(0, min(cap, base * 2 ** max(0, attempts - 1)))
    return max(delay, retry_after or 0.0)


class StripeSink:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, transport: Transport,
                 dlq: DlqWriter, health: Health | None = None) -> None:
        self.settings = settings
        self.cfg = settings.stripe
        self.pool = pool
        self.transport = transport
        self.dlq = dlq
        self.meters: dict[str, MeterConfig] = {m.key: m for m in settings.meters}
        self.window_seconds = -(-settings.processor.window_size_ms // 1000)  # ceil
        self.limiter = AsyncLimiter(self.cfg.rate_limit_per_second, 1)
        self.breaker = CircuitBreaker(
            failure_threshold=self.cfg.circuit_failure_threshold,
            recovery_timeout=self.cfg.circuit_recovery_seconds,
            expected_exception=StripeOutage, name="stripe")
        self.rng = random.Random()
        self.stopping = asyncio.Event()
        self.health = health or Health("stripe-sink")
        self._work = asyncio.Event()
        self._consumed: dict[int, int] = {}
        self._committed: dict[int, int] = {}

    # -- stage ---------------------------------------------------------------------------
    def parse(self, value: bytes | None, partition: int, offset: int) -> Staged | str | None:
        """A Staged aggregate, None when its meter is not billed through Stripe, or a reason
        string when the message is malformed (it goes to the DLQ)."""
        try:
            msg = orjson.loads(value or b"")
            meter = msg["meter"]
            cfg = self.meters.get(meter)
            event_name = cfg.stripe_event_name if cfg else msg.get("stripe_event_name")
            if not event_name:
                return None
            return Staged(
                aggregate_id=str(msg["id"]), customer=str(msg["customer"]), meter=str(meter),
                event_name=str(event_name),
                window_start=datetime.fromisoformat(msg["window_start"]).astimezone(UTC),
                quantity=Decimal(str(msg["quantity"])), partition=partition, offset=offset)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, InvalidOperation) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def stage_batch(self, records: Sequence[Any]) -> None:
        """Stage one fetched batch; dead letters are acknowledged before offsets move."""
        staged: list[Staged] = []
        dead = 0
        for rec in records:
            parsed = self.parse(rec.value, rec.partition, rec.offset)
            if isinstance(parsed, Staged):
                staged.append(parsed)
            elif parsed is None:
                metrics.STRIPE_AGGREGATES_SKIPPED.labels("not_billed").inc()
            else:
                headers = dead_letter_headers(
                    "malformed_aggregate", parsed, rec.topic, rec.partition, rec.offset)
                await self._until_done("stage", partial(
                    self._publish, rec.key, rec.value or b"", headers, "malformed_aggregate"),
                    KAFKA_OUTAGES)
                dead += 1
        if dead:
            await self._until_done("stage", self.dlq.settle, KAFKA_OUTAGES)

        async def stage() -> int:
            async with self.pool.acquire() as conn:
                return await reports.stage(conn, staged, self.cfg.coalesce_interval_seconds,
                                           self.cfg.seal_grace_seconds)
        new = await self._until_done("stage", stage, PG_OUTAGES)
        if new is None:
            return  # stopping: not staged, so not consumed either
        metrics.STRIPE_AGGREGATES_STAGED.inc(new)
        if len(staged) > new:
            metrics.STRIPE_AGGREGATES_SKIPPED.labels("already_staged").inc(len(staged) - new)
        for rec in records:
            self._consumed[rec.partition] = max(self._consumed.get(rec.partition, 0), rec.offset + 1)

    async def commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit, per partition, up to the first aggregate Stripe has not finished with."""
        async with self.pool.acquire() as conn:
            floor = await reports.unfinished_offset_floor(conn)
        offsets = {}
        for tp in consumer.assignment():
            if tp.partition not in self._consumed:
                continue
            target = min(self._consumed[tp.partition], floor.get(tp.partition, 1 << 62))
            if target > self._committed.get(tp.partition, -1):
                offsets[tp] = target
        if offsets:
            await consumer.commit(offsets)
            self._committed.update({tp.partition: o for tp, o in offsets.items()})

    async def consume_loop(self) -> None:
        k = self.settings.kafka
        consumer = AIOKafkaConsumer(k.aggregates_topic, **aiokafka_config(
            k, group_id=self.cfg.consumer_group, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 5),
        ))
        async def start() -> bool:
            await consumer.start()
            return True

        if not await self._until_done("stage", start, KAFKA_OUTAGES, base_s=1.0):
            return  # stopped before the broker answered
        last_commit = 0.0
        lag = ConsumerLag(self.cfg.consumer_group, k.aggregates_topic)
        try:
            async with publishing(lag, consumer) as highwater:
                while not self.stopping.is_set():
                    batches = await self._until_done("stage", lambda: consumer.getmany(
                        timeout_ms=self.cfg.poll_interval_ms, max_records=5000), KAFKA_OUTAGES)
                    lag.fetched_batches(batches or {}, time.time())
                    records = [r for recs in (batches or {}).values() for r in recs]
                    if records:
                        # Staged (or the sink stops) before the next fetch: offsets never pass
                        # a record that was fetched but not staged.
                        await self.stage_batch(records)
                    lag.delivered_batches(batches or {}, highwater, time.time())  # staged
                    if time.monotonic() - last_commit >= 1.0:
                        last_commit = time.monotonic()
                        try:
                            await self.commit(consumer)
                        except POSTGRES_ERRORS as exc:  # the floor query: reported, retried in 1 s
                            self.health.down(POSTGRES, exc)
                        except Exception as exc:  # noqa: BLE001 - a rebalance; next commit covers it
                            log.warning("offset commit failed (%s); retrying", type(exc).__name__)
                            self._committed.clear()
                        assigned = {tp.partition for tp in consumer.assignment()}
                        for p in set(self._consumed) - assigned:  # revoked: its new owner resumes
                            self._consumed.pop(p, None)
                            self._committed.pop(p, None)
        finally:
            with contextlib.suppress(Exception):
                await self.commit(consumer)
            await consumer.stop()

    # -- seal ----------------------------------------------------------------------------
    async def seal_loop(self) -> None:
        async def seal() -> bool:
            async with self.pool.acquire() as conn:
                return bool(await reports.seal_due(conn, datetime.now(UTC)))

        while not self.stopping.is_set():
            if await self._until_done("seal", seal, PG_OUTAGES):
                self._work.set()
            await self._pause(min(0.5, max(0.05, self.cfg.seal_grace_seconds / 4)))

    # -- send ----------------------------------------------------------------------------
    async def send_loop(self) -> None:
        while not self.stopping.is_set():
            self.health.beat("send")
            if self.breaker.opened:
                metrics.STRIPE_CIRCUIT_OPEN.set(1)
                await self._pause(max(0.05, self.breaker.open_remaining))
                continue
            closed = self.breaker.closed
            metrics.STRIPE_CIRCUIT_OPEN.set(0 if closed else 1)
            # half-open: one probe request until Stripe answers again
            limit = self.cfg.max_concurrency * self.transport.batch_size if closed else 1

            async def claim(limit: int = limit) -> list[Claimed]:
                async with self.pool.acquire() as conn:
                    return await reports.claim(conn, limit, self.cfg.lease_seconds,
                                               self.transport.name)
            claimed = await self._until_done("send", claim, PG_OUTAGES)
            if not claimed:
                self._work.clear()
                await self._pause(self.cfg.poll_interval_ms / 1000, self._work)
                continue
            await self.send_claimed(claimed)

    async def send_claimed(self, claimed: Sequence[Claimed]) -> None:
        """Send leased reports and record every outcome."""
        unmapped = [c for c in claimed if not c.stripe_customer_id]
        ready = [c for c in claimed if c.stripe_customer_id]
        outcomes: list[tuple[Claimed, Result]] = [
            (c, Result("reject", code="no_stripe_customer",
                       message=f"customer {c.customer!r} has no stripe_customer_id"))
            for c in unmapped]
        if self.transport.batch_size == 1:
            lanes: dict[tuple[str, str], list[Claimed]] = defaultdict(list)
            for c in ready:
                lanes[(c.customer, c.meter)].append(c)
            # one lane per (customer, meter): its reports go one after the other
            results = await asyncio.gather(*(self._send_lane(lane) for lane in lanes.values()))
            outcomes += [o for lane in results for o in lane]
        else:
            size = self.transport.batch_size
            chunks = [ready[i:i + size] for i in range(0, len(ready), size)]
            results = await asyncio.gather(*(self._send(chunk) for chunk in chunks))
            outcomes += [o for chunk in results for o in chunk]
        # Stripe has answered: record its verdicts before anything else (a retry after an
        # outage re-sends a rejected report's dead letter at worst, never the report).
        await self._until_done("send", lambda: self.record(outcomes), OUTAGES)

    async def _send_lane(self, lane: Sequence[Claimed]) -> list[tuple[Claimed, Result]]:
        out: list[tuple[Claimed, Result]] = []
        for c in lane:
            out += await self._send([c])
        return out

    async def _send(self, batch: Sequence[Claimed]) -> list[tuple[Claimed, Result]]:
        events = [self.meter_event(c) for c in batch]
        name = self.transport.name
        try:
            async with self.limiter:
                started = time.perf_counter()
                try:
                    results = await self.breaker.call_async(self._guarded_send, events)
                except StripeOutage as exc:
                    results = exc.args[0]
                metrics.STRIPE_REQUEST_DURATION.labels(name).observe(time.perf_counter() - started)
                metrics.STRIPE_REQUESTS.labels(name, results[0].outcome).inc()
        except CircuitBreakerError:  # no request was made
            results = [Result("retry", code="circuit_open", message="circuit breaker open",
                              retry_after=self.breaker.open_remaining)] * len(batch)
        return list(zip(batch, results, strict=True))

    async def _guarded_send(self, events: Sequence[MeterEvent]) -> list[Result]:
        results = await self.transport.send(events)
        if any(r.outage for r in results):
            raise StripeOutage(results)
        return results

    def meter_event(self, c: Claimed) -> MeterEvent:
        cfg = self.meters.get(c.meter)
        assert c.stripe_customer_id is not None
        return MeterEvent(
            identifier=c.identifier, event_name=c.event_name,
            customer_key=cfg.stripe_customer_key if cfg else "stripe_customer_id",
            stripe_customer_id=c.stripe_customer_id,
            value_key=cfg.stripe_value_key if cfg else "value",
            value=c.quantity, timestamp=reports.stripe_timestamp(
                c.bucket_start, datetime.now(UTC), max(self.cfg.coalesce_interval_seconds,
                                                       self.window_seconds)))

    async def record(self, outcomes: Sequence[tuple[Claimed, Result]]) -> None:
        """Persist outcomes; rejected reports reach the DLQ before they are marked."""
        accepted = [(c.id, r.request_id) for c, r in outcomes if r.kind == "accepted"]
        retries = [(c.id, backoff_delay(c.attempts, self.cfg.retry_base_seconds,
                                        self.cfg.retry_max_seconds, r.retry_after, self.rng),
                    r.code, r.message) for c, r in outcomes if r.kind == "retry"]
        rejected = [(c, r) for c, r in outcomes if r.kind == "reject"]
        async with self.pool.acquire() as conn:
            if rejected:
                for c, r in rejected:
                    await self._dead_letter(conn, c, r)
                await self.dlq.settle()
            await reports.mark_rejected(conn, [(c.id, r.code, r.message) for c, r in rejected])
            await reports.mark_retry(conn, retries)
            await reports.mark_accepted(conn, accepted)
            if accepted:
                lags = await conn.fetch(
                    """
                    SELECT extract(epoch FROM now() - a.created_at)::float8 AS lag
                    FROM stripe_report_items i JOIN window_aggregates a ON a.id = i.aggregate_id
                    WHERE i.report_id = ANY($1::bigint[])
                    """, [a[0] for a in accepted])
                metrics.observe_many(metrics.DEBIT_TO_STRIPE_LATENCY, [r["lag"] for r in lags])
        metrics.STRIPE_EVENTS_ACCEPTED.inc(len(accepted))
        for _, _, code, _ in retries:
            metrics.STRIPE_RETRIES.labels(code or "unknown").inc()
        for _, r in rejected:
            metrics.STRIPE_REPORTS_REJECTED.labels(r.code or "unknown").inc()
            log.warning("Stripe refused a report: %s %s", r.code, r.message)

    async def _dead_letter(self, conn: asyncpg.Connection, c: Claimed, r: Result) -> None:
        ids = await reports.members(conn, c.id)
        body = orjson.dumps({
            "report_id": c.id, "identifier": c.identifier, "customer": c.customer,
            "meter": c.meter, "event_name": c.event_name,
            "stripe_customer_id": c.stripe_customer_id, "value": str(c.quantity),
            "timestamp": int(c.bucket_start.timestamp()), "aggregate_ids": ids,
        })
        headers = dead_letter_headers(
            r.code or "stripe_rejected", r.message or "", self.settings.kafka.aggregates_topic,
            None, None, **{"stripe.error_code": r.code, "stripe.request_id": r.request_id,
                           "report_id": c.id, "identifier": c.identifier})
        await self._publish(c.customer.encode(), body, headers, r.code or "stripe_rejected")

    async def _publish(self, key: bytes | None, value: bytes, headers: list[Any],
                       reason: str) -> None:
        self.dlq.publish(key, value, headers, reason)  # DlqUnavailable: retried by the caller

    # -- gauges --------------------------------------------------------------------------
    async def gauge_loop(self) -> None:
        async def backlog() -> dict[str, Any]:
            async with self.pool.acquire() as conn:
                return dict(await reports.backlog(conn))

        while not self.stopping.is_set():
            b = await self._until_done("gauges", backlog, PG_OUTAGES)
            if b is not None:
                for status, n in b["counts"].items():
                    metrics.STRIPE_UNFINISHED_REPORTS.labels(status).set(n)
                metrics.STRIPE_OLDEST_UNSENT_AGE.set(b["oldest_sealed_age_seconds"])
            await self._pause(2.0)

    async def _until_done(
        self, loop: str, attempt: Callable[[], Awaitable[T]],
        outages: dict[type[BaseException], str], base_s: float = 0.1,
    ) -> T | None:
        """`attempt()` until it succeeds, waiting out `outages` (the dependencies it uses);
        None once stopping."""
        return await self.health.retrying(attempt, self.stopping, retry_on=outages, loop=loop,
                                          base_s=base_s)

    # -- lifecycle -----------------------------------------------------------------------
    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        _, pending = await asyncio.wait(waits, timeout=seconds,
                                        return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    async def run(self) -> None:
        loops = [self.consume_loop(), self.seal_loop(), self.send_loop(), self.gauge_loop()]
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # a loop that died takes the sink down: better than half a sink
        finally:
            self.stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)


async def start_sink(
    settings: Settings, health: Health | None = None,
) -> tuple[StripeSink, asyncio.Task[None]]:
    """Start a sink in this event loop (for `meterline dev` and tests); stop it with
    `await stop_sink(sink, task)`."""
    health = health or Health("stripe-sink", stall_after_s=300)
    never = asyncio.Event()
    pool = await health.retrying(lambda: create_pool(settings.database_url), never,
                                 retry_on=PG_OUTAGES, loop="stage")
    assert pool is not None
    k = settings.kafka
    dlq = DlqWriter(k, k.aggregates_dlq_topic, k.aggregates_topic, health=health)
    sink = StripeSink(settings, pool, make_transport(settings), dlq, health)
    return sink, asyncio.create_task(sink.run())


async def stop_sink(sink: StripeSink, task: asyncio.Task[None]) -> None:
    sink.stopping.set()
    with contextlib.suppress(Exception):
        await task
    await sink.transport.close()
    with contextlib.suppress(DlqUnavailable):  # offsets were not committed past them
        await sink.dlq.settle(attempts=1)
    sink.dlq.close()
    await sink.pool.close()


def run(settings: Settings) -> None:
    """Blocking entry point of `meterline stripe-sink`; SIGTERM/SIGINT stop it cleanly."""
    health = Health("stripe-sink", stall_after_s=300)
    metrics.serve(settings.stripe.metrics_port, health.probes())

    async def main() -> None:
        sink, task = await start_sink(settings, health)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stopping.set)
        log.info("stripe sink: %s transport, %s req/s, coalescing %ss, %s",
                 settings.stripe.transport, settings.stripe.rate_limit_per_second,
                 settings.stripe.coalesce_interval_seconds,
                 settings.stripe.api_base or "api.stripe.com")
        try:
            await asyncio.wait([task])
        finally:
            await stop_sink(sink, task)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    asyncio.run(main())
