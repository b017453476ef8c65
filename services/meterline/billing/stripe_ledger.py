"""Apply one Stripe event to the credits ledger: one Postgres transaction per event.

The transaction, step by step, and why the order is safe:

1. claim the event id in `stripe_events_applied`; a replay finds it and stops here —
   at-least-once delivery from Kafka becomes an exactly-once effect;
2. resolve the meterline customer (a new Stripe mapping from metadata is recorded now)
   and take the customer's advisory lock, so two consumers never interleave one
   customer's Stripe state;
3. apply the actions; every credit change goes through `meterline.ledger` (grant or void
   + ledger entry + balance + outbox row with thresholds crossed);
4. write the outcome, commit. The Kafka offset is committed only after this (consumer.py).

A rejection raised in 2-3 rolls the whole transaction back, the claim included: a
dead-lettered event leaves no trace and applies normally when replayed after a fix.

Order-independence, by kind of state:
- purchases: one grant per purchase, found through any of its Stripe ids
  (`stripe_purchase_refs`), so checkout + invoice events of one purchase grant once;
- refunds: the refunded share is a function of the largest `amount_refunded` per charge,
  and voids are topped up to it, so old snapshots and refund-before-purchase both end
  on the same void;
- subscriptions: see `billing.plans` (allocation from paid invoices, monotone upgrade
  target, cancellation by `ended_at`, latest snapshot by rank);
- past due: recomputed from every payment outcome recorded (latest paid vs failures).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from meterline.billing.ledger_actions import (
    Apply,
    ChargeRefund,
    CustomerRef,
    PaymentOutcome,
    PeriodAllocation,
    PurchaseGrant,
    Reason,
    StripeEvent,
    SubscriptionSnapshot,
)
from meterline.billing.plans import (
    allocation_allowed,
    plan_in_force,
    seat_credits,
    snapshot_rank,
    upgrade_credits,
)
from meterline.config import PlanConfig
from meterline.core.credits import round_credits
from meterline.ledger import GrantRequest, apply_grant, void_grant_credits
from meterline.storage.grants import plan_grant_request

CLAIM_EVENT = """
INSERT INTO stripe_events_applied (event_id, type, created, outcome) VALUES ($1, $2, $3, 'pending')
ON CONFLICT (event_id) DO NOTHING RETURNING event_id
"""
SET_EVENT_CUSTOMER = "UPDATE stripe_events_applied SET customer_id = $2 WHERE event_id = $1"
SET_OUTCOME = "UPDATE stripe_events_applied SET outcome = $2 WHERE event_id = $1"
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

CUSTOMER_BY_STRIPE_ID = "SELECT id FROM customers WHERE stripe_customer_id = $1"
CUSTOMER_FOR_UPDATE = "SELECT stripe_customer_id FROM customers WHERE id = $1 FOR UPDATE"
INSERT_MAPPED_CUSTOMER = """
INSERT INTO customers (id, stripe_customer_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING
"""
SET_STRIPE_CUSTOMER = """
UPDATE customers SET stripe_customer_id = $2, updated_at = now() WHERE id = $1
"""

GRANT_BY_PURCHASE_REF = """
SELECT grant_id FROM stripe_purchase_refs WHERE ref = ANY($1::text[]) AND kind = 'purchase'
ORDER BY grant_id LIMIT 1
"""
# kind: purchase (one grant per ref) | plan_allocation (links refunds of the invoice to it)
INSERT_PURCHASE_REFS = """
INSERT INTO stripe_purchase_refs (ref, grant_id, kind) SELECT unnest($1::text[]), $2, $3
ON CONFLICT DO NOTHING
"""
GRANT_BY_SOURCE = "SELECT id FROM grants WHERE source = $1 AND source_ref = $2"

UPSERT_REFUND = """
INSERT INTO stripe_charge_refunds (charge_id, payment_intent, invoice, amount, amount_refunded)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (charge_id) DO UPDATE SET
    amount_refunded = greatest(stripe_charge_refunds.amount_refunded, excluded.amount_refunded),
    -- a lost dispute may only know the disputed amount; the charge's own amount wins
    amount = greatest(stripe_charge_refunds.amount, excluded.amount),
    payment_intent = coalesce(stripe_charge_refunds.payment_intent, excluded.payment_intent),
    invoice = coalesce(stripe_charge_refunds.invoice, excluded.invoice),
    updated_at = now()
"""
GRANTS_OF_CHARGE = """
SELECT DISTINCT r.grant_id, g.customer_id FROM stripe_purchase_refs r JOIN grants g ON g.id = r.grant_id
WHERE r.ref = ANY($1::text[]) ORDER BY r.grant_id
"""
REFUNDED_SHARE = """
SELECT coalesce(sum(amount_refunded), 0) AS refunded, coalesce(sum(amount), 0) AS amount
FROM stripe_charge_refunds
WHERE charge_id = ANY($1::text[]) OR payment_intent = ANY($1::text[]) OR invoice = ANY($1::text[])
"""
REFS_OF_GRANT = "SELECT ref FROM stripe_purchase_refs WHERE grant_id = $1"
# voided: after issue (void entries) plus before it took effect (migration 011)
VOIDED_OF_GRANT = """
SELECT g.amount,
       coalesce(-sum(e.amount) FILTER (WHERE e.kind = 'void'), 0) + g.voided_before_issue AS voided
FROM grants g LEFT JOIN ledger_entries e ON e.grant_id = g.id WHERE g.id = $1
GROUP BY g.amount, g.voided_before_issue
"""

INSERT_SNAPSHOT = """
INSERT INTO stripe_subscription_snapshots
    (event_id, subscription_id, created, status, plan_key, period_start, period_end, quantity)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING
"""
SUBSCRIPTION_FOR_UPDATE = """
SELECT status, snapshot_created, snapshot_event_id, ended_at FROM stripe_subscriptions
WHERE id = $1 FOR UPDATE
"""
UPSERT_SUBSCRIPTION = """
INSERT INTO stripe_subscriptions (id, customer_id, status, plan_key, current_period_start,
    current_period_end, ended_at, snapshot_created, snapshot_event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET customer_id = $2, status = $3, plan_key = $4,
    current_period_start = $5, current_period_end = $6, ended_at = $7, snapshot_created = $8,
    snapshot_event_id = $9, updated_at = now()
"""
SET_CUSTOMER_PLAN = """
UPDATE customers SET plan_key = $2, plan_source = 'stripe', updated_at = now() WHERE id = $1
"""
MARK_PLAN_FROM_STRIPE = """
UPDATE customers SET plan_source = 'stripe', updated_at = now()
WHERE id = $1 AND plan_source <> 'stripe'
"""
SUBSCRIPTION_ENDED_AT = "SELECT ended_at FROM stripe_subscriptions WHERE id = $1"
INSERT_PERIOD = """
INSERT INTO stripe_plan_periods (subscription_id, period_start, period_end, customer_id, plan_key,
    invoice_id, base_credits, quantity)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (subscription_id, period_start) DO NOTHING
RETURNING subscription_id
"""
PERIOD_FOR_UPDATE = """
SELECT period_end, customer_id, plan_key, base_credits, upgrade_credits FROM stripe_plan_periods
WHERE subscription_id = $1 AND period_start = $2 FOR UPDATE
"""
PERIOD_CHANGES = """
SELECT created, plan_key, quantity FROM stripe_subscription_snapshots
WHERE subscription_id = $1 AND period_start = $2 AND plan_key IS NOT NULL
"""
SET_UPGRADE_CREDITS = """
UPDATE stripe_plan_periods SET upgrade_credits = $3 WHERE subscription_id = $1 AND period_start = $2
"""

# past_due: a failure newer than the latest paid invoice (a tie counts as paid).
RECOMPUTE_PAST_DUE = """
WITH paid AS (
    SELECT max(created) AS at FROM stripe_events_applied
    WHERE customer_id = $1 AND type = 'invoice.paid'
), failed AS (
    SELECT min(f.created) AS since FROM stripe_events_applied f, paid
    WHERE f.customer_id = $1 AND f.type = 'invoice.payment_failed' AND f.created > coalesce(paid.at, -1)
)
UPDATE customers c SET past_due = failed.since IS NOT NULL,
    past_due_since = to_timestamp(failed.since), updated_at = now()
FROM failed
WHERE c.id = $1 AND (c.past_due IS DISTINCT FROM (failed.since IS NOT NULL)
    OR c.past_due_since IS DISTINCT FROM to_timestamp(failed.since))
RETURNING c.past_due
"""


class EventRejected(Exception):
    """The event cannot apply (it goes to the DLQ); raised inside the transaction."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    """What the transaction needs from settings."""

    balance_topic: str
    thresholds: tuple[int, ...]
    credit_places: int
    plans: Mapping[str, PlanConfig]
    purchased_priority: int


@dataclass
class Applied:
    """What one event did: `outcome` is stored with the event and labels the metric."""

    outcome: str = "applied"  # applied | noop | duplicate
    notes: list[str] = field(default_factory=list)
    grants: list[tuple[str, Decimal]] = field(default_factory=list)  # (source, credits)
    voided: Decimal = Decimal(0)
    past_due_changed: bool = False

    def note(self, what: str) -> None:
        self.notes.append(what)

    @property
    def changed(self) -> bool:
        return bool(self.grants or self.voided or self.past_due_changed)


async def apply_event(conn: asyncpg.Connection, decision: Apply, policy: LedgerPolicy) -> Applied:
    """Apply one decided event exactly once (see the module docstring for the order)."""
    event = decision.event
    result = Applied()
    async with conn.transaction():
        if await conn.fetchval(CLAIM_EVENT, event.id, event.type, event.created) is None:
            return Applied("duplicate")
        customer = await _resolve_customer(conn, decision.customer)
        if customer is not None:
            await conn.execute(LOCK, f"stripe-customer:{customer}")
            await conn.execute(SET_EVENT_CUSTOMER, event.id, customer)
        elif decision.needs_customer:
            raise EventRejected(Reason.UNKNOWN_CUSTOMER,
                                f"no customer for Stripe customer {decision.customer.stripe_customer!r}"
                                " and no metadata.meterline_customer_id")
        for action in decision.actions:
            await _apply_action(conn, action, customer, event, policy, result)
        if result.outcome == "applied" and not result.changed:
            result.outcome = "noop"
        await conn.execute(SET_OUTCOME, event.id,
                           ":".join([result.outcome, *dict.fromkeys(result.notes)])[:200])
    return result


async def _apply_action(
    conn: asyncpg.Connection, action: object, customer: str | None, event: StripeEvent,
    policy: LedgerPolicy, result: Applied,
) -> None:
    if isinstance(action, ChargeRefund):
        await _refund(conn, action, policy, result)
    elif customer is None:
        result.note("unknown_customer")  # past-due bookkeeping for a customer we do not bill
    elif isinstance(action, PaymentOutcome):
        changed = await conn.fetchval(RECOMPUTE_PAST_DUE, customer)
        result.past_due_changed = changed is not None
    elif isinstance(action, PurchaseGrant):
        await _purchase(conn, customer, action, policy, result)
    elif isinstance(action, SubscriptionSnapshot):
        await _snapshot(conn, customer, action, event, policy, result)
    elif isinstance(action, PeriodAllocation):
        await _allocate(conn, customer, action, event, policy, result)


# --- customers -----------------------------------------------------------------------------


async def _resolve_customer(conn: asyncpg.Connection, ref: CustomerRef) -> str | None:
    """The meterline customer of a Stripe customer; else the one named in metadata, whose
    mapping to the Stripe customer is recorded (created if new); else None."""
    if ref.stripe_customer:
        found = await conn.fetchval(CUSTOMER_BY_STRIPE_ID, ref.stripe_customer)
        if found is not None:
            return str(found)
    if ref.meterline_hint is None:
        return None
    await conn.execute(INSERT_MAPPED_CUSTOMER, ref.meterline_hint, ref.stripe_customer)
    row = await conn.fetchrow(CUSTOMER_FOR_UPDATE, ref.meterline_hint)
    linked = row["stripe_customer_id"]
    if ref.stripe_customer and linked is None:
        await conn.execute(SET_STRIPE_CUSTOMER, ref.meterline_hint, ref.stripe_customer)
    elif ref.stripe_customer and linked != ref.stripe_customer:
        raise EventRejected(Reason.CUSTOMER_CONFLICT,
                            f"customer {ref.meterline_hint!r} is linked to Stripe customer {linked!r}")
    return ref.meterline_hint


# --- purchases and refunds ----------------------------------------------------------------------


def _at(epoch: int | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


async def _purchase(
    conn: asyncpg.Connection, customer: str, a: PurchaseGrant, policy: LedgerPolicy,
    result: Applied,
) -> None:
    """Grant a purchase once, whichever of its events (and ids) arrives first."""
    for ref in sorted(a.refs):  # sorted: two purchases' locks never deadlock
        await conn.execute(LOCK, f"stripe-purchase:{ref}")
    grant_id = await conn.fetchval(GRANT_BY_PURCHASE_REF, list(a.refs))
    if grant_id is None:
        req = GrantRequest(customer, a.credits, a.source, a.source_ref, policy.purchased_priority,
                           _at(a.purchased_at), _at(a.expires_at), reason="stripe_purchase")
        grant_id = await apply_grant(conn, req, policy.balance_topic, policy.thresholds)
        if grant_id is None:  # granted before under this (source, ref): keep that one
            grant_id = await conn.fetchval(GRANT_BY_SOURCE, a.source, a.source_ref)
            result.note("already_granted")
        else:
            result.grants.append((a.source, a.credits))
    else:
        result.note("already_granted")
    await conn.execute(INSERT_PURCHASE_REFS, list(a.refs), grant_id, "purchase")
    await _void_refunded_share(conn, int(grant_id), policy, result)  # a refund seen earlier


async def _refund(
    conn: asyncpg.Connection, a: ChargeRefund, policy: LedgerPolicy, result: Applied
) -> None:
    await conn.execute(UPSERT_REFUND, a.charge, a.payment_intent, a.invoice, a.amount,
                       a.amount_refunded)
    refs = [r for r in (a.charge, a.payment_intent, a.invoice) if r]
    grants = await conn.fetch(GRANTS_OF_CHARGE, refs)
    if not grants:
        result.note("no_grant")  # not a purchase, or the purchase has not arrived yet
    for g in grants:
        await conn.execute(LOCK, f"stripe-customer:{g['customer_id']}")
        await _void_refunded_share(conn, g["grant_id"], policy, result)


async def _void_refunded_share(
    conn: asyncpg.Connection, grant_id: int, policy: LedgerPolicy, result: Applied
) -> None:
    """Void the grant up to the refunded share of what paid for it (a full refund: all that
    is left). Credits already used stay used; the voids only ever top up.

    Partial refunds are pro rata, the same for every grant the invoice paid for (a credit
    pack and a plan period alike): each loses `amount_refunded / amount` of its credits.
    Why not by line: a Stripe refund is against the charge, not a line — it does not say
    which line it gives back — so the charge's refunded share is the only rule that any
    delivery order of refunds, purchases and allocations ends on the same voids."""
    refs = [r["ref"] for r in await conn.fetch(REFS_OF_GRANT, grant_id)]
    share = await conn.fetchrow(REFUNDED_SHARE, refs)
    if not share["refunded"] or not share["amount"]:
        return
    grant = await conn.fetchrow(VOIDED_OF_GRANT, grant_id)
    fraction = min(Decimal(share["refunded"]) / Decimal(share["amount"]), Decimal(1))
    target = round_credits(grant["amount"] * fraction, policy.credit_places)
    owed = target - grant["voided"]
    if owed > 0:
        voided = await void_grant_credits(conn, grant_id, owed, "stripe_refund",
                                          policy.balance_topic, policy.thresholds)
        result.voided += voided
        if not voided:
            result.note("nothing_left_to_void")


# --- subscriptions ----------------------------------------------------------------------------


async def _snapshot(
    conn: asyncpg.Connection, customer: str, s: SubscriptionSnapshot, event: StripeEvent,
    policy: LedgerPolicy, result: Applied,
) -> None:
    """Record the snapshot; make it the latest state if it ranks highest; top up upgrades."""
    await conn.execute(INSERT_SNAPSHOT, event.id, s.subscription, event.created, s.status,
                       s.plan_key, s.period_start, s.period_end, s.quantity)
    current = await conn.fetchrow(SUBSCRIPTION_FOR_UPDATE, s.subscription)
    mine = snapshot_rank(s.status, event.created, event.id)
    if current is None or mine > snapshot_rank(current["status"], current["snapshot_created"],
                                               current["snapshot_event_id"]):
        await conn.execute(UPSERT_SUBSCRIPTION, s.subscription, customer, s.status, s.plan_key,
                           s.period_start, s.period_end, s.ended_at, event.created, event.id)
        await conn.execute(SET_CUSTOMER_PLAN, customer, plan_in_force(s.status, s.plan_key))
    else:
        result.note("older_snapshot")
    if s.period_start is not None:
        await _top_up_upgrades(conn, s.subscription, s.period_start, event.id, policy, result)


async def _allocate(
    conn: asyncpg.Connection, customer: str, a: PeriodAllocation, event: StripeEvent,
    policy: LedgerPolicy, result: Applied,
) -> None:
    """A paid period: its plan's included credits, once; then any upgrades already seen."""
    await conn.execute(MARK_PLAN_FROM_STRIPE, customer)
    ended_at = await conn.fetchval(SUBSCRIPTION_ENDED_AT, a.subscription)
    if not allocation_allowed(a.period_start, ended_at):
        result.note("after_cancellation")
        return
    plan = policy.plans[a.plan_key]
    base = seat_credits(plan.included_credits, a.quantity)  # 3 seats: 3x the credits
    inserted = await conn.fetchval(INSERT_PERIOD, a.subscription, a.period_start, a.period_end,
                                   customer, a.plan_key, a.invoice, base, a.quantity)
    if inserted is None:
        result.note("period_already_allocated")
    elif base > 0:
        req = plan_grant_request(customer, plan, base, _dt(a.period_start),
                                 _dt(a.period_end), "stripe_subscription",
                                 f"{a.subscription}:{a.period_start}")
        grant_id = await apply_grant(conn, req, policy.balance_topic, policy.thresholds)
        if grant_id is not None:
            result.grants.append(("stripe_subscription", base))
            # the invoice's ids name this allocation too: refunding the invoice voids its share
            await conn.execute(INSERT_PURCHASE_REFS, list(a.refs), grant_id, "plan_allocation")
            await _void_refunded_share(conn, grant_id, policy, result)  # a refund seen earlier
    await _top_up_upgrades(conn, a.subscription, a.period_start, event.id, policy, result)


async def _top_up_upgrades(
    conn: asyncpg.Connection, subscription: str, period_start: int, event_id: str,
    policy: LedgerPolicy, result: Applied,
) -> None:
    """Grant what the period's upgrade target (billing.plans) has grown by, if anything."""
    period = await conn.fetchrow(PERIOD_FOR_UPDATE, subscription, period_start)
    if period is None:
        return  # not paid (yet): its invoice will top up
    # a rise in seats is an upgrade like a bigger plan: included credits x quantity
    changes = [(r["created"], seat_credits(policy.plans[r["plan_key"]].included_credits,
                                           r["quantity"]))
               for r in await conn.fetch(PERIOD_CHANGES, subscription, period_start)
               if r["plan_key"] in policy.plans]
    target = upgrade_credits(period["base_credits"], period_start, period["period_end"], changes,
                             policy.credit_places)
    owed = target - period["upgrade_credits"]
    if owed <= 0:
        return
    base_plan = policy.plans.get(period["plan_key"])
    if base_plan is None:
        raise EventRejected(Reason.UNKNOWN_PLAN, f"plan {period['plan_key']!r} left the config")
    # The period's own plan terms (priority, reset/rollover), whatever order upgrades came in.
    req = replace(plan_grant_request(period["customer_id"], base_plan, owed, _dt(period_start),
                                     _dt(period["period_end"]), "stripe_subscription",
                                     f"{subscription}:{period_start}:upgrade:{event_id}"),
                  reason="plan_upgrade")
    if await apply_grant(conn, req, policy.balance_topic, policy.thresholds) is not None:
        result.grants.append(("stripe_subscription", owed))
    await conn.execute(SET_UPGRADE_CREDITS, subscription, period_start, target)


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
