"""Random sequences of money changes through the real code and a real Postgres; the ledger's
invariants (meterline/ledger/__init__.py) are checked against the database after every step.

Steps: grants (priorities, expiries, some taking effect later), usage of all four aggregations into a few windows
(so later steps are late corrections, up and down), clock advances with expiry, voids
(what refunds, disputes and Stripe voids call), and manual adjustments.

Derandomized and bounded so it runs in `make test`. A longer run (not METERLINE_* names:
those are read as settings):

    LEDGER_PROPERTY_EXAMPLES=2000 LEDGER_PROPERTY_STEPS=40 \\
        .venv/bin/python -m pytest tests/integration/test_ledger_properties.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .ledger_support import Desk, ledger_settings

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("LEDGER_PROPERTY_EXAMPLES", "100"))
STEPS = int(os.environ.get("LEDGER_PROPERTY_STEPS", "20"))

amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(60), places=2)
values = st.decimals(min_value=Decimal(0), max_value=Decimal(25), places=3)


@dataclass(frozen=True)
class Grant:
    amount: Decimal
    expires_in_hours: int | None
    priority: int
    starts_in_hours: int  # 0: at once; later: scheduled, issued by the ledger's clock


@dataclass(frozen=True)
class Use:
    meter: str
    window: int
    value: Decimal
    at_ms: int


@dataclass(frozen=True)
class Advance:
    hours: int


@dataclass(frozen=True)
class Void:
    grant_index: int
    credits: Decimal


@dataclass(frozen=True)
class Adjust:
    credits: Decimal


steps = st.one_of(
    st.builds(Grant, amounts, st.one_of(st.none(), st.integers(2, 4)), st.sampled_from([1, 10]),
              st.sampled_from([0, 0, 1])),
    st.builds(Use, st.sampled_from(["sum", "count", "max", "latest"]), st.integers(0, 2), values,
              st.integers(0, 4_999)),
    st.builds(Use, st.sampled_from(["sum", "count", "max", "latest"]), st.integers(0, 2), values,
              st.integers(0, 4_999)),
    st.builds(Advance, st.integers(1, 2)),
    st.builds(Void, st.integers(0, 5), amounts),
    st.builds(Adjust, amounts),
)

_customers = itertools.count()


async def _run(dsn: str, sequence: list[object]) -> None:
    customer = f"p{next(_customers)}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        desk = Desk(ledger_settings(dsn), pool)
        grants: list[int] = []
        for i, step in enumerate(sequence):
            if isinstance(step, Grant):
                expires = (None if step.expires_in_hours is None
                           else desk.now + timedelta(hours=step.expires_in_hours))
                starts = desk.now + timedelta(hours=step.starts_in_hours)
                grants.append(await desk.grant(customer, step.amount, expires_at=expires,
                                               priority=step.priority, effective_at=(
                                                   starts if step.starts_in_hours else None)))
            elif isinstance(step, Use):
                await desk.use(customer, step.meter, step.value, step.window, step.at_ms)
            elif isinstance(step, Advance):
                desk.now += timedelta(hours=step.hours)
                await desk.expire()
            elif isinstance(step, Void) and grants:
                await desk.void(grants[step.grant_index % len(grants)], step.credits)
            elif isinstance(step, Adjust):
                await desk.adjust(customer, -step.credits)
            found = await desk.audit(customer)  # others: earlier examples
            assert found.holds, (i, step, found.violations)
    finally:
        await pool.close()


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(steps, min_size=1, max_size=STEPS))
def test_every_sequence_of_money_changes_keeps_the_ledger_invariants(
    migrated_database: str, sequence: list[object]
) -> None:
    asyncio.run(_run(migrated_database, sequence))
