"""The whole pipeline on a secured broker: SASL_SSL + SCRAM-SHA-512, and mutual TLS.

Processor (with its DLQ writer), outbox relay, Stripe sink (against the emulator), webhook
bridge and ledger consumer all reach the broker only through `kafka:` security settings:
the broker advertises only its TLS address, where a client without the CA, the client
certificate (mTLS) or a SCRAM login (SASL_SSL) gets nothing
(tests/integration/test_kafka_tls.py). The SCRAM password reaches the service processes
the way production passes it, through `kafka.sasl_password_file`. Checked: the ledger is
exact, bad input is in the DLQ, Stripe equals the ledger, and a Stripe purchase became
exactly one grant.

The SCRAM login is checked by the TLS terminator in front of the embedded broker
(tests/integration/scram_gate.py): Tansu 0.6.0 cannot hold SCRAM users itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from integration.harness import (
    db_pool,
    fleet,
    read_dlq,
    send_until_exact,
    wait_for_owners,
    wait_until,
)
from integration.scram_gate import ScramUsers
from integration.tls import TlsTerminator, make_pki, tls_broker
from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.stripe_emulator.emulator import StripeEmulator, serve
from meterline.stripe.provision import ensure_customers, ensure_meters
from meterline.stripe.transport import Stripe
from meterline.webhooks.bridge import start_bridge
from meterline.webhooks.signing_secrets import SigningSecrets

from .test_stripe_end_to_end import stripe_by_meter, wait_for_stripe_to_equal_ledger

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CUSTOMERS = 12


@pytest.fixture(params=["sasl_ssl_scram", "mtls"])
def secured_broker(request: pytest.FixtureRequest,
                   tmp_path: Path) -> Iterator[tuple[dict[str, str], TlsTerminator]]:
    """(the `kafka:` security settings for it, the broker's TLS front door)."""
    pki = make_pki(tmp_path / "pki")
    if request.param == "mtls":
        with tls_broker(tmp_path / "kafka", pki, require_client_cert=True) as (_, terminator):
            yield {"security_protocol": "SSL", "ssl_ca_file": str(pki.ca),
                   "ssl_cert_file": str(pki.client_cert),
                   "ssl_key_file": str(pki.client_key)}, terminator
        return
    password = tmp_path / "kafka-password"
    password.write_text("e2e-" + uuid.uuid4().hex + "\n")
    users = ScramUsers("SCRAM-SHA-512", {"meterline": password.read_text().strip()})
    with tls_broker(tmp_path / "kafka", pki, scram=users) as (_, terminator):
        yield {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
               "sasl_username": "meterline", "sasl_password_file": str(password),
               "ssl_ca_file": str(pki.ca)}, terminator
        assert users.logins > 0 and users.failed_logins == 0


async def test_pipeline_is_exact_on_a_secured_broker(
    pipeline_settings: Callable[..., Settings],
    secured_broker: tuple[dict[str, str], TlsTerminator],
    tmp_path: Path, unique_topic_prefix: str,
) -> None:
    security, terminator = secured_broker
    emu = StripeEmulator(seed=21)
    runner = await serve("127.0.0.1", 0, emu)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    settings = pipeline_settings(
        customers=CUSTOMERS,
        kafka={"bootstrap_servers": terminator.address, **security},
        stripe={"api_base": url, "coalesce_interval_seconds": 2, "seal_grace_seconds": 0.5,
                "retry_base_seconds": 0.05, "retry_max_seconds": 1, "poll_interval_ms": 50,
                "lease_seconds": 5, "metrics_port": 0,
                "consumer_group": f"{unique_topic_prefix}stripe-sink"},
        ledger_consumer={"metrics_port": 0, "consumer_group": f"{unique_topic_prefix}ledger"})
    api = Stripe("sk_test_x", url, 10)
    secret = "whsec_tls_" + uuid.uuid4().hex
    bridge = await start_bridge(settings, SigningSecrets([secret]), host="127.0.0.1", port=0)
    emu.add_webhook_endpoint(bridge.webhook_url, secret)
    try:
        async with db_pool(settings.database_url) as pool:
            await ensure_meters(api.client, settings)
            stripe_ids = await ensure_customers(api.client, pool, customer_ids(CUSTOMERS))
            with fleet(settings, tmp_path / "fleet", "w1") as services:
                services.service("relay", "relay")
                services.service("sink", "stripe-sink")
                services.service("ledger", "ledger-consumer")
                await wait_for_owners(pool, settings, {"w1"}, workers=services)
                buyer = customer_ids(CUSTOMERS)[0]
                emu.trigger("checkout.session.completed",
                            {"customer": stripe_ids[buyer], "credits": "90", "amount": 9000})
                gen = LoadGenerator(settings, customer_ids(CUSTOMERS), duplicates=0.05, late=0,
                                    invalid=0.05, seed=29)
                await send_until_exact(pool, gen, rate=400, seconds=6, workers=services)
                want = await wait_for_stripe_to_equal_ledger(pool, settings, emu, services)

                async def purchase_granted() -> list[tuple[str, Decimal]]:
                    rows = await pool.fetch(
                        "SELECT customer_id, amount FROM grants WHERE source LIKE 'stripe%'")
                    return [(r["customer_id"], r["amount"]) for r in rows]
                grants = await wait_until(purchase_granted, timeout=30,
                                          what="the purchase to become a grant", workers=services)
                dlq = read_dlq(settings.kafka, settings.kafka.usage_dlq_topic)
                services.check_alive()
    finally:
        await bridge.stop()
        await api.close()
        await runner.cleanup()
    assert stripe_by_meter(emu) == want and want
    assert grants == [(buyer, Decimal(90))]
    assert sum(dlq.values()) == gen.stats.invalid_sent > 0
    assert terminator.handshake_failures == 0  # every client trusted the broker (and vice versa)

