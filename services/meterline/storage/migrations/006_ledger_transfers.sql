-- The credits ledger as double-entry transfers (meterline/ledger: the model, the
-- invariants and the lock order are written at the top of its __init__.py).
--
-- Accounts, per customer: `issuer` (where credits come from and return to: grants,
-- refunds, voids, manual adjustments), one `grant` account per grant, `usage` (what
-- usage consumed), `receivable` (usage no grant covered: the customer's overage debt)
-- and `expired` (what expiry wrote off). Every change of money is a transfer of a
-- positive amount from one account to another; a ledger entry (ledger_entries) groups
-- the linked transfers of one business event (a grant, a window's debit, an expiry…).
--
-- Kept in step with the transfers by the ledger module only, in the statement that
-- writes them: grants.remaining (a grant account's balance), balances.receivable (the
-- receivable account's debt, = minus its balance), balances.balance (Σ grant balances
-- minus receivable) and balances.granted (the issued minus voided credits of the grants
-- not yet expired: the base of the threshold percentages).

ALTER TABLE balances ADD COLUMN receivable numeric NOT NULL DEFAULT 0;
-- Usage thresholds fired and not re-armed since (the once-per-crossing rule,
-- core.credits.threshold_fires). NULL: not known (migrated books): taken as the
-- thresholds the balance had reached before its next change.
ALTER TABLE balances ADD COLUMN thresholds_fired integer[];
-- Set once, when expiry closes the grant's account; a closed grant takes no transfer in.
ALTER TABLE grants ADD COLUMN expired_at timestamptz;
-- what the expiry clock scans each tick
CREATE INDEX grants_expiring ON grants (expires_at)
    WHERE expired_at IS NULL AND expires_at IS NOT NULL;
-- Set when the grant's credits were issued (issuer -> grant): at once, or, for a grant
-- that takes effect later, when it does (a pending grant raises no balance before).
ALTER TABLE grants ADD COLUMN issued_at timestamptz;
UPDATE grants SET issued_at = created_at;
CREATE INDEX grants_pending ON grants (effective_at) WHERE issued_at IS NULL;

CREATE TABLE transfers (
    id            bigserial PRIMARY KEY,
    entry_id      bigint NOT NULL REFERENCES ledger_entries (id),
    customer_id   text NOT NULL,
    from_account  text NOT NULL
                  CHECK (from_account IN ('issuer', 'grant', 'receivable', 'usage', 'expired')),
    from_grant    bigint REFERENCES grants (id),
    to_account    text NOT NULL
                  CHECK (to_account IN ('issuer', 'grant', 'receivable', 'usage', 'expired')),
    to_grant      bigint REFERENCES grants (id),
    amount        numeric NOT NULL CHECK (amount > 0),
    -- grant | settlement | usage | credit_back | expiry | void | refund | adjustment | ...
    reason        text NOT NULL,
    aggregate_id  text REFERENCES window_aggregates (id),
    -- a credit-back names the transfer it (partly) reverses
    reverses      bigint REFERENCES transfers (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((from_account = 'grant') = (from_grant IS NOT NULL)),
    CHECK ((to_account = 'grant') = (to_grant IS NOT NULL)),
    CHECK (from_account <> to_account OR from_grant <> to_grant)
);
CREATE INDEX transfers_entry ON transfers (entry_id);
CREATE INDEX transfers_from_grant ON transfers (from_grant) WHERE from_grant IS NOT NULL;
CREATE INDEX transfers_to_grant ON transfers (to_grant) WHERE to_grant IS NOT NULL;
CREATE INDEX transfers_aggregate ON transfers (aggregate_id) WHERE aggregate_id IS NOT NULL;
CREATE INDEX transfers_reverses ON transfers (reverses) WHERE reverses IS NOT NULL;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

-- Backfill: every existing ledger entry becomes the transfers that mean what it meant.
--   grant        issuer -> grant                     (amount)
--   debit > 0    grant -> usage per allocation, receivable -> usage for the overage
--   debit < 0    usage -> receivable                 (the old credit-back went to no grant)
--   adjustment   grant -> issuer per allocation, receivable -> issuer for the overage
--   expiry       grant -> expired                    (the remainder written off)
--   void         grant -> issuer                     (the voided credits)
-- Σ grant accounts − receivable then equals each customer's old balance (checked below).
INSERT INTO transfers (entry_id, customer_id, from_account, from_grant, to_account, to_grant,
                       amount, reason, aggregate_id, created_at)
SELECT e.id, e.customer_id, t.from_account, t.from_grant, t.to_account, t.to_grant, t.amount,
       t.reason, e.aggregate_id, e.created_at
FROM ledger_entries e
CROSS JOIN LATERAL (
    SELECT 'issuer', NULL::bigint, 'grant', e.grant_id, e.amount, 'grant'
    WHERE e.kind = 'grant' AND e.amount > 0
    UNION ALL
    SELECT 'grant', a.grant_id, CASE e.kind WHEN 'debit' THEN 'usage' ELSE 'issuer' END, NULL,
           a.credits, CASE e.kind WHEN 'debit' THEN 'usage' ELSE 'adjustment' END
    FROM debit_allocations a WHERE a.ledger_entry_id = e.id AND e.kind IN ('debit', 'adjustment')
    UNION ALL
    SELECT 'receivable', NULL, CASE e.kind WHEN 'debit' THEN 'usage' ELSE 'issuer' END, NULL,
           e.overage, CASE e.kind WHEN 'debit' THEN 'usage' ELSE 'adjustment' END
    WHERE e.kind IN ('debit', 'adjustment') AND e.overage > 0
    UNION ALL
    SELECT 'usage', NULL, 'receivable', NULL, e.amount, 'credit_back'
    WHERE e.kind = 'debit' AND e.amount > 0
    UNION ALL
    SELECT 'grant', e.grant_id, CASE e.kind WHEN 'expiry' THEN 'expired' ELSE 'issuer' END, NULL,
           -e.amount, e.kind
    WHERE e.kind IN ('expiry', 'void') AND e.amount < 0
) AS t (from_account, from_grant, to_account, to_grant, amount, reason)
ORDER BY e.id;

UPDATE grants g SET expired_at = e.created_at
FROM (SELECT grant_id, min(created_at) AS created_at FROM ledger_entries
      WHERE kind = 'expiry' GROUP BY grant_id) e
WHERE g.id = e.grant_id;

UPDATE balances b SET receivable = coalesce(r.debt, 0)
FROM (SELECT c.customer_id,
             (SELECT coalesce(sum(amount) FILTER (WHERE from_account = 'receivable'), 0)
                   - coalesce(sum(amount) FILTER (WHERE to_account = 'receivable'), 0)
              FROM transfers t WHERE t.customer_id = c.customer_id) AS debt
      FROM balances c) r
WHERE b.customer_id = r.customer_id;

-- What a grant puts in force for `granted` (the thresholds' base): issued minus voided
-- (void entries only: a manual adjustment takes credits out like usage, it does not shrink
-- the grant). Used by expiry (meterline.ledger.changes) and the audit.
CREATE FUNCTION grant_in_force(bigint) RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(CASE WHEN t.to_account = 'grant' THEN t.amount ELSE -t.amount END), 0)
    FROM transfers t JOIN ledger_entries e ON e.id = t.entry_id
    WHERE (t.to_grant = $1 AND t.from_account = 'issuer')
       OR (t.from_grant = $1 AND t.to_account = 'issuer' AND e.kind = 'void')
$$;

-- `granted`, recomputed from the transfers over the grants not expired (the old running
-- value forgot fully used grants at expiry and subtracted voided credits twice).
UPDATE balances b SET granted = coalesce(
    (SELECT sum(grant_in_force(g.id)) FROM grants g
     WHERE g.customer_id = b.customer_id AND g.expired_at IS NULL), 0);

-- The migration refuses to commit books that do not balance (nothing is lost silently).
DO $$
DECLARE bad text;
BEGIN
    SELECT string_agg(b.customer_id, ', ') INTO bad FROM balances b
    WHERE b.balance <> coalesce((SELECT sum(remaining) FROM grants g
                                 WHERE g.customer_id = b.customer_id), 0) - b.receivable;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger migration: balance <> grants - receivable for %', bad;
    END IF;
END $$;

-- Manual-grant idempotency references become unambiguous: `<length of customer>:<customer>:<key>`
-- (the old `<customer>:<key>` let customer `a` with key `b:c` collide with customer `a:b`
-- with key `c`). The key is recovered from the old reference with the grant's own customer.
UPDATE grants SET source_ref = length(customer_id) || ':' || source_ref
WHERE source = 'manual' AND left(source_ref, length(customer_id) + 1) = customer_id || ':';
