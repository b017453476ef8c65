"""meterline.core.credits: rounding, burn-down order, thresholds and balance-change messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.credits import (
    BalanceChange,
    Burn,
    Grant,
    burn_down,
    burn_order,
    debit_for,
    depleted,
    round_credits,
    threshold_fires,
    thresholds_crossed,
)

NOW = datetime(2026, 11, 21, 17, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)
D = Decimal


def grant(
    id: int,  # noqa: A002 - mirrors Grant.id
    remaining: str | int = 100,
    priority: int = 10,
    effective_at: datetime = NOW - 24 * HOUR,
    expires_at: datetime | None = None,
) -> Grant:
    return Grant(id, D(remaining), priority, effective_at, expires_at)


# --- round_credits / debit_for ---------------------------------------------------------------

ROUNDINGS = [
    # exactly half way between 0 and 1e-6: rounds to the even neighbour, 0
    ("0.0000005", 6, "0.000000"),
    # half way between 1e-6 and 2e-6: rounds to even, up
    ("0.0000015", 6, "0.000002"),
    # half way between 2e-6 and 3e-6: rounds to even, down
    ("0.0000025", 6, "0.000002"),
    ("0.0000035", 6, "0.000004"),
    # just below / above half way: ordinary rounding
    ("0.00000149", 6, "0.000001"),
    ("0.00000051", 6, "0.000001"),
    # negatives round half-even symmetrically
    ("-0.0000015", 6, "-0.000002"),
    ("-0.0000025", 6, "-0.000002"),
    # zero places
    ("1.5", 0, "2"),
    ("2.5", 0, "2"),
    # a short value is padded, not changed
    ("0.1", 6, "0.100000"),
    ("12", 2, "12.00"),
    # twelve places, the configured maximum
    ("0.0000000000005", 12, "0.000000000000"),
    ("0.0000000000015", 12, "0.000000000002"),
]


@pytest.mark.parametrize(("amount", "places", "expected"), ROUNDINGS)
def test_round_credits_rounds_half_even(amount: str, places: int, expected: str) -> None:
    result = round_credits(D(amount), places)

    assert result == D(expected)
    assert result.as_tuple().exponent == -places  # exactly `places` decimals, also for zero


@given(
    x=st.decimals(min_value=-(10**12), max_value=10**12, allow_nan=False, allow_infinity=False),
    places=st.integers(0, 12),
)
@settings(max_examples=300, deadline=None)
def test_round_credits_has_at_most_p_decimals_and_error_at_most_half_a_unit(
    x: Decimal, places: int
) -> None:
    result = round_credits(x, places)

    assert -result.as_tuple().exponent <= places
    with localcontext() as ctx:
        ctx.prec = 200  # exact arithmetic for the check itself
        error = abs(x - result)
        half_unit = D("0.5").scaleb(-places)
        assert error <= half_unit
        if error == half_unit:  # a tie went to the even neighbour
            assert result.scaleb(places) % 2 == 0


def test_round_credits_does_not_overflow_for_large_amounts() -> None:
    assert round_credits(D("1e23"), 6) == D("100000000000000000000000.000000")


DEBITS = [
    # an integer count times a price
    (1234, "0.001", 6, "1.234000"),
    # an exact decimal quantity: 0.1 * 3 is 0.3, not 0.30000000000000004
    (D("0.1"), "3", 6, "0.300000"),
    # one unit at half a micro-credit rounds (half-even) to nothing ...
    (1, "0.0000005", 6, "0.000000"),
    # ... but three units in one aggregate round once: 0.0000015 -> 0.000002
    (3, "0.0000005", 6, "0.000002"),
    # zero usage costs zero
    (0, "0.01", 6, "0.000000"),
    # a negative `latest` correction gives a negative debit (a credit back)
    (-30, "0.01", 6, "-0.300000"),
    # a free meter
    (999, "0", 6, "0.000000"),
]


@pytest.mark.parametrize(("quantity", "price", "places", "expected"), DEBITS)
def test_debit_for_is_rounded_once_per_aggregate(
    quantity: int | Decimal, price: str, places: int, expected: str
) -> None:
    assert str(debit_for(quantity, D(price), places)) == expected


# --- burn order ----------------------------------------------------------------------------


def test_burn_order_is_priority_then_expiry_then_effective_then_id() -> None:
    grants = [
        grant(1, priority=20, expires_at=NOW + HOUR),  # low priority loses despite expiring first
        grant(2, priority=10),  # never expires: last within its priority
        grant(3, priority=10, expires_at=NOW + 48 * HOUR),
        grant(4, priority=10, expires_at=NOW + 2 * HOUR),  # earliest expiry in priority 10
        grant(5, priority=10, expires_at=NOW + 48 * HOUR, effective_at=NOW - 48 * HOUR),  # older
        grant(6, priority=10, expires_at=NOW + 48 * HOUR, effective_at=NOW - 48 * HOUR),  # id tie
        grant(7, priority=5),  # the best priority wins even though it never expires
    ]

    assert [g.id for g in sorted(grants, key=burn_order)] == [7, 4, 5, 6, 3, 2, 1]


def test_never_expiring_grants_burn_after_any_expiring_grant_of_the_same_priority() -> None:
    far = grant(1, expires_at=NOW + 10_000 * 24 * HOUR)
    never = grant(2, effective_at=NOW - 100_000 * HOUR)  # effective much earlier: irrelevant

    assert [g.id for g in sorted([never, far], key=burn_order)] == [1, 2]


def test_never_expiring_grants_burn_by_effective_at_then_id() -> None:
    grants = [grant(3, effective_at=NOW - HOUR), grant(2, effective_at=NOW - 2 * HOUR),
              grant(1, effective_at=NOW - HOUR)]

    assert [g.id for g in sorted(grants, key=burn_order)] == [2, 1, 3]


# --- burn_down ---------------------------------------------------------------------------------


def test_burn_down_takes_from_grants_in_burn_order() -> None:
    grants = [grant(1, "10"), grant(2, "5", expires_at=NOW + HOUR), grant(3, "4", priority=1)]

    burn, updated = burn_down(grants, D("12"), NOW)

    assert burn == Burn(((3, D("4")), (2, D("5")), (1, D("3"))), D("0"))
    assert [(g.id, g.remaining) for g in updated] == [(1, D("7")), (2, D("0")), (3, D("0"))]


def test_burn_down_skips_grants_not_yet_effective() -> None:
    grants = [grant(1, "10", priority=1, effective_at=NOW + timedelta(microseconds=1)), grant(2, "10")]

    burn, updated = burn_down(grants, D("4"), NOW)

    assert burn.allocations == ((2, D("4")),)
    assert updated[0] == grants[0]


def test_burn_down_uses_a_grant_effective_exactly_now() -> None:
    burn, _ = burn_down([grant(1, "10", effective_at=NOW)], D("4"), NOW)

    assert burn.allocations == ((1, D("4")),)


def test_burn_down_skips_expired_grants_including_one_expiring_exactly_now() -> None:
    grants = [grant(1, "10", priority=1, expires_at=NOW), grant(2, "10", priority=1, expires_at=NOW - HOUR),
              grant(3, "10", expires_at=NOW + timedelta(microseconds=1))]

    burn, updated = burn_down(grants, D("4"), NOW)

    assert burn.allocations == ((3, D("4")),)
    assert updated[:2] == grants[:2]


def test_burn_down_skips_exhausted_grants() -> None:
    burn, _ = burn_down([grant(1, "0", priority=1), grant(2, "10")], D("1"), NOW)

    assert burn.allocations == ((2, D("1")),)


def test_burn_down_charges_overage_when_grants_run_out() -> None:
    burn, updated = burn_down([grant(1, "2.5"), grant(2, "1", expires_at=NOW - HOUR)], D("4"), NOW)

    assert burn == Burn(((1, D("2.5")),), D("1.5"))
    assert [g.remaining for g in updated] == [D("0"), D("1")]


def test_burn_down_without_grants_is_all_overage() -> None:
    assert burn_down([], D("3.25"), NOW) == (Burn((), D("3.25")), [])


@pytest.mark.parametrize(
    "amount",
    [
        # a `latest` correction crediting back
        D("-2.5"),
        # nothing to debit
        D("0"),
    ],
)
def test_burn_down_of_non_positive_amount_burns_nothing(amount: Decimal) -> None:
    grants = [grant(1, "10")]

    burn, updated = burn_down(grants, amount, NOW)

    assert burn == Burn((), amount)
    assert updated == grants


GRANT_TIMES = st.integers(-5, 5).map(lambda h: NOW + h * HOUR)


@st.composite
def grant_lists(draw: st.DrawFn) -> list[Grant]:
    n = draw(st.integers(0, 8))
    ids = draw(st.lists(st.integers(1, 1_000), min_size=n, max_size=n, unique=True))
    return [
        Grant(
            i,
            draw(st.decimals(0, 100, places=2)),
            draw(st.integers(0, 3)),
            draw(GRANT_TIMES),
            draw(st.one_of(st.none(), GRANT_TIMES)),
        )
        for i in ids
    ]


@given(grants=grant_lists(), amount=st.decimals(D("0.000001"), 500, places=6))
@settings(max_examples=300, deadline=None)
def test_burn_down_conserves_credits(grants: list[Grant], amount: Decimal) -> None:
    burn, updated = burn_down(grants, amount, NOW)

    allocated = dict(burn.allocations)
    assert sum(allocated.values(), D(0)) + burn.overage == amount
    assert burn.overage >= 0
    assert all(c > 0 for c in allocated.values())
    assert len(allocated) == len(burn.allocations)  # a grant is used at most once
    # the grants come back in their order, each reduced by what it gave, never below zero
    assert [g.id for g in updated] == [g.id for g in grants]
    for before, after in zip(grants, updated, strict=True):
        assert after.remaining >= 0
        assert before.remaining - after.remaining == allocated.get(before.id, 0)
        if before.id in allocated:
            assert before.usable_at(NOW)
    # allocations follow burn_order; every grant but the last is drained
    by_id = {g.id: g for g in grants}
    used = [by_id[i] for i, _ in burn.allocations]
    assert used == sorted(used, key=burn_order)
    for g in used[:-1]:
        assert allocated[g.id] == g.remaining
    # no usable grant is skipped: the used ones are a prefix of the usable ones in burn order
    usable = sorted((g for g in grants if g.usable_at(NOW)), key=burn_order)
    assert used == usable[: len(used)]
    if burn.overage > 0:
        assert used == usable  # overage only once every usable grant is empty


# --- thresholds and depletion --------------------------------------------------------------------

THRESHOLDS = (50, 75, 90, 100)

CROSSINGS = [
    # 40% used: below the first threshold
    ("100", "60", "100", ()),
    # exactly 50% used crosses 50
    ("100", "50", "100", (50,)),
    # 49% -> 51% used crosses 50 only
    ("51", "49", "100", (50,)),
    # one debit jumping from 40% to 95% crosses three thresholds at once
    ("60", "5", "100", (50, 75, 90)),
    # into overage: all four
    ("100", "-20", "100", (50, 75, 90, 100)),
    # reaching zero balance is 100% used
    ("10", "0", "100", (100,)),
    # already at 100%: going further negative crosses nothing again
    ("0", "-5", "100", ()),
    # already past 50%: a small further debit below 75% crosses nothing
    ("49.99", "49.98", "100", ()),
    # thresholds are relative to the grant: 50% of 3 is 1.5
    ("1.6", "1.5", "3", (50,)),
    ("1.6", "1.500001", "3", ()),
    # balance rises (a credit back): never a crossing
    ("40", "60", "100", ()),
    # unchanged balance
    ("50", "50", "100", ()),
    # nothing granted: no thresholds at all
    ("0", "-10", "0", ()),
    ("5", "-10", "-1", ()),
]


@pytest.mark.parametrize(("before", "after", "granted", "expected"), CROSSINGS)
def test_thresholds_crossed(before: str, after: str, granted: str, expected: tuple[int, ...]) -> None:
    assert thresholds_crossed(D(before), D(after), D(granted), THRESHOLDS) == expected


# (fired before, balance before -> after, granted before -> after, fires, fired after)
FIRES = [
    # a debit from 40% to 80% used fires 50 and 75 and remembers them
    ("", "60", "20", "100", "100", (50, 75), {50, 75}),
    # a further debit fires only what it newly reaches
    ("50,75", "20", "5", "100", "100", (90,), {50, 75, 90}),
    # expiry of a used-up grant shrinks the base: 75% -> 50%, nothing fires, nothing re-arms
    ("50,75", "50", "50", "200", "100", (), {50, 75}),
    # ... so the next debit to 60% does not fire 50 again (the balance never recovered)
    ("50,75", "50", "40", "100", "100", (), {50, 75}),
    # expiry of an unused remainder: 70% -> 100% fires 75, 90, 100, never 50 a second time
    ("50", "60", "0", "200", "100", (75, 90, 100), {50, 75, 90, 100}),
    # a credit-back that takes the share back under 75 re-arms 75 (the balance recovered) ...
    ("50,75", "20", "30", "100", "100", (), {50}),
    # ... and crossing it again fires it again: a real recrossing
    ("50", "30", "20", "100", "100", (75,), {50, 75}),
    # a top-up (the next period's allocation) re-arms everything the share fell under:
    # 95% -> 50% keeps 50 fired, re-arms 75 and 90
    ("50,75,90", "5", "95", "100", "190", (), {50}),
    # fired not known (migrated books): what was reached before counts as fired
    (None, "20", "5", "100", "100", (90,), {50, 75, 90}),
    # no grants: no thresholds
    ("", "0", "-10", "0", "0", (), set()),
]


@pytest.mark.parametrize(("fired", "before", "after", "g_before", "g_after", "fires", "fired_after"),
                         FIRES)
def test_threshold_fires_once_per_crossing(
    fired: str | None, before: str, after: str, g_before: str, g_after: str,
    fires: tuple[int, ...], fired_after: set[int],
) -> None:
    known = None if fired is None else frozenset(int(t) for t in fired.split(",") if t)
    assert threshold_fires(known, D(before), D(after), D(g_before), D(g_after), THRESHOLDS) == (
        fires, frozenset(fired_after))


DEPLETIONS = [
    # positive to exactly zero
    ("1", "0", True),
    # positive to negative
    ("1", "-1", True),
    # the smallest positive balance to zero
    ("0.000001", "0", True),
    # still positive
    ("1", "0.5", False),
    # already zero: not a new depletion
    ("0", "-1", False),
    # already negative
    ("-1", "-2", False),
    # a credit back that leaves it at zero or lifts it
    ("-1", "0", False),
    ("0", "1", False),
]


@pytest.mark.parametrize(("before", "after", "expected"), DEPLETIONS)
def test_depleted_only_on_the_transition_to_zero_or_below(before: str, after: str, expected: bool) -> None:
    assert depleted(D(before), D(after)) is expected


# --- BalanceChange.to_message ---------------------------------------------------------------------


def test_balance_change_message_carries_exact_strings_thresholds_and_depletion() -> None:
    change = BalanceChange("cus_1", D("10.500000"), D("-0.250000"), D("100"), "usage", (7, 9), THRESHOLDS)

    assert change.delta == D("-10.750000")
    assert change.to_message() == {
        "customer": "cus_1",
        "balance_before": "10.500000",
        "balance_after": "-0.250000",
        "delta": "-10.750000",
        "reason": "usage",
        "ledger_entry_id": 9,  # the last entry
        "ledger_entry_ids": [7, 9],
        "thresholds_crossed": [90, 100],  # 89.5% used before, 100.25% after
        "depleted": True,
        "granted": "100",
        "transfers": [],  # the ledger fills them in (tests/integration/test_ledger_transfers.py)
    }


def test_balance_change_message_without_ledger_entries_has_null_entry_id() -> None:
    message = BalanceChange("cus_1", D("80"), D("70"), D("100"), "usage", (), THRESHOLDS).to_message()

    assert message["ledger_entry_id"] is None
    assert message["ledger_entry_ids"] == []
    assert message["thresholds_crossed"] == []
    assert message["depleted"] is False
