"""One way to create, use and replace a confluent-kafka producer.

Every meterline producer (DLQ writers, the outbox relay, the webhook bridge, the Stripe
sink's DLQ) is a `HealingProducer`. Its rule, the reason it exists:

    A producer that reported an unrecoverable error is never used again.

Unrecoverable = fenced (PRODUCER_FENCED, INVALID_PRODUCER_EPOCH, ...), fatal, or — for an
idempotent producer — a message that timed out: on the embedded Tansu broker such a
producer is fenced for every later delivery (its sequence numbers can no longer be
trusted), and on Apache Kafka replacing it costs one InitProducerId. The error is noted
when it is reported (a delivery report or the error callback, i.e. inside `poll`), and the
producer is swapped at the next safe point (`produce` or an explicit `heal`, both on the
thread that produces, so no message can slip into a producer being retired): the old one's
queue is purged, so every message it held gets a failed delivery report and its owner
re-queues it on the new producer. Purged in-flight messages may still have reached the
broker, so a replacement can duplicate a message: every meterline topic is consumed
at-least-once with a dedupe key, which is what makes replacement safe.

A broker that fences every new producer must not make us spin: replacements are at least
`min_replace_interval_s` apart. Each replacement is counted in
`meterline_producer_replacements_total{client}` and logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from meterline import metrics
from meterline.config import KafkaConfig
from meterline.kafka.security import librdkafka_config

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
DeliveryCallback = Callable[[KafkaError | None, Message], None]

# Reported by a producer that is dead for good.
_FENCED = frozenset({
    KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.INVALID_PRODUCER_ID_MAPPING, KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError._FENCED, KafkaError._FATAL,
})
# What the purge of a replaced producer reports: not a sign of the new one's health.
PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


def is_unrecoverable(err: KafkaError, *, idempotent: bool) -> bool:
    """True when a producer that reported `err` must be replaced, not retried."""
    if err.fatal() or err.code() in _FENCED:
        return True
    return idempotent and err.code() == KafkaError._MSG_TIMED_OUT


def producer_config(kafka: KafkaConfig, client: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings every meterline producer shares (brokers and security from
    `meterline.kafka.security`); `overrides` adds its own
    (`linger.ms`, `compression.type`, ...). `message.max.bytes` and `message.timeout.ms`
    always come from the configuration (docs/operations.md, "Producers")."""
    return librdkafka_config(kafka, **{
        "client.id": f"meterline-{client}",
        "enable.idempotence": True,
        "acks": "all",
        "message.max.bytes": kafka.producer_message_max_bytes,
        "message.timeout.ms": kafka.producer_message_timeout_ms,
        **overrides,
    })


class HealingProducer:
    """A producer that replaces itself after an unrecoverable error (see the module doc).

    Thread-safe like the librdkafka client it wraps: `produce` may run on the event loop
    while `flush` runs in an executor thread. With `poll_thread=True` a daemon thread
    serves delivery reports (for callers that never call `poll`/`flush` themselves).
    `on_error` sees every error librdkafka reports outside deliveries (e.g. all brokers
    down), from the thread that serves them.
    """

    def __init__(
        self,
        config: dict[str, Any],
        client: str,
        *,
        min_replace_interval_s: float = 1.0,
        poll_thread: bool = False,
        on_error: Callable[[KafkaError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.config = config
        self.idempotent = bool(config.get("enable.idempotence"))
        self.max_message_bytes = int(config.get("message.max.bytes", 1_000_000))
        self.min_replace_interval_s = min_replace_interval_s
        self.clock = clock
        self.replacements = 0
        self._poll_thread = poll_thread
        self._on_error_hook = on_error
        self._lock = threading.Lock()
        self._dead: KafkaError | None = None
        self._last_replace = float("-inf")
        self._stop_polling: threading.Event | None = None
        self._producer = self._new()

    # --- the producer in use -------------------------------------------------------

    def _new(self) -> Producer:
        producer = Producer({**self.config, "error_cb": self._on_error})
        if self._poll_thread:
            stop = threading.Event()
            threading.Thread(target=_serve, args=(producer, stop), daemon=True,
                             name=f"{self.client}-kafka-poll").start()
            self._stop_polling = stop
        return producer

    @property
    def dead(self) -> KafkaError | None:
        """The unrecoverable error of the current producer, until it is replaced."""
        return self._dead

    def note(self, err: KafkaError | None) -> None:
        """Look at a delivery report's error: an unrecoverable one dooms the producer."""
        if err is not None and err.code() not in PURGED and is_unrecoverable(
                err, idempotent=self.idempotent):
            self._dead = self._dead or err

    def _on_error(self, err: KafkaError) -> None:  # librdkafka's error callback (in poll)
        if err.fatal():
            self._dead = self._dead or err
        if self._on_error_hook is not None:
            self._on_error_hook(err)

    def heal(self) -> bool:
        """Replace the producer if it reported an unrecoverable error; True if replaced.

        The old producer's queue is purged and its reports served here, so the callbacks
        of everything it held run (with a purge error) before this returns.
        """
        with self._lock:
            err = self._dead
            if err is None or self.clock() - self._last_replace < self.min_replace_interval_s:
                return False
            old, stop = self._producer, self._stop_polling
            self._dead = None
            self._last_replace = self.clock()
            self._producer = self._new()
            self.replacements += 1
        metrics.PRODUCER_REPLACEMENTS.labels(self.client).inc()
        log.warning("%s: Kafka producer unusable (%s); replaced it, re-queuing what it held",
                    self.client, err.str())
        _retire(old, stop)
        return True

    # --- what callers use ----------------------------------------------------------

    def produce(
        self, topic: str, value: bytes, key: bytes | None, headers: Headers,
        on_delivery: DeliveryCallback, *, queue_wait_s: float = 0.0,
    ) -> None:
        """Queue one message; its report goes to `on_delivery` (and is looked at first).

        A full local queue is served for up to `queue_wait_s` before BufferError escapes;
        KafkaException (too large, fatal) escapes as raised.
        """
        self.heal()

        def report(err: KafkaError | None, msg: Message) -> None:
            self.note(err)
            on_delivery(err, msg)

        deadline = self.clock() + queue_wait_s
        while True:
            producer = self._producer
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=report)
                return
            except BufferError:
                if self.clock() >= deadline:
                    raise
                producer.poll(0.05)
            except KafkaException as exc:
                self.note(exc.args[0])
                if not self.heal():
                    raise

    def poll(self, timeout_s: float = 0.0) -> int:
        return int(self._producer.poll(timeout_s))

    def flush(self, timeout_s: float) -> int:
        """Wait for every queued message's report; return how many are still queued.

        Never replaces the producer (it may run in another thread than `produce`): call
        `heal()` afterwards, from the producing thread, before re-queuing failures."""
        return int(self._producer.flush(timeout_s))

    def list_topics(self, topic: str, timeout_s: float) -> Any:
        """Topic metadata from the broker (a cheap "is it there" probe)."""
        return self._producer.list_topics(topic, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued within `timeout_s`; purge the rest (its owners get failed
        reports). Returns how many were purged."""
        producer = self._producer
        remaining = int(producer.flush(timeout_s))
        if remaining:
            producer.purge()
            producer.poll(0)
        if self._stop_polling is not None:
            self._stop_polling.set()
        return remaining


def _serve(producer: Producer, stop: threading.Event) -> None:
    while not stop.is_set():
        producer.poll(0.1)


def _retire(producer: Producer, stop: threading.Event | None) -> None:
    """Fail everything a dead producer holds (its callbacks re-queue it) and let it go."""
    if stop is not None:
        stop.set()
    producer.purge()
    producer.flush(1.0)  # serves the purge reports; nothing can be delivered any more
