"""The processor's lag in seconds through the real broker and Postgres: while flushes are
blocked (a test transaction holds a lock on partition_checkpoints), pending events reach
processor.max_pending_events, intake waits, and the records it has not applied — fetched
or not — age; once the lock goes, the processor catches up and the lag returns to 0."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from integration.harness import (
    Sample,
    db_pool,
    fleet,
    metric_value,
    scrape,
    wait_for_owners,
    wait_until,
)
from meterline.config import Settings
from meterline.devstack.embedded import _free_port
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def lag_seconds(samples: list[Sample], group: str) -> float:
    return max((s.value for s in samples if s.name == "meterline_consumer_lag_seconds"
                and s.labels.get("group") == group), default=0.0)


async def test_lag_in_seconds_grows_while_back_pressure_holds_intake(
        pipeline_settings: Callable[..., Settings], tmp_path: Path) -> None:
    port = _free_port()
    settings = pipeline_settings(customers=20, processor={
        "metrics_port": port, "max_pending_events": 1000})
    group = settings.kafka.consumer_group
    with fleet(settings, tmp_path, "w0") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w0"}, workers=workers)
            async with pool.acquire() as blocker:
                lock = blocker.transaction()
                await lock.start()
                await blocker.execute("LOCK TABLE partition_checkpoints IN ACCESS EXCLUSIVE MODE")
                gen = LoadGenerator(settings, customer_ids(20), duplicates=0, late=0, invalid=0,
                                    seed=7)
                now_ms = int(datetime.now(UTC).timestamp() * 1000)
                for _ in range(20_000):
                    customer, body = gen.make_event(now_ms)
                    gen.producer.produce(settings.kafka.usage_topic, body, customer.encode())
                gen.flush()
                produced_at = time.time()

                async def stalled() -> list[Sample] | None:
                    samples = scrape(port)
                    full = metric_value(samples, "meterline_pending_events") >= 1000
                    return samples if full else None

                await wait_until(stalled, 30, "intake under back-pressure", workers)
                first = await wait_until(lambda: _lag_at_least(port, group, 3.0), 30,
                                         "lag in seconds above 3 s", workers)
                later = await wait_until(lambda: _lag_at_least(port, group, first + 2.0), 30,
                                         "lag still growing", workers)
                # Never more than the age of the records themselves.
                assert later <= time.time() - produced_at + 2.0
                await lock.rollback()
        await wait_until(lambda: _lag_at_most(port, group, 0.0), 60,
                         "caught up: lag back to 0", workers)


async def _lag_at_most(port: int, group: str, ceiling: float) -> bool:
    samples = [s for s in scrape(port) if s.name == "meterline_consumer_lag_seconds"
               and s.labels.get("group") == group]
    return bool(samples) and all(s.value <= ceiling for s in samples)


async def _lag_at_least(port: int, group: str, floor: float) -> float | None:
    value = lag_seconds(scrape(port), group)
    return value if value >= floor else None
