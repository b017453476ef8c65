"""Manual grants and adjustments through the API: ledger, balance, outbox, idempotency."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from .api_support import Api, add_customer, api_settings, grant, running_api

pytestmark = pytest.mark.integration

BALANCE_CHANGE_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "balance-change.schema.json").read_text())


async def outbox(api: Api, customer: str) -> list[dict[str, Any]]:
    rows = await api.db.fetch("SELECT topic, payload FROM outbox WHERE key = $1 ORDER BY id",
                              customer)
    assert {r["topic"] for r in rows} <= {api.settings.kafka.balance_changes_topic}
    return [orjson.loads(r["payload"]) for r in rows]


async def test_manual_grant_shows_in_balance_and_ledger_and_publishes_a_balance_change(
        migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "g1", plan="pro")
        _, body, headers = await api.post_json(
            "/v1/customers/g1/grants",
            {"amount": "150.25", "reason": "goodwill for INC-42", "priority": 3,
             "expires_at": "2099-01-01T00:00:00Z"},
            201, headers={"Idempotency-Key": "inc-42"})
        assert headers["Idempotent-Replayed"] == "false"
        assert body["kind"] == "grant" and body["amount"] == "150.25"
        assert body["balance_after"] == "150.25" and body["reason"] == "goodwill for INC-42"

        balance = await api.get_json("/v1/customers/g1/balance")
        assert balance["balance"] == "150.25"
        [g] = balance["grants"]
        assert (g["id"], g["source"], g["priority"], g["remaining"], g["expires_at"]) == (
            body["grant_id"], "manual", 3, "150.25", "2099-01-01T00:00:00Z")

        ledger = await api.get_json("/v1/customers/g1/ledger")
        [entry] = ledger["entries"]
        assert (entry["id"], entry["kind"], entry["amount"], entry["grant_id"], entry["reason"],
                entry["note"]) == (body["ledger_entry_id"], "grant", "150.25", body["grant_id"],
                                   "manual_grant", "goodwill for INC-42")

        [message] = await outbox(api, "g1")
        jsonschema.validate(message, BALANCE_CHANGE_SCHEMA)
        assert (message["reason"], message["delta"], message["balance_after"],
                message["ledger_entry_id"]) == ("manual_grant", "150.25", "150.25",
                                                body["ledger_entry_id"])


async def test_repeating_a_grant_request_applies_it_once_and_answers_the_same(
        migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "g1")
        request = {"amount": "10", "reason": "promo", "ref": "promo-2026-11"}
        _, first, _ = await api.post_json("/v1/customers/g1/grants", request, 201)
        _, again, headers = await api.post_json("/v1/customers/g1/grants", request, 200)
        assert again == first and headers["Idempotent-Replayed"] == "true"
        # the same key as a header, same request: a repeat too ("10.0" is the same amount)
        _, again, _ = await api.post_json(
            "/v1/customers/g1/grants", {**request, "amount": "10.0"}, 200,
            headers={"Idempotency-Key": "promo-2026-11"})
        assert again == first
        # eight at once: still one grant
        answers = await asyncio.gather(*(
            api.post_json("/v1/customers/g1/grants", {"amount": "5", "reason": "burst"}, None,
                          headers={"Idempotency-Key": "burst"}) for _ in range(8)))
        assert sorted(status for status, _, _ in answers) == [200] * 7 + [201]
        assert len({orjson.dumps(body) for _, body, _ in answers}) == 1

        assert await api.db.fetchval("SELECT count(*) FROM grants WHERE customer_id = 'g1'") == 2
        assert await api.db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE customer_id = 'g1'") == 2
        assert len(await outbox(api, "g1")) == 2
        assert (await api.get_json("/v1/customers/g1/balance"))["balance"] == "15"


async def test_a_used_key_with_a_different_request_is_refused(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "g1")
        await api.post_json("/v1/customers/g1/grants", {"amount": "10", "reason": "a", "ref": "k"},
                            201)
        for changed in ({"amount": "11"}, {"reason": "b"}, {"priority": 1}):
            _, body, _ = await api.post_json(
                "/v1/customers/g1/grants", {"amount": "10", "reason": "a", "ref": "k", **changed},
                409)
            assert body["error"]["code"] == "idempotency_key_reused"
        # keys are per customer: the same key for another customer is another request
        await add_customer(api.db, "g2")
        await api.post_json("/v1/customers/g2/grants", {"amount": "3", "reason": "a", "ref": "k"},
                            201)
        assert await api.db.fetchval("SELECT count(*) FROM grants") == 2


async def test_negative_adjustment_burns_grants_in_order_then_goes_into_overage(
        migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "a1")
        first = await grant(api, "a1", "10", priority=5)
        second = await grant(api, "a1", "10", priority=10)

        _, body, _ = await api.post_json("/v1/customers/a1/grants",
                                         {"amount": "-15", "reason": "refund of order 77"}, 201,
                                         headers={"Idempotency-Key": "refund-77"})
        assert (body["kind"], body["grant_id"], body["balance_after"]) == ("adjustment", None, "5")
        remaining = dict(await api.db.fetch("SELECT id, remaining FROM grants"))
        assert remaining == {first: 0, second: 5}
        taken = dict(await api.db.fetch(
            "SELECT from_grant, amount FROM transfers WHERE entry_id = $1 AND to_account = 'issuer'",
            body["ledger_entry_id"]))
        assert taken == {first: 10, second: 5}

        _, body, _ = await api.post_json("/v1/customers/a1/grants",
                                         {"amount": "-7.5", "reason": "chargeback"}, 201,
                                         headers={"Idempotency-Key": "cb-1"})
        assert body["balance_after"] == "-2.5"
        entry = await api.db.fetchrow("SELECT kind, amount, overage, reason FROM ledger_entries "
                                      "WHERE id = $1", body["ledger_entry_id"])
        assert tuple(entry) == ("adjustment", Decimal("-7.5"), Decimal("2.5"), "adjustment")
        messages = await outbox(api, "a1")
        assert [(m["reason"], m["delta"], m["depleted"]) for m in messages[-2:]] == [
            ("adjustment", "-15", False), ("adjustment", "-7.5", True)]
        for m in messages:
            jsonschema.validate(m, BALANCE_CHANGE_SCHEMA)
        ledger_sum = await api.db.fetchval(
            "SELECT sum(amount) FROM ledger_entries WHERE customer_id = 'a1'")
        assert ledger_sum == Decimal("-2.5")


@pytest.mark.parametrize(("body", "headers", "status", "fragment"), [
    ({"amount": "10", "reason": "x"}, {}, 400, "Idempotency-Key header or a ref"),
    ({"amount": 10, "reason": "x", "ref": "r"}, {}, 400, "amount: a decimal string"),
    ({"amount": "1e3", "reason": "x", "ref": "r"}, {}, 400, "amount: a decimal string"),
    ({"amount": "0.00", "reason": "x", "ref": "r"}, {}, 400, "must not be zero"),
    ({"amount": "1000000000000000", "reason": "x", "ref": "r"}, {}, 400, "below 10^15"),
    ({"amount": "1.0000000000001", "reason": "x", "ref": "r"}, {}, 400, "12 decimal places"),
    ({"amount": "NaN", "reason": "x", "ref": "r"}, {}, 400, "amount"),
    ({"amount": "10", "ref": "r"}, {}, 400, "reason"),
    ({"amount": "10", "reason": "   ", "ref": "r"}, {}, 400, "reason"),
    ({"amount": "10", "reason": "x", "ref": "a"}, {"Idempotency-Key": "b"}, 400, "differ"),
    ({"amount": "-1", "reason": "x", "ref": "r", "expires_at": "2099-01-01T00:00:00Z"}, {}, 400,
     "apply to grants"),
    ({"amount": "1", "reason": "x", "ref": "r", "expires_at": "2001-01-01T00:00:00Z"}, {}, 400,
     "expires_at"),
    ({"amount": "1", "reason": "x", "ref": "r", "bonus": True}, {}, 400, "unknown field"),
    ({"amount": "1", "reason": "x", "ref": "r", "priority": "1"}, {}, 400, "priority"),
])
async def test_invalid_grant_requests_are_refused_and_change_nothing(
        migrated_database: str, body: dict[str, Any], headers: dict[str, str], status: int,
        fragment: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        await add_customer(api.db, "g1")
        _, answer, _ = await api.post_json("/v1/customers/g1/grants", body, status,
                                           headers=headers)
        assert fragment in answer["error"]["message"]
        assert await api.db.fetchval("SELECT count(*) FROM ledger_entries") == 0


async def test_grant_for_an_unknown_customer_or_not_json_is_refused(migrated_database: str) -> None:
    async with running_api(api_settings(migrated_database)) as api:
        _, body, _ = await api.post_json("/v1/customers/ghost/grants",
                                         {"amount": "1", "reason": "x", "ref": "r"}, 404)
        assert body["error"]["code"] == "customer_not_found"
        async with api.http.post(api.url + "/v1/customers/ghost/grants", data=b"amount=1",
                                 headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with api.http.post(api.url + "/v1/customers/ghost/grants", data=b"x" * 70_000,
                                 headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
        assert await api.db.fetchval("SELECT count(*) FROM grants") == 0
