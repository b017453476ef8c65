"""Crashes: SIGKILL the processor at random moments while load flows; nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.harness import (
    Sender,
    assert_exact,
    assert_ledger_integrity,
    db_pool,
    fleet,
    owners,
    wait_for_ledger,
    wait_for_owners,
)
from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SEED = 20261121


async def test_kill9_at_random_moments_then_restart_neither_loses_nor_doubles_debits(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    kills = rng.choice((3, 4))
    settings = pipeline_settings(customers=50)
    parts = settings.kafka.partitions
    started = time.monotonic()
    with fleet(settings, tmp_path, "w0") as workers:
        async with db_pool(settings.database_url) as pool:
            claims = [await wait_for_owners(pool, settings, {"w0"}, workers=workers)]
            gen = LoadGenerator(settings, customer_ids(50), duplicates=0.1, late=0.01,
                                invalid=0.005, seed=SEED)
            with Sender(gen, rate=1500) as sender:
                for i in range(kills):
                    # Random moments while the current worker is consuming and flushing.
                    await asyncio.sleep(rng.uniform(0.5, 4.0))
                    workers.kill(f"w{i}")
                    workers.start(f"w{i + 1}")
                    claims.append(await wait_for_owners(
                        pool, settings, {f"w{i + 1}"}, timeout=45, workers=workers))
                await asyncio.sleep(1.5)
                sender.stop()
            snap = await wait_for_ledger(pool, gen, timeout=45, workers=workers, settle=1.5)
            assert [code for _, code in workers.gone] == [-9] * kills
            st = gen.stats
            assert st.duplicates_sent > 0 and st.late_events > 0
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, st.events_sent)

            # Fencing: every restart claimed every partition with a higher epoch,
            # and the last worker is the owner of record.
            final = await owners(pool, settings)
            assert {o for o, _ in final.values()} == {f"w{kills}"}
            for p in range(parts):
                epochs = [c[p][1] for c in claims] + [final[p][1]]
                assert epochs[:-1] == sorted(set(epochs[:-1])), epochs
                assert epochs[-1] == epochs[-2], "no claim after the last restart"
    assert time.monotonic() - started < 150
