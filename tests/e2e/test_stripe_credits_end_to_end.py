"""Credits bought in Stripe, burnt by usage, down to a paywall that says no.

Stripe emulator --signed webhook--> bridge --stripe.events--> ledger consumer (grant)
usage.events --> processor (debits, thresholds) --> relay --> billing.balance-changes
API entitlement: the customer's plan blocks overage, so at zero balance it answers no.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from confluent_kafka import Producer

from integration.harness import db_pool, fleet, read_messages, wait_for_owners, wait_until
from meterline.api import ApiServer
from meterline.billing import consumer as ledger_consumer
from meterline.config import Settings
from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.stripe.provision import ensure_customers
from meterline.stripe.transport import Stripe
from meterline.webhooks.bridge import start_bridge
from meterline.webhooks.signing_secrets import SigningSecrets

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0123456789abcdef"


async def test_bought_credits_burn_down_through_thresholds_to_a_blocked_entitlement(
    pipeline_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    settings = pipeline_settings(
        customers=[{"id": "acme", "plan": "capped"}],
        plans=[{"key": "capped", "included_credits": "10", "period": "month",
                "carryover": "reset", "overage": "block"}],
        meters=[{"key": "gpu_seconds", "event_type": "gpu_usage", "aggregation": "sum",
                 "value_property": "seconds", "credits_per_unit": "1"}],
        ledger_consumer={"metrics_port": 0},
    )
    emu = StripeEmulator(seed=9)
    emulator = await serve("127.0.0.1", 0, emu)
    api_client = Stripe("sk_test_x", f"http://127.0.0.1:{emulator.addresses[0][1]}", 10)
    secret = "whsec_e2e_" + uuid.uuid4().hex
    bridge = await start_bridge(settings, SigningSecrets([secret]), host="127.0.0.1", port=0)
    emu.add_webhook_endpoint(bridge.webhook_url, secret)
    ledger = await ledger_consumer.start(settings)
    api = await ApiServer(settings, (TOKEN.encode(),), host="127.0.0.1", port=0).start()
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})

    async def get(path: str) -> dict[str, Any]:
        async with http.get(api.url + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]

    async def balance() -> Decimal:
        return Decimal((await get("/v1/customers/acme/balance"))["balance"])

    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})

    def use(seconds: int) -> None:
        event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "e2e",
                 "type": "gpu_usage", "subject": "acme",
                 "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                 "data": {"seconds": seconds}}
        producer.produce(settings.kafka.usage_topic, orjson.dumps(event), b"acme")
        assert producer.flush(10) == 0

    try:
        async with db_pool(settings.database_url) as pool:
            [stripe_id] = (await ensure_customers(api_client.client, pool, ["acme"])).values()
            with fleet(settings, tmp_path, "w1") as services:
                services.service("relay", "relay")
                await wait_for_owners(pool, settings, {"w1"}, workers=services)
                await wait_until(lambda: _eq(balance(), Decimal(10)), timeout=20,
                                 what="the plan's 10 included credits")

                # buy 90 credits in Stripe: signed webhook -> bridge -> Kafka -> grant
                emu.trigger("checkout.session.completed",
                            {"customer": stripe_id, "credits": "90", "amount": 9000})
                await wait_until(lambda: _eq(balance(), Decimal(100)), timeout=30,
                                 what="the purchase to become a grant")
                allowed = await get("/v1/customers/acme/entitlements/gpu_seconds")
                assert allowed["allowed"] is True and allowed["reason"] == "within_balance"

                # burn 50 + 25 + 15 + 10 of the 100 granted credits, one window at a time
                left = Decimal(100)
                for seconds in (50, 25, 15, 10):
                    use(seconds)
                    left -= seconds
                    await wait_until(lambda left=left: _eq(balance(), left), timeout=30,
                                     what=f"balance {left}", workers=services)
                denied = await get("/v1/customers/acme/entitlements/gpu_seconds")
                await asyncio.sleep(1.5)  # let the relay publish the last balance change
                changes = [orjson.loads(m.value or b"") for m in read_messages(
                    settings.kafka.bootstrap_servers, settings.kafka.balance_changes_topic)]
    finally:
        await http.close()
        await api.stop()
        await ledger.stop()
        await bridge.stop()
        await api_client.close()
        await emulator.cleanup()

    assert denied["allowed"] is False and denied["reason"] == "balance_exhausted"
    mine = [c for c in changes if c["customer"] == "acme"]
    crossed = [t for c in mine for t in c["thresholds_crossed"]]
    assert crossed == [50, 75, 90, 100]  # each once, in order
    assert [c["reason"] for c in mine if c["depleted"]] == ["usage"]
    assert Decimal(mine[-1]["balance_after"]) == 0
    grants = [c for c in mine if Decimal(c["delta"]) == 90]
    assert len(grants) == 1  # the purchase, granted once


async def _eq(value: Any, want: Decimal) -> bool:
    return bool(await value == want)
