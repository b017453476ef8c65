"""History for growth benchmarks: the dedupe state that `n` past events leave behind.

Pushing 10^7..10^8 events through the processor before a benchmark would take
hours here, so `load_history` writes directly what the real write path leaves
in the dedupe tables once those events are debited: one mark per event under
its (window start, blake2b(source, id)) identity, grouped under one confirmed
token per (customer, meter, window) buffer, exactly as `Pipeline.reserve` and
the flush do with one partition. Slots and epochs are a single claim's (1, 1).
tests/integration/test_history.py checks the equivalence against the real path.

Only the dedupe state is loaded (not window aggregates or ledger entries): it
is the state whose size the per-event cost could depend on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from meterline.core.events import dedupe_key
from meterline.devstack.load import customer_ids
from meterline.storage.dedupe import add_days_of

SOURCE = "history"
METER = "llm_tokens"  # the dev config's meter of CloudEvents type llm_tokens


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    event_id: str
    customer: str
    time_ms: int


def history_events(n: int, first_ms: int, span_ms: int, customers: int) -> Iterator[HistoryEvent]:
    """`n` events spread evenly over [first_ms, first_ms + span_ms), round-robin over customers."""
    names = customer_ids(customers)
    for i in range(n):
        yield HistoryEvent(str(i), names[i % customers], first_ms + i * span_ms // n)


def _token(customer: str, window_start_ms: int) -> int:
    """One token per (customer, meter, window): what a window buffer's flush confirms."""
    digest = hashlib.blake2b(f"{customer}\x00{METER}\x00{window_start_ms}".encode(), digest_size=8)
    return int.from_bytes(digest.digest()) >> 1  # 63 bits, like WindowBuffer tokens


async def load_history(conn: asyncpg.Connection, n: int, first_ms: int, span_ms: int,
                       customers: int, window_size_ms: int = 5_000, chunk: int = 500_000) -> None:
    """Write the dedupe marks and confirmed tokens of `history_events(...)` (COPY, in chunks)."""
    tokens: set[int] = set()
    rows: list[tuple[int, bytes, int, int, int]] = []
    for ev in history_events(n, first_ms, span_ms, customers):
        start = ev.time_ms - ev.time_ms % window_size_ms
        token = _token(ev.customer, start)
        tokens.add(token)
        rows.append((start, dedupe_key(SOURCE, ev.event_id), 1, 1, token))
        if len(rows) == chunk:
            await _copy(conn, rows, tokens)
            rows, tokens = [], set()
    await _copy(conn, rows, tokens)


async def _copy(conn: asyncpg.Connection, rows: list[tuple[int, bytes, int, int, int]],
                tokens: set[int]) -> None:
    if not rows:
        return
    await add_days_of(conn, [rows[0][0], rows[-1][0]])
    async with conn.transaction():
        await conn.copy_records_to_table(
            "dedupe_marks", records=rows,
            columns=["window_start_ms", "key", "slot", "epoch", "token"])
        # A token may span two chunks: confirm it once.
        await conn.execute(
            "INSERT INTO flush_tokens (token) SELECT t FROM unnest($1::bigint[]) AS t "
            "WHERE NOT EXISTS (SELECT 1 FROM flush_tokens f WHERE f.token = t)", list(tokens))


DEDUPE_TABLES = ("dedupe_marks", "flush_tokens")


async def relation_bytes(conn: asyncpg.Connection, tables: tuple[str, ...] = DEDUPE_TABLES) -> int:
    """Bytes on disk of `tables`, their partitions and their indexes."""
    return int(await conn.fetchval("""
        SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
        WHERE c.relkind = 'r' AND (c.relname = ANY($1::text[]) OR EXISTS (
            SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
            WHERE i.inhrelid = c.oid AND p.relname = ANY($1::text[])))""", list(tables)))
