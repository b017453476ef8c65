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

A producer that was fenced or timed out is replaced (meterline.kafka.producer): the
messages it held fail fast (503, retried by Stripe) and the next publish uses a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message

from meterline import metrics
from meterline.config import KafkaConfig
from meterline.health import Health
from meterline.kafka.limits import producer_limits
from meterline.kafka.producer import PURGED, Headers, HealingProducer, producer_config
from meterline.webhooks.intake import StripeEvent

log = logging.getLogger(__name__)

CLIENT = "webhook-bridge"


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


class StripeEventPublisher:
    """Publishes verified events to one topic and knows whether the broker is reachable."""

    def __init__(
        self,
        kafka: KafkaConfig,
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
        # Liveness (/healthz): the probe loop keeps completing rounds (each is bounded by
        # its metadata timeout), so the bridge's event loop and producer threads are not stuck.
        self.liveness = Health(CLIENT, stall_after_s=max(60.0, 10 * probe_interval_s))
        self._config = producer_config(
            kafka, CLIENT,
            # Webhooks arrive one by one; 1 ms still batches the concurrent ones.
            **{"linger.ms": 1, "message.timeout.ms": message_timeout_ms,
               # Bounded memory in an outage: a full local queue answers 503 at once.
               "queue.buffering.max.kbytes": 65_536})
        self._kafka = kafka
        self.max_bytes = kafka.producer_message_max_bytes  # checked against the topic at start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: HealingProducer | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._was_ready: bool | None = None  # None: log the first probe's verdict

    async def start(self) -> None:
        """Create the producer and start probing the broker (call from the serving loop)."""
        self._loop = asyncio.get_running_loop()
        # A topic that takes less than the producer sends is logged once, here (kafka/limits.py).
        limits = await self._loop.run_in_executor(
            None, producer_limits, self._kafka, [self.topic], self.max_bytes)
        self.max_bytes = limits[self.topic]
        self._producer = HealingProducer(self._config, CLIENT, poll_thread=True,
                                         on_error=self._on_error, clock=self.clock)
        await self._probe_and_record()  # ready at once when the broker is up
        self._probe_task = asyncio.create_task(self._probe_forever())

    def ready(self) -> bool:
        ready = self.health.ready(self.clock())
        metrics.WEBHOOK_BROKER_READY.set(1 if ready else 0)
        return ready

    async def publish(self, event: StripeEvent, raw: bytes) -> None:
        """Return once the broker has acknowledged `raw`; raise PublishFailed otherwise."""
        assert self._loop is not None and self._producer is not None, "start() first"
        done: asyncio.Future[None] = self._loop.create_future()
        try:
            # produce() first replaces a producer that reported itself dead
            self._producer.produce(self.topic, raw, event.key.encode(), event_headers(event),
                                   self._reporter(done))
        except BufferError as exc:
            raise PublishFailed("local producer queue full") from exc
        except KafkaException as exc:
            raise PublishFailed(str(exc)) from exc
        try:
            await asyncio.wait_for(done, self.delivery_timeout_s)
        except TimeoutError:
            self.health.failed()
            raise PublishFailed(f"no ack within {self.delivery_timeout_s:g} s") from None

    def _reporter(self, done: asyncio.Future[None]) -> Callable[[KafkaError | None, Message], None]:
        loop = self._loop
        assert loop is not None

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:  # poll thread
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(self._settle, done, err)

        return on_delivery

    def _settle(self, done: asyncio.Future[None], err: KafkaError | None) -> None:
        if err is None:
            self.health.succeeded(self.clock())
            if not done.done():  # done = we already gave up (timeout) and answered 503
                done.set_result(None)
            return
        if err.code() not in PURGED:
            self.health.failed()
        if not done.done():
            done.set_exception(PublishFailed(err.str()))

    def _on_error(self, err: KafkaError) -> None:  # poll thread
        if not (err.fatal() or err.code() == KafkaError._ALL_BROKERS_DOWN):
            return  # transient (a dropped connection): librdkafka reconnects by itself
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.health.failed)

    async def _probe_forever(self) -> None:
        """Ask the broker for the topic's metadata now and then, so /readyz works when idle."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self._probe_and_record()

    async def _probe_and_record(self) -> None:
        assert self._producer is not None
        # An idle bridge still swaps a producer that died, before the next webhook needs it
        # (on the loop, where publish() produces: nothing can slip into the retired one).
        self._producer.heal()
        if await asyncio.to_thread(self._probe, self._producer):
            self.health.succeeded(self.clock())
        else:
            self.health.failed()
        ready = self.ready()
        if ready != self._was_ready:  # log transitions only, never per request
            log.log(logging.INFO if ready else logging.WARNING, "broker %s for topic %s",
                    "reachable" if ready else "UNREACHABLE", self.topic)
            self._was_ready = ready
        self.liveness.beat("probe")

    def _probe(self, producer: HealingProducer) -> bool:
        try:
            meta = producer.list_topics(self.topic, min(self.probe_interval_s, 5.0))
        except (KafkaException, RuntimeError):  # RuntimeError: closed meanwhile
            return False
        topic = meta.topics.get(self.topic)
        return topic is not None and topic.error is None and bool(topic.partitions)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop probing and deliver what is still queued (bounded by `timeout_s`)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            remaining = await asyncio.to_thread(producer.close, timeout_s)
            if remaining:
                log.warning("%d webhook events undelivered at shutdown (answered 503)", remaining)
