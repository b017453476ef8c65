"""`meterline bench --dedupe`: the reservation path alone, as history grows, old design vs new.

Calls the reservation the way the processor does (batches of 10,000 new keys,
then one confirmation per batch) on one Postgres, for two schemas side by side:

- `row_per_event_001`: the dedupe marks of migration 001 (one row per event, a
  random 16-byte primary key, purged by DELETE), reproduced here with their
  reservation statement, for comparison only;
- `window_partitioned_020`: `storage/dedupe.py` on a migrated database (marks
  keyed by window start and partitioned by day, migration 020).

At each mark count (`--dedupe-marks`), history is first filled up to it by a
bulk INSERT of rows shaped as the real path writes them: random keys for the
001 table; for 020, keys of windows spread evenly over the lateness horizon in
time order (the order a live stream writes them), with their confirmed tokens.
Then `--dedupe-batches` batches of live keys (current windows) are reserved and
confirmed, timed. Relation sizes give the bytes per mark at rest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from meterline.devstack.bench import run_bench, servers
from meterline.devstack.history import DEDUPE_TABLES, relation_bytes
from meterline.storage import dedupe
from meterline.storage.db import migrate, with_database

BATCH = 10_000
WINDOW_MS = 5_000
HORIZON_MS = 35 * dedupe.DAY_MS

LEGACY_SCHEMA = """
CREATE TABLE legacy_marks (
    key      bytea PRIMARY KEY,
    slot     bigint NOT NULL,
    epoch    bigint NOT NULL,
    token    bigint NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX legacy_marks_seen_at ON legacy_marks USING brin (seen_at);
CREATE TABLE legacy_tokens (
    token         bigint PRIMARY KEY,
    committed_at  timestamptz NOT NULL DEFAULT now()
);
"""

LEGACY_RESERVE = """
INSERT INTO legacy_marks AS m (key, slot, epoch, token)
SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[])
ON CONFLICT (key) DO UPDATE
    SET slot = excluded.slot, epoch = excluded.epoch, token = excluded.token, seen_at = now()
    WHERE m.slot = excluded.slot AND m.epoch < excluded.epoch
      AND NOT EXISTS (SELECT 1 FROM legacy_tokens f WHERE f.token = m.token)
RETURNING key
"""

LEGACY_FILL = """
WITH s AS (SELECT i FROM generate_series($1::bigint, $2::bigint - 1) AS i)
INSERT INTO legacy_marks (key, slot, epoch, token)
SELECT decode(md5('h' || i), 'hex'), 1, 1, i / 10000 FROM s
"""
LEGACY_FILL_TOKENS = """
INSERT INTO legacy_tokens (token) SELECT generate_series($1::bigint / 10000, ($2::bigint - 1) / 10000)
ON CONFLICT DO NOTHING
"""

# History keys of 020: mark i of `total` sits in the window at its share of the horizon.
WINDOW_FILL = """
WITH s AS (SELECT i FROM generate_series($1::bigint, $2::bigint - 1) AS i)
INSERT INTO dedupe_marks (window_start_ms, key, slot, epoch, token)
SELECT ($3::bigint + (i * $4::bigint / $5::bigint)) / 5000 * 5000, decode(md5('h' || i), 'hex'),
       1, 1, i / 10000
FROM s
"""
WINDOW_FILL_TOKENS = """
INSERT INTO flush_tokens (token) SELECT generate_series($1::bigint / 10000, ($2::bigint - 1) / 10000)
"""


async def _measure(conn: asyncpg.Connection, legacy: bool, batches: int, now_ms: int) -> float:
    """Reservations per second for `batches` batches of new keys, each confirmed after.

    One batch more runs first, untimed (statement preparation, plan cache).
    """
    n = BATCH
    elapsed = 0.0
    for b in range(-1, batches):
        keys = [secrets.token_bytes(16) for _ in range(n)]
        token = secrets.randbits(62)
        started = time.perf_counter()
        if legacy:
            rows = await conn.fetch(LEGACY_RESERVE, keys, [1] * n, [1] * n, [token] * n)
            await conn.execute("INSERT INTO legacy_tokens (token) VALUES ($1)", token)
        else:
            # live traffic: the current window and the one before it
            window = (now_ms // WINDOW_MS - b % 2) * WINDOW_MS
            rows = await dedupe.reserve(conn, [(window, k) for k in keys], [1] * n, [1] * n,
                                        [token] * n)
            async with conn.transaction():
                await dedupe.confirm(conn, [token])
        if b >= 0:
            elapsed += time.perf_counter() - started
        assert len(rows) == n, "fresh random keys must all be reserved"
    return n * batches / elapsed


class Design:
    """One schema in its own database, filled up to a mark count and measured there."""

    def __init__(self, name: str, legacy: bool) -> None:
        self.name, self.legacy = name, legacy
        self.tables = ("legacy_marks", "legacy_tokens") if legacy else DEDUPE_TABLES
        self.filled = 0
        self.measured = 0  # marks written by the timed batches
        self.conn: asyncpg.Connection | None = None

    async def open(self, server_dsn: str) -> None:
        db = f"bench_dedupe_{self.name}"
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
            await admin.execute(f'CREATE DATABASE "{db}"')
        finally:
            await admin.close()
        dsn = with_database(server_dsn, db)
        await migrate(dsn)
        self.conn = await asyncpg.connect(dsn)
        if self.legacy:
            await self.conn.execute(LEGACY_SCHEMA)

    async def fill(self, level: int, total: int, now_ms: int) -> float:
        """Bulk-load history up to `level` marks (in one-million slices); return the seconds it took."""
        assert self.conn is not None
        started = time.perf_counter()
        for lo in range(self.filled, level, 1_000_000):
            hi = min(lo + 1_000_000, level)
            if self.legacy:
                await self.conn.execute(LEGACY_FILL, lo, hi)
                await self.conn.execute(LEGACY_FILL_TOKENS, lo, hi)
            else:
                await self.conn.execute(WINDOW_FILL, lo, hi, now_ms - HORIZON_MS,
                                        HORIZON_MS - dedupe.DAY_MS, total)
                await self.conn.execute(WINDOW_FILL_TOKENS, lo, hi)
        self.filled = level
        await self.conn.execute("CHECKPOINT")
        await self.conn.execute("VACUUM ANALYZE")
        return time.perf_counter() - started

    async def measure(self, batches: int, now_ms: int) -> float:
        assert self.conn is not None
        rate = await _measure(self.conn, self.legacy, batches, now_ms)
        self.measured += (batches + 1) * BATCH
        return rate

    async def bytes_per_mark(self) -> float:
        assert self.conn is not None
        return await relation_bytes(self.conn, self.tables) / (self.filled + self.measured)


async def _main(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path) -> dict[str, Any]:
    """Both designs at each mark count, measured alternately (A B B A) so load on the
    shared machine weighs on both alike; the rate reported is the mean of the two rounds."""
    _, server_dsn = servers(stack, workdir)
    levels = sorted(int(x) for x in args.dedupe_marks.split(","))
    designs = [Design("row_per_event_001", True), Design("window_partitioned_020", False)]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "batch_size": BATCH,
                               "batches_per_level": args.dedupe_batches, "order": "A B B A"}
    now_ms = int(time.time() * 1000)
    try:
        for d in designs:
            await d.open(server_dsn)
            results[d.name] = {"levels": []}
        for level in levels:
            fills = [await d.fill(level, max(levels) or 1, now_ms) for d in designs]
            rates: dict[str, list[float]] = {d.name: [] for d in designs}
            for d in (*designs, *reversed(designs)):
                rates[d.name].append(await d.measure(args.dedupe_batches, now_ms))
            for d, fill_s in zip(designs, fills, strict=True):
                row = {"marks": level,
                       "reservations_per_second": round(sum(rates[d.name]) / 2),
                       "rounds": [round(r) for r in rates[d.name]],
                       "bytes_per_mark": round(await d.bytes_per_mark(), 1),
                       "fill_seconds": round(fill_s, 1)}
                print(f"[dedupe {d.name}] {row}", file=sys.stderr)
                results[d.name]["levels"].append(row)
    finally:
        for d in designs:
            if d.conn is not None:
                await d.conn.close()
    for d in designs:
        rows = results[d.name]["levels"]
        results[d.name]["at_most_vs_empty"] = round(
            rows[-1]["reservations_per_second"] / rows[0]["reservations_per_second"], 3)
    return results


def run(args: argparse.Namespace) -> int:
    return run_bench(args, _main, "meterline-bench-dedupe-", lambda results: True)
