"""ledger_consumer config: defaults, validation naming the field, and the catalog built from it."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.billing.consumer import catalog_from, policy_from
from meterline.config import ConfigError, load_settings

PLANS = [{"key": "pro", "included_credits": "500"}]


def test_defaults() -> None:
    s = load_settings(None)

    assert s.ledger_consumer.metrics_port == 9468
    assert s.ledger_consumer.purchased_credit_expiry_days is None
    assert catalog_from(s).purchased_expiry_seconds is None


def test_price_mapped_to_an_unknown_plan_fails_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="ledger_consumer.plan_by_price"):
        load_settings(None, plans=PLANS, ledger_consumer={"plan_by_price": {"price_1": "gold"}})


def test_credit_pack_prices_must_grant_positive_credits() -> None:
    with pytest.raises(ConfigError, match="ledger_consumer.credits_by_price"):
        load_settings(None, ledger_consumer={"credits_by_price": {"price_1": "0"}})


def test_catalog_and_policy_carry_the_maps_and_expiry() -> None:
    s = load_settings(None, plans=PLANS, ledger_consumer={
        "plan_by_price": {"price_pro": "pro"}, "credits_by_price": {"price_pack": "250.5"},
        "purchased_credit_expiry_days": 365, "purchased_credit_priority": 30})

    cat, policy = catalog_from(s), policy_from(s)

    assert cat.plans == frozenset({"pro"})
    assert cat.plan_by_price == {"price_pro": "pro"}
    assert cat.credits_by_price == {"price_pack": Decimal("250.5")}
    assert cat.purchased_expiry_seconds == 365 * 86_400
    assert policy.purchased_priority == 30
    assert policy.plans["pro"].included_credits == 500
