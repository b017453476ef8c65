-- Stripe-driven credits: the state the ledger consumer (`meterline ledger-consumer`) keeps
-- so that Stripe events apply exactly once and in any order.
--
-- Stripe times are kept as Stripe sends them (Unix seconds, bigint) in the stripe_*
-- tables, which mirror Stripe objects; grants get timestamptz as everywhere else.
-- The rules that use these tables are in meterline/billing/ (stripe_events.py,
-- plans.py: pure; stripe_ledger.py: the transaction).

-- Idempotency: one row per Stripe event applied, written in the same transaction as
-- the ledger change it made. A replayed event id finds its row and changes nothing.
-- Dead-lettered events are not recorded (a fixed-up replay from the DLQ must apply).
CREATE TABLE stripe_events_applied (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    created      bigint NOT NULL,      -- the event's `created`: orders payment outcomes
    customer_id  text,                 -- the meterline customer, when the event names one
    outcome      text NOT NULL,        -- applied | already_granted | no_grant | ...
    applied_at   timestamptz NOT NULL DEFAULT now()
);
-- past_due is recomputed from the payment outcomes recorded here (latest paid vs failures).
CREATE INDEX stripe_events_applied_payments ON stripe_events_applied (customer_id, type, created)
    WHERE type IN ('invoice.paid', 'invoice.payment_failed');

-- A purchase's identity: every Stripe id that names it (checkout session, invoice,
-- payment intent) points at the one grant it bought. Checkout + invoice events of one
-- purchase share a payment intent (and the session names its invoice), so the second
-- event finds the first one's grant here and grants nothing. Refunds find grants here.
CREATE TABLE stripe_purchase_refs (
    ref       text PRIMARY KEY,
    grant_id  bigint NOT NULL REFERENCES grants (id)
);
CREATE INDEX stripe_purchase_refs_grant ON stripe_purchase_refs (grant_id);

-- Refund state per charge: the largest `amount_refunded` seen (it only grows in Stripe,
-- so an older snapshot delivered late changes nothing). Amounts in the currency's
-- minor unit, as Stripe sends them. Kept even when the purchase is not known yet: the
-- purchase, when it arrives, is voided then.
CREATE TABLE stripe_charge_refunds (
    charge_id        text PRIMARY KEY,
    payment_intent   text,
    invoice          text,
    amount           bigint NOT NULL CHECK (amount > 0),
    amount_refunded  bigint NOT NULL CHECK (amount_refunded >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_charge_refunds_payment_intent ON stripe_charge_refunds (payment_intent);
CREATE INDEX stripe_charge_refunds_invoice ON stripe_charge_refunds (invoice);

-- Every subscription snapshot applied (customer.subscription.* events): the history the
-- mid-period upgrade proration is computed from, whatever order it arrived in.
CREATE TABLE stripe_subscription_snapshots (
    event_id         text PRIMARY KEY,
    subscription_id  text NOT NULL,
    created          bigint NOT NULL,
    status           text NOT NULL,
    plan_key         text,
    period_start     bigint,
    period_end       bigint
);
CREATE INDEX stripe_subscription_snapshots_period
    ON stripe_subscription_snapshots (subscription_id, period_start);

-- The latest state of each subscription: the snapshot with the greatest
-- (terminal status, created, event id). Older snapshots delivered late never replace it;
-- `canceled` is terminal in Stripe, so it wins whatever arrives after it.
CREATE TABLE stripe_subscriptions (
    id                    text PRIMARY KEY,
    customer_id           text NOT NULL,
    status                text NOT NULL,
    plan_key              text,
    current_period_start  bigint,
    current_period_end    bigint,
    ended_at              bigint,       -- set when canceled: no allocation for later periods
    snapshot_created      bigint NOT NULL,
    snapshot_event_id     text NOT NULL,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_subscriptions_customer ON stripe_subscriptions (customer_id);

-- One row per paid subscription period: its base allocation (the plan on the period's
-- invoice) and the upgrade credits granted so far for mid-period upgrades.
CREATE TABLE stripe_plan_periods (
    subscription_id  text NOT NULL,
    period_start     bigint NOT NULL,
    period_end       bigint NOT NULL CHECK (period_end > period_start),
    customer_id      text NOT NULL,
    plan_key         text NOT NULL,
    invoice_id       text NOT NULL,
    base_credits     numeric NOT NULL CHECK (base_credits >= 0),
    upgrade_credits  numeric NOT NULL DEFAULT 0 CHECK (upgrade_credits >= 0),
    PRIMARY KEY (subscription_id, period_start)
);

-- Who decides a customer's plan: `config` (calendar-period allocations by the processor)
-- or `stripe` (periods and allocations from Stripe subscriptions; the processor's
-- calendar allocator skips these customers, and config sync leaves their plan alone).
ALTER TABLE customers
    ADD COLUMN plan_source text NOT NULL DEFAULT 'config' CHECK (plan_source IN ('config', 'stripe'));
