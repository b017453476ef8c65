"""The dedupe reservation rules (storage/dedupe.py) against a real Postgres."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from meterline.storage.dedupe import DAY_MS, DAYS_AHEAD, confirm, reserve, retain

pytestmark = pytest.mark.integration

SLOT_A, SLOT_B = 1, 2


@pytest.fixture
async def pool(migrated_database: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


# A window of today: its day partition exists (migration 020 makes the horizon's days).
WINDOW = int(time.time() * 1000) // 5000 * 5000


async def _reserve(pool: asyncpg.Pool, keys: list[bytes], slot: int, epoch: int, token: int,
                   window: int = WINDOW) -> set[bytes]:
    """Reserve `keys` in one window; return the keys reserved for us."""
    n = len(keys)
    ours = await reserve(pool, [(window, k) for k in keys], [slot] * n, [epoch] * n, [token] * n)
    assert {w for w, _ in ours} <= {window}
    return {k for _, k in ours}


async def _confirm(pool: asyncpg.Pool, token: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await confirm(conn, [token])


async def test_new_keys_are_reserved_and_a_second_reservation_is_a_duplicate(pool: asyncpg.Pool) -> None:
    assert await _reserve(pool, [b"k1", b"k2"], SLOT_A, 1, 100) == {b"k1", b"k2"}
    # the same worker (same slot and epoch), another window: a duplicate
    assert await _reserve(pool, [b"k1", b"k3"], SLOT_A, 1, 101) == {b"k3"}


async def test_confirmed_mark_is_never_taken_over_even_by_a_newer_epoch(pool: asyncpg.Pool) -> None:
    await _reserve(pool, [b"k1"], SLOT_A, 1, 100)
    await _confirm(pool, 100)

    assert await _reserve(pool, [b"k1"], SLOT_A, 2, 200) == set()


async def test_orphan_of_an_older_epoch_of_the_same_slot_is_taken_over(pool: asyncpg.Pool) -> None:
    # epoch 1 reserved k1 and crashed before its flush: the token was never confirmed
    await _reserve(pool, [b"k1"], SLOT_A, 1, 100)

    assert await _reserve(pool, [b"k1"], SLOT_A, 2, 200) == {b"k1"}
    row = await pool.fetchrow("SELECT epoch, token FROM dedupe_marks WHERE key = $1", b"k1")
    assert (row["epoch"], row["token"]) == (2, 200)


async def test_a_zombie_cannot_take_back_a_mark_from_the_newer_epoch(pool: asyncpg.Pool) -> None:
    await _reserve(pool, [b"k1"], SLOT_A, 2, 200)

    assert await _reserve(pool, [b"k1"], SLOT_A, 1, 100) == set()


async def test_live_reservation_of_another_partition_is_not_taken_over(pool: asyncpg.Pool) -> None:
    # a mis-keyed duplicate: partition B sees an event partition A already holds
    await _reserve(pool, [b"k1"], SLOT_A, 1, 100)

    assert await _reserve(pool, [b"k1"], SLOT_B, 5, 500) == set()


async def test_taken_over_orphan_counts_once_when_the_old_token_is_confirmed_too_late(
    pool: asyncpg.Pool,
) -> None:
    """Even if a fenced worker's token row appeared later, the mark now carries the new token."""
    await _reserve(pool, [b"k1"], SLOT_A, 1, 100)
    await _reserve(pool, [b"k1"], SLOT_A, 2, 200)
    await _confirm(pool, 200)

    applied = await pool.fetchval(
        "SELECT count(*) FROM dedupe_marks m JOIN flush_tokens f USING (token) WHERE key = $1", b"k1")
    assert applied == 1


async def test_the_same_key_in_another_window_is_another_event(pool: asyncpg.Pool) -> None:
    """The duplicate rule: (source, id) *within a window start*; another window is another event."""
    assert await _reserve(pool, [b"k1"], SLOT_A, 1, 100) == {b"k1"}
    await _confirm(pool, 100)

    assert await _reserve(pool, [b"k1"], SLOT_A, 1, 101, window=WINDOW + 5000) == {b"k1"}
    assert await _reserve(pool, [b"k1"], SLOT_B, 1, 102, window=WINDOW) == set()


async def test_a_day_without_partition_is_created_on_demand(pool: asyncpg.Pool) -> None:
    """A late event for a day whose partition is gone (or not made yet) is still reserved, once."""
    far = WINDOW + 10 * DAY_MS  # beyond the days made ahead of time
    name = "dedupe_marks_" + datetime.fromtimestamp(far / 1000, UTC).strftime("%Y%m%d")
    assert await pool.fetchval("SELECT to_regclass($1)", name) is None

    assert await _reserve(pool, [b"k1"], SLOT_A, 1, 100, window=far) == {b"k1"}
    assert await pool.fetchval("SELECT to_regclass($1)::text", name) == name
    assert await _reserve(pool, [b"k1"], SLOT_B, 1, 200, window=far) == set()


async def test_retention_drops_whole_day_partitions_after_the_horizon(pool: asyncpg.Pool) -> None:
    """`retain` makes the days ahead and drops (never deletes from) the days past the horizon."""
    now = datetime.fromtimestamp(WINDOW / 1000, UTC)
    horizon = timedelta(days=35)
    old_window = WINDOW - 36 * DAY_MS - DAY_MS  # its whole day is past horizon + margin
    assert await _reserve(pool, [b"old"], SLOT_A, 1, 100, window=old_window) == {b"old"}
    assert await _reserve(pool, [b"new"], SLOT_A, 1, 101) == {b"new"}

    retention = await retain(pool, now, horizon)
    dropped = retention.dropped
    assert retention.days_ahead == DAYS_AHEAD

    old_day = datetime.fromtimestamp(old_window / 1000, UTC).strftime("%Y%m%d")
    assert f"dedupe_marks_{old_day}" in dropped
    assert all(t.startswith(("dedupe_marks_", "flush_tokens_")) for t in dropped)
    assert await pool.fetchval("SELECT count(*) FROM dedupe_marks WHERE key = 'old'") == 0
    assert await pool.fetchval("SELECT count(*) FROM dedupe_marks WHERE key = 'new'") == 1
    # the days ahead exist, so no live reservation waits for DDL
    for ahead in range(DAYS_AHEAD + 1):
        day = (now + timedelta(days=ahead)).strftime("%Y%m%d")
        assert await pool.fetchval("SELECT to_regclass($1)", f"dedupe_marks_{day}") is not None
        assert await pool.fetchval("SELECT to_regclass($1)", f"flush_tokens_{day}") is not None
    # the horizon's days are all kept: a 35-day-old window still finds its marks' partition
    kept = (now - horizon).strftime("%Y%m%d")
    assert await pool.fetchval("SELECT to_regclass($1)", f"dedupe_marks_{kept}") is not None
    assert (await retain(pool, now, horizon)).dropped == []  # idempotent
