-- A void (refund, lost dispute, Stripe or API void) of a grant that has not taken effect yet
-- (future effective_at, issued_at NULL) holds no credits to move: it is recorded here and
-- the grant issues only its unvoided part when it takes effect (ledger/changes.py).
-- VOIDED_OF_GRANT (billing/stripe_ledger.py) counts it with the voids made after issue, so
-- a refund replayed later voids nothing twice.
ALTER TABLE grants ADD COLUMN voided_before_issue numeric NOT NULL DEFAULT 0
    CHECK (voided_before_issue >= 0 AND voided_before_issue <= amount);
