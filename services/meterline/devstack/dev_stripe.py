"""The Stripe side of `meterline dev`: emulator (or Stripe test mode), provisioning, the
sink, and the end-of-run check that Stripe holds exactly the ledger's usage.

Without `STRIPE_API_KEY` the local emulator runs as a subprocess and the sink points at
it; with a key the sink reports to Stripe test mode (meters and customers are created
there when missing -- use a test-mode key).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from meterline.config import Settings
from meterline.devstack.embedded import _free_port
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.reconcile import Reconciler
from meterline.stripe.sink import stripe_api_key
from meterline.stripe.transport import Stripe


def config_overrides() -> dict[str, Any]:
    """`stripe:` settings for the dev config: the emulator's URL unless a key is set."""
    out: dict[str, Any] = {"metrics_port": _free_port()}
    if not os.environ.get("STRIPE_API_KEY"):
        out["api_base"] = f"http://127.0.0.1:{_free_port()}"
    return out


def emulated(settings: Settings) -> bool:
    return bool(settings.stripe.api_base)


def emulator_events(settings: Settings) -> list[dict[str, Any]]:
    """Every meter event the emulator accepted (its inspection endpoint)."""
    url = f"{settings.stripe.api_base}/_emulator/events"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read(), parse_float=Decimal)["data"]


async def start(settings: Settings, services: Any, pool: asyncpg.Pool,
                customers: list[str]) -> None:
    """Start the emulator (if emulated), create meters and customers, start the sink."""
    if emulated(settings):
        port = settings.stripe.api_base.rsplit(":", 1)[1]  # type: ignore[union-attr]
        services.start("stripe-emulator", "--port", port, "--rate", "0")
    api = Stripe(stripe_api_key(settings), settings.stripe.api_base, 10)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await ensure_meters(api.client, settings)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await ensure_customers(api.client, pool, customers)
    finally:
        await api.close()
    services.start("stripe-sink")


def live_line(m: dict[str, float]) -> str:
    return (f"  Stripe   {int(m.get('meterline_stripe_events_accepted_total', 0)):>10,} events"
            f" accepted   unfinished reports "
            f"{int(m.get('meterline_stripe_unfinished_reports', 0)):,}"
            f"   retries {int(m.get('meterline_stripe_retries_total', 0)):,}"
            f"   circuit {'OPEN' if m.get('meterline_stripe_circuit_open') else 'closed'}")


async def _drained(pool: asyncpg.Pool, billed: list[str]) -> bool:
    """Every aggregate of a billed meter is staged and every report is finished."""
    async with pool.acquire() as conn:
        return bool(await conn.fetchval(
            """SELECT NOT EXISTS (SELECT 1 FROM stripe_reports
                                  WHERE status IN ('open', 'pending', 'sending'))
                  AND (SELECT count(*) FROM stripe_report_items)
                      = (SELECT count(*) FROM window_aggregates WHERE meter = ANY($1::text[]))""",
            billed))


async def finish(settings: Settings, pool: asyncpg.Pool, services: Any) -> dict[str, Any]:
    """After the ledger is drained: wait for the sink to finish, then compare and reconcile.

    The comparison covers every aggregate (cutoff = the next whole minute, after the last
    bucket), unlike a periodic reconciliation, which leaves the newest buckets to settle.
    """
    s = settings.stripe
    billed = [m.key for m in settings.meters if m.stripe_event_name]
    deadline = time.monotonic() + s.coalesce_interval_seconds + s.seal_grace_seconds + 60
    while not await _drained(pool, billed) and time.monotonic() < deadline:
        services.check_alive()
        await asyncio.sleep(0.5)
    api = Stripe(stripe_api_key(settings), s.api_base, 10)
    try:
        now = datetime.now(UTC)
        cutoff = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        report = await Reconciler(settings, pool, api).run_once(
            resubmit=False, now=now, cutoff=cutoff)
    finally:
        await api.close()
    async with pool.acquire() as conn:
        accepted = await conn.fetchval(
            "SELECT count(*) FROM stripe_reports WHERE status = 'accepted'")
    out: dict[str, Any] = {
        "stripe": "emulator" if emulated(settings) else "test mode",
        "stripe_events_accepted": len(emulator_events(settings)) if emulated(settings) else accepted,
        "stripe_reports_accepted": accepted,
        "stripe_matches_ledger": bool(report.rows) and all(
            r.stripe == r.ledger and not r.in_flight for r in report.rows),
        "reconcile_max_variance": str(report.max_variance),
        "reconcile_flagged": len(report.flagged),
    }
    return out
