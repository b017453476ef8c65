"""Consumer lag in seconds through the real broker: records produced with known timestamps,
consumed by a real aiokafka consumer that `meterline.consumer_lag.publishing` watches."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from meterline.consumer_lag import ConsumerLag, publishing
from meterline.devstack.embedded import create_topics

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, n: int, timestamp_ms: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(n):
        producer.produce(topic, f"r{i}".encode(), partition=0, timestamp=timestamp_ms)
    assert producer.flush(10) == 0


def lag_seconds(group: str, topic: str) -> float | None:
    return REGISTRY.get_sample_value(
        "meterline_consumer_lag_seconds", {"group": group, "topic": topic, "partition": "0"})


async def eventually(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_lag_is_the_age_of_the_oldest_unconsumed_record(
        kafka_bootstrap: str, unique_topic_prefix: str) -> None:
    topic, group = f"{unique_topic_prefix}lag", f"{unique_topic_prefix}lag-group"
    create_topics(kafka_bootstrap, {topic: 1})
    old_ms = int((time.time() - 120) * 1000)      # produced "two minutes ago"
    produce(kafka_bootstrap, topic, 20, old_ms)

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                session_timeout_ms=2000, heartbeat_interval_ms=500)
    await consumer.start()
    lag = ConsumerLag(group, topic)
    try:
        async with publishing(lag, consumer, interval_s=0.2) as highwater:
            # Consume five of twenty: fifteen two-minute-old records still wait.
            got = 0
            while got == 0:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5)
                lag.fetched_batches(batches, time.time())
                lag.delivered_batches(batches, highwater, time.time())
                got = sum(len(r) for r in batches.values())
            await eventually(lambda: (lag_seconds(group, topic) or 0) >= 119)
            first = lag_seconds(group, topic)
            assert first is not None and first < 130
            # Not consuming: the oldest record only gets older.
            await asyncio.sleep(1.5)
            assert (lag_seconds(group, topic) or 0) >= first + 1

            # Consume the rest: nothing waits.
            while got < 20:
                batches = await consumer.getmany(timeout_ms=1000)
                lag.fetched_batches(batches, time.time())
                lag.delivered_batches(batches, highwater, time.time())
                got += sum(len(r) for r in batches.values())
            await eventually(lambda: lag_seconds(group, topic) == 0.0)

            # New records arrive and are fetched but never consumed: lag grows from zero.
            produce(kafka_bootstrap, topic, 3, int(time.time() * 1000))
            await eventually(lambda: (lag_seconds(group, topic) or 0) >= 1.0)
    finally:
        await consumer.stop()
    # Stopped watching: the series goes away rather than freezing.
    assert lag_seconds(group, topic) is None
