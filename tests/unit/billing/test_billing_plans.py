"""meterline.billing.plans: upgrade proration, cancellation, latest snapshot — and purity."""

from __future__ import annotations

import ast
import random
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.billing.plans import (
    allocation_allowed,
    plan_in_force,
    snapshot_rank,
    upgrade_credits,
)

D = Decimal
START, END = 1_000_000, 1_000_000 + 30 * 86_400
HALF = START + 15 * 86_400


@pytest.mark.parametrize(("changes", "expected"), [
    ([], "0"),  # no snapshot yet
    ([(START, D(50))], "0"),  # the period's own plan
    ([(HALF, D(500))], "225"),  # 50 -> 500 half-way: (500 - 50) x 1/2
    ([(START - 10, D(500))], "450"),  # upgraded before the period began: the whole difference
    ([(END + 10, D(500))], "0"),  # after the period: nothing left of it
    ([(HALF, D(10))], "0"),  # a downgrade waits for the next period
    ([(HALF, D(10)), (HALF + 1, D(500))], "224.999826"),  # down then up: only the rise above base
    ([(HALF, D(500)), (HALF + 86_400, D(50)), (HALF + 2 * 86_400, D(500))], "225"),  # re-upgrade: nothing new
    ([(START + 10 * 86_400, D(200)), (HALF, D(500))], "250"),  # 150 x 2/3 + 300 x 1/2
])
def test_upgrade_credits_prorate_each_rise_above_the_highest_plan_so_far(
    changes: list[tuple[int, Decimal]], expected: str
) -> None:
    assert upgrade_credits(D(50), START, END, changes, 6) == D(expected)


change_lists = st.lists(
    st.tuples(st.integers(START - 86_400, END + 86_400), st.sampled_from([D(0), D(50), D(120), D(500)])),
    max_size=8,
)


@given(change_lists, st.randoms())
def test_upgrade_target_does_not_depend_on_delivery_order(
    changes: list[tuple[int, Decimal]], rnd: random.Random
) -> None:
    shuffled = list(changes)
    rnd.shuffle(shuffled)

    assert upgrade_credits(D(50), START, END, shuffled, 6) == upgrade_credits(D(50), START, END, changes, 6)


@given(change_lists, change_lists)
def test_upgrade_target_only_grows_as_snapshots_arrive(
    known: list[tuple[int, Decimal]], later: list[tuple[int, Decimal]]
) -> None:
    """What makes top-ups safe: granting `target - granted` never needs taking back."""
    assert upgrade_credits(D(50), START, END, known + later, 6) >= upgrade_credits(D(50), START, END, known, 6)


def test_cancellation_stops_allocations_from_the_period_it_ended_in_on() -> None:
    assert allocation_allowed(START, None)
    assert allocation_allowed(START, START + 1)
    assert not allocation_allowed(START, START)
    assert not allocation_allowed(END, START + 5)


def test_canceled_snapshot_is_latest_whatever_is_created_after_it() -> None:
    canceled = snapshot_rank("canceled", 100, "evt_a")
    later_active = snapshot_rank("active", 200, "evt_b")

    assert canceled > later_active


def test_snapshots_created_in_the_same_second_are_ordered_by_event_id() -> None:
    assert snapshot_rank("active", 100, "evt_b") > snapshot_rank("active", 100, "evt_a")


@pytest.mark.parametrize(("status", "plan"), [
    ("active", "pro"), ("trialing", "pro"), ("past_due", "pro"),
    ("canceled", None), ("incomplete", None), ("unpaid", None), ("incomplete_expired", None),
])
def test_plan_in_force_while_the_subscription_runs(status: str, plan: str | None) -> None:
    assert plan_in_force(status, "pro") == plan


# --- the pure modules stay pure ---------------------------------------------------------------

BILLING = Path(__file__).resolve().parents[3] / "services" / "meterline" / "billing"
PURE = ("ledger_actions.py", "stripe_events.py", "plans.py")
FORBIDDEN = ("aiokafka", "asyncpg", "confluent_kafka", "faust", "aiohttp", "stripe",
             "prometheus_client", "meterline.storage", "meterline.processor", "meterline.metrics",
             "meterline.stripe", "socket")


@pytest.mark.parametrize("name", PURE)
def test_billing_rules_import_no_io(name: str) -> None:
    tree = ast.parse((BILLING / name).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert not {n for n in names for f in FORBIDDEN if n == f or n.startswith(f + ".")}
