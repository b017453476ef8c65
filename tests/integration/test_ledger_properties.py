"""Random sequences of money changes through the real code and a real Postgres; the ledger's
invariants (meterline/ledger/__init__.py) are checked against the database after every step.

Steps, each through the code that does it in production:
- grants (priorities, expiries, some taking effect later), voids and adjustments (`meterline.ledger`);
- usage of all four aggregations into a few windows, through the processor's flush (so later
  steps are late corrections, up and down);
- clock advances with expiry, and a move to the next calendar period (expiry, then the
  config plan allocator, `storage.grants.allocate_plan_periods`);
- config plan changes (`sync_config` + the allocator: prorated mid-period);
- Stripe events decided and applied like the ledger consumer does (`billing.stripe_events.decide`
  + `billing.stripe_ledger.apply_event`): credit purchases, subscription snapshots (plan
  changes, upgrades, seat changes), paid subscription invoices (period allocations), full and
  partial refunds of any payment, and lost disputes;
- API grants and adjustments (`api.credits.parse_request` + `apply_manual_credit`), some
  replaying an earlier idempotency key.

Derandomized and bounded so it runs in `make test`. A longer run (not METERLINE_* names:
those are read as settings):

    LEDGER_PROPERTY_EXAMPLES=2000 LEDGER_PROPERTY_STEPS=40 \\
        .venv/bin/python -m pytest tests/integration/test_ledger_properties.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meterline.api.context import ApiContext
from meterline.api.credits import apply_manual_credit, parse_request
from meterline.api.wire import ApiError
from meterline.billing.consumer import catalog_from, policy_from
from meterline.billing.ledger_actions import Apply
from meterline.billing.stripe_events import decide
from meterline.billing.stripe_ledger import apply_event
from meterline.config import Settings
from meterline.devstack.stripe_emulator import objects
from meterline.storage.grants import allocate_plan_periods, period_bounds, sync_config

from .ledger_support import Desk, ledger_settings

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("LEDGER_PROPERTY_EXAMPLES", "100"))
STEPS = int(os.environ.get("LEDGER_PROPERTY_STEPS", "20"))

amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(60), places=2)
values = st.decimals(min_value=Decimal(0), max_value=Decimal(25), places=3)


PLANS = [
    {"key": "starter", "included_credits": "50", "period": "month", "carryover": "reset"},
    {"key": "growth", "included_credits": "200", "period": "month", "carryover": "reset"},
    {"key": "pro", "included_credits": "500", "period": "month", "carryover": "rollover"},
]
plan_keys = st.sampled_from([p["key"] for p in PLANS])
CHARGE_CENTS = 5000  # every credit purchase costs $50


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
class NextPeriod:
    """The clock moves into the next month: expiry, then the config plan allocator."""


@dataclass(frozen=True)
class Void:
    grant_index: int
    credits: Decimal


@dataclass(frozen=True)
class Adjust:
    credits: Decimal


@dataclass(frozen=True)
class ConfigPlan:
    plan: str


@dataclass(frozen=True)
class Purchase:  # checkout.session.completed with meterline_credits
    credits: Decimal


@dataclass(frozen=True)
class Subscription:  # customer.subscription.updated: plan change, upgrade or seat change
    plan: str
    seats: int


@dataclass(frozen=True)
class PlanInvoice:  # invoice.paid for the subscription's current period: an allocation
    pass


@dataclass(frozen=True)
class Refund:  # charge.refunded: cumulative refunded share of one payment
    payment_index: int
    percent: int  # of the charge, added to what was refunded before; 100+: full


@dataclass(frozen=True)
class DisputeLost:
    payment_index: int


@dataclass(frozen=True)
class ApiCredit:  # POST /v1/customers/{id}/grants: a grant (> 0) or an adjustment (< 0)
    amount: Decimal
    replay: bool  # resend the previous request's idempotency key and body


steps = st.one_of(
    st.builds(Grant, amounts, st.one_of(st.none(), st.integers(2, 4)), st.sampled_from([1, 10]),
              st.sampled_from([0, 0, 1])),
    st.builds(Use, st.sampled_from(["sum", "count", "max", "latest"]), st.integers(0, 2), values,
              st.integers(0, 4_999)),
    st.builds(Use, st.sampled_from(["sum", "count", "max", "latest"]), st.integers(0, 2), values,
              st.integers(0, 4_999)),
    st.builds(Advance, st.integers(1, 2)),
    st.just(NextPeriod()),
    st.builds(Void, st.integers(0, 5), amounts),
    st.builds(Adjust, amounts),
    st.builds(ConfigPlan, plan_keys),
    st.builds(Purchase, amounts),
    st.builds(Subscription, plan_keys, st.integers(1, 3)),
    st.builds(Subscription, plan_keys, st.integers(1, 3)),  # twice: upgrades need two
    st.just(PlanInvoice()),
    st.builds(Refund, st.integers(0, 5), st.sampled_from([25, 50, 100])),
    st.builds(DisputeLost, st.integers(0, 5)),
    st.builds(ApiCredit, st.one_of(amounts, amounts.map(lambda a: -a)), st.booleans()),
)

_customers = itertools.count()


@dataclass
class Stripe:
    """One customer's side of Stripe: events decided and applied as the ledger consumer does."""

    settings: Settings
    customer: str
    payments: list[tuple[str, int]] = field(default_factory=list)  # (payment intent, cents)
    refunded: dict[str, int] = field(default_factory=dict)
    plan: tuple[str, int] | None = None  # the subscription's (plan, seats)
    sent: int = 0

    @property
    def cus(self) -> str:
        return f"cus_{self.customer}"

    def next_id(self, what: str) -> str:
        self.sent += 1
        return f"{what}_{self.customer}_{self.sent}"

    async def apply(self, conn: asyncpg.Connection, type_: str, obj: dict[str, Any],
                    now: datetime) -> None:
        # `created` rises with every event, as Stripe's do for one customer's changes
        created = int(now.timestamp()) + self.sent
        raw = json.dumps(objects.event(type_, obj, event_id=self.next_id("evt"),
                                       created=created)).encode()
        decision = decide(raw, catalog_from(self.settings))
        assert isinstance(decision, Apply), decision
        await apply_event(conn, decision, policy_from(self.settings))

    def price(self, plan: str) -> dict[str, Any]:
        return objects.price(f"price_{plan}", unit_amount=1000, metadata={"meterline_plan": plan},
                             recurring_interval="month")

    def subscription(self, plan: str, seats: int, now: datetime) -> dict[str, Any]:
        start, end = period_bounds("month", now)
        return objects.subscription(
            f"sub_{self.customer}", customer=self.cus, price_obj=self.price(plan),
            status="active", period=(int(start.timestamp()), int(end.timestamp())),
            created=int(start.timestamp()), item_id=f"si_{self.customer}", quantity=seats)

    def plan_invoice(self, now: datetime) -> dict[str, Any] | None:
        if self.plan is None:
            return None
        plan, seats = self.plan
        start, end = period_bounds("month", now)
        period = (int(start.timestamp()), int(end.timestamp()))
        line = objects.invoice_line(self.next_id("il"), price_obj=self.price(plan),
                                    subscription=f"sub_{self.customer}", period=period,
                                    quantity=seats)
        pi = self.next_id("pi")
        self.payments.append((pi, 1000 * seats))
        return objects.invoice(self.next_id("in"), customer=self.cus, lines=[line],
                               created=int(now.timestamp()), billing_reason="subscription_cycle",
                               subscription=f"sub_{self.customer}", payment_intent=pi)

    def refund(self, index: int, percent: int, now: datetime) -> dict[str, Any] | None:
        if not self.payments:
            return None
        pi, cents = self.payments[index % len(self.payments)]
        self.refunded[pi] = min(cents, self.refunded.get(pi, 0) + cents * percent // 100)
        return objects.charge(f"ch_{pi}", customer=self.cus, amount=cents,
                              amount_refunded=self.refunded[pi], created=int(now.timestamp()),
                              payment_intent=pi)

    def lost_dispute(self, index: int) -> dict[str, Any] | None:
        if not self.payments:
            return None
        pi, cents = self.payments[index % len(self.payments)]
        return {"id": self.next_id("du"), "object": "dispute", "amount": cents,
                "charge": f"ch_{pi}", "payment_intent": pi, "status": "lost",
                "reason": "fraudulent"}


async def _api_credit(desk: Desk, api: ApiContext, customer: str, step: ApiCredit, key: str,
                      body: dict[str, Any]) -> None:
    req = parse_request(customer, body, key, desk.now)
    async with desk.db.acquire() as conn:
        try:
            await apply_manual_credit(conn, api, req, desk.now)
        except ApiError as exc:  # a replayed key with another body: refused, nothing applied
            assert step.replay and exc.status == 409, exc


async def _run(dsn: str, sequence: list[object]) -> None:
    customer = f"p{next(_customers)}"

    def config(plan: str) -> Settings:
        return ledger_settings(dsn, plans=PLANS, customers=[
            {"id": customer, "plan": plan, "stripe_customer_id": f"cus_{customer}"}])

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        cfg = config("starter")
        desk = Desk(cfg, pool)
        api = ApiContext.create(cfg, pool, clock=lambda: desk.now)
        stripe = Stripe(cfg, customer)
        async with pool.acquire() as conn:
            await sync_config(conn, cfg)
        grants: list[int] = []
        last_api: tuple[str, dict[str, Any]] | None = None
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
            elif isinstance(step, NextPeriod):
                desk.now = period_bounds("month", desk.now)[1] + timedelta(minutes=1)
                await desk.expire()
                async with pool.acquire() as conn:
                    await allocate_plan_periods(conn, cfg, desk.now)
            elif isinstance(step, Void) and grants:
                await desk.void(grants[step.grant_index % len(grants)], step.credits)
            elif isinstance(step, Adjust):
                await desk.adjust(customer, -step.credits)
            elif isinstance(step, ConfigPlan):
                cfg = config(step.plan)
                async with pool.acquire() as conn:
                    await sync_config(conn, cfg)
                    await allocate_plan_periods(conn, cfg, desk.now)
            elif isinstance(step, Purchase):
                pi = stripe.next_id("pi")
                stripe.payments.append((pi, CHARGE_CENTS))
                session = objects.checkout_session(
                    stripe.next_id("cs"), customer=stripe.cus, amount_total=CHARGE_CENTS,
                    created=int(desk.now.timestamp()), payment_intent=pi,
                    metadata={"meterline_credits": str(step.credits)})
                async with pool.acquire() as conn:
                    await stripe.apply(conn, "checkout.session.completed", session, desk.now)
            elif isinstance(step, Subscription):
                stripe.plan = (step.plan, step.seats)
                async with pool.acquire() as conn:
                    await stripe.apply(conn, "customer.subscription.updated",
                                       stripe.subscription(step.plan, step.seats, desk.now),
                                       desk.now)
            elif isinstance(step, PlanInvoice):
                invoice = stripe.plan_invoice(desk.now)
                if invoice is not None:
                    async with pool.acquire() as conn:
                        await stripe.apply(conn, "invoice.paid", invoice, desk.now)
            elif isinstance(step, Refund):
                charge = stripe.refund(step.payment_index, step.percent, desk.now)
                if charge is not None:
                    async with pool.acquire() as conn:
                        await stripe.apply(conn, "charge.refunded", charge, desk.now)
            elif isinstance(step, DisputeLost):
                dispute = stripe.lost_dispute(step.payment_index)
                if dispute is not None:
                    async with pool.acquire() as conn:
                        await stripe.apply(conn, "charge.dispute.closed", dispute, desk.now)
            elif isinstance(step, ApiCredit):
                key, body = (last_api if step.replay and last_api is not None
                             else (f"k{i}", {"amount": str(step.amount), "reason": "support"}))
                if step.replay:  # same key; a different amount must be refused, not applied
                    body = body | {"amount": str(step.amount)}
                last_api = (key, body)
                await _api_credit(desk, api, customer, step, key, body)
            found = await desk.audit(customer)  # others: earlier examples
            assert found.holds, (i, step, found.violations)
    finally:
        await pool.close()


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(steps, min_size=STEPS // 2, max_size=STEPS))
# always run: a paid period, a mid-period upgrade with more seats, used credits, a partial then
# a full refund of the period's invoice, a purchase lost to a dispute, an API grant and a
# config plan change, then the next period
@example(sequence=[Subscription("starter", 1), PlanInvoice(), Subscription("pro", 2),
                   Use("sum", 0, Decimal("120.5"), 0), Refund(0, 25), Purchase(Decimal(40)),
                   Refund(0, 100), DisputeLost(1), ApiCredit(Decimal(7), False),
                   ApiCredit(Decimal(7), True), ConfigPlan("growth"), NextPeriod()])
def test_every_sequence_of_money_changes_keeps_the_ledger_invariants(
    migrated_database: str, sequence: list[object]
) -> None:
    asyncio.run(_run(migrated_database, sequence))

