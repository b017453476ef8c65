"""Coalescing of window aggregates into Stripe reports (Postgres, no Kafka, no Stripe)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from meterline.stripe import reports
from meterline.stripe.reports import Staged, bucket_of

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)


def staged(n: int, second: int, quantity: str, customer: str = "c1") -> Staged:
    return Staged(f"agg_{customer}_{n}", customer, "gpu_seconds", "gpu_seconds",
                  T0 + timedelta(seconds=second), Decimal(quantity), partition=0, offset=n)


def test_buckets_are_epoch_aligned_and_never_straddle_a_day() -> None:
    assert bucket_of(T0 + timedelta(seconds=59), 60) == T0
    assert bucket_of(T0 + timedelta(seconds=60), 60) == T0 + timedelta(minutes=1)
    midnight = datetime(2026, 12, 1, tzinfo=UTC)
    assert bucket_of(midnight - timedelta(seconds=1), 3600) == midnight - timedelta(hours=1)
    assert bucket_of(T0 + timedelta(seconds=7), 0) == T0 + timedelta(seconds=7)


async def test_coalescing_sums_exactly_and_late_aggregates_open_a_new_part(
    migrated_database: str,
) -> None:
    conn = await asyncpg.connect(migrated_database)
    try:
        # windows 0..55 s of one minute: 12 aggregates of 0.1 + one of 1e-9 -> one report
        first = [staged(i, i * 5, "0.1") for i in range(12)] + [staged(99, 3, "0.000000001")]
        assert await reports.stage(conn, first, 60, 5) == 13
        assert await reports.stage(conn, first[:4], 60, 5) == 0  # redelivery: nothing new
        # the next minute's windows go to their own bucket
        assert await reports.stage(conn, [staged(200, 61, "2")], 60, 5) == 1

        assert await reports.seal_due(conn, T0 + timedelta(seconds=64)) == 0  # grace not over
        assert await reports.seal_due(conn, T0 + timedelta(seconds=65)) == 1
        # a late aggregate for the sealed minute: a second part, never the sealed report
        assert await reports.stage(conn, [staged(300, 10, "0.7")], 60, 5) == 1
        assert await reports.seal_due(conn, T0 + timedelta(seconds=125)) == 2
        rows = await conn.fetch(
            "SELECT bucket_start, part, quantity, aggregate_count, identifier, status"
            " FROM stripe_reports ORDER BY bucket_start, part")
    finally:
        await conn.close()
    assert [(r["bucket_start"], r["part"], r["quantity"], r["aggregate_count"]) for r in rows] == [
        (T0, 0, Decimal("1.200000001"), 13),
        (T0, 1, Decimal("0.7"), 1),
        (T0 + timedelta(minutes=1), 0, Decimal("2"), 1),
    ]
    assert rows[0]["identifier"].startswith("mlc_")
    assert rows[1]["identifier"] == "agg_c1_300" and rows[2]["identifier"] == "agg_c1_200"
    assert {r["status"] for r in rows} == {"pending"}


async def test_offsets_are_held_below_the_first_unfinished_report(migrated_database: str) -> None:
    conn = await asyncpg.connect(migrated_database)
    try:
        await reports.stage(conn, [staged(i, i, "1") for i in range(3)]
                            + [staged(10, 70, "1")], 60, 0)
        await reports.seal_due(conn, T0 + timedelta(seconds=200))
        assert await reports.unfinished_offset_floor(conn) == {0: 0}
        [a, b] = await reports.claim(conn, 10, 60, "v1")
        assert (a.quantity, b.quantity) == (Decimal(3), Decimal(1))
        await reports.mark_accepted(conn, [(a.id, "req_1")])
        assert await reports.unfinished_offset_floor(conn) == {0: 10}
        await reports.mark_rejected(conn, [(b.id, "meter_event_customer_not_found", "no")])
        assert await reports.unfinished_offset_floor(conn) == {}
    finally:
        await conn.close()
