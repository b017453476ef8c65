"""Dedupe marks: what counts as a duplicate, for how long, and how marks are kept.

**The duplicate rule.** An event's identity is its CloudEvents (`source`, `id`)
*within the tumbling window its `time` falls in* (the window's start, see
`core/windows.py`). Two events are duplicates, and only the first is debited,
when they share (`source`, `id`) and window start:

- the same CloudEvent published again (a producer retry, a replayed backup, a
  re-driven DLQ, a mirror restart) keeps its `time`, so it is a duplicate for
  as long as its original is within the horizon below;
- the same event published under another Kafka key lands on another partition,
  owned by another worker: its window start is the same, so the reservation of
  the first partition makes it a duplicate there too;
- the same (`source`, `id`) with a `time` in *another* window is a different
  event and is debited (as Lago and Flexprice do: the timestamp is part of the
  identity). With a `time` in the same window it is a duplicate; first wins;
- a different subject or type with the same (`source`, `id`) and window is a
  duplicate as well (CloudEvents: `source` + `id` identify the event).

Changing `processor.window_size_ms` changes window starts, so a re-publication
across such a change is not recognised.

**The horizon.** Marks are kept for `Pipeline.dedupe_horizon`, which is the
maximum lateness unless `processor.dedupe_horizon_hours` opts out with a shorter
one (start-up warns): while its original is within the horizon a duplicate is
never debited twice; older than the maximum lateness it is rejected as too_old.

**Why the cost stays flat.** `dedupe_marks` is keyed by (window start, key) and
range-partitioned by window start, one partition per UTC day (migration 020).
Live traffic reserves marks for the current windows only, so inserts land on
the right edge of today's index, whatever the history kept; old partitions are
only read by late events of their own days. Retention drops whole day
partitions (`retain`), never rows; the next days are created ahead of time,
and a reservation that finds no partition for its day creates it.

**Reservation and confirmation.** Inserting a mark per event is the costliest
write of the pipeline. Doing it at window close would put seconds of inserts
between a window's end and its debit; so marks are *reserved* continuously, in
their own small statements, and the flush transaction confirms a whole window
with one `flush_tokens` row. The rules that keep this exactly-once:

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
  (both lock its checkpoint row), so a takeover never races a confirmation;
- a token outlives every mark that may carry it (`retain`), so a confirmed mark
  never looks like an orphan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

DAY_MS = 86_400_000
# Partitions are created this many days ahead, so no reservation of a live event
# waits for DDL (the on-demand creation is for late events of dropped days).
DAYS_AHEAD = 3
# Marks of a window day are dropped one day after its last window left the horizon
# (margin for the clocks of workers and producers); tokens three days after, because
# a mark may carry a token committed up to the future skew after its window.
MARKS_MARGIN = timedelta(days=1)
TOKENS_MARGIN = timedelta(days=3)

RESERVE = """
INSERT INTO dedupe_marks AS m (window_start_ms, key, slot, epoch, token)
SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bigint[])
ON CONFLICT (window_start_ms, key) DO UPDATE
    SET slot = excluded.slot, epoch = excluded.epoch, token = excluded.token
    WHERE (m.token = excluded.token
           OR m.slot = excluded.slot AND m.epoch < excluded.epoch
              AND NOT EXISTS (SELECT 1 FROM flush_tokens f WHERE f.token = m.token))
RETURNING window_start_ms, key
"""

CONFIRM = "INSERT INTO flush_tokens (token) SELECT unnest($1::bigint[])"
CONFIRMED = "SELECT count(*) FROM flush_tokens WHERE token = ANY($1::bigint[])"

ADD_DAYS = "SELECT dedupe_add_days($1::date, $2::date)"
DROP_DAYS = "SELECT dedupe_drop_days($1::date, $2::date)"
# The last day that has both a marks and a tokens partition.
LAST_DAY = """
SELECT least(max(to_date(right(c.relname, 8), 'YYYYMMDD')) FILTER (WHERE p.relname = 'dedupe_marks'),
             max(to_date(right(c.relname, 8), 'YYYYMMDD')) FILTER (WHERE p.relname = 'flush_tokens'))
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relname IN ('dedupe_marks', 'flush_tokens')
"""

Identity = tuple[int, bytes]  # (window start in ms, blake2b of (source, id))


async def reserve(
    conn: asyncpg.Connection | asyncpg.Pool,
    identities: Sequence[Identity],
    slots: Sequence[int],
    epochs: Sequence[int],
    tokens: Sequence[int],
) -> set[Identity]:
    """Reserve marks; return the identities now reserved for us (the rest are duplicates).

    `identities` must be distinct (ON CONFLICT DO UPDATE may touch a row once per statement).
    """
    if not identities:
        return set()
    starts = [i[0] for i in identities]
    args = (starts, [i[1] for i in identities], slots, epochs, tokens)
    try:
        rows = await conn.fetch(RESERVE, *args)
    except asyncpg.CheckViolationError:
        # "no partition of relation found for row": a day before the oldest partition
        # (a late event after a short opt-out horizon dropped it) or past the days made
        # ahead (housekeeping not running). Create the days and try once more.
        await add_days_of(conn, starts)
        rows = await conn.fetch(RESERVE, *args)
    return {(r[0], r[1]) for r in rows}


async def confirm(conn: asyncpg.Connection, tokens: Sequence[int]) -> None:
    """Inside the flush transaction: the marks of these tokens become applied."""
    if tokens:
        await conn.execute(CONFIRM, list(tokens))


async def add_days(conn: asyncpg.Connection | asyncpg.Pool, first: date, last: date) -> None:
    """Create the partitions of days `first`..`last` that do not exist yet."""
    try:
        await conn.execute(ADD_DAYS, first, last)
    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
        await conn.execute(ADD_DAYS, first, last)  # another worker created one concurrently


async def add_days_of(conn: asyncpg.Connection | asyncpg.Pool, window_starts: Sequence[int]) -> None:
    """Create the partitions of the days from the first to the last of `window_starts`."""
    await add_days(conn, _day(min(window_starts) // DAY_MS), _day(max(window_starts) // DAY_MS))


@dataclass(frozen=True, slots=True)
class Retention:
    dropped: list[str]  # tables dropped, oldest day first
    days_ahead: int  # days after today that have a partition for marks and for tokens


async def retain(conn: asyncpg.Connection | asyncpg.Pool, now: datetime,
                 horizon: timedelta) -> Retention:
    """Housekeeping: make the next days' partitions, drop the expired ones.

    Dropping a partition is a catalog change, whatever its size: retention never
    deletes rows.
    """
    today = now.date()
    await add_days(conn, today, today + timedelta(days=DAYS_AHEAD))
    oldest_kept = now - horizon
    rows = await conn.fetch(DROP_DAYS, (oldest_kept - MARKS_MARGIN).date(),
                            (oldest_kept - TOKENS_MARGIN).date())
    last = await conn.fetchval(LAST_DAY)
    return Retention([r[0] for r in rows], (last - today).days if last else -1)


def _day(epoch_day: int) -> date:
    return date(1970, 1, 1) + timedelta(days=epoch_day)


async def confirmed(conn: asyncpg.Connection | asyncpg.Pool, tokens: Sequence[int]) -> int:
    """How many of `tokens` a committed flush confirmed."""
    return int(await conn.fetchval(CONFIRMED, list(tokens)))
