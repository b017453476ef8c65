"""Two workers in one consumer group: partitions split, move back, debits stay exact."""

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
    wait_for_ledger,
    wait_for_owners,
)
from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CYCLES = 2

# Guards two rebalance bugs fixed in processor/app.py: runs stamped with a generation read
# before a fetch that a claim + seek completed inside (records skipped), and seeks made off
# the consumer thread (a KeyError in aiokafka's fetcher). Seeks and fetch tags now happen
# on the consumer thread.
async def test_two_workers_share_partitions_and_rebalance_exactly_once(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(customers=60)
    with fleet(settings, tmp_path, "A") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"A"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(60), duplicates=0.1, late=0, invalid=0,
                                seed=42)
            with Sender(gen, rate=1500) as sender:
                # Twice: B joins mid-stream (the partitions split), then leaves (SIGTERM)
                # and A takes every partition back. Each cycle rebalances A twice.
                for _ in range(CYCLES):
                    await asyncio.sleep(2)
                    workers.start("B")
                    split = await wait_for_owners(pool, settings, {"A", "B"}, timeout=45,
                                                  workers=workers)
                    mine = {w: sorted(p for p, (o, _) in split.items() if o == w) for w in "AB"}
                    assert mine["A"] and mine["B"], mine
                    await asyncio.sleep(3)  # both consume and flush their share
                    assert workers.terminate("B") == 0
                    back = await wait_for_owners(pool, settings, {"A"}, timeout=45,
                                                 workers=workers)
                    # B's partitions were claimed again: their epochs moved past B's claims.
                    for p in mine["B"]:
                        assert back[p][1] > split[p][1]
                await asyncio.sleep(2)
                sender.stop()
            snap = await wait_for_ledger(pool, gen, timeout=45, workers=workers, settle=1.5,
                                         stall=8)
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, gen.stats.events_sent)
            # Both workers committed debits: aggregates came from every partition.
            assert await pool.fetchval(
                "SELECT count(DISTINCT kafka_partition) FROM window_aggregates"
            ) == settings.kafka.partitions
