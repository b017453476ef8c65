"""A customer's ledger driven through the real write paths, for the ledger tests.

Usage goes through the processor's real flush (`api_support.flush_events`), grants,
voids, adjustments and expiry through `meterline.ledger`, and `audit` checks the
invariants against the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from meterline.config import Settings, load_settings
from meterline.ledger import (
    GrantRequest,
    apply_adjustment,
    apply_grant,
    expire_grants,
    void_grant_credits,
)
from meterline.ledger.audit import Audit, audit
from meterline.storage.flush import FlushResult

from .api_support import flush_events

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)  # a window start (5 s windows)

# One meter per aggregation, credits per unit 1, so credits read as values.
METERS = [
    {"key": key, "event_type": key, "aggregation": key, "value_property": "v",
     "credits_per_unit": "1", "stripe_event_name": key}
    for key in ("sum", "count", "max", "latest")
]


def ledger_settings(dsn: str, places: int = 6, rate: str = "1", **sections: Any) -> Settings:
    """Settings with the four test meters; `sections` adds e.g. plans and customers."""
    meters = [m | {"credits_per_unit": rate} for m in METERS]
    return load_settings(None, database_url=dsn, meters=meters,
                         processor={"credit_decimal_places": places}, **sections)


@dataclass
class Desk:
    """One test's handle on the ledger: settings, a pool and the clock."""

    settings: Settings
    db: asyncpg.Pool
    now: datetime = T0 + timedelta(minutes=1)

    @property
    def topic(self) -> str:
        return self.settings.kafka.balance_changes_topic

    @property
    def thresholds(self) -> tuple[int, ...]:
        return self.settings.processor.thresholds_percent

    async def grant(self, customer: str, amount: str | Decimal, *,
                    expires_at: datetime | None = None, effective_at: datetime | None = None,
                    priority: int = 10, ref: str | None = None) -> int:
        async with self.db.acquire() as conn:
            gid = await apply_grant(conn, GrantRequest(
                customer, Decimal(amount), "test", ref or uuid.uuid4().hex, priority,
                effective_at or T0 - timedelta(days=1), expires_at), self.topic, self.thresholds,
                self.now)
        assert gid is not None
        return gid

    async def use(self, customer: str, meter: str, value: Decimal | int | str,
                  window: int = 0, at_ms: int = 0) -> FlushResult:
        """One event of `meter` in window number `window` after T0 (5 s windows)."""
        size = self.settings.processor.window_size_ms
        at = T0 + timedelta(milliseconds=window * size + at_ms)
        v = Decimal(value) if isinstance(value, str) else value
        return await flush_events(self.settings, self.db, [(customer, meter, at, v)], now=self.now)

    async def expire(self) -> int:
        async with self.db.acquire() as conn:
            return await expire_grants(conn, self.now, self.topic, self.thresholds)

    async def void(self, grant_id: int, credits: str | Decimal) -> Decimal:
        async with self.db.acquire() as conn:
            return await void_grant_credits(conn, grant_id, Decimal(credits), "test_void",
                                            self.topic, self.thresholds)

    async def adjust(self, customer: str, amount: str | Decimal) -> None:
        async with self.db.acquire() as conn:
            await apply_adjustment(conn, customer, Decimal(amount), "adjustment", self.topic,
                                   self.thresholds, self.now)

    async def balance(self, customer: str) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT balance, granted, receivable FROM balances WHERE customer_id = $1", customer)
        assert row is not None
        return row

    async def audit(self, customer: str | None = None) -> Audit:
        rates = {m.key: m.credits_per_unit for m in self.settings.meters}
        async with self.db.acquire() as conn:
            return await audit(conn, rates, self.settings.processor.credit_decimal_places,
                               customer)
