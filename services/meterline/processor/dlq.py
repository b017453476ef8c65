"""Dead-letter writer: rejected records to a DLQ topic with the reason and origin in headers.

Used by the processor (`usage.events.dlq`), the Stripe sink (`usage.aggregates.dlq`) and
the ledger consumer (`stripe.events.dlq`). A rejected record's offset may only be
committed after its DLQ copy is acknowledged by the broker: `settle()` waits for that,
and re-sends anything that failed, before offsets move — nothing is dropped.

Failure contract (the processor stops the partition and retries on it): `write`,
`publish` and `settle` raise `DlqUnavailable`, never another exception, when a dead
letter cannot be queued or confirmed. The producer heals itself
(`meterline.kafka.producer`): a fenced or timed-out one is replaced and what it held is
re-sent on the next `settle`.

A dead letter larger than the DLQ topic takes (`meterline.kafka.limits`) is stored as a
truncated copy: reason `oversized`, plus the original's SHA-256, length and reason in
headers, so it can still be identified and matched against its source.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException, Message

from meterline import metrics
from meterline.config import KafkaConfig
from meterline.core.events import Reason, Rejection
from meterline.health import KAFKA, Health
from meterline.kafka.limits import RECORD_OVERHEAD_BYTES, topic_max_bytes
from meterline.kafka.producer import Headers, HealingProducer, producer_config

__all__ = ["DlqUnavailable", "DlqWriter", "Headers", "dead_letter_headers", "dlq_headers",
           "fit_dead_letter"]

# A full local queue is served this long before a write gives up (DlqUnavailable).
_QUEUE_WAIT_S = 1.0


class DlqUnavailable(Exception):
    """DLQ messages could not be queued or delivered; offsets must not advance past them."""


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


def _record_bytes(key: bytes | None, headers: Headers) -> int:
    """Bytes of a record besides its value, as librdkafka and the broker count them."""
    h = sum(len(n) + len(v or b"") + 10 for n, v in headers)  # + two varints per header
    return RECORD_OVERHEAD_BYTES + len(key or b"") + h


def fit_dead_letter(
    key: bytes | None, value: bytes, headers: Headers, max_bytes: int,
) -> tuple[bytes | None, bytes, Headers] | None:
    """A (key, value, headers) that fits in `max_bytes`, or None when the record fits as is.

    Pure. The copy keeps the original's origin headers and detail; its reason becomes
    `oversized` (the original reason moves to `meterline.original.reason`), and the
    original's length and SHA-256 identify it. A key too large to leave room is dropped
    (its length and SHA-256 are kept too).
    """
    if len(value) + _record_bytes(key, headers) <= max_bytes:
        return None
    original = dict(headers).get("meterline.reason")
    kept = [(n, v) for n, v in headers if n != "meterline.reason"]
    extra: Headers = [
        ("meterline.reason", Reason.OVERSIZED.value.encode()),
        ("meterline.original.reason", original if isinstance(original, bytes) else b""),
        ("meterline.truncated", b"true"),
        ("meterline.original.length", str(len(value)).encode()),
        ("meterline.original.sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    if key is not None and len(key) > max_bytes // 4:
        extra += [("meterline.original.key_length", str(len(key)).encode()),
                  ("meterline.original.key_sha256", hashlib.sha256(key).hexdigest().encode())]
        key = None
    out = extra + kept
    room = max(0, max_bytes - _record_bytes(key, out))
    return key, value[:room], out


class DlqWriter:
    """One DLQ topic's producer; see the module docstring for its contract."""

    def __init__(self, kafka: KafkaConfig, dlq_topic: str, source_topic: str, *,
                 health: Health | None = None, check_limits: bool = True) -> None:
        self.topic = dlq_topic
        self.source_topic = source_topic
        self.health = health
        self.message_timeout_s = kafka.producer_message_timeout_ms / 1000
        self.max_bytes = kafka.producer_message_max_bytes
        if check_limits:
            self.max_bytes = topic_max_bytes(kafka, dlq_topic, self.max_bytes)
        self._producer = HealingProducer(
            producer_config(kafka, f"dlq-{dlq_topic}", **{"linger.ms": 20}), f"dlq-{dlq_topic}")
        # Dead letters whose delivery failed, re-sent by settle(); a deque because delivery
        # reports append from whichever thread serves them (settle flushes in an executor).
        self._failed: deque[tuple[bytes | None, bytes, Headers, str]] = deque()

    @property
    def replacements(self) -> int:
        return self._producer.replacements

    def write(self, partition: int, key: bytes | None, rejections: Iterable[Rejection]) -> int:
        """Queue the dead letters of one partition's rejections; raise DlqUnavailable if one
        cannot be queued (those before it are queued: a retry may dead-letter them twice)."""
        n = 0
        for r in rejections:
            self.publish(key, r.payload, dlq_headers(r, self.source_topic, partition),
                         r.reason.value)
            n += 1
        if n:
            self._producer.poll(0)
        return n

    def publish(
        self, key: bytes | None, value: bytes, headers: Headers, reason: str
    ) -> None:
        """Queue one dead letter; `settle()` confirms it (counted by topic and reason)."""
        fitted = fit_dead_letter(key, value, headers, self.max_bytes)
        if fitted is not None:
            key, value, headers = fitted
            reason = Reason.OVERSIZED.value
            metrics.DLQ_TRUNCATED.labels(self.topic).inc()
        self._queue(key, value, headers, reason)

    def _queue(self, key: bytes | None, value: bytes, headers: Headers, reason: str) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._failed.append((key, value, headers, reason))
            else:
                metrics.DLQ_MESSAGES.labels(self.topic, reason).inc()

        try:
            self._producer.produce(self.topic, value, key, headers, on_delivery,
                                   queue_wait_s=_QUEUE_WAIT_S)
        except (BufferError, KafkaException) as exc:
            self._unavailable(exc)
            raise DlqUnavailable(f"{self.topic}: cannot queue a dead letter: {exc!r}") from exc

    async def settle(self, timeout: float | None = None, attempts: int = 3) -> None:
        """Wait until every DLQ message written so far is acknowledged; retry failures.

        Each attempt waits up to `timeout` (default: the producer's message timeout plus
        5 s, so every message gets its verdict); raises DlqUnavailable when attempts run out.
        """
        wait_s = timeout if timeout is not None else self.message_timeout_s + 5
        loop = asyncio.get_running_loop()
        remaining = 0
        for _ in range(attempts):
            remaining = await loop.run_in_executor(None, self._producer.flush, wait_s)
            if remaining == 0 and not self._failed:
                if self.health is not None:
                    self.health.up(KAFKA)
                return
            self._producer.heal()  # a fenced/timed-out producer: re-send on a fresh one
            for _ in range(len(self._failed)):
                failed = self._failed.popleft()
                try:
                    self._queue(*failed)
                except DlqUnavailable:
                    self._failed.appendleft(failed)  # kept for the next settle
                    raise
        exc = DlqUnavailable(f"{self.topic}: {remaining + len(self._failed)} dead letters "
                             f"undelivered after {attempts} attempts")
        self._unavailable(exc)
        raise exc

    async def reachable(self, timeout_s: float = 5.0) -> bool:
        """Ask the broker for the DLQ topic's metadata: is Kafka there (readiness probe)?"""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._producer.list_topics, self.topic, timeout_s)
        except KafkaException as exc:
            self._unavailable(exc)
            return False
        if self.health is not None:
            self.health.up(KAFKA)
        return True

    def _unavailable(self, exc: BaseException) -> None:
        if self.health is not None:
            self.health.down(KAFKA, exc)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout_s)
