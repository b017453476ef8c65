"""The ledger consumer against a real broker and Postgres: Stripe events on `stripe.events`
(produced here with confluent-kafka, as the webhook bridge does) applied to the ledger
exactly once and in any order."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from confluent_kafka import Message, Producer
from prometheus_client import REGISTRY

from meterline.billing.consumer import RunningLedgerConsumer, start
from meterline.config import Settings
from meterline.devstack.dev import read_topic
from meterline.devstack.embedded import EmbeddedKafka
from meterline.devstack.stripe_emulator import objects
from meterline.ledger.accounts import USAGE_ACCOUNT, Transfer, grant_account
from meterline.ledger.book import Entry, open_books, post
from meterline.storage.grants import sync_config

pytestmark = pytest.mark.integration

T0 = 1_790_000_000
M = 30 * 86_400
PLANS = [
    {"key": "starter", "included_credits": "50", "period": "month", "carryover": "reset"},
    {"key": "growth", "included_credits": "200", "period": "month", "carryover": "reset"},
    {"key": "pro", "included_credits": "500", "period": "month", "carryover": "rollover"},
]
Event = dict[str, Any]


# --- harness -------------------------------------------------------------------------------------


class Env:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, handle: RunningLedgerConsumer) -> None:
        self.settings, self.pool, self.handle = settings, pool, handle
        self.producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                                  "enable.idempotence": True, "acks": "all"})
        self.sent = 0

    def send(self, *events: Event | bytes, key: str | None = None) -> None:
        """Produce like the bridge: raw event JSON, key = Stripe customer, event headers."""
        for ev in events:
            if isinstance(ev, bytes):
                value, headers = ev, []
            else:
                value = json.dumps(ev, separators=(",", ":")).encode()
                headers = [("stripe-event-type", ev["type"].encode()),
                           ("stripe-event-id", ev["id"].encode()),
                           ("stripe-api-version", str(ev.get("api_version")).encode())]
                obj_customer = ev["data"]["object"].get("customer")
                key = key if key is not None else obj_customer
            self.producer.produce(self.settings.kafka.stripe_events_topic, value,
                                  key.encode() if key else None, headers=headers)
            self.sent += 1
        assert self.producer.flush(10) == 0

    async def settled(self, timeout: float = 30) -> None:
        """Wait until the consumer has handled every record sent so far."""
        deadline = time.monotonic() + timeout
        while self.handle.consumer.records_done < self.sent:
            assert time.monotonic() < deadline, (
                f"consumer handled {self.handle.consumer.records_done} of {self.sent} records")
            await asyncio.sleep(0.05)

    async def balance(self, customer: str) -> Decimal:
        return Decimal(await self.pool.fetchval(
            "SELECT coalesce((SELECT balance FROM balances WHERE customer_id = $1), 0)", customer))

    async def assert_ledger_integrity(self) -> None:
        rows = await self.pool.fetch(
            """SELECT b.customer_id, b.balance, coalesce(sum(e.amount), 0) AS total
               FROM balances b LEFT JOIN ledger_entries e USING (customer_id) GROUP BY 1, 2""")
        assert all(r["balance"] == r["total"] for r in rows), rows


Start = Callable[..., Awaitable[Env]]


@pytest.fixture
async def ledger_env(
    pipeline_settings: Callable[..., Settings], unique_topic_prefix: str,
    embedded_kafka: EmbeddedKafka | None,
) -> AsyncIterator[Start]:
    """Factory: settings + config sync + a running in-process ledger consumer."""
    envs: list[Env] = []
    # The embedded broker joins a group in ~half the session timeout: keep it short there.
    # Real Kafka refuses session timeouts under group.min.session.timeout.ms (6 s).
    session_ms = 2000 if embedded_kafka is not None else 6000

    async def make(customers: list[dict[str, Any]], **sections: Any) -> Env:
        settings = pipeline_settings(
            customers, plans=PLANS, kafka={"session_timeout_ms": session_ms},
            ledger_consumer={"consumer_group": f"{unique_topic_prefix}ledger",
                             **sections.pop("ledger_consumer", {})},
            **sections)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=3)
        assert pool is not None
        async with pool.acquire() as conn:
            await sync_config(conn, settings)
        env = Env(settings, pool, await start(settings))
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.handle.stop()
        await env.pool.close()


@asynccontextmanager
async def counted(type_: str, outcome: str) -> AsyncIterator[Callable[[], float]]:
    """How much meterline_ledger_consumer_events_total{type, outcome} grew inside the block."""
    labels = {"type": type_, "outcome": outcome}
    before = REGISTRY.get_sample_value("meterline_ledger_consumer_events_total", labels) or 0
    yield lambda: (REGISTRY.get_sample_value("meterline_ledger_consumer_events_total", labels) or 0) - before


def checkout(n: str, customer: str | None, credits: str, *, pi: str, invoice: str | None = None,
             created: int = T0, metadata: dict[str, str] | None = None) -> Event:
    session = objects.checkout_session(
        f"cs_{n}", customer=customer, amount_total=5000, created=created, payment_intent=pi,
        invoice=invoice, metadata={"meterline_credits": credits, **(metadata or {})})
    return objects.event("checkout.session.completed", session, event_id=f"evt_cs_{n}", created=created)


def pack_invoice_paid(n: str, customer: str, credits_per_unit: str, quantity: int, *, pi: str,
                      invoice_id: str | None = None, created: int = T0) -> Event:
    price = objects.price(f"price_pack_{n}", unit_amount=1000,
                          metadata={"meterline_credits": credits_per_unit})
    line = objects.invoice_line(f"il_{n}", price_obj=price, period=(created, created), quantity=quantity)
    inv = objects.invoice(invoice_id or f"in_{n}", customer=customer, lines=[line], created=created,
                          payment_intent=pi)
    return objects.event("invoice.paid", inv, event_id=f"evt_in_{n}", created=created)


def invoice_outcome(n: str, customer: str, *, paid: bool, created: int) -> Event:
    price = objects.price("price_other", unit_amount=700)  # no meterline meaning: past due only
    line = objects.invoice_line(f"il_{n}", price_obj=price, period=(created, created))
    inv = objects.invoice(f"in_{n}", customer=customer, lines=[line], created=created, paid=paid)
    return objects.event("invoice.paid" if paid else "invoice.payment_failed", inv,
                         event_id=f"evt_{n}", created=created)


def refund(n: str, customer: str, *, pi: str, amount: int, refunded: int, created: int) -> Event:
    ch = objects.charge(f"ch_{n}", customer=customer, amount=amount, amount_refunded=refunded,
                        created=created, payment_intent=pi)
    return objects.event("charge.refunded", ch, event_id=f"evt_{n}_{refunded}", created=created)


# --- purchases -----------------------------------------------------------------------------------


async def test_replayed_event_id_grants_once(ledger_env: Start) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    ev = checkout("1", "cus_acme", "1000", pi="pi_1")

    async with counted("checkout.session.completed", "duplicate") as duplicates:
        env.send(ev, ev, ev)
        await env.settled()

    assert await env.balance("acme") == 1000
    assert await env.pool.fetchval("SELECT count(*) FROM grants WHERE source = 'stripe_checkout'") == 1
    assert await env.pool.fetchval("SELECT outcome FROM stripe_events_applied") == "applied"
    assert duplicates() == 2
    outbox = [json.loads(r["payload"]) for r in await env.pool.fetch("SELECT payload FROM outbox")]
    assert [(o["customer"], o["delta"], o["reason"]) for o in outbox] == [
        ("acme", "1000", "stripe_purchase")]


async def test_lag_in_seconds_is_published_for_the_ledger_group(ledger_env: Start) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(checkout("lag", "cus_acme", "10", pi="pi_lag"))
    await env.settled()
    labels = {"group": env.settings.ledger_consumer.consumer_group,
              "topic": env.settings.kafka.stripe_events_topic}

    def series() -> dict[str, float]:
        return {s.labels["partition"]: s.value
                for m in REGISTRY.collect() if m.name == "meterline_consumer_lag_seconds"
                for s in m.samples if labels.items() <= s.labels.items()}

    deadline = time.monotonic() + 10
    while not series():  # published every second
        assert time.monotonic() < deadline, "no meterline_consumer_lag_seconds for the group"
        await asyncio.sleep(0.1)
    assert set(series().values()) == {0.0}  # everything consumed


async def test_one_purchase_seen_by_checkout_and_invoice_events_grants_once_in_either_order(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "a", "stripe_customer_id": "cus_a"},
                            {"id": "b", "stripe_customer_id": "cus_b"}])
    # Checkout with invoice creation: the session names its invoice; both share the payment intent.
    env.send(checkout("a", "cus_a", "1000", pi="pi_a", invoice="in_a"),
             pack_invoice_paid("a", "cus_a", "1000", 1, pi="pi_a"))
    env.send(pack_invoice_paid("b", "cus_b", "500", 2, pi="pi_b"),
             checkout("b", "cus_b", "1000", pi="pi_b", invoice="in_b"))
    await env.settled()

    assert await env.balance("a") == 1000  # the checkout's credits: it came first
    assert await env.balance("b") == 1000  # the invoice's 2 x 500: it came first
    grants = await env.pool.fetch("SELECT customer_id, source FROM grants ORDER BY customer_id")
    assert [(g["customer_id"], g["source"]) for g in grants] == [
        ("a", "stripe_checkout"), ("b", "stripe_invoice")]
    outcomes = {r["event_id"]: r["outcome"] for r in await env.pool.fetch(
        "SELECT event_id, outcome FROM stripe_events_applied")}
    assert outcomes["evt_in_a"] == "noop:already_granted"
    assert outcomes["evt_cs_b"] == "noop:already_granted"
    await env.assert_ledger_integrity()


async def test_unknown_stripe_customer_is_mapped_through_metadata_and_remembered(
    ledger_env: Start,
) -> None:
    env = await ledger_env([])
    env.send(checkout("1", "cus_new", "10", pi="pi_1", metadata={"meterline_customer_id": "newco"}),
             pack_invoice_paid("2", "cus_new", "5", 1, pi="pi_2"))  # no metadata: the mapping serves
    await env.settled()

    assert await env.pool.fetchval(
        "SELECT stripe_customer_id FROM customers WHERE id = 'newco'") == "cus_new"
    assert await env.balance("newco") == 15


# --- subscriptions -------------------------------------------------------------------------------


def lifecycle(cus: str) -> list[Event]:
    """created (starter) -> growth, then pro mid-period -> two renewals on pro -> deleted."""
    sub = f"sub_{cus}"

    def price(plan: str) -> dict[str, Any]:
        return objects.price(f"price_{plan}", unit_amount=1000, metadata={"meterline_plan": plan},
                             recurring_interval="month")

    def snap(n: int, type_: str, plan: str, period: int, at: int, status: str = "active",
             ended_at: int | None = None) -> Event:
        obj = objects.subscription(sub, customer=cus, price_obj=price(plan), status=status,
                                   period=(T0 + period * M, T0 + (period + 1) * M), created=T0,
                                   item_id=f"si_{cus}", ended_at=ended_at)
        return objects.event(type_, obj, event_id=f"evt_{cus}_{n}", created=at)

    def paid(n: int, plan: str, period: int, reason: str, proration: bool = False) -> Event:
        at = T0 + period * M
        line = objects.invoice_line(f"il_{cus}_{n}", price_obj=price(plan), subscription=sub,
                                    period=(at, at + M), proration=proration)
        inv = objects.invoice(f"in_{cus}_{n}", customer=cus, lines=[line], created=at,
                              billing_reason=reason, subscription=sub, payment_intent=f"pi_{cus}_{n}")
        return objects.event("invoice.paid", inv, event_id=f"evt_{cus}_{n}", created=at)

    ended = T0 + 2 * M + M // 3
    return [
        snap(1, "customer.subscription.created", "starter", 0, T0),
        paid(2, "starter", 0, "subscription_create"),
        snap(3, "customer.subscription.updated", "growth", 0, T0 + M // 4),
        snap(4, "customer.subscription.updated", "pro", 0, T0 + M // 2),
        paid(5, "pro", 0, "subscription_update", proration=True),  # Stripe's proration invoice
        snap(6, "customer.subscription.updated", "pro", 1, T0 + M),
        paid(7, "pro", 1, "subscription_cycle"),
        snap(8, "customer.subscription.updated", "pro", 2, T0 + 2 * M),
        paid(9, "pro", 2, "subscription_cycle"),
        snap(10, "customer.subscription.deleted", "pro", 2, ended, "canceled", ended),
    ]


async def ledger_meaning(pool: asyncpg.Pool, customer: str) -> dict[str, Any]:
    """A customer's ledger, as what it means: not how many rows it took to get there."""
    grants = await pool.fetch(
        """SELECT source, effective_at, expires_at, sum(amount) AS credits FROM grants
           WHERE customer_id = $1 GROUP BY 1, 2, 3 ORDER BY 2, 3 NULLS LAST""", customer)
    entries = await pool.fetch("""SELECT kind, sum(amount) AS credits FROM ledger_entries
                                  WHERE customer_id = $1 GROUP BY 1 ORDER BY 1""", customer)
    periods = await pool.fetch(
        """SELECT period_start - $2 AS offset_s, plan_key, base_credits, upgrade_credits
           FROM stripe_plan_periods WHERE customer_id = $1 ORDER BY period_start""", customer, T0)
    state = await pool.fetchrow(
        """SELECT c.plan_key, c.plan_source, s.status, s.ended_at, b.balance, b.granted
           FROM customers c JOIN stripe_subscriptions s ON s.customer_id = c.id
           JOIN balances b ON b.customer_id = c.id WHERE c.id = $1""", customer)
    return {"grants": [tuple(g) for g in grants], "entries": [tuple(e) for e in entries],
            "periods": [tuple(p) for p in periods], "state": tuple(state)}


async def test_shuffled_subscription_lifecycle_ends_on_the_same_ledger(ledger_env: Start) -> None:
    orders = 6
    customers = [f"cus_{i}" for i in range(orders)]
    env = await ledger_env([{"id": c, "stripe_customer_id": c} for c in customers])
    rnd = random.Random(20261121)
    for i, cus in enumerate(customers):
        events = lifecycle(cus)
        if i == orders - 1:
            events.reverse()  # the worst order: deletion first, creation last
        elif i:
            rnd.shuffle(events)
        env.send(*events)
    await env.settled(60)

    meanings = [await ledger_meaning(env.pool, c) for c in customers]
    expected = meanings[0]  # delivered in order
    # starter 50 + prorated upgrades in period 0 (growth at 1/4: 150 x 3/4; pro at 1/2: 300 x 1/2)
    # + pro 500 for each of the two renewals; nothing after the cancellation.
    assert [p[1:] for p in expected["periods"]] == [
        ("starter", Decimal(50), Decimal("262.5")), ("pro", Decimal(500), Decimal(0)),
        ("pro", Decimal(500), Decimal(0))]
    assert expected["entries"] == [("grant", Decimal("1312.5"))]
    assert expected["state"][:4] == (None, "stripe", "canceled", T0 + 2 * M + M // 3)
    assert expected["state"][4] == Decimal("1312.5")
    for cus, meaning in zip(customers[1:], meanings[1:], strict=True):
        assert meaning == expected, cus
    await env.assert_ledger_integrity()


async def test_plan_allocations_multiply_included_credits_by_seats_on_creation_and_changes(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    price = objects.price("price_growth", unit_amount=1000, metadata={"meterline_plan": "growth"},
                          recurring_interval="month")

    def seats(n: int, quantity: int, at: int) -> Event:
        obj = objects.subscription("sub_s", customer="cus_acme", price_obj=price, status="active",
                                   period=(T0, T0 + M), created=T0, item_id="si_s",
                                   quantity=quantity)
        return objects.event("customer.subscription.updated", obj, event_id=f"evt_s{n}",
                             created=at)

    line = objects.invoice_line("il_s", price_obj=price, subscription="sub_s", period=(T0, T0 + M),
                                quantity=3)
    inv = objects.invoice("in_s", customer="cus_acme", lines=[line], created=T0,
                          billing_reason="subscription_create", subscription="sub_s",
                          payment_intent="pi_s")
    env.send(seats(1, 3, T0), objects.event("invoice.paid", inv, event_id="evt_s2", created=T0))
    await env.settled()
    assert await env.balance("acme") == 600  # 3 seats x 200

    env.send(seats(3, 5, T0 + M // 2))  # two more seats at half the period: 2 x 200 x 1/2
    await env.settled()
    assert await env.balance("acme") == 800
    env.send(seats(4, 4, T0 + 3 * M // 4))  # fewer seats: from the next period on
    await env.settled()
    assert await env.balance("acme") == 800
    period = await env.pool.fetchrow(
        "SELECT quantity, base_credits, upgrade_credits FROM stripe_plan_periods")
    assert tuple(period) == (3, 600, 200)
    await env.assert_ledger_integrity()


async def test_calendar_allocator_leaves_stripe_subscribers_alone(ledger_env: Start) -> None:
    from datetime import UTC, datetime

    from meterline.storage.grants import allocate_plan_periods

    env = await ledger_env([{"id": "cus_1", "stripe_customer_id": "cus_1"},
                            {"id": "cfg", "plan": "starter"}])
    env.send(*lifecycle("cus_1")[:2])  # created on starter + its first invoice
    await env.settled()

    async with env.pool.acquire() as conn:
        made = await allocate_plan_periods(conn, env.settings, datetime.now(UTC))

    assert made == 1  # the config customer only
    assert await env.pool.fetchval(
        "SELECT plan_key FROM customers WHERE id = 'cus_1'") == "starter"


# --- past due ------------------------------------------------------------------------------------


async def test_past_due_follows_the_latest_payment_outcome_whatever_the_delivery_order(
    ledger_env: Start,
) -> None:
    names = ["fail_then_paid", "paid_then_old_fail", "paid_then_fail", "fail_then_old_paid"]
    env = await ledger_env([{"id": n, "stripe_customer_id": f"cus_{n}"} for n in names])
    t1, t2 = T0, T0 + 3600
    env.send(invoice_outcome("a1", "cus_fail_then_paid", paid=False, created=t1),
             invoice_outcome("a2", "cus_fail_then_paid", paid=True, created=t2))
    env.send(invoice_outcome("b2", "cus_paid_then_old_fail", paid=True, created=t2),
             invoice_outcome("b1", "cus_paid_then_old_fail", paid=False, created=t1))
    env.send(invoice_outcome("c1", "cus_paid_then_fail", paid=True, created=t1),
             invoice_outcome("c2", "cus_paid_then_fail", paid=False, created=t2))
    env.send(invoice_outcome("d2", "cus_fail_then_old_paid", paid=False, created=t2),
             invoice_outcome("d1", "cus_fail_then_old_paid", paid=True, created=t1))
    # an invoice of a Stripe customer meterline does not bill: acknowledged, not dead-lettered
    env.send(invoice_outcome("e1", "cus_stranger", paid=False, created=t1))
    await env.settled()

    rows = {r["id"]: (r["past_due"], r["since"]) for r in await env.pool.fetch(
        "SELECT id, past_due, extract(epoch FROM past_due_since)::bigint AS since FROM customers")}
    assert rows == {
        "fail_then_paid": (False, None),
        "paid_then_old_fail": (False, None),
        "paid_then_fail": (True, t2),
        "fail_then_old_paid": (True, t2),
    }
    assert "cus_stranger" not in rows


# --- refunds -------------------------------------------------------------------------------------


async def use_credits(pool: asyncpg.Pool, grant_source_ref: str, credits: int) -> None:
    """Stand-in for the processor's debit of `credits` from one grant: a grant -> usage
    transfer written through the ledger."""
    async with pool.acquire() as conn, conn.transaction():
        gid, customer = await conn.fetchrow(
            "SELECT id, customer_id FROM grants WHERE source_ref = $1", grant_source_ref)
        books = await open_books(conn, [customer])
        used = Transfer(grant_account(gid), USAGE_ACCOUNT, Decimal(credits), "usage")
        await post(conn, books, [Entry(customer, "debit", "usage", (used,))], "balances", ())


async def test_refund_voids_the_remaining_credits_of_that_purchase_only(ledger_env: Start) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(checkout("A", "cus_acme", "1000", pi="pi_A"), checkout("B", "cus_acme", "500", pi="pi_B"))
    await env.settled()
    await use_credits(env.pool, "cs_A", 300)

    env.send(refund("A", "cus_acme", pi="pi_A", amount=5000, refunded=5000, created=T0 + 10))
    await env.settled()

    voids = await env.pool.fetch(
        """SELECT g.source_ref, e.amount FROM ledger_entries e JOIN grants g ON g.id = e.grant_id
           WHERE e.kind = 'void'""")
    assert [(v["source_ref"], v["amount"]) for v in voids] == [("cs_A", Decimal(-700))]
    assert await env.balance("acme") == 500  # 1000 + 500 - 300 used - 700 voided
    assert await env.pool.fetchval("SELECT remaining FROM grants WHERE source_ref = 'cs_A'") == 0
    await env.assert_ledger_integrity()


async def test_partial_refunds_void_their_share_and_old_snapshots_change_nothing(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(checkout("B", "cus_acme", "500", pi="pi_B"),
             refund("B", "cus_acme", pi="pi_B", amount=5000, refunded=2500, created=T0 + 10))
    await env.settled()
    assert await env.balance("acme") == 250  # half refunded: half the credits

    env.send(refund("B", "cus_acme", pi="pi_B", amount=5000, refunded=1000, created=T0 + 5))  # older
    await env.settled()
    assert await env.balance("acme") == 250

    env.send(refund("B", "cus_acme", pi="pi_B", amount=5000, refunded=5000, created=T0 + 20))
    await env.settled()
    assert await env.balance("acme") == 0
    await env.assert_ledger_integrity()


def plan_and_pack_invoice(n: str, *, shape_2025: bool = False) -> Event:
    """One invoice paying a growth period (200 credits) and a pack of 100 credits, paid by pi_<n>."""
    plan = objects.price("price_growth", unit_amount=1000, metadata={"meterline_plan": "growth"},
                         recurring_interval="month")
    pack = objects.price(f"price_pack_{n}", unit_amount=1000, metadata={"meterline_credits": "100"})
    lines = [objects.invoice_line(f"il_{n}_plan", price_obj=plan, subscription=f"sub_{n}",
                                  period=(T0, T0 + M)),
             objects.invoice_line(f"il_{n}_pack", price_obj=pack, period=(T0, T0))]
    inv = objects.invoice(f"in_{n}", customer="cus_acme", lines=lines, created=T0,
                          billing_reason="subscription_create", subscription=f"sub_{n}",
                          payment_intent=None if shape_2025 else f"pi_{n}")
    if shape_2025:  # no invoice.payment_intent: the payment intent is on its payments
        inv["payments"] = {"object": "list", "data": [{
            "object": "invoice_payment", "id": f"inpay_{n}",
            "payment": {"type": "payment_intent", "payment_intent": f"pi_{n}"}}]}
    return objects.event("invoice.paid", inv, event_id=f"evt_in_{n}", created=T0)


@pytest.mark.parametrize("shape_2025", [False, True], ids=["classic", "2025"])
async def test_full_refund_of_an_invoice_voids_its_plan_allocation_and_its_pack(
    ledger_env: Start, shape_2025: bool,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(plan_and_pack_invoice("P", shape_2025=shape_2025))
    await env.settled()
    assert await env.balance("acme") == 300
    # a 2025 charge names no invoice: only the payment intent links it
    env.send(refund("P", "cus_acme", pi="pi_P", amount=2000, refunded=2000, created=T0 + 10))
    await env.settled()

    assert await env.balance("acme") == 0
    voided = {r["source"]: r["voided"] for r in await env.pool.fetch(
        """SELECT g.source, -sum(e.amount) AS voided FROM ledger_entries e
           JOIN grants g ON g.id = e.grant_id WHERE e.kind = 'void' GROUP BY g.source""")}
    assert voided == {"stripe_subscription": 200, "stripe_invoice": 100}
    await env.assert_ledger_integrity()


async def test_partial_refund_of_an_invoice_voids_the_same_share_of_each_of_its_grants(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    # the refund first: the allocation and the pack find it when they arrive
    env.send(refund("Q", "cus_acme", pi="pi_Q", amount=2000, refunded=500, created=T0 + 10))
    await env.settled()
    env.send(plan_and_pack_invoice("Q"))
    await env.settled()

    # a quarter of the charge back: a quarter of each grant (pro rata, not by line)
    assert await env.balance("acme") == 225
    remaining = dict(await env.pool.fetch("SELECT source, remaining FROM grants"))
    assert remaining == {"stripe_subscription": 150, "stripe_invoice": 75}
    await env.assert_ledger_integrity()


async def test_a_lost_dispute_voids_the_disputed_purchase_and_an_open_one_does_not(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(checkout("D", "cus_acme", "1000", pi="pi_D"))
    await env.settled()
    await use_credits(env.pool, "cs_D", 300)

    def dispute_event(n: int, type_: str, status: str) -> Event:
        obj = {"id": "du_D", "object": "dispute", "amount": 5000, "charge": "ch_D",
               "payment_intent": "pi_D", "status": status, "reason": "fraudulent"}
        return objects.event(type_, obj, event_id=f"evt_du_{n}", created=T0 + n)

    env.send(dispute_event(1, "charge.dispute.created", "needs_response"))
    await env.settled()
    assert await env.balance("acme") == 700
    env.send(dispute_event(2, "charge.dispute.closed", "lost"))
    await env.settled()
    assert await env.balance("acme") == 0  # what was left of the purchase; used credits stay used
    await env.assert_ledger_integrity()


async def test_refund_delivered_before_its_purchase_voids_the_purchase_when_it_arrives(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(refund("C", "cus_acme", pi="pi_C", amount=5000, refunded=5000, created=T0 + 10))
    await env.settled()
    assert await env.pool.fetchval("SELECT outcome FROM stripe_events_applied") == "noop:no_grant"

    env.send(checkout("C", "cus_acme", "1000", pi="pi_C"))
    await env.settled()

    assert await env.balance("acme") == 0
    kinds = [r["kind"] for r in await env.pool.fetch("SELECT kind FROM ledger_entries ORDER BY id")]
    assert kinds == ["grant", "void"]


# --- bad input, irrelevant input, restarts --------------------------------------------------------


def header_map(message: Message) -> dict[str, str]:
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in pairs}


async def test_bad_events_go_to_the_dlq_with_a_reason_and_the_partition_keeps_flowing(
    ledger_env: Start,
) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    key = "cus_acme"  # one partition: the good event after the bad ones must still apply
    no_id = objects.event("invoice.paid", {"id": "in_1"}, event_id="", created=T0)
    stranger = checkout("x", "cus_stranger", "10", pi="pi_x")  # no meterline_customer_id
    unknown_plan = lifecycle("cus_acme")[0]
    unknown_plan["data"]["object"]["items"]["data"][0]["price"]["metadata"]["meterline_plan"] = "gold"
    bad_credits = checkout("y", "cus_acme", "-3", pi="pi_y")

    async with counted("other", "ignored") as irrelevant:
        env.send(b"{not json", no_id, stranger, unknown_plan, bad_credits,
                 objects.event("customer.created", {"id": "cus_acme", "object": "customer"},
                               event_id="evt_other", created=T0),
                 checkout("ok", "cus_acme", "7", pi="pi_ok"), key=key)
        await env.settled()

    assert await env.balance("acme") == 7
    assert irrelevant() == 1
    dlq = read_topic(env.settings.kafka.bootstrap_servers, env.settings.kafka.stripe_events_dlq_topic)
    headers = [header_map(m) for m in dlq]
    assert sorted(h["meterline.reason"] for h in headers) == [
        "invalid_credits", "invalid_event", "malformed_json", "unknown_customer", "unknown_plan"]
    stranger_dlq = next(h for h in headers if h["meterline.reason"] == "unknown_customer")
    assert stranger_dlq["meterline.stripe_event_id"] == "evt_cs_x"
    assert stranger_dlq["meterline.original.topic"] == env.settings.kafka.stripe_events_topic
    # nothing of a dead-lettered event stays: a replay after a fix applies normally
    assert await env.pool.fetchval(
        "SELECT count(*) FROM stripe_events_applied WHERE event_id = 'evt_cs_x'") == 0
    original = next(m for m in dlq if header_map(m)["meterline.reason"] == "malformed_json")
    assert original.value() == b"{not json"


async def test_a_restarted_consumer_resumes_after_the_committed_offsets(ledger_env: Start) -> None:
    env = await ledger_env([{"id": "acme", "stripe_customer_id": "cus_acme"}])
    env.send(checkout("1", "cus_acme", "10", pi="pi_1"))
    await env.settled()
    await env.handle.stop()

    env.handle = await start(env.settings)
    env.sent = 0  # counts what the new consumer must handle
    env.send(checkout("2", "cus_acme", "5", pi="pi_2"))
    await env.settled()

    assert env.handle.consumer.records_done == 1  # the first record was not read again
    assert await env.balance("acme") == 15
