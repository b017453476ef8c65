"""Outbox relay: `meterline relay` — outbox rows -> Kafka, marked sent only after delivery.

Delivery is at-least-once (a crash between the broker's ack and the `sent_at`
update re-sends the batch); every message carries its outbox id in the
`meterline.outbox_id` header and a deterministic id in its payload, so
consumers can drop repeats. The producer is idempotent (confluent-kafka), so
its own retries never duplicate; a producer fenced or timed out in a broker outage is
replaced (meterline.kafka.producer) and the batch, rolled back, is sent again by the
fresh one. Several relays may run: `FOR UPDATE SKIP LOCKED` gives each row to one of them.

Outages: a Postgres or broker error rolls the batch back; the relay backs off, reports
itself not ready (`/readyz`, `meterline_dependency_up`) and resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
from confluent_kafka import KafkaError, KafkaException, Message

from meterline import metrics
from meterline.config import KafkaConfig, Settings
from meterline.health import KAFKA, POSTGRES, Health, stopped_within
from meterline.kafka.limits import producer_limits
from meterline.kafka.producer import HealingProducer, producer_config
from meterline.metrics import run_service
from meterline.storage.db import DATABASE_UNAVAILABLE, create_pool

log = logging.getLogger(__name__)

CLAIM_BATCH = """
SELECT id, topic, key, payload FROM outbox
WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""
MARK_SENT = "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])"
BACKLOG = """
SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) AS age
FROM outbox WHERE sent_at IS NULL
"""


# The database is unavailable: the batch rolled back, retry it.
POSTGRES_ERRORS = DATABASE_UNAVAILABLE


class DeliveryFailed(Exception):
    """The broker did not acknowledge the whole batch; nothing of it was marked sent."""


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, kafka: KafkaConfig, batch_size: int = 5000,
                 health: Health | None = None, *, check_limits: bool = True) -> None:
        self.pool = pool
        # What the topics the relay publishes to take, against what its producer sends
        # (a smaller topic limit is logged at start-up, kafka/limits.py).
        self.max_bytes = producer_limits(
            kafka, (kafka.aggregates_topic, kafka.balance_changes_topic),
            kafka.producer_message_max_bytes) if check_limits else {}
        self.batch_size = batch_size
        self.published = 0
        self.health = health or Health("relay")
        self._producer = HealingProducer(
            producer_config(kafka, "relay", **{"linger.ms": 5, "compression.type": "lz4"}),
            "relay")
        # Long enough for every message's verdict (delivered or timed out), so a batch
        # never rolls back while copies of it are still queued in the producer.
        self._flush_timeout_s = kafka.producer_message_timeout_ms / 1000 + 5

    @property
    def replacements(self) -> int:
        return self._producer.replacements

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were delivered and marked."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(CLAIM_BATCH, self.batch_size)
            if not rows:
                return 0
            errors: list[KafkaError] = []

            def on_delivery(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    errors.append(err)

            try:
                for r in rows:
                    self._produce(r["topic"], r["key"], r["payload"], r["id"], on_delivery)
            except (BufferError, KafkaException) as exc:
                raise DeliveryFailed(f"cannot queue: {exc!r}") from exc
            loop = asyncio.get_running_loop()
            remaining = await loop.run_in_executor(None, self._producer.flush,
                                                   self._flush_timeout_s)
            if remaining or errors:
                # Roll back: the rows stay unsent and are retried; nothing is marked sent unseen.
                raise DeliveryFailed(f"{remaining} undelivered, errors: {errors[:3]}")
            await conn.execute(MARK_SENT, [r["id"] for r in rows])
        for r in rows:
            metrics.OUTBOX_PUBLISHED.labels(r["topic"]).inc()
        self.published += len(rows)
        return len(rows)

    def _produce(
        self, topic: str, key: str, payload: bytes, outbox_id: int,
        cb: Callable[[KafkaError | None, Message], None],
    ) -> None:
        headers: list[tuple[str, str | bytes | None]] = [("meterline.outbox_id", str(outbox_id).encode())]
        self._producer.produce(topic, bytes(payload), key.encode(), headers, cb,
                               queue_wait_s=self._flush_timeout_s)

    async def update_backlog_metrics(self) -> None:
        row = await self.pool.fetchrow(BACKLOG)
        metrics.OUTBOX_BACKLOG.set(row["n"])
        metrics.OUTBOX_OLDEST_AGE.set(float(row["age"] or 0))

    async def run_forever(self, poll_interval: float, stop: asyncio.Event) -> None:
        """Relay until `stop`; an outage of either side is waited out, never fatal."""
        last_gauge = 0.0
        backoff = poll_interval
        while not stop.is_set():
            n = 0
            try:
                n = await self.relay_once()
                self.health.up(POSTGRES)
                self.health.up(KAFKA)
                backoff = poll_interval
            except DeliveryFailed as exc:
                backoff = self._failed(KAFKA, exc, backoff)
            except POSTGRES_ERRORS as exc:
                backoff = self._failed(POSTGRES, exc, backoff)
            self.health.beat("relay")
            if time.monotonic() - last_gauge > 1:
                last_gauge = time.monotonic()
                try:
                    await self.update_backlog_metrics()
                except POSTGRES_ERRORS:
                    pass  # the relay loop reports the outage
            if n < self.batch_size:
                await stopped_within(stop, backoff)

    def _failed(self, dependency: str, exc: Exception, backoff: float) -> float:
        metrics.OUTBOX_FAILURES.inc()
        self.health.down(dependency, exc)
        return min(max(backoff, 0.05) * 2, 5.0)


async def serve(settings: Settings, stop: asyncio.Event, health: Health | None = None) -> None:
    health = health or Health("relay")
    pool = await health.retrying(
        lambda: create_pool(settings.database_url, max_size=2), stop,
        retry_on=dict.fromkeys(POSTGRES_ERRORS, POSTGRES), loop="relay")
    if pool is None:
        return  # stopped before Postgres came up
    relay = OutboxRelay(pool, settings.kafka, settings.relay.batch_size, health)
    try:
        await relay.run_forever(settings.relay.poll_interval_ms / 1000, stop)
    finally:
        await pool.close()


def run(settings: Settings) -> None:
    """Run the relay until SIGINT/SIGTERM; /metrics, /healthz and /readyz on its metrics port."""
    health = Health("relay")
    run_service(settings.relay.metrics_port, lambda stop: serve(settings, stop, health),
                health.probes())
