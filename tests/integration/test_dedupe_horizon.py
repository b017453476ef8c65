"""The duplicate rule (storage/dedupe.py) over the whole lateness horizon, through the real
broker and Postgres.

Events are published to Kafka, read back with their real partitions and offsets,
and fed to an in-process `Pipeline` whose clock the test moves (30 and 36 days
on): nothing here waits for a day to pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from confluent_kafka import Producer

from meterline.config import Settings
from meterline.core.events import Reason
from meterline.processor.dlq import DlqWriter
from meterline.processor.pipeline import Pipeline, RecordRun, dedupe_horizon
from meterline.storage.db import create_pool

from .harness import FakeClock, Message, Record, read_messages

pytestmark = pytest.mark.integration

DAY_S = 86_400
CUSTOMER = "cust_00000"


def _event(event_id: str, at_ms: int, tokens: int, source: str = "dedupe-test") -> bytes:
    at = datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps({
        "specversion": "1.0", "id": event_id, "source": source, "type": "llm_tokens",
        "subject": CUSTOMER, "time": at.replace("+00:00", "Z"), "data": {"tokens": tokens}})


class Topic:
    """Publishes to the real usage topic and hands the pipeline what the broker returns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                                  "enable.idempotence": True})
        self.seen: set[tuple[int, int]] = set()

    def publish(self, partition: int, key: bytes, value: bytes) -> None:
        self.producer.produce(self.settings.kafka.usage_topic, value, key, partition=partition)
        assert self.producer.flush(10) == 0

    def new_messages(self, count: int) -> list[Message]:
        """The `count` messages published since the last call, read back from the broker."""
        fresh = [m for m in read_messages(self.settings.kafka.bootstrap_servers,
                                          self.settings.kafka.usage_topic, 1.0)
                 if (m.partition, m.offset) not in self.seen]
        assert len(fresh) == count, f"expected {count} new messages, the broker has {len(fresh)}"
        self.seen |= {(m.partition, m.offset) for m in fresh}
        return fresh


async def _apply(pipeline: Pipeline, clock: FakeClock, messages: list[Message]) -> None:
    """Ingest the broker's records per partition, close every window, flush."""
    for p in sorted({m.partition for m in messages}):
        records = [Record(m.offset, m.key, m.value) for m in messages if m.partition == p]
        assert pipeline.ingest(RecordRun(p, pipeline.generation(p), records, records[0].offset)) is None
    clock.now += 10  # past every window's close (5 s windows, 1 s grace)
    assert await pipeline.flush_tick() is not None
    assert pipeline.windows.pending_events == 0


async def _debited(pool: asyncpg.Pool) -> tuple[int, int]:
    """(events, tokens) the ledger's window aggregates hold for the customer."""
    row = await pool.fetchrow(
        "SELECT coalesce(sum(event_count), 0) AS events, coalesce(sum(quantity), 0) AS tokens "
        "FROM window_aggregates WHERE customer_id = $1", CUSTOMER)
    return int(row["events"]), int(row["tokens"])


async def test_duplicates_are_never_debited_twice_within_the_horizon_and_too_old_after_it(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=1)
    assert settings.processor.max_lateness_days == 35
    assert dedupe_horizon(settings.processor) == timedelta(days=35)  # by construction
    k = settings.kafka
    # The middle of a window, so t0 and t0 + 1 ms share it.
    t0_ms = (int(datetime.now(UTC).timestamp() * 1000) // 5000) * 5000 - 10_000 + 2_000
    clock = FakeClock(t0_ms / 1000 + 0.5)
    topic = Topic(settings)
    pool = await create_pool(settings.database_url)
    dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic)
    pipeline = Pipeline(settings, pool, dlq, "dedupe-test", clock)
    try:
        await pipeline.maintain()
        await pipeline.claim([0, 1])

        # Day 0: the originals.
        topic.publish(0, CUSTOMER.encode(), _event("e1", t0_ms, 100))
        topic.publish(0, CUSTOMER.encode(), _event("e2", t0_ms, 10))
        await _apply(pipeline, clock, topic.new_messages(2))
        assert await _debited(pool) == (2, 110)

        # Day 30: the housekeeping ran every day; re-publications arrive (late, within 35 days).
        for day in range(1, 31):
            clock.now = t0_ms / 1000 + day * DAY_S
            await pipeline.maintain()
        topic.publish(0, CUSTOMER.encode(), _event("e1", t0_ms, 100))  # a replayed backup
        topic.publish(1, b"another-key", _event("e1", t0_ms, 100))  # mis-keyed: another partition
        topic.publish(1, b"another-key", _event("e2", t0_ms + 1, 10))  # same id, same window
        now_ms = int(clock.now * 1000)
        topic.publish(0, CUSTOMER.encode(), _event("e1", now_ms, 7))  # same id, today's window
        topic.publish(0, CUSTOMER.encode(), _event("e1", t0_ms, 5, source="other"))  # other source
        messages = topic.new_messages(5)
        assert {m.partition for m in messages} == {0, 1}
        await _apply(pipeline, clock, messages)
        # Only the same id in another window, and the other source's event, are new events.
        assert await _debited(pool) == (4, 122)

        # Day 36: the original is older than the maximum lateness: rejected as too old.
        clock.now = t0_ms / 1000 + 36 * DAY_S
        await pipeline.maintain()
        topic.publish(0, CUSTOMER.encode(), _event("e1", t0_ms, 100))
        [late] = topic.new_messages(1)
        records = [Record(late.offset, late.key, late.value)]
        assert pipeline.ingest(RecordRun(0, pipeline.generation(0), records, late.offset)) is None
        await dlq.settle()
        [letter] = [m for m in read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
                    if m.headers.get("meterline.original.offset") == str(late.offset).encode()
                    and m.headers.get("meterline.original.partition") == b"0"]
        assert letter.headers["meterline.reason"] == Reason.TOO_OLD.value.encode()
        assert pipeline.windows.pending_events == 0
        assert await _debited(pool) == (4, 122)
    finally:
        dlq.close()
        await pool.close()


async def test_the_original_days_partition_is_dropped_once_past_the_horizon(
    pipeline_settings: Callable[..., Settings],
) -> None:
    """Retention is the processor's housekeeping dropping whole day partitions."""
    settings = pipeline_settings(customers=1)
    k = settings.kafka
    t0_ms = int(datetime.now(UTC).timestamp() * 1000) - 10_000
    day = datetime.fromtimestamp(t0_ms / 1000, UTC).strftime("%Y%m%d")
    clock = FakeClock(t0_ms / 1000 + 0.5)
    topic = Topic(settings)
    pool = await create_pool(settings.database_url)
    dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic)
    pipeline = Pipeline(settings, pool, dlq, "dedupe-test", clock)
    try:
        await pipeline.claim([0])
        topic.publish(0, CUSTOMER.encode(), _event("r1", t0_ms, 1))
        await _apply(pipeline, clock, topic.new_messages(1))
        partition = f"dedupe_marks_{day}"
        assert await pool.fetchval(f"SELECT count(*) FROM {partition}") == 1

        clock.now = t0_ms / 1000 + 36 * DAY_S  # past the horizon, within the drop margin
        await pipeline.maintain()
        assert await pool.fetchval("SELECT to_regclass($1)", partition) is not None
        clock.now = t0_ms / 1000 + 38 * DAY_S
        await pipeline.maintain()
        assert await pool.fetchval("SELECT to_regclass($1)", partition) is None
        ahead = datetime.fromtimestamp(clock.now + 3 * DAY_S, UTC).strftime("%Y%m%d")
        assert await pool.fetchval("SELECT to_regclass($1)", f"dedupe_marks_{ahead}") is not None
    finally:
        dlq.close()
        await pool.close()


def test_a_shorter_horizon_is_an_explicit_opt_out_that_start_up_warns_about(
    pipeline_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture,
) -> None:
    settings = pipeline_settings(customers=1, processor={"dedupe_horizon_hours": 24})
    with caplog.at_level(logging.WARNING, logger="meterline.processor.pipeline"):
        assert dedupe_horizon(settings.processor) == timedelta(hours=24)
    assert "debited twice" in caplog.text
    caplog.clear()
    longer = pipeline_settings(customers=1, processor={"dedupe_horizon_hours": 40 * 24})
    with caplog.at_level(logging.WARNING, logger="meterline.processor.pipeline"):
        assert dedupe_horizon(longer.processor) == timedelta(days=40)
    assert caplog.text == ""
