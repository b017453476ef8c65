"""Consumer lag in seconds: how old the oldest record a consumer group has not consumed is.

The convention of kafka-lag-exporter and klag-exporter: lag is a time, not a count, so one
threshold fits a busy partition and a quiet one. Those exporters read a group's committed
offsets from Kafka; meterline's processor keeps its offsets in Postgres (with the debits),
so there is no committed offset for them to read. Each meterline consumer measures its
own lag instead, from the records it is handed:

- When records are fetched and nothing was waiting, the first of them is the oldest
  unconsumed record: its Kafka timestamp is where the lag counts from (exact).
- Once the application has consumed a batch (applied, staged, committed — each consumer
  says when) that reaches the high watermark, nothing waits: lag 0.
- After a consumed batch that stops short of it, the next record was appended no earlier
  than the last one consumed, so ``now - last.timestamp`` is the age of the oldest
  unconsumed record, exact to within the gap between two records (an upper bound).
- Caught up, but the high watermark has since moved past the consumer's position and
  nothing was fetched (the consumer is stalled): the records waited at least since that
  was first noticed (a lower bound).

Timestamps are read from the records rather than by interpolating offsets over time
(kafka-lag-exporter's way) because the consumer already holds them, at no cost. With
CreateTime topics a producer that stamps old times inflates the value; LogAppendTime
topics make it exact.

The gauge is published on a timer, not only per batch, so a consumer that stops
consuming shows its lag growing instead of freezing at its last value.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from meterline import metrics

HighWatermark = Callable[[int], "int | None"]  # partition -> high watermark, None if unknown


@dataclass
class PartitionLag:
    next_offset: int | None = None       # the position: the next record to consume
    waiting_since: float | None = None   # unix seconds the oldest unconsumed record is from


@dataclass
class ConsumerLag:
    """Lag of one consumer group on one topic, per partition this process consumes."""

    group: str
    topic: str
    partitions: dict[int, PartitionLag] = field(default_factory=dict)

    def fetched(self, partition: int, first_offset: int, first_timestamp_ms: int | None,
                now: float) -> None:
        """Records from `first_offset` on reached the consumer, not yet consumed."""
        lag = self.partitions.setdefault(partition, PartitionLag())
        if lag.next_offset is None:
            lag.next_offset = first_offset
        # Nothing known to wait, or this is the very next record: its time is the answer.
        if lag.waiting_since is None or lag.next_offset == first_offset:
            lag.waiting_since = _seconds(first_timestamp_ms, now)

    def delivered(self, partition: int, last_offset: int, last_timestamp_ms: int | None,
                  highwater: int | None, now: float) -> None:
        """Records up to `last_offset` were consumed by the application."""
        lag = self.partitions.setdefault(partition, PartitionLag())
        lag.next_offset = last_offset + 1
        if highwater is not None and lag.next_offset >= highwater:
            lag.waiting_since = None
        elif last_timestamp_ms is not None and last_timestamp_ms > 0:
            lag.waiting_since = _seconds(last_timestamp_ms, now)
        elif lag.waiting_since is None:
            lag.waiting_since = now  # no timestamp: waiting from now on, at least

    def seconds(self, partition: int, highwater: int | None, now: float) -> float:
        """The lag of `partition` at `now`, noting records that arrived while caught up."""
        lag = self.partitions.setdefault(partition, PartitionLag())
        # Before the first delivery the position is unknown (and so, in practice, is the
        # high watermark: both come with the first fetch), so nothing is noted yet.
        if (lag.waiting_since is None and highwater is not None
                and lag.next_offset is not None and highwater > lag.next_offset):
            lag.waiting_since = now
        return 0.0 if lag.waiting_since is None else max(now - lag.waiting_since, 0.0)

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: their new owner reports them; a stale series would lie."""
        for p in partitions:
            self.partitions.pop(p, None)
            try:
                metrics.CONSUMER_LAG_SECONDS.remove(self.group, self.topic, str(p))
            except KeyError:
                pass

    def publish(self, assigned: set[int], highwater: HighWatermark, now: float) -> None:
        self.forget(set(self.partitions) - assigned)
        for p in assigned:
            metrics.CONSUMER_LAG_SECONDS.labels(self.group, self.topic, str(p)).set(
                self.seconds(p, highwater(p), now))

    def fetched_batches(self, batches: Mapping[TopicPartition, Sequence[Any]],
                        now: float) -> None:
        """What `getmany` returned (records with `offset` and `timestamp`), before handling."""
        for tp, records in batches.items():
            if records and tp.topic == self.topic:
                self.fetched(tp.partition, records[0].offset, records[0].timestamp, now)

    def delivered_batches(self, batches: Mapping[TopicPartition, Sequence[Any]],
                          highwater: HighWatermark, now: float) -> None:
        """The same batches once handled: consumed."""
        for tp, records in batches.items():
            if records and tp.topic == self.topic:
                last = records[-1]
                self.delivered(tp.partition, last.offset, last.timestamp,
                               highwater(tp.partition), now)

    async def publish_every(self, interval_s: float, assigned: Callable[[], set[int]],
                            highwater: HighWatermark, clock: Callable[[], float]) -> None:
        """Run until cancelled; `assigned` and `highwater` read the consumer's current state."""
        while True:
            self.publish(assigned(), highwater, clock())
            await asyncio.sleep(interval_s)


def _seconds(timestamp_ms: int | None, now: float) -> float:
    """A record's Kafka timestamp in Unix seconds; `now` when it has none (-1) or is ahead."""
    if timestamp_ms is None or timestamp_ms <= 0:
        return now
    return min(timestamp_ms / 1000.0, now)


def aiokafka_highwater(consumer: AIOKafkaConsumer, topic: str) -> HighWatermark:
    def highwater(partition: int) -> int | None:
        try:
            value: int | None = consumer.highwater(TopicPartition(topic, partition))
        except Exception:  # noqa: BLE001 - not assigned (any more): unknown
            return None
        return value
    return highwater


@contextlib.asynccontextmanager
async def publishing(lag: ConsumerLag, consumer: AIOKafkaConsumer,
                     interval_s: float = 1.0) -> AsyncIterator[HighWatermark]:
    """Publish `lag` for an aiokafka consumer's assigned partitions while the block runs;
    yields the consumer's high-watermark reader for `delivered_batches`."""
    highwater = aiokafka_highwater(consumer, lag.topic)

    def assigned() -> set[int]:
        return {tp.partition for tp in consumer.assignment() if tp.topic == lag.topic}

    task = asyncio.create_task(lag.publish_every(interval_s, assigned, highwater, time.time))
    try:
        yield highwater
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lag.forget(set(lag.partitions))
