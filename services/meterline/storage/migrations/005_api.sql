-- API read paths and the manual credit changes the API makes.

-- Hourly usage per (customer, meter), kept by a statement-level trigger on
-- window_aggregates. The balance endpoint reads a billing period's usage and
-- the recent burn rate from a few of these rows instead of one row per 5 s
-- window (a busy customer has ~17k windows a day per meter). The flush inserts
-- all its aggregates in one statement, so the trigger runs once per flush, in
-- its transaction: the rollup is exactly as committed as the aggregates.
-- Rows are upserted in key order so concurrent flushes never lock them in
-- opposite orders. Hours are UTC, like plan periods.
CREATE TABLE usage_hourly (
    customer_id  text NOT NULL,
    hour         timestamptz NOT NULL,
    meter        text NOT NULL,
    quantity     numeric NOT NULL,
    credits      numeric NOT NULL,
    event_count  bigint NOT NULL,
    aggregates   integer NOT NULL,
    PRIMARY KEY (customer_id, hour, meter)
);

CREATE FUNCTION usage_hourly_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_hourly AS u (customer_id, hour, meter, quantity, credits, event_count, aggregates)
    SELECT customer_id, date_trunc('hour', window_start, 'UTC'), meter,
           sum(quantity), sum(credits), sum(event_count), count(*)
    FROM new_aggregates
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (customer_id, hour, meter) DO UPDATE SET
        quantity = u.quantity + excluded.quantity,
        credits = u.credits + excluded.credits,
        event_count = u.event_count + excluded.event_count,
        aggregates = u.aggregates + excluded.aggregates;
    RETURN NULL;
END $$;

-- Created before the backfill: it locks out concurrent inserts until this migration commits.
CREATE TRIGGER window_aggregates_usage_hourly AFTER INSERT ON window_aggregates
    REFERENCING NEW TABLE AS new_aggregates
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hourly_add();

INSERT INTO usage_hourly (customer_id, hour, meter, quantity, credits, event_count, aggregates)
SELECT customer_id, date_trunc('hour', window_start, 'UTC'), meter,
       sum(quantity), sum(credits), sum(event_count), count(*)
FROM window_aggregates
GROUP BY 1, 2, 3;

-- One row per manual grant or adjustment made through the API, written in the
-- same transaction as its ledger entry. (customer, idempotency key) makes a
-- retried request harmless: the repeat finds this row and answers with it;
-- a different request under the same key is refused (fingerprint differs).
-- `note` is the operator's reason: the ledger entry says what happened
-- (reason manual_grant / adjustment), this row says why and at whose request.
CREATE TABLE manual_credit_requests (
    customer_id      text NOT NULL,
    idempotency_key  text NOT NULL,
    fingerprint      text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('grant', 'adjustment')),
    amount           numeric NOT NULL CHECK (amount <> 0),
    note             text NOT NULL,
    grant_id         bigint REFERENCES grants (id),
    ledger_entry_id  bigint NOT NULL REFERENCES ledger_entries (id),
    balance_after    numeric NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, idempotency_key)
);
CREATE UNIQUE INDEX manual_credit_requests_entry ON manual_credit_requests (ledger_entry_id);
