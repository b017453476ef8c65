"""The benchmark's bulk history (devstack/history.py) is the state the real write path leaves."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from meterline.config import Settings
from meterline.devstack.history import METER, SOURCE, history_events, load_history
from meterline.processor.pipeline import Pipeline, RecordRun
from meterline.storage.db import create_pool

from .harness import FakeClock, Record

pytestmark = pytest.mark.integration

EVENTS, CUSTOMERS, SPAN_MS = 400, 3, 60_000


class NoDlq:
    """Every event here is valid: a dead letter would be a test failure."""

    source_topic = "unused"

    def write(self, *args: object) -> None:
        raise AssertionError(f"unexpected dead letter: {args}")

    async def settle(self) -> None:
        return None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Groups = set[frozenset[tuple[int, bytes]]]


async def _marks_by_token(pool: asyncpg.Pool) -> tuple[Groups, int]:
    """The marks grouped by their token, and how many marks are not confirmed."""
    rows = await pool.fetch("SELECT window_start_ms, key, token FROM dedupe_marks")
    groups: dict[int, set[tuple[int, bytes]]] = {}
    for r in rows:
        groups.setdefault(r["token"], set()).add((r["window_start_ms"], bytes(r["key"])))
    unconfirmed = await pool.fetchval(
        "SELECT count(*) FROM dedupe_marks m WHERE NOT EXISTS "
        "(SELECT 1 FROM flush_tokens f WHERE f.token = m.token)")
    return {frozenset(g) for g in groups.values()}, unconfirmed


async def test_bulk_history_equals_what_the_processor_writes_for_the_same_events(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=CUSTOMERS)
    assert any(m.key == METER and m.event_type == METER for m in settings.meters)
    now_s = 1_800_000_000.0
    first_ms = int(now_s * 1000) - 2 * SPAN_MS
    events = list(history_events(EVENTS, first_ms, SPAN_MS, CUSTOMERS))
    size = settings.processor.window_size_ms
    assert len({e.time_ms - e.time_ms % size for e in events}) * 3 < EVENTS  # several per window
    records = [Record(i, e.customer.encode(), orjson.dumps({
        "specversion": "1.0", "id": e.event_id, "source": SOURCE, "type": METER,
        "subject": e.customer, "time": _iso(e.time_ms), "data": {"tokens": 1}}))
        for i, e in enumerate(events)]
    pool = await create_pool(settings.database_url)
    try:
        # The real path: one partition, ingest, reserve, flush.
        clock = FakeClock(now_s)
        pipeline = Pipeline(settings, pool, NoDlq(), "history-test", clock)  # type: ignore[arg-type]
        await pipeline.claim([0])
        assert pipeline.ingest(RecordRun(0, pipeline.generation(0), records, 0)) is None
        assert pipeline.windows.pending_events == EVENTS
        assert await pipeline.flush_tick() is not None
        assert pipeline.windows.pending_events == 0
        real, real_unconfirmed = await _marks_by_token(pool)

        await pool.execute("TRUNCATE dedupe_marks, flush_tokens")
        async with pool.acquire() as conn:
            await load_history(conn, EVENTS, first_ms, SPAN_MS, CUSTOMERS, size, chunk=70)
        bulk, bulk_unconfirmed = await _marks_by_token(pool)
    finally:
        await pool.close()

    assert (real_unconfirmed, bulk_unconfirmed) == (0, 0)
    assert sum(len(g) for g in real) == EVENTS
    # the same marks, under the same grouping into confirmed window tokens
    assert bulk == real
