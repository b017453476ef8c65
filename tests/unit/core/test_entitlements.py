"""The entitlement rule and the units a balance still covers (pure)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.core.entitlements import Entitlement, decide, units_covered


@pytest.mark.parametrize(("balance", "overage", "past_due", "policy", "expected"), [
    # within balance: allowed whatever the overage policy
    ("0.000001", "block", False, "block", Entitlement(True, "within_balance", False)),
    ("5", None, False, "block", Entitlement(True, "within_balance", False)),
    # at zero: block refuses, allow and no plan go on in overage
    ("0", "block", False, "block", Entitlement(False, "balance_exhausted", False)),
    ("0", "allow", False, "block", Entitlement(True, "overage_allowed", True)),
    ("-3", None, False, "block", Entitlement(True, "overage_allowed", True)),
    # past due: refused under policy block, whatever the balance; ignored under allow
    ("5", "allow", True, "block", Entitlement(False, "past_due", False)),
    ("-3", "block", True, "block", Entitlement(False, "past_due", False)),  # past due first
    ("5", "block", True, "allow", Entitlement(True, "within_balance", False)),
    ("-3", "block", True, "allow", Entitlement(False, "balance_exhausted", False)),
])
def test_decide_follows_the_rule_table(balance: str, overage: str | None, past_due: bool, policy: str,
                expected: Entitlement) -> None:
    assert decide(Decimal(balance), overage, past_due, policy) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("balance", "rate", "units"), [
    ("1", "0.001", Decimal(1000)),
    ("0.0019", "0.001", Decimal(1)),      # rounded down: never promise a unit it cannot pay
    ("0", "0.001", Decimal(0)),
    ("-4", "0.001", Decimal(0)),
    ("7", "0", None),                      # a free meter has no limit
])
def test_units_covered_round_down_and_are_unlimited_for_free_meters(balance: str, rate: str, units: Decimal | None) -> None:
    assert units_covered(Decimal(balance), Decimal(rate)) == units
