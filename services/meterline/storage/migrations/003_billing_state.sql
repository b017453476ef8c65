-- Billing state the ledger consumer keeps per customer and the API reads.
-- past_due: a Stripe invoice payment failed and no invoice has been paid since
-- (policy in config: billing.past_due_policy = block | allow).
ALTER TABLE customers
    ADD COLUMN past_due        boolean NOT NULL DEFAULT false,
    ADD COLUMN past_due_since  timestamptz;
