"""The session's Kafka and Postgres fixtures work end to end."""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
from confluent_kafka import Consumer, Producer

from meterline.devstack.embedded import POSTGRES_SETTINGS, create_topics

pytestmark = pytest.mark.integration

MESSAGES = 100
PARTITIONS = 4


def test_kafka_round_trip(kafka_bootstrap: str, unique_topic_prefix: str) -> None:
    topic = f"{unique_topic_prefix}roundtrip"
    create_topics(kafka_bootstrap, {topic: PARTITIONS})

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = [(f"k{i % 10}".encode(), f"v{i:03d}".encode()) for i in range(MESSAGES)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(15) == 0, "messages left undelivered"

    # A consumer group, as the processor uses; Tansu finishes a join after about
    # half of session.timeout.ms, so keep it small.
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{unique_topic_prefix}g",
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[bytes, bytes, int]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(received) < MESSAGES and time.monotonic() < deadline:
            _poll_into(consumer, received)
        # Keep polling a little past the 100th message to catch duplicates.
        quiet_until = time.monotonic() + 1
        while time.monotonic() < quiet_until:
            _poll_into(consumer, received)
    finally:
        consumer.close()

    assert len(received) == MESSAGES
    assert sorted((k, v) for k, v, _ in received) == sorted(sent)
    # Same key -> same partition, in production order.
    for key in {k for k, _ in sent}:
        assert len({p for k, _, p in received if k == key}) == 1
        assert [v for k, v, _ in received if k == key] == [v for k, v in sent if k == key]
    assert len({p for _, _, p in received}) > 1, "keys should spread over partitions"


def _poll_into(consumer: Consumer, received: list[tuple[bytes, bytes, int]]) -> None:
    msg = consumer.poll(0.2)
    if msg is None:
        return
    assert msg.error() is None, msg.error()
    key, value, partition = msg.key(), msg.value(), msg.partition()
    assert key is not None and value is not None and partition is not None
    received.append((key, value, partition))


async def test_fresh_database_is_usable_and_empty(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        name = urlsplit(fresh_database).path.lstrip("/")
        assert name.startswith("meterline_test_")
        assert await conn.fetchval("SELECT current_database()") == name
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await conn.fetchval(tables) == 0
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(10)])
        assert await conn.fetchval("SELECT sum(id) FROM t") == 45
    finally:
        await conn.close()


async def test_embedded_postgres_runs_with_the_write_pattern_settings(fresh_database: str) -> None:
    """The server `make run`, tests and bench start has POSTGRES_SETTINGS in force (not pending)."""
    if os.environ.get("DATABASE_URL") or "host=/" not in urlsplit(fresh_database).query:
        pytest.skip("the session's Postgres is not the embedded one (no unix socket)")
    conn = await asyncpg.connect(fresh_database)
    try:
        rows = await conn.fetch(
            "SELECT name, current_setting(name) AS shown, pending_restart FROM pg_settings "
            "WHERE name = ANY($1::text[])", list(POSTGRES_SETTINGS))
    finally:
        await conn.close()
    shown = {r["name"]: r["shown"] for r in rows}
    assert not [r["name"] for r in rows if r["pending_restart"]]
    expected = dict(POSTGRES_SETTINGS, wal_compression="pglz")  # `on` reads back as pglz (PG 15+)
    assert shown == expected
