"""A broker outage mid-stream (the embedded broker frozen with SIGSTOP): nothing is lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.harness import (
    Sender,
    assert_exact,
    assert_ledger_integrity,
    db_pool,
    fleet,
    snapshot,
    wait_for_ledger,
    wait_for_owners,
)
from meterline.config import Settings
from meterline.devstack.embedded import EmbeddedKafka
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FROZEN_SECONDS = 5


async def test_broker_frozen_then_thawed_loses_nothing(
    pipeline_settings: Callable[..., Settings],
    embedded_kafka: EmbeddedKafka | None,
    tmp_path: Path,
) -> None:
    if embedded_kafka is None:
        pytest.skip("needs the embedded broker to freeze it (Kafka is external or a container)")
    settings = pipeline_settings(customers=40)
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(40), duplicates=0.05, late=0, invalid=0,
                                seed=13)
            with Sender(gen, rate=1500) as sender:
                await asyncio.sleep(2)
                debited_before = (await snapshot(pool, detail=False)).events_debited
                embedded_kafka.freeze()
                try:
                    await asyncio.sleep(FROZEN_SECONDS)
                finally:
                    embedded_kafka.thaw()
                await asyncio.sleep(3)
                sender.stop()
            snap = await wait_for_ledger(pool, gen, timeout=60, workers=workers, settle=1.5)
            assert 0 < debited_before < gen.stats.events_sent
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, gen.stats.events_sent)
