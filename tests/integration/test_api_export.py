"""The dispute CSV export: every window aggregate with its debit and Stripe report status."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from meterline.api.export import COLUMNS

from .api_support import NOW, Api, add_customer, api_settings, flush_usage, grant, running_api

pytestmark = pytest.mark.integration

T = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)

# Created only where the Stripe sink's migration (002_stripe_reports.sql) is absent: the
# columns the export reads and these tests write, nothing more.
STRIPE_TABLES = """
CREATE TABLE IF NOT EXISTS stripe_reports (
    id bigserial PRIMARY KEY, customer_id text NOT NULL, meter text NOT NULL,
    event_name text NOT NULL, bucket_start timestamptz NOT NULL, part integer NOT NULL,
    seal_after timestamptz NOT NULL, status text NOT NULL, identifier text UNIQUE,
    attempts integer NOT NULL DEFAULT 0, last_error text, stripe_response_id text);
CREATE TABLE IF NOT EXISTS stripe_report_items (
    aggregate_id text PRIMARY KEY, report_id bigint REFERENCES stripe_reports (id),
    customer_id text NOT NULL, meter text NOT NULL, window_start timestamptz NOT NULL,
    quantity numeric NOT NULL);
"""


async def report(db: asyncpg.Pool, aggregate_ids: list[str], status: str, attempts: int,
                 last_error: str | None = None, response_id: str | None = None) -> int:
    """A Stripe sink report carrying `aggregate_ids` (one coalesced meter event)."""
    rows = await db.fetch("SELECT id, customer_id, meter, window_start, quantity "
                          "FROM window_aggregates WHERE id = ANY($1)", aggregate_ids)
    first = rows[0]
    report_id = await db.fetchval(
        "INSERT INTO stripe_reports (customer_id, meter, event_name, bucket_start, part, "
        "seal_after, status, identifier, attempts, last_error, stripe_response_id) "
        "VALUES ($1, $2, $2, $3, 0, $3, $4, $5, $6, $7, $8) RETURNING id",
        first["customer_id"], first["meter"], first["window_start"], status,
        f"rep_{aggregate_ids[0]}", attempts, last_error, response_id)
    await db.executemany(
        "INSERT INTO stripe_report_items (aggregate_id, report_id, customer_id, meter, "
        "window_start, quantity) VALUES ($1, $2, $3, $4, $5, $6)",
        [(r["id"], report_id, r["customer_id"], r["meter"], r["window_start"], r["quantity"])
         for r in rows])
    return int(report_id)


async def export(api: Api, customer: str, query: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    async with api.http.get(f"{api.url}/v1/customers/{customer}/export.csv?{query}") as r:
        assert r.status == 200, await r.text()
        text = (await r.read()).decode()
        headers = dict(r.headers)
    assert text.endswith("\r\n")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames or ()) == COLUMNS
    return headers, list(reader)


async def test_export_lists_every_window_with_its_debit_and_stripe_report_status(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database, api={"export_fetch_rows": 10})
    async with running_api(settings, clock=lambda: NOW) as api:
        await api.db.execute(STRIPE_TABLES)
        await add_customer(api.db, "d1")
        await add_customer(api.db, "other")
        await grant(api, "d1", "1")
        usage = [("d1", "api_calls", T + timedelta(seconds=5 * i), 1) for i in range(30)
                 for _ in range(i + 1)]                                          # 30 windows
        usage += [("d1", "llm_tokens", T + timedelta(seconds=1), 0)]             # debits nothing
        usage += [("d1", "gpu_seconds", T + timedelta(minutes=30), 80)]          # past the grant
        usage += [("d1", "api_calls", T - timedelta(seconds=1), 5)]              # before `from`
        usage += [("other", "api_calls", T + timedelta(seconds=2), 1)]           # someone else
        await flush_usage(api, usage)
        await flush_usage(api, [("d1", "api_calls", T + timedelta(seconds=3), 1)] * 4)  # late
        ids = {(r["meter"], r["window_start"], r["seq"]): r["id"] for r in await api.db.fetch(
            "SELECT id, meter, window_start, seq FROM window_aggregates WHERE customer_id = 'd1'")}
        assert len(ids) == 34
        first = ids[("api_calls", T, 0)]
        correction = ids[("api_calls", T, 1)]
        gpu = ids[("gpu_seconds", T + timedelta(minutes=30), 0)]
        accepted = await report(api.db, [first, ids[("api_calls", T + timedelta(seconds=5), 0)]],
                                "accepted", 1, response_id="req_abc")
        rejected = await report(api.db, [gpu], "rejected", 3,
                                last_error="=HYPERLINK(\"x\") meter_event_customer_not_found")

        headers, rows = await export(api, "d1", "from=2026-11-21T09:00:00Z&to=2026-11-21T10:00:00Z")

        assert headers["Content-Type"] == "text/csv; charset=utf-8"
        assert headers.get("Transfer-Encoding") == "chunked"  # streamed, not buffered
        assert 'filename="meterline-d1-20261121T090000Z-20261121T100000Z.csv"' in \
            headers["Content-Disposition"]
        # every aggregate of d1 in the range, once, in window order; nothing else
        by_id = {r["aggregate_id"]: r for r in rows}
        assert len(rows) == len(by_id) == 33  # 30 windows + a correction + llm + gpu
        assert set(by_id) == set(ids.values()) - {ids[("api_calls", T - timedelta(seconds=5), 0)]}
        assert all(r["customer_id"] == "d1" for r in rows)
        assert [(r["window_start"], r["meter"], r["seq"]) for r in rows] == sorted(
            (r["window_start"], r["meter"], r["seq"]) for r in rows)

        # the first window: 1 call (0.001 credits), covered by the grant, reported and accepted
        r = by_id[first]
        assert (r["window_start"], r["window_end"], r["seq"], r["correction"]) == (
            "2026-11-21T09:00:00.000Z", "2026-11-21T09:00:05.000Z", "0", "false")
        assert (Decimal(r["quantity"]), Decimal(r["credits"]), Decimal(r["debited_credits"]),
                Decimal(r["overage_credits"])) == (1, Decimal("0.001"), Decimal("0.001"), 0)
        assert (r["stripe_report_id"], r["stripe_status"], r["stripe_attempts"],
                r["stripe_response_id"]) == (str(accepted), "accepted", "1", "req_abc")
        assert r["stripe_identifier"] == f"rep_{first}"
        # its late correction: 4 more calls, a separate debit, not reported yet
        r = by_id[correction]
        assert (r["seq"], r["correction"], Decimal(r["quantity"]), Decimal(r["window_value"]),
                Decimal(r["debited_credits"]), r["stripe_status"]) == (
            "1", "true", 4, 5, Decimal("0.004"), "unreported")
        # the window that debited nothing has no ledger entry
        r = by_id[ids[("llm_tokens", T, 0)]]
        assert (Decimal(r["credits"]), r["ledger_entry_id"], r["debited_credits"]) == (0, "", "")
        # gpu: 0.8 credits when the grant had little left: overage; rejected by Stripe, and the
        # error text cannot run as a spreadsheet formula
        r = by_id[gpu]
        assert Decimal(r["debited_credits"]) == Decimal("0.8")
        assert Decimal(r["overage_credits"]) > 0
        assert (r["stripe_status"], r["stripe_attempts"], r["stripe_report_id"]) == (
            "rejected", "3", str(rejected))
        assert r["stripe_last_error"] == "'=HYPERLINK(\"x\") meter_event_customer_not_found"
        # every debit matches the ledger, row by row
        debits = {x["aggregate_id"]: x for x in await api.db.fetch(
            "SELECT id, aggregate_id, -amount AS debited, overage FROM ledger_entries "
            "WHERE kind = 'debit' AND customer_id = 'd1'")}
        for agg_id, row in by_id.items():
            d = debits.get(agg_id)
            if d is None:
                assert row["ledger_entry_id"] == ""
            else:
                assert (int(row["ledger_entry_id"]), Decimal(row["debited_credits"]),
                        Decimal(row["overage_credits"])) == (d["id"], d["debited"], d["overage"])
                assert Decimal(row["credits"]) == d["debited"]
        assert sum(Decimal(r["debited_credits"] or 0) for r in rows) == \
            sum(x["debited"] for x in debits.values() if x["aggregate_id"] in by_id)


async def test_export_of_unknown_customer_is_404_json_and_empty_range_is_a_header(
        migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database), clock=lambda: NOW) as api:
        await api.db.execute(STRIPE_TABLES)
        async with api.http.get(api.url + "/v1/customers/ghost/export.csv") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "customer_not_found"
        await add_customer(api.db, "quiet")
        _, rows = await export(api, "quiet", "from=2026-11-01T00:00:00Z")
        assert rows == []
        async with api.http.get(api.url + "/v1/customers/quiet/export.csv?to=nope") as r:
            assert r.status == 400


async def test_exports_beyond_the_limit_are_refused_so_hot_paths_keep_their_connections(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database, api={"max_concurrent_exports": 1})
    async with running_api(settings, clock=lambda: NOW) as api:
        await api.db.execute(STRIPE_TABLES)
        await add_customer(api.db, "e1")
        assert api.server.context is not None
        # while one export is streaming (it holds the only slot), another is refused
        async with api.server.context.exports, api.http.get(
                api.url + "/v1/customers/e1/export.csv") as r:
            assert r.status == 429
            assert (await r.json())["error"]["code"] == "too_many_exports"
        _, rows = await export(api, "e1", "from=2026-11-01T00:00:00Z")
        assert rows == []
