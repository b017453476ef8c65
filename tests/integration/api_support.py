"""Shared by the API tests: a running API in this process, and ways to seed real state.

Usage is debited through the processor's real flush (`storage.flush.flush`), grants and
adjustments through the real `storage.grants` helpers, so the API reads exactly what
production writes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from meterline.api import ApiServer
from meterline.api.context import Clock, utc_now
from meterline.config import Settings, load_settings
from meterline.core.events import EPOCH, UsageEvent, dedupe_key
from meterline.core.windows import OpenWindows
from meterline.ledger import GrantRequest, apply_adjustment, apply_grant
from meterline.processor.pipeline import policy_from
from meterline.storage import checkpoints
from meterline.storage.dedupe import reserve
from meterline.storage.flush import FlushResult, flush
from meterline.storage.grants import sync_config

TOKEN = "test-token-0123456789abcdef"
SECOND_TOKEN = "rotated-token-abcdefghijklmnop"
DEV_CONFIG = Path(str(resources.files("meterline.devstack").joinpath("dev-config.yaml")))
# A fixed "now" for tests that depend on the clock (periods, burn rate, grant status).
NOW = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)


def api_settings(dsn: str, **sections: Any) -> Settings:
    """The shipped dev config (meters api_calls/llm_tokens/gpu_seconds, plans starter=allow,
    pro=block) on the test database, plus `sections`."""
    return load_settings(DEV_CONFIG, database_url=dsn, **sections)


@dataclass
class Api:
    server: ApiServer
    http: aiohttp.ClientSession  # sends TOKEN
    db: asyncpg.Pool
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    async def get_json(self, path: str, status: int = 200, **kw: Any) -> Any:
        async with self.http.get(self.url + path, **kw) as r:
            body = await r.json()
            assert r.status == status, (r.status, body)
            return body

    async def post_json(self, path: str, body: Any, status: int | None = None,
                        **kw: Any) -> tuple[int, Any, dict[str, str]]:
        async with self.http.post(self.url + path, json=body, **kw) as r:
            out = await r.json()
            if status is not None:
                assert r.status == status, (r.status, out)
            return r.status, out, dict(r.headers)


@asynccontextmanager
async def running_api(settings: Settings, tokens: Iterable[str] = (TOKEN,),
                      clock: Clock = utc_now) -> AsyncIterator[Api]:
    """The API on a free port of 127.0.0.1, with plans synced to the database."""
    db = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    assert db is not None
    try:
        async with db.acquire() as conn:
            await sync_config(conn, settings)
        server = ApiServer(settings, tuple(t.encode() for t in tokens), host="127.0.0.1", port=0,
                           clock=clock)
        async with server, aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield Api(server, http, db, settings)
    finally:
        await db.close()


async def add_customer(db: asyncpg.Pool, customer: str, plan: str | None = None,
                       past_due: bool = False) -> None:
    await db.execute(
        "INSERT INTO customers (id, plan_key, past_due, past_due_since) VALUES ($1, $2, $3, "
        "CASE WHEN $3 THEN now() END)", customer, plan, past_due)


async def grant(api: Api, customer: str, amount: str, ref: str | None = None, priority: int = 10,
                effective_at: datetime | None = None, expires_at: datetime | None = None) -> int:
    async with api.db.acquire() as conn:
        gid = await apply_grant(conn, GrantRequest(
            customer, Decimal(amount), "test", ref or uuid.uuid4().hex, priority,
            effective_at or NOW - timedelta(days=1), expires_at),
            api.settings.kafka.balance_changes_topic, api.settings.processor.thresholds_percent)
    assert gid is not None
    return gid


async def adjust(api: Api, customer: str, amount: str) -> None:
    async with api.db.acquire() as conn:
        await apply_adjustment(conn, customer, Decimal(amount), "test",
                               api.settings.kafka.balance_changes_topic,
                               api.settings.processor.thresholds_percent, NOW)


def ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)


async def flush_usage(api: Api, usage: list[tuple[str, str, datetime, int]],
                      partition: int = 0, now: datetime = NOW) -> None:
    """Debit (customer, meter, event time, value) events through the processor's real flush."""
    await flush_events(api.settings, api.db, usage, partition, now)


async def flush_events(settings: Settings, db: asyncpg.Pool,
                       usage: list[tuple[str, str, datetime, Decimal | int]],
                       partition: int = 0, now: datetime = NOW) -> FlushResult:
    """`flush_usage` without a running API: the events, in one flush, at `now`."""
    policy = policy_from(settings)
    [claim] = await checkpoints.claim(db, policy.usage_topic, [partition], "api-test")
    windows = OpenWindows(settings.processor.window_size_ms, 0)
    windows.assign(partition, claim.next_offset)
    events = [UsageEvent(dedupe_key("api-test", uuid.uuid4().hex), customer, meter, ms(at), value,
                         claim.next_offset + i)
              for i, (customer, meter, at, value) in enumerate(usage)]
    windows.add(partition, events, claim.next_offset + len(events), ms(now) + 10**9)
    for buf in windows.buffers():
        keys = [(buf.key.start_ms, e.dedupe_key) for e in buf.events]
        ours = await reserve(db, keys, [claim.slot] * len(keys), [claim.epoch] * len(keys),
                             [buf.token] * len(keys))
        assert ours == set(keys)
        assert buf.settle_reservation(len(keys), set()) == 0
    closable = windows.take_closable(ms(now) + 10**9)
    async with db.acquire() as conn:
        return await flush(conn, closable, {partition: claim.epoch}, policy, now)
