"""The API against real Postgres: auth, balance, entitlements, usage, ledger, customers, ops."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from meterline.api.auth import load_tokens
from meterline.devstack.embedded import EmbeddedPostgres

from .api_support import (
    NOW,
    SECOND_TOKEN,
    TOKEN,
    add_customer,
    adjust,
    api_settings,
    flush_usage,
    grant,
    running_api,
)

pytestmark = pytest.mark.integration


# --- auth ---------------------------------------------------------------------------------


async def test_v1_needs_one_of_the_configured_bearer_tokens(migrated_database: str) -> None:
    settings = api_settings(migrated_database)
    async with running_api(settings, tokens=(TOKEN, SECOND_TOKEN)) as api:
        await add_customer(api.db, "c1")
        path = api.url + "/v1/customers/c1/entitlements/api_calls"
        async with aiohttp.ClientSession() as anon:
            async with anon.get(path) as r:  # no header
                assert r.status == 401
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="meterline"'
                assert (await r.json())["error"]["code"] == "unauthorized"
            for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}",
                           TOKEN, f"Bearer {TOKEN} extra"):
                async with anon.get(path, headers={"Authorization": header}) as r:
                    assert r.status == 401, header
                    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="meterline"')
            async with anon.get(path, headers={"Authorization": f"Bearer {TOKEN}x"}) as r:
                assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            for token in (TOKEN, SECOND_TOKEN):
                async with anon.get(path, headers={"Authorization": f"bearer {token}"}) as r:
                    assert r.status == 200, token
            # a POST without a token changes nothing
            async with anon.post(api.url + "/v1/customers", json={"id": "intruder"}) as r:
                assert r.status == 401
            assert await api.db.fetchval("SELECT count(*) FROM customers WHERE id = 'intruder'") == 0
            for open_path in ("/healthz", "/readyz", "/metrics"):
                async with anon.get(api.url + open_path) as r:
                    assert r.status == 200, open_path


async def test_tokens_from_the_file_work_and_are_never_echoed(
        migrated_database: str, tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"# rotated 2026-11\n{SECOND_TOKEN}\n\n")
    tokens = load_tokens({"METERLINE_API_TOKENS_FILE": str(file), "METERLINE_API_TOKENS": TOKEN})
    assert tokens == (TOKEN.encode(), SECOND_TOKEN.encode())
    settings = api_settings(migrated_database)
    async with running_api(settings, tokens=[SECOND_TOKEN]) as api, aiohttp.ClientSession() as anon:
        async with anon.get(api.url + "/v1/customers/x/balance",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 401
            assert TOKEN not in await r.text()
        async with anon.get(api.url + "/v1/customers/x/balance",
                            headers={"Authorization": f"Bearer {SECOND_TOKEN}"}) as r:
            assert r.status == 404  # authorised; no such customer


# --- balance ------------------------------------------------------------------------------


async def test_balance_shows_grants_period_usage_burn_rate_and_projected_depletion(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database)
    async with running_api(settings, clock=lambda: NOW) as api:
        await add_customer(api.db, "c1", plan="starter")
        g1 = await grant(api, "c1", "10", priority=5, expires_at=NOW + timedelta(days=3))
        g2 = await grant(api, "c1", "100")
        g3 = await grant(api, "c1", "7", effective_at=NOW + timedelta(days=1))
        # 2,000 calls (2 credits) at 12:10 and 1,000 (1 credit) in the previous month
        await flush_usage(api, [("c1", "api_calls", NOW - timedelta(minutes=20), 1)] * 2000)
        await flush_usage(api, [("c1", "api_calls", datetime(2026, 10, 31, 23, 0, tzinfo=UTC), 1)]
                          * 1000)
        await flush_usage(api, [("c1", "gpu_seconds", NOW - timedelta(hours=1, minutes=50), 50)])

        body = await api.get_json("/v1/customers/c1/balance")

        assert Decimal(body["balance"]) == 117 - 2 - 1 - Decimal("0.5")
        assert body["plan"] == {"key": "starter", "overage": "allow", "period": "month"}
        assert [(g["id"], Decimal(g["remaining"]), g["status"]) for g in body["grants"]] == [
            # burn-down order: priority 5 first, then the never-expiring ones by effective time
            (g1, Decimal("6.5"), "active"), (g2, 100, "active"), (g3, 7, "scheduled")]
        assert body["grants"][0]["expires_at"] == "2026-11-24T12:30:00Z"
        assert body["period"]["start"] == "2026-11-01T00:00:00Z"
        assert body["period"]["end"] == "2026-12-01T00:00:00Z"
        assert {u["meter"]: (Decimal(u["quantity"]), Decimal(u["credits"]), u["event_count"])
                for u in body["period"]["usage"]} == {
            "api_calls": (2000, 2, 2000), "gpu_seconds": (50, Decimal("0.5"), 1)}
        assert Decimal(body["period"]["credits_used"]) == Decimal("2.5")
        # burn span: from 11:00 (12:30 - 1 h, down to the hour): 2 credits over 1.5 h
        assert body["burn_rate"] == {"credits_per_hour": "1.333333", "since": "2026-11-21T11:00:00Z"}
        # 113.5 credits at 4/3 credits per hour: 85.125 h from now
        assert body["projected_depletion"] == {"status": "projected",
                                               "at": "2026-11-25T01:37:30Z"}
        assert body["as_of"] == "2026-11-21T12:30:00Z"


@pytest.mark.parametrize(("period", "start", "end"), [
    ("hour", "2026-11-21T12:00:00Z", "2026-11-21T13:00:00Z"),
    ("day", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z"),
    ("month", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
])
async def test_balance_period_is_the_plans_utc_calendar_period(
        migrated_database: str, period: str, start: str, end: str) -> None:
    plans = [{"key": "p", "included_credits": "1", "period": period, "overage": "block"}]
    async with running_api(api_settings(migrated_database, plans=plans), clock=lambda: NOW) as api:
        await add_customer(api.db, "c1", plan="p")
        await flush_usage(api, [("c1", "api_calls", NOW - timedelta(minutes=40), 1)])  # 11:50
        body = await api.get_json("/v1/customers/c1/balance")
        assert (body["period"]["start"], body["period"]["end"]) == (start, end)
        assert Decimal(body["period"]["credits_used"]) == (0 if period == "hour" else
                                                           Decimal("0.001"))


async def test_balance_of_unknown_customer_is_404_and_of_usage_only_customer_is_served(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database)
    async with running_api(settings, clock=lambda: NOW) as api:
        body = await api.get_json("/v1/customers/nobody/balance", 404)
        assert body == {"error": {"code": "customer_not_found", "message": "no customer 'nobody'"}}
        # events of a customer not declared anywhere still debit it (require_known_customers off)
        await flush_usage(api, [("anon", "api_calls", NOW - timedelta(minutes=1), 1)] * 10)
        body = await api.get_json("/v1/customers/anon/balance")
        assert Decimal(body["balance"]) == Decimal("-0.01")
        assert body["plan"] is None
        assert body["projected_depletion"]["status"] == "depleted"


# --- entitlements -------------------------------------------------------------------------

# balance, plan overage, past_due, past_due_policy -> allowed, reason
MATRIX = [
    ("5", "allow", False, "block", True, "within_balance"),
    ("5", "allow", False, "allow", True, "within_balance"),
    ("5", "allow", True, "block", False, "past_due"),
    ("5", "allow", True, "allow", True, "within_balance"),
    ("5", "block", False, "block", True, "within_balance"),
    ("5", "block", False, "allow", True, "within_balance"),
    ("5", "block", True, "block", False, "past_due"),
    ("5", "block", True, "allow", True, "within_balance"),
    ("0", "allow", False, "block", True, "overage_allowed"),
    ("0", "allow", False, "allow", True, "overage_allowed"),
    ("0", "allow", True, "block", False, "past_due"),
    ("0", "allow", True, "allow", True, "overage_allowed"),
    ("0", "block", False, "block", False, "balance_exhausted"),
    ("0", "block", False, "allow", False, "balance_exhausted"),
    ("0", "block", True, "block", False, "past_due"),
    ("0", "block", True, "allow", False, "balance_exhausted"),
    ("-5", "allow", False, "block", True, "overage_allowed"),
    ("-5", "allow", False, "allow", True, "overage_allowed"),
    ("-5", "allow", True, "block", False, "past_due"),
    ("-5", "allow", True, "allow", True, "overage_allowed"),
    ("-5", "block", False, "block", False, "balance_exhausted"),
    ("-5", "block", False, "allow", False, "balance_exhausted"),
    ("-5", "block", True, "block", False, "past_due"),
    ("-5", "block", True, "allow", False, "balance_exhausted"),
]


async def test_entitlement_matrix_of_balance_overage_past_due_and_policy(
        migrated_database: str) -> None:
    assert len({row[:4] for row in MATRIX}) == 24  # every combination, once
    plan_of = {"allow": "starter", "block": "pro"}
    for policy in ("block", "allow"):
        settings = api_settings(migrated_database, billing={"past_due_policy": policy})
        async with running_api(settings) as api:
            for n, (balance, overage, past_due, row_policy, allowed, reason) in enumerate(MATRIX):
                if row_policy != policy:
                    continue
                customer = f"m{n}"
                await add_customer(api.db, customer, plan_of[overage], past_due)
                if balance == "5":
                    await grant(api, customer, "5")
                elif balance == "0":
                    await grant(api, customer, "5")
                    await adjust(api, customer, "-5")
                else:
                    await adjust(api, customer, "-5")
                body = await api.get_json(f"/v1/customers/{customer}/entitlements/api_calls")
                case = (balance, overage, past_due, policy)
                assert (body["allowed"], body["reason"]) == (allowed, reason), case
                assert Decimal(body["balance"]) == Decimal(balance), case
                assert body["overage_policy"] == overage
                assert body["past_due"] is past_due and body["past_due_policy"] == policy
                assert body["in_overage"] is (allowed and Decimal(balance) <= 0)
                assert body["units_remaining"] == ("5000" if balance == "5" else "0")


async def test_entitlement_without_plan_is_never_blocked_by_balance_and_unknowns_are_404(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database)
    async with running_api(settings) as api:
        await add_customer(api.db, "free")
        await adjust(api, "free", "-1")
        body = await api.get_json("/v1/customers/free/entitlements/gpu_seconds")
        assert (body["allowed"], body["reason"], body["plan"]) == (True, "overage_allowed", None)
        assert body["credits_per_unit"] == "0.01"
        body = await api.get_json("/v1/customers/free/entitlements/no_such_meter", 404)
        assert body["error"]["code"] == "meter_not_found"
        body = await api.get_json("/v1/customers/ghost/entitlements/api_calls", 404)
        assert body["error"]["code"] == "customer_not_found"


# --- usage and ledger ---------------------------------------------------------------------


async def test_usage_counts_windows_by_start_with_whole_hours_from_the_rollup(
        migrated_database: str) -> None:
    settings = api_settings(migrated_database)
    async with running_api(settings, clock=lambda: NOW) as api:
        await add_customer(api.db, "u1")
        at = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
        usage = [
            ("u1", "gpu_seconds", at + timedelta(minutes=59, seconds=50), 1),     # before from
            ("u1", "gpu_seconds", at + timedelta(minutes=59, seconds=57), 10),    # edge, raw
            ("u1", "gpu_seconds", at + timedelta(hours=1, minutes=15), 100),      # whole hour
            ("u1", "gpu_seconds", at + timedelta(hours=2, seconds=2), 1000),      # edge, raw
            ("u1", "gpu_seconds", at + timedelta(hours=2, seconds=6), 10000),     # at/after to
            ("u1", "llm_tokens", at + timedelta(hours=1, minutes=1), 500),
        ]
        await flush_usage(api, usage)
        q = "from=2026-11-21T10:59:55Z&to=2026-11-21T12:00:05%2B00:00"
        body = await api.get_json(f"/v1/customers/u1/usage?{q}")
        assert body["from"] == "2026-11-21T10:59:55Z" and body["to"] == "2026-11-21T12:00:05Z"
        assert {m["meter"]: (Decimal(m["quantity"]), Decimal(m["credits"]), m["event_count"],
                             m["aggregates"]) for m in body["meters"]} == {
            "gpu_seconds": (1110, Decimal("11.1"), 3, 3),
            "llm_tokens": (500, Decimal("0.01"), 1, 1),
        }
        assert Decimal(body["total_credits"]) == Decimal("11.11")
        only = await api.get_json(f"/v1/customers/u1/usage?{q}&meter=llm_tokens")
        assert [m["meter"] for m in only["meters"]] == ["llm_tokens"]
        # an unescaped "+" arrives as a space and still means "+"
        body = await api.get_json("/v1/customers/u1/usage?from=2026-11-21T10:59:55+00:00"
                                  "&to=2026-11-21T12:00:05Z")
        assert body["from"] == "2026-11-21T10:59:55Z"
        # the rollup agrees with the aggregates it summarises
        rollup = await api.db.fetch(
            "SELECT meter, sum(quantity) q, sum(event_count) n FROM usage_hourly GROUP BY meter")
        raw = await api.db.fetch(
            "SELECT meter, sum(quantity) q, sum(event_count) n FROM window_aggregates GROUP BY meter")
        assert sorted(map(tuple, rollup)) == sorted(map(tuple, raw))


@pytest.mark.parametrize(("query", "message"), [
    ("from=yesterday", "from: not an RFC 3339"),
    ("from=2026-11-21T10:00:00", "from: not an RFC 3339"),          # no offset
    ("to=2026-02-30T00:00:00Z", "to: not an RFC 3339"),              # no such day
    ("from=2026-11-21T10:00:00Z&to=2026-11-21T10:00:00Z", "from must be before to"),
    ("from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "spans more than 400 days"),
])
async def test_usage_rejects_bad_ranges_with_a_message_naming_the_parameter(
        migrated_database: str, query: str, message: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "u1")
        body = await api.get_json(f"/v1/customers/u1/usage?{query}", 400)
        assert body["error"]["code"] == "invalid_request"
        assert message in body["error"]["message"]


async def test_ledger_pages_newest_first_by_cursor_until_the_end(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "l1")
        await add_customer(api.db, "other")
        for i in range(5):
            await grant(api, "l1", str(i + 1))
        await grant(api, "other", "9")
        seen: list[int] = []
        cursor = ""
        for _ in range(3):
            page = await api.get_json(f"/v1/customers/l1/ledger?limit=2{cursor}")
            seen += [e["id"] for e in page["entries"]]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            cursor = f"&cursor={page['next_cursor']}"
        expected = [r["id"] for r in await api.db.fetch(
            "SELECT id FROM ledger_entries WHERE customer_id = 'l1' ORDER BY id DESC")]
        assert seen == expected and len(seen) == 5
        for bad in ("limit=0", "limit=1001", "limit=x", "cursor=-1"):
            await api.get_json(f"/v1/customers/l1/ledger?{bad}", 400)


# --- customers ----------------------------------------------------------------------------


async def test_customer_upsert_creates_updates_and_maps_stripe_ids(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        _, body, _ = await api.post_json("/v1/customers", {"id": "k1", "plan": "pro"}, 201)
        assert (body["plan"], body["stripe_customer_id"], body["past_due"]) == ("pro", None, False)
        _, body, _ = await api.post_json("/v1/customers",
                                         {"id": "k1", "stripe_customer_id": "cus_1"}, 200)
        assert (body["plan"], body["stripe_customer_id"]) == ("pro", "cus_1")  # plan kept
        _, body, _ = await api.post_json("/v1/customers", {"id": "k1", "plan": None}, 200)
        assert (body["plan"], body["stripe_customer_id"]) == (None, "cus_1")
        _, body, _ = await api.post_json("/v1/customers",
                                         {"id": "k2", "stripe_customer_id": "cus_1"}, 409)
        assert body["error"]["code"] == "stripe_customer_conflict"
        _, body, _ = await api.post_json("/v1/customers", {"id": "k2", "plan": "gold"}, 422)
        assert body["error"]["code"] == "unknown_plan"
        for bad in ({}, {"id": ""}, {"id": "a\nb"}, {"id": "k3", "past_due": True}, {"id": 7}):
            await api.post_json("/v1/customers", bad, 400)
        assert await api.db.fetchval("SELECT count(*) FROM customers") == 1


# --- operations ---------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_template(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        for customer in range(3):
            await api.get_json(f"/v1/customers/nobody{customer}/balance", 404)
        async with api.http.get(api.url + "/metrics") as r:
            text = await r.text()
        line = next(ln for ln in text.splitlines() if ln.startswith(
            'meterline_api_requests_total{route="/v1/customers/{id}/balance",status="404"}'))
        assert float(line.split()[-1]) >= 3
        assert "nobody0" not in text  # ids never become labels
        async with api.http.get(api.url + "/no/such/route") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with api.http.delete(api.url + "/v1/customers/x/balance") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_readyz_reports_the_database_going_away(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await api.get_json("/readyz")
        pool = api.server._pool  # noqa: SLF001 - simulate losing the database
        assert pool is not None
        await pool.close()
        body = await api.get_json("/readyz", 503)
        assert body["error"]["code"] == "not_ready"
        body = await api.get_json("/v1/customers/x/balance", 503)
        assert body["error"]["code"] == "database_unavailable"


async def test_api_answers_503_through_a_postgres_crash_and_recovers_without_a_restart(
    migrated_database: str, embedded_postgres: EmbeddedPostgres | None,
) -> None:
    if embedded_postgres is None:
        pytest.skip("needs the embedded Postgres to crash it")
    async with running_api(api_settings(migrated_database)) as api:
        await api.get_json("/readyz")
        await api.get_json("/v1/customers/nobody/balance", 404)
        embedded_postgres.crash()
        try:
            assert (await api.get_json("/readyz", 503))["error"]["code"] == "not_ready"
            body = await api.get_json("/v1/customers/nobody/balance", 503)
            assert body["error"]["code"] == "database_unavailable"
        finally:
            embedded_postgres.recover()
        # The same process serves again once Postgres is back (its pool reconnects).
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            async with api.http.get(api.url + "/readyz") as r:
                if r.status == 200:
                    break
            assert asyncio.get_running_loop().time() < deadline, "API never ready again"
            await asyncio.sleep(0.5)
        await api.get_json("/v1/customers/nobody/balance", 404)
