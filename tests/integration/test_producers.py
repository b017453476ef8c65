"""Producers that heal, and dead letters sized for the DLQ topic — through the real broker.

The embedded broker (Tansu) fences an idempotent producer whose messages timed out during
an outage for every later delivery; `HealingProducer` must replace it and deliver.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sized

import pytest
from confluent_kafka import KafkaError, Message, Producer

from meterline import metrics
from meterline.config import KafkaConfig, Settings
from meterline.core.events import Reason, Rejection
from meterline.devstack.embedded import EmbeddedKafka, create_topics
from meterline.kafka.producer import HealingProducer, producer_config
from meterline.processor.dlq import DlqUnavailable, DlqWriter
from meterline.relay.outbox import OutboxRelay
from meterline.webhooks.publisher import StripeEventPublisher

from .harness import read_messages

pytestmark = pytest.mark.integration

TIMEOUT_MS = 1500  # message.timeout.ms: short, so a 3 s freeze expires in-flight messages


def _replacements(client: str) -> float:
    return metrics.PRODUCER_REPLACEMENTS.labels(client)._value.get()  # noqa: SLF001


def _kafka(bootstrap: str, **changes: object) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=bootstrap,
                       **{"producer_message_timeout_ms": TIMEOUT_MS, **changes})


def _freezable_topic(bootstrap: str, kafka: EmbeddedKafka | None, name: str) -> EmbeddedKafka:
    """Create topic `name`; the broker, which the test will freeze (skip when external)."""
    if kafka is None:
        pytest.skip("needs the embedded broker to freeze it")
    create_topics(bootstrap, {name: 1})
    return kafka


def _freeze_until_expired(kafka: EmbeddedKafka, send: Callable[[], None],
                          flush: Callable[[float], object], reports: Sized) -> None:
    """Freeze the broker, `send` one message, and serve reports until its own arrives (the
    time-out; librdkafka scans for expired messages about once a second, later under load)."""
    before = len(reports)
    kafka.freeze()
    try:
        send()
        deadline = time.monotonic() + 30
        while len(reports) == before and time.monotonic() < deadline:
            flush(0.5)
    finally:
        kafka.thaw()


def test_a_plain_idempotent_producer_stays_fenced_after_its_messages_time_out(
    kafka_bootstrap: str, embedded_kafka: EmbeddedKafka | None, unique_topic_prefix: str,
) -> None:
    """The broker behaviour the healing exists for (if this stops failing deliveries, the
    replacement is merely harmless)."""
    topic = f"{unique_topic_prefix}plain"
    embedded_kafka = _freezable_topic(kafka_bootstrap, embedded_kafka, topic)
    errors: list[KafkaError | None] = []
    p = Producer(producer_config(_kafka(kafka_bootstrap), "plain-test"))
    p.produce(topic, b"before", on_delivery=lambda e, m: errors.append(e))
    p.flush(10)
    _freeze_until_expired(
        embedded_kafka, lambda: p.produce(topic, b"during", on_delivery=lambda e, m: errors.append(e)),
        p.flush, errors)
    p.produce(topic, b"after", on_delivery=lambda e, m: errors.append(e))
    p.flush(10)
    assert [e.code() if e else None for e in errors] == [
        None, KafkaError._MSG_TIMED_OUT, KafkaError.PRODUCER_FENCED]


def test_a_timed_out_producer_is_replaced_and_the_retry_is_delivered(
    kafka_bootstrap: str, embedded_kafka: EmbeddedKafka | None, unique_topic_prefix: str,
) -> None:
    topic = f"{unique_topic_prefix}healing"
    embedded_kafka = _freezable_topic(kafka_bootstrap, embedded_kafka, topic)
    client = f"test-{unique_topic_prefix}"
    producer = HealingProducer(producer_config(_kafka(kafka_bootstrap), client), client)
    reports: list[tuple[bytes, KafkaError | None]] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        reports.append((msg.value() or b"", err))

    producer.produce(topic, b"before", None, [], report)
    assert producer.flush(10) == 0
    before = _replacements(client)
    _freeze_until_expired(embedded_kafka, lambda: producer.produce(topic, b"lost", None, [], report),
                          producer.flush, reports)
    assert reports[-1][1] is not None and reports[-1][1].code() == KafkaError._MSG_TIMED_OUT
    producer.produce(topic, b"lost", None, [], report)  # the owner's retry
    assert producer.flush(15) == 0
    assert reports[-1] == (b"lost", None)
    assert producer.replacements == 1
    assert _replacements(client) == before + 1
    values = [m.value for m in read_messages(kafka_bootstrap, topic)]
    assert values.count(b"before") == 1 and values.count(b"lost") >= 1


def test_a_fenced_producer_is_replaced_and_the_retry_is_delivered(
    kafka_bootstrap: str, embedded_kafka: EmbeddedKafka | None, unique_topic_prefix: str,
) -> None:
    """The PRODUCER_FENCED path itself: time-outs are ignored here, so the producer is used
    once more, fenced, and only then replaced."""
    topic = f"{unique_topic_prefix}fenced"
    embedded_kafka = _freezable_topic(kafka_bootstrap, embedded_kafka, topic)
    client = f"fenced-{unique_topic_prefix}"
    producer = HealingProducer(producer_config(_kafka(kafka_bootstrap), client), client)
    producer.idempotent = False  # do not replace on the time-out: let the broker fence it
    reports: list[tuple[bytes, KafkaError | None]] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        reports.append((msg.value() or b"", err))

    producer.produce(topic, b"before", None, [], report)
    assert producer.flush(10) == 0
    _freeze_until_expired(embedded_kafka, lambda: producer.produce(topic, b"lost", None, [], report),
                          producer.flush, reports)
    producer.produce(topic, b"after", None, [], report)
    producer.flush(10)
    assert producer.replacements == 0
    err = reports[-1][1]
    assert err is not None and err.code() == KafkaError.PRODUCER_FENCED
    before = _replacements(client)
    producer.produce(topic, b"after", None, [], report)  # the owner's retry
    assert producer.flush(15) == 0
    assert reports[-1] == (b"after", None)
    assert producer.replacements == 1 and _replacements(client) == before + 1
    assert b"after" in {m.value for m in read_messages(kafka_bootstrap, topic)}


async def test_dlq_writer_heals_after_an_outage_past_the_message_timeout(
    kafka_bootstrap: str, embedded_kafka: EmbeddedKafka | None, unique_topic_prefix: str,
) -> None:
    """The processor's failure of issue 9: DlqUnavailable forever after a freeze with DLQ
    records in flight. Now: unavailable while frozen, delivered after the thaw."""
    dlq_topic = f"{unique_topic_prefix}usage.events.dlq"
    embedded_kafka = _freezable_topic(kafka_bootstrap, embedded_kafka, dlq_topic)
    dlq = DlqWriter(_kafka(kafka_bootstrap), dlq_topic, "usage.events")
    rejection = Rejection(Reason.MALFORMED_JSON, "not JSON", 7, b"{{{")
    embedded_kafka.freeze()
    try:
        dlq.write(0, b"k", [rejection])
        with pytest.raises(DlqUnavailable):
            await dlq.settle(timeout=TIMEOUT_MS / 1000 + 4, attempts=1)  # past the time-out
    finally:
        embedded_kafka.thaw()
    await dlq.settle()  # no restart: the replaced producer delivers
    assert dlq.replacements >= 1
    msgs = read_messages(kafka_bootstrap, dlq_topic)
    assert {m.value for m in msgs} == {b"{{{"}
    assert msgs[0].headers["meterline.original.offset"] == b"7"
    dlq.close()


async def test_dead_letters_too_large_for_the_dlq_are_truncated_copies(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=0, kafka={"producer_message_max_bytes": 1_048_576})
    k = settings.kafka
    dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic)
    assert dlq.max_bytes == 1_048_576  # Tansu reports no limits: the configured one holds
    big = {1_100_000: b"a" * 1_100_000, 2_000_000: b"b" * 2_000_000, 500_000: b"c" * 500_000}
    truncated_before = metrics.DLQ_TRUNCATED.labels(k.usage_dlq_topic)._value.get()  # noqa: SLF001
    dlq.write(3, b"cust_1", [Rejection(Reason.OVERSIZED, "too big", n, v) for n, v in big.items()])
    await dlq.settle()
    dlq.close()
    got = {int(m.headers["meterline.original.offset"]): m for m in read_messages(
        k.bootstrap_servers, k.usage_dlq_topic)}
    assert sorted(got) == sorted(big)
    for n in (1_100_000, 2_000_000):
        m = got[n]
        h = m.headers
        assert m.key == b"cust_1"
        assert h["meterline.reason"] == b"oversized"
        assert h["meterline.truncated"] == b"true"
        assert h["meterline.original.reason"] == b"oversized"
        assert int(h["meterline.original.length"]) == n
        assert h["meterline.original.sha256"] == hashlib.sha256(big[n]).hexdigest().encode()
        assert h["meterline.original.topic"] == k.usage_topic.encode()
        assert h["meterline.original.partition"] == b"3"
        assert m.value is not None and big[n].startswith(m.value)
        assert 1_040_000 < len(m.value) < 1_048_576
    assert got[500_000].value == big[500_000] and "meterline.truncated" not in got[500_000].headers
    assert metrics.DLQ_TRUNCATED.labels(k.usage_dlq_topic)._value.get() == truncated_before + 2  # noqa: SLF001


async def test_dlq_writer_raises_dlq_unavailable_when_nothing_can_be_queued(
    kafka_bootstrap: str, embedded_kafka: EmbeddedKafka | None, unique_topic_prefix: str,
) -> None:
    """A full local queue (broker frozen) ends in DlqUnavailable, never BufferError."""
    dlq_topic = f"{unique_topic_prefix}small.dlq"
    embedded_kafka = _freezable_topic(kafka_bootstrap, embedded_kafka, dlq_topic)
    dlq = DlqWriter(_kafka(kafka_bootstrap, producer_message_timeout_ms=60_000), dlq_topic, "src")
    dlq._producer._producer = Producer({  # noqa: SLF001 - a tiny queue fills at once
        **dlq._producer.config, "queue.buffering.max.messages": 5})  # noqa: SLF001
    embedded_kafka.freeze()
    started = time.monotonic()
    try:
        with pytest.raises(DlqUnavailable):
            dlq.write(0, None, [Rejection(Reason.MALFORMED_JSON, "x", i, b"x") for i in range(50)])
    finally:
        embedded_kafka.thaw()
    assert time.monotonic() - started < 5
    await asyncio.sleep(0)
    await dlq.settle()
    dlq.close()


async def test_relay_and_bridge_check_their_topics_size_limits_at_start_up(
    kafka_bootstrap: str, unique_topic_prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    small = 200_000  # below the producers' message.max.bytes (kafka.producer_message_max_bytes)
    aggregates, changes, events = (f"{unique_topic_prefix}{n}" for n in ("agg", "bal", "events"))
    create_topics(kafka_bootstrap, {aggregates: 1, changes: 1, events: 1}, configs={
        aggregates: {"max.message.bytes": str(small)}, events: {"max.message.bytes": str(small)}})
    kafka = _kafka(kafka_bootstrap, aggregates_topic=aggregates, balance_changes_topic=changes,
                   stripe_events_topic=events)
    assert kafka.producer_message_max_bytes > small
    with caplog.at_level(logging.WARNING, logger="meterline.kafka.limits"):
        relay = OutboxRelay(None, kafka)  # type: ignore[arg-type] # no database needed to start
        publisher = StripeEventPublisher(kafka, events, delivery_timeout_s=5,
                                         message_timeout_ms=TIMEOUT_MS, probe_interval_s=1)
        await publisher.start()
        try:
            assert publisher.max_bytes == small
        finally:
            await publisher.close()
    assert relay.max_bytes == {aggregates: small, changes: kafka.producer_message_max_bytes}
    warned = [r.getMessage() for r in caplog.records if "below the producer" in r.getMessage()]
    assert len(warned) == 2 and {w.split(":")[0] for w in warned} == {aggregates, events}
