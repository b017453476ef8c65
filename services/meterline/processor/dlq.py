"""Dead-letter writer: rejected events to `usage.events.dlq` with the reason and origin in headers.

Uses confluent-kafka's idempotent producer (aiokafka's fails on the embedded
broker). A rejected record's offset may only be checkpointed after its DLQ
copy is acknowledged by the broker: `settle()` waits for that, and re-sends
anything that failed, before a flush commits offsets — nothing is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from confluent_kafka import KafkaError, Message, Producer

from meterline import metrics
from meterline.core.events import Rejection

Headers = list[tuple[str, str | bytes | None]]


class DlqUnavailable(Exception):
    """DLQ messages could not be delivered; offsets must not advance past them."""


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int | None,
                        offset: int | None, **extra: object) -> Headers:
    """The headers every meterline dead letter carries (schemas/dlq-headers.md);
    `extra` adds `meterline.<name>` headers (None values are left out)."""
    headers: Headers = [
        ("meterline.reason", reason.encode()),
        ("meterline.detail", detail[:1000].encode()),
        ("meterline.original.topic", topic.encode()),
        ("meterline.original.partition", str(partition).encode()),
        ("meterline.original.offset", str(offset).encode()),
        ("meterline.rejected_at_ms", str(int(time.time() * 1000)).encode()),
    ]
    headers += [(f"meterline.{k}", str(v)[:1000].encode()) for k, v in extra.items() if v is not None]
    return headers


def dlq_headers(rejection: Rejection, topic: str, partition: int) -> Headers:
    return dead_letter_headers(
        rejection.reason.value, rejection.detail, topic, partition, rejection.offset,
        **{"original.batch_index": rejection.batch_index})


class DlqWriter:
    def __init__(self, bootstrap_servers: str, dlq_topic: str, source_topic: str) -> None:
        self.topic = dlq_topic
        self.source_topic = source_topic
        self._producer = Producer({
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "message.timeout.ms": 30_000,
        })
        self._failed: list[tuple[bytes | None, bytes, Headers, str]] = []

    def write(self, partition: int, key: bytes | None, rejections: Iterable[Rejection]) -> int:
        n = 0
        for r in rejections:
            headers = dlq_headers(r, self.source_topic, partition)
            self.publish(key, r.payload, headers, r.reason.value)
            n += 1
        if n:
            self._producer.poll(0)
        return n

    def publish(
        self, key: bytes | None, value: bytes, headers: Headers, reason: str
    ) -> None:
        """Queue one dead letter; `settle()` confirms it (counted by topic and reason)."""
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._failed.append((key, value, headers, reason))
            else:
                metrics.DLQ_MESSAGES.labels(self.topic, reason).inc()

        while True:
            try:
                self._producer.produce(self.topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve callbacks and retry
                self._producer.poll(0.05)

    async def settle(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Wait until every DLQ message written so far is acknowledged; retry failures."""
        loop = asyncio.get_running_loop()
        for _ in range(attempts):
            remaining = await loop.run_in_executor(None, self._producer.flush, timeout)
            if remaining == 0 and not self._failed:
                return
            retry, self._failed = self._failed, []
            for key, value, headers, reason in retry:
                self.publish(key, value, headers, reason)
        raise DlqUnavailable(f"{len(self._failed)} DLQ messages undelivered")

    def close(self) -> None:
        self._producer.flush(10)
