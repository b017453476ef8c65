"""Exact debits through the real broker, Postgres and a processor subprocess.

Every test checks the same two equalities: the ledger's debits per customer
equal the load generator's independently computed expectation, and the number
of events in window aggregates equals the number of unique valid events sent.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids

from .harness import (
    Sender,
    assert_exact,
    assert_ledger_integrity,
    db_pool,
    fleet,
    wait_for_ledger,
    wait_for_owners,
)

pytestmark = pytest.mark.integration

CUSTOMERS = 40
LATE_PER_WINDOW = 60


async def _send_with_duplicates_and_check(
    settings: Settings, workdir: Path, batch_size: int, rate: float, seconds: float
) -> None:
    with fleet(settings, workdir, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(CUSTOMERS), batch_size=batch_size,
                                duplicates=0.3, late=0, invalid=0, seed=7)
            with Sender(gen, rate) as sender:
                await asyncio.sleep(seconds)
                sender.stop()
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers, settle=1.5)

            st = gen.stats
            sent_items = st.events_sent + st.duplicates_sent
            assert 0.25 < st.duplicates_sent / sent_items < 0.35, st
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, st.events_sent)


async def test_exact_totals_with_30_percent_duplicates(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(customers=CUSTOMERS)
    await _send_with_duplicates_and_check(settings, tmp_path, batch_size=0, rate=2000, seconds=4)


async def test_exact_totals_with_30_percent_duplicates_in_batch_envelopes(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(customers=CUSTOMERS)
    await _send_with_duplicates_and_check(settings, tmp_path, batch_size=200, rate=3000, seconds=4)


async def test_late_events_debited_as_corrections_of_their_own_window(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    customers = customer_ids(4)
    settings = pipeline_settings(customers=len(customers))
    size = settings.processor.window_size_ms
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customers, duplicates=0, late=0, invalid=0, seed=11)
            # Phase 1: on-time events over a few windows; wait until all are flushed.
            for _ in range(4):
                gen.send(300)
                await asyncio.sleep(0.6)
            gen.flush()
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers)
            assert_exact(snap, gen)
            flushed = await pool.fetch(
                "SELECT customer_id, meter, window_start, max(seq) AS seq FROM window_aggregates "
                "GROUP BY 1, 2, 3")
            # Not necessarily all seq 0: with a 300 ms grace, an on-time event fetched more
            # than 300 ms after its window's end is already a correction (see the report).
            before = {(r["customer_id"], r["meter"], r["window_start"]): r["seq"] for r in flushed}
            # Phase 2: NEW events (fresh ids) stamped inside those already-flushed windows,
            # among some on-time ones. With 4 customers x 3 meters and 300 events per send,
            # every (customer, meter) already has an aggregate in each of those windows
            # (checked below), so each late event must become a correction of its window.
            windows = sorted({t[2] for t in before})
            assert len(windows) >= 2, "phase 1 should span several windows"
            now = datetime.now(UTC)
            assert now >= windows[-1] + timedelta(
                milliseconds=size + settings.processor.window_grace_ms)
            meter_of = {m.event_type: m.key for m in settings.meters}
            late: Counter[tuple[str, str, datetime]] = Counter()
            for start in windows:
                start_ms = int(start.timestamp() * 1000)
                for i in range(LATE_PER_WINDOW):
                    customer, body = gen.make_event(start_ms + (i * 37) % size)
                    doc = orjson.loads(body)
                    late[(customer, meter_of[doc["type"]], start)] += 1
                    gen.producer.produce(gen.topic, body, customer.encode())
            assert set(late) <= set(before), "a late event hit a window without an aggregate"
            gen.send(200)
            gen.flush()
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers, settle=1.5)
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, gen.stats.events_sent)

            rows = await pool.fetch(
                "SELECT customer_id, meter, window_start, window_end, seq, event_count "
                "FROM window_aggregates WHERE window_start = ANY($1::timestamptz[])", windows)
            new = [r for r in rows
                   if r["seq"] > before.get((r["customer_id"], r["meter"], r["window_start"]), -1)]
            # Each (customer, meter, old window) that got late events got new aggregates that
            # are corrections (seq > 0) of that same window, holding exactly those events
            # (usually one; more if its late events straddled a flush tick).
            got: dict[tuple[str, str, datetime], list[Any]] = defaultdict(list)
            for r in new:
                got[(r["customer_id"], r["meter"], r["window_start"])].append(r)
            assert set(got) == set(late)
            for key, rs in got.items():
                seqs_new = sorted(r["seq"] for r in rs)
                assert seqs_new == list(range(before[key] + 1, before[key] + 1 + len(rs))), key
                assert seqs_new[0] > 0
                assert sum(r["event_count"] for r in rs) == late[key], key
                for r in rs:
                    assert r["window_end"] - r["window_start"] == timedelta(milliseconds=size)
            assert sum(r["event_count"] for r in new) == LATE_PER_WINDOW * len(windows)
            # seq counts up per window without gaps: 0, 1, ...
            seqs = await pool.fetch(
                "SELECT customer_id, meter, window_start, array_agg(seq ORDER BY seq) AS seqs "
                "FROM window_aggregates GROUP BY 1, 2, 3")
            for r in seqs:
                assert r["seqs"] == list(range(len(r["seqs"]))), dict(r)
