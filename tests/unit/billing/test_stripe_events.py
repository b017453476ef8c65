"""meterline.billing.stripe_events: every Stripe event type -> ledger actions, pure.

Objects come from the emulator's builders (`meterline.devstack.stripe_emulator.objects`), so these tests
also pin that the emulator sends what the consumer reads; 2025-shaped objects are
written out by hand.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from meterline.billing.ledger_actions import (
    Apply,
    Catalog,
    ChargeRefund,
    CustomerRef,
    Ignore,
    PaymentOutcome,
    PeriodAllocation,
    PurchaseGrant,
    Reason,
    Reject,
    SubscriptionSnapshot,
)
from meterline.billing.stripe_events import decide, type_label
from meterline.devstack.stripe_emulator import objects

T0 = 1_790_000_000
MONTH = 30 * 86_400
CAT = Catalog(plans=frozenset({"starter", "pro"}), plan_by_price={"price_cfg_pro": "pro"},
              credits_by_price={"price_cfg_pack": Decimal("250")}, credit_places=6)


def raw(event_type: str, obj: dict[str, Any], event_id: str = "evt_1", created: int = T0) -> bytes:
    event = objects.event(event_type, obj, event_id=event_id, created=created)
    return json.dumps(event, separators=(",", ":")).encode()


def applied(decision: object) -> Apply:
    assert isinstance(decision, Apply), decision
    return decision


def plan_price(plan: str, price_id: str = "price_plan") -> dict[str, Any]:
    return objects.price(price_id, unit_amount=2000, metadata={"meterline_plan": plan},
                         recurring_interval="month")


def pack_price(credits: str, price_id: str = "price_pack") -> dict[str, Any]:
    return objects.price(price_id, unit_amount=1000, metadata={"meterline_credits": credits})


def session(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"customer": "cus_1", "amount_total": 5000, "created": T0,
                            "payment_intent": "pi_1", "metadata": {"meterline_credits": "1000"}}
    return objects.checkout_session("cs_1", **{**args, **kw})


# --- checkout --------------------------------------------------------------------------------


def test_paid_checkout_session_is_a_purchase_of_its_metadata_credits() -> None:
    d = applied(decide(raw("checkout.session.completed", session()), CAT))

    assert d.customer == CustomerRef("cus_1", None)
    assert d.actions == (PurchaseGrant(Decimal("1000"), "stripe_checkout", "cs_1", ("cs_1", "pi_1"),
                                       T0, None),)


def test_checkout_purchase_names_its_invoice_too_so_the_invoice_event_cannot_grant_again() -> None:
    d = applied(decide(raw("checkout.session.completed", session(invoice="in_9")), CAT))

    [grant] = d.actions
    assert isinstance(grant, PurchaseGrant)
    assert grant.refs == ("cs_1", "pi_1", "in_9")


def test_async_payment_succeeded_grants_like_a_paid_completion() -> None:
    d = applied(decide(raw("checkout.session.async_payment_succeeded", session()), CAT))

    assert isinstance(d.actions[0], PurchaseGrant)


@pytest.mark.parametrize(("changes", "why"), [
    ({"payment_status": "unpaid"}, "not_paid"),  # a delayed method: async_payment_succeeded follows
    ({"mode": "subscription"}, "not_payment_mode"),  # subscriptions come through their invoices
    ({"metadata": {}}, "no_credits"),  # some other product sold through Checkout
])
def test_checkout_sessions_that_buy_no_credits_now_are_ignored(changes: dict[str, Any], why: str) -> None:
    d = decide(raw("checkout.session.completed", session(**changes)), CAT)

    assert isinstance(d, Ignore)
    assert d.why == why


def test_purchase_expiry_follows_the_configured_days() -> None:
    cat = Catalog(CAT.plans, {}, {}, 6, purchased_expiry_seconds=86_400)

    d = applied(decide(raw("checkout.session.completed", session()), cat))

    assert isinstance(d.actions[0], PurchaseGrant)
    assert d.actions[0].expires_at == T0 + 86_400


@pytest.mark.parametrize("credits", ["-5", "0", "abc", "1e3", "NaN", "1.0000001", "10000000000000001", ""])
def test_bad_credits_metadata_is_rejected_not_rounded(credits: str) -> None:
    d = decide(raw("checkout.session.completed", session(metadata={"meterline_credits": credits})), CAT)

    assert isinstance(d, Reject)
    assert d.reason is Reason.INVALID_CREDITS
    assert (d.event_id, d.event_type) == ("evt_1", "checkout.session.completed")


def test_guest_checkout_names_its_customer_through_metadata() -> None:
    s = session(customer=None, metadata={"meterline_credits": "5", "meterline_customer_id": "acme"})

    d = applied(decide(raw("checkout.session.completed", s), CAT))

    assert d.customer == CustomerRef(None, "acme")
    assert d.needs_customer


# --- invoices ------------------------------------------------------------------------------------


def pack_invoice(**kw: Any) -> dict[str, Any]:
    line = objects.invoice_line("il_1", price_obj=pack_price("100"), period=(T0, T0), quantity=3)
    args: dict[str, Any] = {"customer": "cus_1", "lines": [line], "created": T0,
                            "payment_intent": "pi_7"}
    return objects.invoice("in_1", **{**args, **kw})


def test_paid_invoice_of_credit_packs_is_one_purchase_of_credits_times_quantity() -> None:
    d = applied(decide(raw("invoice.paid", pack_invoice()), CAT))

    assert d.actions == (
        PaymentOutcome(True, "in_1"),
        PurchaseGrant(Decimal("300"), "stripe_invoice", "in_1", ("in_1", "pi_7"), T0, None),
    )


def test_config_price_map_wins_over_metadata() -> None:
    line = objects.invoice_line("il_1", price_obj=pack_price("1", "price_cfg_pack"), period=(T0, T0))

    d = applied(decide(raw("invoice.paid", pack_invoice(lines=[line])), CAT))

    assert isinstance(d.actions[1], PurchaseGrant)
    assert d.actions[1].credits == Decimal("250")


def test_paid_invoice_without_meterline_lines_only_clears_past_due() -> None:
    line = objects.invoice_line("il_1", price_obj=objects.price("price_x", unit_amount=10), period=(T0, T0))

    d = applied(decide(raw("invoice.paid", pack_invoice(lines=[line])), CAT))

    assert d.actions == (PaymentOutcome(True, "in_1"),)
    assert not d.needs_customer  # an unknown customer is then acknowledged, not dead-lettered


def sub_invoice(reason: str, price_obj: dict[str, Any], proration: bool = False) -> dict[str, Any]:
    line = objects.invoice_line("il_1", price_obj=price_obj, period=(T0, T0 + MONTH),
                                subscription="sub_1", proration=proration)
    return objects.invoice("in_2", customer="cus_1", lines=[line], created=T0,
                           billing_reason=reason, subscription="sub_1", payment_intent="pi_2")


@pytest.mark.parametrize("reason", ["subscription_create", "subscription_cycle", "subscription_update"])
def test_paid_subscription_invoice_allocates_the_lines_plan_for_its_period(reason: str) -> None:
    d = applied(decide(raw("invoice.paid", sub_invoice(reason, plan_price("pro"))), CAT))

    assert d.actions == (PaymentOutcome(True, "in_2"),
                         PeriodAllocation("sub_1", "pro", T0, T0 + MONTH, "in_2",
                                          refs=("in_2", "pi_2")))


def test_proration_lines_allocate_nothing_upgrades_come_from_the_subscription() -> None:
    d = applied(decide(raw("invoice.paid", sub_invoice("subscription_update", plan_price("pro"), True)), CAT))

    assert d.actions == (PaymentOutcome(True, "in_2"),)


def test_price_mapped_by_config_to_a_plan() -> None:
    price = objects.price("price_cfg_pro", unit_amount=1, recurring_interval="month")

    d = applied(decide(raw("invoice.paid", sub_invoice("subscription_cycle", price)), CAT))

    assert isinstance(d.actions[1], PeriodAllocation)
    assert d.actions[1].plan_key == "pro"


def test_price_naming_an_unconfigured_plan_is_rejected() -> None:
    d = decide(raw("invoice.paid", sub_invoice("subscription_cycle", plan_price("enterprise"))), CAT)

    assert isinstance(d, Reject)
    assert d.reason is Reason.UNKNOWN_PLAN


def test_2025_invoice_shape_with_parent_and_pricing_allocates_too() -> None:
    inv = {
        "id": "in_3", "object": "invoice", "customer": "cus_1", "billing_reason": "subscription_cycle",
        "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_9"}},
        "lines": {"data": [{
            "id": "il_3", "object": "line_item", "period": {"start": T0, "end": T0 + MONTH},
            "pricing": {"type": "price_details", "price_details": {"price": "price_cfg_pro", "product": "prod_1"}},
            "parent": {"type": "subscription_item_details",
                       "subscription_item_details": {"subscription": "sub_9", "proration": False}},
        }]},
    }

    d = applied(decide(raw("invoice.paid", inv), CAT))

    assert d.actions[1] == PeriodAllocation("sub_9", "pro", T0, T0 + MONTH, "in_3", refs=("in_3",))


def test_2025_invoice_payments_name_the_payment_intent_refunds_find_it_by() -> None:
    inv = sub_invoice("subscription_cycle", plan_price("pro")) | {"payment_intent": None, "payments": {
        "object": "list", "data": [{"object": "invoice_payment", "id": "inpay_1",
                                    "payment": {"type": "payment_intent", "payment_intent": "pi_25"}}]}}

    d = applied(decide(raw("invoice.paid", inv), CAT))

    assert d.actions[1] == PeriodAllocation("sub_1", "pro", T0, T0 + MONTH, "in_2",
                                            refs=("in_2", "pi_25"))


def test_failed_invoice_payment_flags_past_due() -> None:
    d = applied(decide(raw("invoice.payment_failed", pack_invoice(paid=False)), CAT))

    assert d.actions == (PaymentOutcome(False, "in_1"),)


def test_invoice_without_lines_is_an_invalid_object() -> None:
    inv = pack_invoice()
    del inv["lines"]

    d = decide(raw("invoice.paid", inv), CAT)

    assert isinstance(d, Reject)
    assert d.reason is Reason.INVALID_OBJECT


# --- subscriptions -------------------------------------------------------------------------------


def sub(status: str = "active", **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"customer": "cus_1", "price_obj": plan_price("starter"), "status": status,
                            "period": (T0, T0 + MONTH), "created": T0, "item_id": "si_1"}
    return objects.subscription("sub_1", **{**args, **kw})


@pytest.mark.parametrize("event_type", ["customer.subscription.created", "customer.subscription.updated"])
def test_subscription_events_are_snapshots_of_plan_and_period(event_type: str) -> None:
    d = applied(decide(raw(event_type, sub()), CAT))

    assert d.actions == (SubscriptionSnapshot("sub_1", "active", "starter", T0, T0 + MONTH, None),)


def test_deleted_subscription_snapshot_carries_when_it_ended() -> None:
    d = applied(decide(raw("customer.subscription.deleted", sub("canceled", ended_at=T0 + 99)), CAT))

    assert d.actions == (SubscriptionSnapshot("sub_1", "canceled", "starter", T0, T0 + MONTH, T0 + 99),)


def test_deleted_subscription_without_ended_at_ends_at_the_event() -> None:
    d = applied(decide(raw("customer.subscription.deleted", sub("canceled"), created=T0 + 5), CAT))

    assert isinstance(d.actions[0], SubscriptionSnapshot)
    assert d.actions[0].ended_at == T0 + 5


def test_2025_subscription_keeps_its_period_on_the_item() -> None:
    s = sub()
    del s["current_period_start"], s["current_period_end"]
    s["items"]["data"][0].update(current_period_start=T0, current_period_end=T0 + MONTH)

    d = applied(decide(raw("customer.subscription.updated", s), CAT))

    assert isinstance(d.actions[0], SubscriptionSnapshot)
    assert (d.actions[0].period_start, d.actions[0].period_end) == (T0, T0 + MONTH)


def test_subscription_to_a_price_that_is_no_plan_is_ignored() -> None:
    s = sub(price_obj=objects.price("price_other", unit_amount=5, recurring_interval="month"))

    d = decide(raw("customer.subscription.created", s), CAT)

    assert isinstance(d, Ignore)
    assert d.why == "no_plan_price"


# --- refunds -------------------------------------------------------------------------------------


def test_charge_refunded_carries_its_payment_links_and_cumulative_refund() -> None:
    ch = objects.charge("ch_1", customer="cus_1", amount=5000, amount_refunded=2500, created=T0,
                        payment_intent="pi_1", invoice="in_1")

    d = applied(decide(raw("charge.refunded", ch), CAT))

    assert d.actions == (ChargeRefund("ch_1", "pi_1", "in_1", 5000, 2500),)
    assert not d.needs_customer  # the grant it voids names the customer


def test_refund_above_the_charge_is_an_invalid_object() -> None:
    ch = objects.charge("ch_1", customer="cus_1", amount=5000, amount_refunded=6000, created=T0,
                        payment_intent="pi_1")

    d = decide(raw("charge.refunded", ch), CAT)

    assert isinstance(d, Reject)
    assert d.reason is Reason.INVALID_OBJECT


def dispute(status: str, charge: object = "ch_1", amount: int = 5000) -> dict[str, object]:
    return {"id": "du_1", "object": "dispute", "amount": amount, "charge": charge,
            "payment_intent": "pi_1", "status": status, "reason": "fraudulent"}


@pytest.mark.parametrize("event_type", ["charge.dispute.created", "charge.dispute.closed"])
def test_a_lost_dispute_counts_its_amount_as_refunded(event_type: str) -> None:
    d = applied(decide(raw(event_type, dispute("lost")), CAT))

    assert d.actions == (ChargeRefund("ch_1", "pi_1", None, 5000, 5000),)


def test_a_lost_partial_dispute_of_an_expanded_charge_is_its_share_of_the_charge() -> None:
    ch = objects.charge("ch_1", customer="cus_1", amount=8000, amount_refunded=0, created=T0,
                        payment_intent="pi_1")

    d = applied(decide(raw("charge.dispute.closed", dispute("lost", ch, 2000)), CAT))

    assert d.actions == (ChargeRefund("ch_1", "pi_1", None, 8000, 2000),)


@pytest.mark.parametrize("status", ["needs_response", "under_review", "won", "warning_closed"])
def test_an_open_or_won_dispute_changes_nothing(status: str) -> None:
    d = decide(raw("charge.dispute.closed", dispute(status)), CAT)

    assert isinstance(d, Ignore)
    assert d.why == "dispute_not_lost"


# --- irrelevant and malformed --------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["customer.created", "payment_intent.succeeded",
                                        "invoice.finalized", "invoice.payment_succeeded"])
def test_irrelevant_event_types_are_ignored_and_labelled_other(event_type: str) -> None:
    d = decide(raw(event_type, {"id": "x", "object": "thing"}), CAT)

    assert isinstance(d, Ignore)
    assert d.why == "irrelevant_type"
    assert type_label(event_type) == "other"


def test_known_types_keep_their_label() -> None:
    assert type_label("invoice.paid") == "invoice.paid"
    assert type_label(None) == "other"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe", Reason.MALFORMED_JSON),  # not UTF-8
    (b"{not json", Reason.MALFORMED_JSON),
    (b'{"id": "evt_1", "created": NaN}', Reason.MALFORMED_JSON),
    (b"", Reason.MALFORMED_JSON),  # a tombstone
    (b"[1, 2]", Reason.INVALID_EVENT),
    (b'{"type": "invoice.paid", "created": 1, "data": {"object": {}}}', Reason.INVALID_EVENT),  # no id
    (b'{"id": "evt_1", "type": "invoice.paid", "created": "yesterday", "data": {"object": {}}}',
     Reason.INVALID_EVENT),
    (b'{"id": "evt_1", "type": "invoice.paid", "created": 1.5, "data": {"object": {}}}',
     Reason.INVALID_EVENT),
    (b'{"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {}}', Reason.INVALID_EVENT),
    (b'{"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {"object": {"lines": {"data": []}}}}',
     Reason.INVALID_OBJECT),  # no invoice id
])
def test_malformed_events_are_rejected_with_one_reason(payload: bytes, reason: Reason) -> None:
    d = decide(payload, CAT)

    assert isinstance(d, Reject)
    assert d.reason is reason


def test_amounts_with_fractions_parse_as_decimal_never_float() -> None:
    body = raw("checkout.session.completed", session()).replace(b'"amount_total":5000', b'"amount_total":50.10')

    d = applied(decide(body, CAT))

    assert d.event.object["amount_total"] == Decimal("50.10")
