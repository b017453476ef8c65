"""Verified Stripe events -> Kafka, with the broker's acknowledgement awaited from asyncio.

The bridge may answer 2xx only once an event is durably in Kafka, so every publish
waits for its delivery report: an idempotent confluent-kafka producer (acks=all)
whose reports are served by a dedicated poll thread and handed to the event loop
with `call_soon_threadsafe`. Nothing here blocks the loop.

Delivery is at least once, by design:
- a request that times out (or fails) is answered 503 and Stripe retries it later;
- the message we gave up on may still be delivered by librdkafka afterwards (it keeps
  trying for `message_timeout_ms`), so the topic can hold an event more than once.
Both are harmless: the downstream consumer dedupes by Stripe event id.

An idempotent producer that was fenced (PRODUCER_FENCED, e.g. after expired in-flight
messages forced an epoch bump the broker refused) or hit a fatal error never recovers,
so it is replaced by a fresh one; its queued messages fail fast (503, retried by Stripe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from meterline import metrics
from meterline.webhooks.intake import StripeEvent

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]

# A producer that reports one of these is dead for good: replace it.
_UNRECOVERABLE = frozenset({
    KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.INVALID_PRODUCER_ID_MAPPING, KafkaError._FENCED, KafkaError._FATAL,
})
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
_MIN_RESET_INTERVAL_S = 1.0


class PublishFailed(Exception):
    """The event is not known to be in Kafka: answer 503 so Stripe retries."""


def event_headers(event: StripeEvent) -> Headers:
    """Routing headers, so consumers can filter and dedupe without parsing the body."""
    return [
        ("stripe-event-type", event.event_type.encode()),
        ("stripe-event-id", event.event_id.encode()),
        ("stripe-api-version", event.api_version.encode() if event.api_version else None),
    ]


class BrokerHealth:
    """Whether the broker answered recently and nothing failed since: what /readyz reports."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._last_ok: float | None = None

    def succeeded(self, now: float) -> None:
        self._last_ok = now

    def failed(self) -> None:
        # Any failure outweighs earlier successes until the next one.
        self._last_ok = None

    def ready(self, now: float) -> bool:
        return self._last_ok is not None and now - self._last_ok <= self.stale_after_s


class _PolledProducer:
    """One producer plus the thread that serves its callbacks (delivery reports, errors)."""

    def __init__(
        self, config: dict[str, Any], on_error: Callable[[_PolledProducer, KafkaError], None]
    ) -> None:
        self.producer = Producer({**config, "error_cb": lambda err: on_error(self, err)})
        # Held by metadata probes (other threads): close() must not destroy the client under them.
        self.in_use = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="webhook-kafka-poll", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def close(self, timeout_s: float, *, purge: bool = False) -> int:
        """Deliver what is queued (or drop it at once), then release the client.

        Returns how many messages were still undelivered and dropped: their requests
        were answered 503 (or are about to be), so Stripe retries them.
        """
        if purge:
            self.producer.purge()
        remaining = int(self.producer.flush(timeout_s))
        if remaining:
            self.producer.purge()
            self.producer.poll(0)  # serve the purge reports, so no request waits on them
        self._stop.set()
        self._thread.join()
        with self.in_use:
            self.producer.close()
        return remaining


class StripeEventPublisher:
    """Publishes verified events to one topic and knows whether the broker is reachable."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        delivery_timeout_s: float,
        message_timeout_ms: int,
        probe_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic = topic
        self.delivery_timeout_s = delivery_timeout_s
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.health = BrokerHealth(stale_after_s=3 * probe_interval_s)
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": "meterline-webhook-bridge",
            "enable.idempotence": True,
            "acks": "all",
            # Webhooks arrive one by one; 1 ms still batches the concurrent ones.
            "linger.ms": 1,
            "message.timeout.ms": message_timeout_ms,
            # Bounded memory in an outage: a full local queue answers 503 at once.
            "queue.buffering.max.kbytes": 65_536,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _PolledProducer | None = None
        self._last_reset = float("-inf")
        self._probe_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[int]] = set()
        self._was_ready: bool | None = None  # None: log the first probe's verdict

    async def start(self) -> None:
        """Create the producer and start probing the broker (call from the serving loop)."""
        self._loop = asyncio.get_running_loop()
        self._current = _PolledProducer(self._config, self._on_error)
        await self._probe_and_record()  # ready at once when the broker is up
        self._probe_task = asyncio.create_task(self._probe_forever())

    def ready(self) -> bool:
        ready = self.health.ready(self.clock())
        metrics.WEBHOOK_BROKER_READY.set(1 if ready else 0)
        return ready

    async def publish(self, event: StripeEvent, raw: bytes) -> None:
        """Return once the broker has acknowledged `raw`; raise PublishFailed otherwise."""
        assert self._loop is not None and self._current is not None, "start() first"
        handle = self._current
        done: asyncio.Future[None] = self._loop.create_future()
        try:
            handle.producer.produce(
                self.topic, raw, event.key.encode(), headers=event_headers(event),
                on_delivery=self._reporter(done, handle),
            )
        except BufferError as exc:
            raise PublishFailed("local producer queue full") from exc
        except KafkaException as exc:
            raise PublishFailed(str(exc)) from exc
        try:
            await asyncio.wait_for(done, self.delivery_timeout_s)
        except TimeoutError:
            self.health.failed()
            raise PublishFailed(f"no ack within {self.delivery_timeout_s:g} s") from None

    def _reporter(
        self, done: asyncio.Future[None], handle: _PolledProducer
    ) -> Callable[[KafkaError | None, Message], None]:
        loop = self._loop
        assert loop is not None

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:  # poll thread
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(self._settle, done, err, handle)

        return on_delivery

    def _settle(
        self, done: asyncio.Future[None], err: KafkaError | None, handle: _PolledProducer
    ) -> None:
        if err is None:
            self.health.succeeded(self.clock())
            if not done.done():  # done = we already gave up (timeout) and answered 503
                done.set_result(None)
            return
        if err.code() not in _PURGED:
            self.health.failed()
        if err.code() in _UNRECOVERABLE or err.fatal():
            self._replace(handle, err)
        if not done.done():
            done.set_exception(PublishFailed(err.str()))

    def _on_error(self, handle: _PolledProducer, err: KafkaError) -> None:  # poll thread
        if not (err.fatal() or err.code() == KafkaError._ALL_BROKERS_DOWN):
            return  # transient (a dropped connection): librdkafka reconnects by itself
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_broker_error, handle, err)

    def _on_broker_error(self, handle: _PolledProducer, err: KafkaError) -> None:
        self.health.failed()
        if err.fatal():
            self._replace(handle, err)

    def _replace(self, handle: _PolledProducer, err: KafkaError) -> None:
        """Swap in a fresh producer for `handle` (once, however many reports say it is dead)."""
        if handle is not self._current or self._loop is None:
            return
        wait = _MIN_RESET_INTERVAL_S - (self.clock() - self._last_reset)
        if wait > 0:  # a broker that fences every new producer must not make us spin
            self._loop.call_later(wait, self._replace, handle, err)
            return
        log.warning("Kafka producer unusable (%s); replacing it", err.str())
        metrics.WEBHOOK_PRODUCER_RESETS.inc()
        self._last_reset = self.clock()
        self._current = _PolledProducer(self._config, self._on_error)
        retire = asyncio.create_task(asyncio.to_thread(handle.close, 1.0, purge=True))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)

    async def _probe_forever(self) -> None:
        """Ask the broker for the topic's metadata now and then, so /readyz works when idle."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self._probe_and_record()

    async def _probe_and_record(self) -> None:
        assert self._current is not None
        if await asyncio.to_thread(self._probe, self._current):
            self.health.succeeded(self.clock())
        else:
            self.health.failed()
        ready = self.ready()
        if ready != self._was_ready:  # log transitions only, never per request
            log.log(logging.INFO if ready else logging.WARNING, "broker %s for topic %s",
                    "reachable" if ready else "UNREACHABLE", self.topic)
            self._was_ready = ready

    def _probe(self, handle: _PolledProducer) -> bool:
        try:
            with handle.in_use:
                meta = handle.producer.list_topics(
                    self.topic, timeout=min(self.probe_interval_s, 5.0))
        except (KafkaException, RuntimeError):  # RuntimeError: closed meanwhile
            return False
        topic = meta.topics.get(self.topic)
        return topic is not None and topic.error is None and bool(topic.partitions)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop probing and deliver what is still queued (bounded by `timeout_s`)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        handle, self._current = self._current, None
        if handle is not None:
            remaining = await asyncio.to_thread(handle.close, timeout_s)
            if remaining:
                log.warning("%d webhook events undelivered at shutdown (answered 503)", remaining)
