-- Refunds reach plan allocations too: an invoice's ids (invoice, payment intents) name every
-- grant it paid for — its credit-pack purchase and its subscription period's allocation — so
-- a refund of the invoice voids its refunded share of each (billing/stripe_ledger.py).
-- `purchase` refs keep naming one purchase grant each (a second event of the same purchase
-- finds it and grants nothing); `plan_allocation` refs only link refunds.
ALTER TABLE stripe_purchase_refs DROP CONSTRAINT stripe_purchase_refs_pkey;
ALTER TABLE stripe_purchase_refs
    ADD COLUMN kind text NOT NULL DEFAULT 'purchase' CHECK (kind IN ('purchase', 'plan_allocation'));
ALTER TABLE stripe_purchase_refs ADD PRIMARY KEY (ref, grant_id);
CREATE UNIQUE INDEX stripe_purchase_refs_one_purchase ON stripe_purchase_refs (ref)
    WHERE kind = 'purchase';
