"""Per-partition Kafka checkpoints in Postgres, with fencing epochs.

A worker that is assigned a partition *claims* it: the claim bumps the
partition's epoch and returns the offset to resume from. Every flush locks the
partitions' checkpoint rows and checks that the epochs are still the ones it
claimed (see `flush.py`). Claims and flushes lock the same rows, so they
serialise: a flush either commits before the new owner's claim (which then
reads the flushed offset) or is rejected after it. A zombie worker that lost
a partition can therefore never commit debits for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

CLAIM = """
INSERT INTO partition_checkpoints AS c (topic, partition, next_offset, epoch, owner, claimed_at)
SELECT $1, p, 0, 1, $2, now() FROM unnest($3::int[]) AS p
ON CONFLICT (topic, partition) DO UPDATE
    SET epoch = c.epoch + 1, owner = excluded.owner, claimed_at = now()
RETURNING partition, next_offset, epoch, slot
"""

LOCK_EPOCHS = """
SELECT partition, epoch FROM partition_checkpoints
WHERE topic = $1 AND partition = ANY($2::int[])
ORDER BY partition
FOR UPDATE
"""

STORE_OFFSETS = """
UPDATE partition_checkpoints AS c SET next_offset = u.next_offset, updated_at = now()
FROM unnest($2::int[], $3::bigint[]) AS u (partition, next_offset)
WHERE c.topic = $1 AND c.partition = u.partition
"""


@dataclass(frozen=True, slots=True)
class Claim:
    partition: int
    next_offset: int
    epoch: int
    slot: int


class FencedError(Exception):
    """Another worker claimed these partitions after us: our flush must not commit."""

    def __init__(self, partitions: set[int]) -> None:
        super().__init__(f"fenced off partitions {sorted(partitions)}")
        self.partitions = partitions


async def claim(pool: asyncpg.Pool, topic: str, partitions: Iterable[int], owner: str) -> list[Claim]:
    """Take ownership of `partitions`; return where to resume each one."""
    parts = sorted(set(partitions))
    if not parts:
        return []
    rows = await pool.fetch(CLAIM, topic, owner, parts)
    return [Claim(r["partition"], r["next_offset"], r["epoch"], r["slot"]) for r in rows]


async def check_epochs(conn: asyncpg.Connection, topic: str, epochs: dict[int, int]) -> None:
    """Inside a transaction: lock the rows and raise FencedError if any epoch moved on."""
    rows = await conn.fetch(LOCK_EPOCHS, topic, sorted(epochs))
    current = {r["partition"]: r["epoch"] for r in rows}
    lost = {p for p, e in epochs.items() if current.get(p) != e}
    if lost:
        raise FencedError(lost)


async def store_offsets(conn: asyncpg.Connection, topic: str, offsets: dict[int, int]) -> None:
    if offsets:
        parts = sorted(offsets)
        await conn.execute(STORE_OFFSETS, topic, parts, [offsets[p] for p in parts])

