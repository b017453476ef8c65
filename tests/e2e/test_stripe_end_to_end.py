"""Usage events -> processor -> relay -> Stripe sink -> Stripe emulator, with Stripe failing
10 % of calls (429/500) and answering slowly, and the sink killed with SIGKILL twice.

Stripe must end up with exactly the ledger's usage per (customer, meter): a lost report
would leave it short, a duplicate (the same usage under a new identifier) would make it
long. Stripe dedupes equal identifiers, so the sum is the check that can fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from integration.harness import (
    Fleet,
    Sender,
    assert_exact,
    db_pool,
    fleet,
    wait_for_ledger,
    wait_for_owners,
    wait_until,
)
from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.transport import Stripe

pytestmark = pytest.mark.e2e

CUSTOMERS = 20


async def ledger_by_meter(pool: object, settings: Settings) -> dict[tuple[str, str], Decimal]:
    async with pool.acquire() as conn:  # type: ignore[attr-defined]
        rows = await conn.fetch(
            "SELECT c.stripe_customer_id AS cus, a.meter, sum(a.quantity) AS q"
            " FROM window_aggregates a JOIN customers c ON c.id = a.customer_id GROUP BY 1, 2")
    names = {m.key: m.stripe_event_name for m in settings.meters}
    return {(r["cus"], names[r["meter"]]): r["q"] for r in rows}


def stripe_by_meter(emu: StripeEmulator) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = {}
    for e in emu.events:
        out[(e.customer, e.event_name)] = out.get((e.customer, e.event_name), Decimal(0)) + e.value
    return out


async def wait_for_stripe_to_equal_ledger(
    pool: object, settings: Settings, emu: StripeEmulator, workers: Fleet, timeout: float = 60,
) -> dict[tuple[str, str], Decimal]:
    """Wait until the emulator's usage per (customer, meter) equals the ledger's; return it."""
    want = await ledger_by_meter(pool, settings)

    async def stripe_matches() -> bool:
        return stripe_by_meter(emu) == want
    await wait_until(stripe_matches, timeout=timeout, what="Stripe totals = ledger",
                     workers=workers)
    return want


async def test_stripe_equals_ledger_through_failures_latency_and_sink_kills(
    pipeline_settings: Callable[..., Settings], tmp_path: Path, unique_topic_prefix: str,
) -> None:
    emu = StripeEmulator(latency_seconds=0.002, latency_jitter_seconds=0.03, seed=11)
    runner = await serve("127.0.0.1", 0, emu)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    settings = pipeline_settings(customers=CUSTOMERS, stripe={
        "api_base": url, "coalesce_interval_seconds": 2, "seal_grace_seconds": 0.5,
        "retry_base_seconds": 0.05, "retry_max_seconds": 1, "poll_interval_ms": 50,
        "lease_seconds": 3, "metrics_port": 0,
        "consumer_group": f"{unique_topic_prefix}stripe-sink"})
    api = Stripe("sk_test_x", url, 10)
    try:
        async with db_pool(settings.database_url) as pool:
            await ensure_meters(api.client, settings)
            await ensure_customers(api.client, pool, customer_ids(CUSTOMERS))
            emu.failure_rate = emu.throttle_rate = 0.05  # 10 % of the sink's calls fail
            with fleet(settings, tmp_path, "w1") as services:
                services.service("relay", "relay")
                services.service("sink", "stripe-sink")
                await wait_for_owners(pool, settings, {"w1"}, workers=services)
                gen = LoadGenerator(settings, customer_ids(CUSTOMERS), duplicates=0.1, late=0,
                                    invalid=0, seed=5)
                with Sender(gen, 1500):
                    for _ in range(2):  # SIGKILL the sink mid-stream, twice
                        await asyncio.sleep(2.5)
                        services.kill("sink")
                        services.service("sink", "stripe-sink")
                snap = await wait_for_ledger(pool, gen, timeout=40, workers=services)
                assert_exact(snap, gen)
                want = await wait_for_stripe_to_equal_ledger(pool, settings, emu, services)
                await asyncio.sleep(2)  # a late duplicate would still show up
                async with pool.acquire() as conn:
                    statuses = dict(await conn.fetch(
                        "SELECT status, count(*) FROM stripe_reports GROUP BY 1"))
    finally:
        await api.close()
        await runner.cleanup()
    assert stripe_by_meter(emu) == want
    assert statuses == {"accepted": len(emu.events)}
    assert emu.injected[429] > 0 and emu.injected[500] > 0, emu.injected
    assert [code for n, code in services.gone if n == "sink"][:2] == [-9, -9]  # SIGKILLed
