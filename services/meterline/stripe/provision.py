"""Create what the sink needs on the Stripe side: a meter per billed meterline meter and a
Stripe customer per meterline customer that has none (recorded in `customers`).

Used by `meterline dev` against the emulator, and by `meterline stripe-provision` against
Stripe test mode (it only creates what is missing: meters found by event_name are reused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import stripe

from meterline.config import Settings
from meterline.storage.db import create_pool


async def ensure_meters(client: stripe.StripeClient, settings: Settings) -> dict[str, str]:
    """{event_name: Stripe meter id} for every meter with a `stripe_event_name`."""
    existing = {m.event_name: m.id
                for m in (await client.v1.billing.meters.list_async({"limit": 100})).data}
    out = {}
    for m in settings.meters:
        if not m.stripe_event_name:
            continue
        if m.stripe_event_name not in existing:
            created = await client.v1.billing.meters.create_async({
                "display_name": m.key, "event_name": m.stripe_event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": m.stripe_customer_key, "type": "by_id"},
                "value_settings": {"event_payload_key": m.stripe_value_key},
            })
            existing[m.stripe_event_name] = created.id
        out[m.stripe_event_name] = existing[m.stripe_event_name]
    return out


async def ensure_customers(client: stripe.StripeClient, pool: asyncpg.Pool,
                           customer_ids: Sequence[str]) -> dict[str, str]:
    """Create a Stripe customer for each id without a mapping; return {id: Stripe id}."""
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO customers (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
            [(c,) for c in customer_ids])
        rows = await conn.fetch(
            "SELECT id, stripe_customer_id FROM customers WHERE id = ANY($1::text[])",
            list(customer_ids))
        mapping = {r["id"]: r["stripe_customer_id"] for r in rows}
        for cid in customer_ids:
            if mapping.get(cid):
                continue
            cus = await client.v1.customers.create_async(
                {"name": cid, "metadata": {"meterline_customer_id": cid}})
            await conn.execute(
                "UPDATE customers SET stripe_customer_id = $2, updated_at = now() WHERE id = $1",
                cid, cus.id)
            mapping[cid] = cus.id
    return mapping


def run(settings: Settings) -> int:
    """`meterline stripe-provision`: meters for billed meters, customers for configured ones."""
    from meterline.stripe.sink import stripe_api_key
    from meterline.stripe.transport import Stripe

    async def main() -> int:
        api = Stripe(stripe_api_key(settings), settings.stripe.api_base,
                     settings.stripe.request_timeout_seconds)
        pool = await create_pool(settings.database_url)
        try:
            meters = await ensure_meters(api.client, settings)
            customers = await ensure_customers(api.client, pool, [c.id for c in settings.customers])
        finally:
            await pool.close()
            await api.close()
        print(f"Stripe meters: {meters}")
        print(f"{len(customers)} customers mapped to Stripe customers")
        return 0

    return asyncio.run(main())
