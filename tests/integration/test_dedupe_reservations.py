"""The dedupe reservation rules (storage/dedupe.py) against a real Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from meterline.storage.dedupe import confirm, reserve

pytestmark = pytest.mark.integration

SLOT_A, SLOT_B = 1, 2


@pytest.fixture
async def pool(migrated_database: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


async def _reserve(pool: asyncpg.Pool, keys: list[bytes], slot: int, epoch: int, token: int) -> set[bytes]:
    n = len(keys)
    return await reserve(pool, keys, [slot] * n, [epoch] * n, [token] * n)


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
