"""Projected depletion from the recent burn rate (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from meterline.core.depletion import project

NOW = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
HOUR_AGO = NOW - timedelta(hours=1)


def test_balance_runs_out_at_the_burn_rate() -> None:
    p = project(Decimal(30), Decimal(10), HOUR_AGO, NOW)  # 10 credits an hour
    assert (p.status, p.burn_rate_per_hour, p.depletes_at) == (
        "projected", Decimal("10.000000"), NOW + timedelta(hours=3))


def test_rate_is_rounded_half_even_to_the_ledger_places() -> None:
    p = project(Decimal(1), Decimal(1), NOW - timedelta(hours=3), NOW, places=2)
    assert p.burn_rate_per_hour == Decimal("0.33")


def test_no_usage_means_no_projection() -> None:
    for burned in (Decimal(0), Decimal(-2)):  # a `latest` correction can credit back
        p = project(Decimal(5), burned, HOUR_AGO, NOW)
        assert (p.status, p.depletes_at, p.burn_rate_per_hour) == ("no_recent_usage", None, 0)


def test_depleted_balance_has_no_date() -> None:
    for balance in (Decimal(0), Decimal("-0.5")):
        p = project(balance, Decimal(10), HOUR_AGO, NOW)
        assert (p.status, p.depletes_at) == ("depleted", None)


def test_far_future_is_beyond_the_horizon_not_an_overflow() -> None:
    p = project(Decimal(10) ** 15, Decimal("0.000001"), HOUR_AGO, NOW)
    assert (p.status, p.depletes_at) == ("beyond_horizon", None)
