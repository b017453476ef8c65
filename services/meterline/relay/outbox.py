"""Outbox relay: `meterline relay` — outbox rows -> Kafka, marked sent only after delivery.

Delivery is at-least-once (a crash between the broker's ack and the `sent_at`
update re-sends the batch); every message carries its outbox id in the
`meterline.outbox_id` header and a deterministic id in its payload, so
consumers can drop repeats. The producer is idempotent (confluent-kafka), so
its own retries never duplicate. Several relays may run: `FOR UPDATE SKIP
LOCKED` gives each row to one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
from confluent_kafka import KafkaError, Message, Producer

from meterline import metrics
from meterline.config import Settings
from meterline.metrics import run_service
from meterline.storage.db import create_pool

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


class DeliveryFailed(Exception):
    pass


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, bootstrap_servers: str, batch_size: int = 5000) -> None:
        self.pool = pool
        self.batch_size = batch_size
        self.published = 0
        self._producer = Producer({
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        })

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

            for r in rows:
                self._produce(r["topic"], r["key"], r["payload"], r["id"], on_delivery)
            loop = asyncio.get_running_loop()
            remaining = await loop.run_in_executor(None, self._producer.flush, 30)
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
        while True:
            try:
                self._producer.produce(topic, bytes(payload), key.encode(), headers=headers,
                                       on_delivery=cb)
                return
            except BufferError:
                self._producer.poll(0.05)

    async def update_backlog_metrics(self) -> None:
        row = await self.pool.fetchrow(BACKLOG)
        metrics.OUTBOX_BACKLOG.set(row["n"])
        metrics.OUTBOX_OLDEST_AGE.set(float(row["age"] or 0))

    async def run_forever(self, poll_interval: float, stop: asyncio.Event) -> None:
        last_gauge = 0.0
        backoff = poll_interval
        while not stop.is_set():
            try:
                n = await self.relay_once()
                backoff = poll_interval
            except (DeliveryFailed, asyncpg.PostgresError, OSError) as exc:
                metrics.OUTBOX_FAILURES.inc()
                log.warning("relay batch failed, retrying: %r", exc)
                n = 0
                backoff = min(backoff * 2, 5.0)
            if time.monotonic() - last_gauge > 1:
                last_gauge = time.monotonic()
                try:
                    await self.update_backlog_metrics()
                except (asyncpg.PostgresError, OSError):
                    pass
            if n < self.batch_size:
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except TimeoutError:
                    pass


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await create_pool(settings.database_url, max_size=2)
    relay = OutboxRelay(pool, settings.kafka.bootstrap_servers, settings.relay.batch_size)
    try:
        await relay.run_forever(settings.relay.poll_interval_ms / 1000, stop)
    finally:
        await pool.close()


def run(settings: Settings) -> None:
    """Run the relay until SIGINT/SIGTERM."""
    run_service(settings.relay.metrics_port, lambda stop: serve(settings, stop))
