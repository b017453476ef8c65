"""Config plan allocations through the real allocator and ledger: one rule with Stripe for
mid-period plan changes, and missed rollover periods allocated when a processor starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from meterline.config import Settings, load_settings
from meterline.storage.grants import allocate_plan_periods, sync_config

pytestmark = pytest.mark.integration

PLANS = [
    {"key": "starter", "included_credits": "50", "period": "month", "carryover": "reset"},
    {"key": "growth", "included_credits": "200", "period": "month", "carryover": "reset"},
    {"key": "pro", "included_credits": "500", "period": "month", "carryover": "rollover"},
]
NOV = datetime(2026, 11, 1, tzinfo=UTC)
MID_NOV = datetime(2026, 11, 16, tzinfo=UTC)  # half of November's 30 days


def _settings(dsn: str, plan: str) -> Settings:
    return load_settings(None, database_url=dsn, plans=PLANS,
                         customers=[{"id": "c", "plan": plan}])


@pytest.fixture
async def pool(migrated_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


async def _allocate(pool: asyncpg.Pool, settings: Settings, now: datetime) -> Decimal:
    async with pool.acquire() as conn:
        await sync_config(conn, settings)
        await allocate_plan_periods(conn, settings, now)
    return Decimal(await pool.fetchval("SELECT balance FROM balances WHERE customer_id = 'c'"))


async def test_a_plan_changed_in_the_config_mid_period_is_prorated_not_granted_twice(
    pool: asyncpg.Pool, migrated_database: str,
) -> None:
    assert await _allocate(pool, _settings(migrated_database, "starter"), NOV) == 50
    # growth from the middle of the month: (200 - 50) x 1/2, as a Stripe upgrade would be
    assert await _allocate(pool, _settings(migrated_database, "growth"), MID_NOV) == 125
    assert await _allocate(pool, _settings(migrated_database, "growth"), MID_NOV) == 125
    # back down: a downgrade waits for the next period; up again: nothing new is owed
    assert await _allocate(pool, _settings(migrated_database, "starter"), MID_NOV) == 125
    assert await _allocate(pool, _settings(migrated_database, "growth"), MID_NOV) == 125
    period = await pool.fetchrow("SELECT plan_key, base_credits, upgrade_credits"
                                 " FROM config_plan_periods")
    assert tuple(period) == ("starter", 50, 75)


async def test_missed_rollover_periods_are_allocated_when_a_processor_starts_again(
    pool: asyncpg.Pool, migrated_database: str,
) -> None:
    settings = _settings(migrated_database, "pro")
    assert await _allocate(pool, settings, NOV) == 500
    # no processor ran in December and January: February's start allocates all three
    assert await _allocate(pool, settings, datetime(2027, 2, 3, tzinfo=UTC)) == 2000
    starts = [r["period_start"].date().isoformat() for r in await pool.fetch(
        "SELECT period_start FROM config_plan_periods ORDER BY 1")]
    assert starts == ["2026-11-01", "2026-12-01", "2027-01-01", "2027-02-01"]


async def test_missed_reset_periods_are_not_allocated_after_the_fact(
    pool: asyncpg.Pool, migrated_database: str,
) -> None:
    settings = _settings(migrated_database, "starter")
    assert await _allocate(pool, settings, NOV) == 50
    # November's reset credits are still there until expiry runs; only February is new
    assert await _allocate(pool, settings, datetime(2027, 2, 3, tzinfo=UTC)) == 100
    assert await pool.fetchval("SELECT count(*) FROM config_plan_periods") == 2
