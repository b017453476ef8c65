"""Dedupe marks: reserved while a window is open, confirmed by the window's flush.

Inserting a mark per event is the costliest write of the pipeline (~110–150k
rows/s here). Doing it at window close would put seconds of inserts between a
window's end and its debit; so marks are *reserved* continuously, in their own
small statements, and the flush transaction confirms a whole window with one
`flush_tokens` row. The rules that keep this exactly-once:

- a mark counts as applied only if its token is in `flush_tokens`, and tokens
  are inserted only by the flush transaction that debits their events;
- reserving a key that already has a mark returns nothing (a duplicate), unless
  the mark is an *orphan*: unconfirmed and stamped by an older epoch of the same
  partition slot — its worker crashed or was fenced before flushing, and the
  partition's new owner, now replaying the event, takes it over;
- a live reservation of another partition (a mis-keyed duplicate) is never
  taken over: that partition's owner will debit it, or replay it;
- a mark already stamped with the reserving buffer's own token is that buffer's: a
  reservation whose answer was lost (connection broken after the INSERT ran) is simply
  sent again, and must not find its own marks and call its events duplicates (which
  would drop them unseen). Tokens are random per buffer, and a confirmed token's buffer
  is gone, so no other buffer reserves under it;
- epochs only grow, and a claim waits for an in-flight flush of the partition
  (both lock its checkpoint row), so a takeover never races a confirmation.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg

RESERVE = """
INSERT INTO dedupe_marks AS m (key, slot, epoch, token)
SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[])
ON CONFLICT (key) DO UPDATE
    SET slot = excluded.slot, epoch = excluded.epoch, token = excluded.token, seen_at = now()
    WHERE (m.token = excluded.token
           OR m.slot = excluded.slot AND m.epoch < excluded.epoch
              AND NOT EXISTS (SELECT 1 FROM flush_tokens f WHERE f.token = m.token))
RETURNING key
"""

CONFIRM = "INSERT INTO flush_tokens (token) SELECT unnest($1::bigint[])"
CONFIRMED = "SELECT count(*) FROM flush_tokens WHERE token = ANY($1::bigint[])"

PURGE_MARKS = "DELETE FROM dedupe_marks WHERE seen_at < $1"
# Tokens outlive their marks (a mark's seen_at <= its token's committed_at), so a
# confirmed mark can never look like an orphan.
PURGE_TOKENS = "DELETE FROM flush_tokens WHERE committed_at < $1"


async def reserve(
    conn: asyncpg.Connection | asyncpg.Pool,
    keys: Sequence[bytes],
    slots: Sequence[int],
    epochs: Sequence[int],
    tokens: Sequence[int],
) -> set[bytes]:
    """Reserve marks; return the keys now reserved for us (the rest are duplicates).

    `keys` must be distinct (ON CONFLICT DO UPDATE may touch a row once per statement).
    """
    if not keys:
        return set()
    rows = await conn.fetch(RESERVE, keys, slots, epochs, tokens)
    return {r[0] for r in rows}


async def confirm(conn: asyncpg.Connection, tokens: Sequence[int]) -> None:
    """Inside the flush transaction: the marks of these tokens become applied."""
    if tokens:
        await conn.execute(CONFIRM, list(tokens))


async def confirmed(conn: asyncpg.Connection | asyncpg.Pool, tokens: Sequence[int]) -> int:
    """How many of `tokens` a committed flush confirmed."""
    return int(await conn.fetchval(CONFIRMED, list(tokens)))


async def purge(conn: asyncpg.Connection | asyncpg.Pool, now: datetime, horizon: timedelta) -> None:
    await conn.execute(PURGE_MARKS, now - horizon)
    await conn.execute(PURGE_TOKENS, now - horizon - timedelta(hours=1))
