"""The flush transaction's balance changes: burn-down, thresholds, depletion, outbox."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import orjson
import pytest

from meterline.config import load_settings
from meterline.core.events import UsageEvent, dedupe_key
from meterline.core.windows import OpenWindows
from meterline.processor.pipeline import policy_from
from meterline.storage import checkpoints
from meterline.storage.dedupe import reserve
from meterline.storage.flush import flush
from meterline.storage.grants import sync_config

pytestmark = pytest.mark.integration

T0 = 1_795_000_000_000  # a window start (ms), multiple of 5 s


async def test_debit_crossing_thresholds_and_depleting_is_published_with_them(
    migrated_database: str,
) -> None:
    settings = load_settings(
        None,
        meters=[{"key": "gpu_seconds", "event_type": "gpu_usage", "aggregation": "sum",
                 "value_property": "seconds", "credits_per_unit": "1"}],
        customers=[{"id": "c1", "grants": [{"ref": "g", "amount": "100"}]}],
    )
    policy = policy_from(settings)
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await sync_config(conn, settings)
        [claim] = await checkpoints.claim(pool, policy.usage_topic, [0], "w1")
        windows = OpenWindows(5_000, 0)
        windows.assign(0, 0)
        # 60 + 35 + 10 = 105 credits of a 100-credit grant: 50, 75, 90 and 100 % crossed, depleted
        events = [UsageEvent(dedupe_key("s", str(i)), "c1", "gpu_seconds", T0 + i, v, i)
                  for i, v in enumerate((60, 35, 10))]
        windows.add(0, events, 3, T0)
        [buf] = windows.buffers()
        keys = [(buf.key.start_ms, e.dedupe_key) for e in buf.events]
        ours = await reserve(pool, keys, [claim.slot] * 3, [claim.epoch] * 3, [buf.token] * 3)
        assert ours == set(keys)
        assert buf.settle_reservation(3, set()) == 0
        closable = windows.take_closable(T0 + 5_000)

        async with pool.acquire() as conn:
            result = await flush(conn, closable, {0: claim.epoch}, policy)

        assert sorted(result.thresholds_crossed) == [50, 75, 90, 100]
        rows = await pool.fetch(
            "SELECT payload FROM outbox WHERE topic = $1 ORDER BY id", policy.balance_changes_topic)
        usage = orjson.loads(rows[-1]["payload"])
        assert usage["reason"] == "usage"
        assert Decimal(usage["balance_before"]) == 100
        assert Decimal(usage["balance_after"]) == -5
        assert Decimal(usage["delta"]) == -105
        assert usage["thresholds_crossed"] == [50, 75, 90, 100]
        assert usage["depleted"] is True
        overage = await pool.fetchval("SELECT overage FROM ledger_entries WHERE kind = 'debit'")
        assert overage == Decimal(5)
    finally:
        await pool.close()
