"""Stripe -> meterline in `meterline dev`: the webhook bridge, the ledger consumer, and
credit top-ups bought "in Stripe" (the emulator) that raise balances while usage runs.

Every `every_seconds` a demo customer buys credits: the emulator delivers a signed
`checkout.session.completed` to the bridge, the bridge puts it on `stripe.events`, the
ledger consumer grants the credits. The live view shows the latest top-up landing; the
summary checks every top-up became exactly one grant of its amount.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from meterline.config import Settings
from meterline.devstack.embedded import _free_port

TOP_UP_CREDITS = Decimal(100)


def config_overrides() -> dict[str, dict[str, Any]]:
    return {"webhook_bridge": {"host": "127.0.0.1", "port": _free_port()},
            "ledger_consumer": {"metrics_port": _free_port()}}


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def bridge_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.webhook_bridge.port}"


async def start(settings: Settings, services: Any, emulated: bool) -> None:
    """Start the bridge and the ledger consumer; subscribe the bridge to the emulator."""
    # dev only: a fresh signing secret per run, shared by the emulator and the bridge
    os.environ.setdefault("STRIPE_WEBHOOK_SECRETS", "whsec_dev_" + secrets.token_hex(16))
    services.start("webhook-bridge")
    services.start("ledger-consumer")
    deadline = time.monotonic() + 60
    while True:
        services.check_alive()
        if await asyncio.to_thread(_ready, bridge_url(settings) + "/readyz"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("webhook bridge not ready within 60 s")
        await asyncio.sleep(0.3)
    if emulated:
        secret = os.environ["STRIPE_WEBHOOK_SECRETS"].split(",")[0].strip()
        _post_json(f"{settings.stripe.api_base}/_emulator/webhook_endpoints",
                   {"url": bridge_url(settings) + "/webhooks/stripe", "secret": secret})


@dataclass
class TopUp:
    customer: str
    session_id: str
    credits: Decimal
    balance_before: Decimal
    at: float
    balance_after: Decimal | None = None
    applied_after: float | None = None


@dataclass
class TopUps:
    """Buys credits for random customers in the emulator and follows them into the ledger."""

    settings: Settings
    pool: asyncpg.Pool
    every_seconds: float = 10.0
    done: list[TopUp] = field(default_factory=list)
    _next_at: float = field(default_factory=lambda: time.monotonic() + 5)
    _rng: random.Random = field(default_factory=lambda: random.Random(42))

    async def tick(self) -> None:
        if time.monotonic() >= self._next_at:
            self._next_at += self.every_seconds
            await self.buy()
        await self.follow()

    async def buy(self) -> None:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT c.id, c.stripe_customer_id, coalesce(b.balance, 0) AS b"
                                    " FROM customers c LEFT JOIN balances b ON b.customer_id = c.id"
                                    " WHERE c.stripe_customer_id IS NOT NULL ORDER BY c.id")
        if not rows:
            return
        row = self._rng.choice(rows)
        event = await asyncio.to_thread(
            _post_json, f"{self.settings.stripe.api_base}/_emulator/trigger",
            {"type": "checkout.session.completed", "customer": row["stripe_customer_id"],
             "credits": str(TOP_UP_CREDITS), "amount": 2500})
        self.done.append(TopUp(row["id"], event["data"]["object"]["id"], TOP_UP_CREDITS,
                               row["b"], time.monotonic()))

    async def follow(self) -> None:
        waiting = [t for t in self.done if t.balance_after is None]
        if not waiting:
            return
        async with self.pool.acquire() as conn:
            granted = {r["source_ref"] for r in await conn.fetch(
                "SELECT source_ref FROM grants WHERE source = 'stripe_checkout'"
                " AND source_ref = ANY($1::text[])", [t.session_id for t in waiting])}
            for t in waiting:
                if t.session_id in granted:
                    t.balance_after = await conn.fetchval(
                        "SELECT balance FROM balances WHERE customer_id = $1", t.customer)
                    t.applied_after = time.monotonic() - t.at

    def live_line(self, bridge: dict[str, float], ledger: dict[str, float]) -> str:
        line = (f"  Stripe→ {int(bridge.get('meterline_webhook_requests_total', 0)):>10,} webhooks"
                f"   grants from Stripe {int(ledger.get('meterline_grants_from_stripe_total', 0)):,}")
        last = next((t for t in reversed(self.done) if t.balance_after is not None), None)
        if last is not None and last.applied_after is not None:
            line += (f"   last top-up {last.customer} +{last.credits}: balance "
                     f"{last.balance_before:.3f} → {last.balance_after:.3f}"
                     f" ({last.applied_after:.1f} s after purchase)")
        return line

    async def finish(self, bridge_metrics: dict[str, float], timeout: float = 60) -> dict[str, Any]:
        """Wait for every top-up to land; report and check them."""
        deadline = time.monotonic() + timeout
        while any(t.balance_after is None for t in self.done) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            await self.follow()
        async with self.pool.acquire() as conn:
            grants = await conn.fetch(
                "SELECT customer_id, source_ref, amount FROM grants"
                " WHERE source IN ('stripe_checkout', 'stripe_invoice', 'stripe_subscription')")
            inconsistent = await conn.fetchval(
                """SELECT count(*) FROM balances b
                   LEFT JOIN (SELECT customer_id, sum(amount) AS s FROM ledger_entries
                              GROUP BY 1) l USING (customer_id)
                   WHERE b.balance <> coalesce(l.s, 0)""")
        by_ref = {g["source_ref"]: g for g in grants}
        exact = len(grants) == len(self.done) and all(
            t.session_id in by_ref and by_ref[t.session_id]["amount"] == t.credits
            and by_ref[t.session_id]["customer_id"] == t.customer for t in self.done)
        applied = [t.applied_after for t in self.done if t.applied_after is not None]
        return {
            "webhook_events_received": int(bridge_metrics.get(
                "meterline_webhook_requests_total:outcome=accepted", 0)),
            "stripe_top_ups": len(self.done),
            "grants_from_stripe": len(grants),
            "stripe_grants_exact": exact,
            "balances_equal_ledger": inconsistent == 0,
            "top_up_to_balance_seconds_max": round(max(applied), 2) if applied else None,
        }
