"""schemas/openapi.yaml is a valid OpenAPI 3.1 document, and the running API keeps it.

schemathesis generates requests from the committed document (valid and invalid
ones) and sends them to a real `meterline api` on a real Postgres, checking every
answer: no 5xx, only documented status codes, content types and headers, bodies
that match their schemas, invalid input refused with a 4xx, auth enforced. The
document's examples (customer `cust_demo`, meter `api_calls`) point at seeded
data, so the success paths are exercised too, not only the 404s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance

from meterline.api import ApiServer
from meterline.api.auth import TokenChecker
from meterline.api.context import ApiContext
from meterline.api.server import build_app
from meterline.config import Settings, load_settings
from meterline.devstack.dev import write_config
from meterline.ledger import GrantRequest, apply_grant
from meterline.storage.grants import sync_config

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "schemas" / "openapi.yaml"
TOKEN = "contract-token-0123456789"
DOCUMENT: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())

schema = schemathesis.openapi.from_path(OPENAPI)


def test_openapi_document_is_valid_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_every_route_of_the_app_is_documented_and_vice_versa() -> None:
    ctx = ApiContext.create(load_settings(None), pool=None)  # type: ignore[arg-type]
    app = build_app(ctx, TokenChecker((TOKEN.encode(),)))
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    documented = {(m, p) for p, ops in DOCUMENT["paths"].items() for m in ops}
    assert routes == documented


@pytest.fixture
def api_url(migrated_database: str, tmp_path: Path) -> Iterator[str]:
    """A real API on a free port, in a thread with its own event loop (schemathesis is sync)."""
    config = write_config(tmp_path, "127.0.0.1:9", migrated_database, 0)
    settings = load_settings(config, database_url=migrated_database)
    ready: dict[str, str] = {}
    started, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        await _seed(settings)
        async with ApiServer(settings, (TOKEN.encode(),), host="127.0.0.1", port=0) as server:
            ready["url"] = server.url
            started.set()
            await asyncio.to_thread(stop.wait)

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(30), "API did not start"
    if failure:
        raise failure[0]
    try:
        yield ready["url"]
    finally:
        stop.set()
        thread.join(10)


async def _seed(settings: Settings) -> None:
    """The data the document's examples name: customer cust_demo with a grant and usage."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await sync_config(conn, settings)
        await conn.execute("INSERT INTO customers (id, plan_key) VALUES ('cust_demo', 'pro')")
        await apply_grant(conn, GrantRequest("cust_demo", Decimal(500), "config", "demo"),
                          settings.kafka.balance_changes_topic,
                          settings.processor.thresholds_percent)
        now = datetime.now(UTC).replace(microsecond=0)
        await conn.execute(
            "INSERT INTO window_aggregates (id, customer_id, meter, window_start, window_end, seq,"
            " quantity, window_value, event_count, credits, kafka_partition, first_offset,"
            " last_offset) SELECT 'agg_' || g, 'cust_demo', 'api_calls',"
            " $1::timestamptz - g * interval '5 s', $1::timestamptz - g * interval '5 s' + interval '5 s', 0, 100, 100, 100, 0.1, 0, g, g"
            " FROM generate_series(1, 50) g", now - timedelta(minutes=1))
    finally:
        await conn.close()


def strict_response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    """The documented JSON schema of a response, as a root that resolves its $refs."""
    operation = DOCUMENT["paths"].get(path, {}).get(method.lower())
    response = operation and operation["responses"].get(str(status))
    if not response:
        return None
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = response.get("content", {}).get("application/json")
    return {"components": DOCUMENT["components"], **media["schema"]} if media else None


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_keeps_its_openapi_contract(case: schemathesis.Case, api_url: str) -> None:
    # Positive data may still be refused by rules a schema cannot state (from < to, a day
    # that does not exist, a grant-only field on an adjustment): those answer a documented
    # 400, which the other checks verify, so "valid data must be accepted" is not checked.
    response = case.call_and_validate(
        base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"},
        excluded_checks=[positive_data_acceptance])
    # schemathesis tolerates undocumented members in responses; this contract does not
    # (additionalProperties: false is a promise to clients that generate code from it).
    strict = strict_response_schema(case.path, case.method, response.status_code)
    if strict is not None:
        jsonschema.Draft202012Validator(strict).validate(response.json())
