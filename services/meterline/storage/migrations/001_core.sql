-- meterline core schema: credits ledger, window aggregates, dedupe marks,
-- per-partition Kafka checkpoints (with fencing epochs) and the outbox.
-- Credits and quantities are NUMERIC everywhere: never floats.

CREATE TABLE plans (
    key               text PRIMARY KEY,
    included_credits  numeric NOT NULL CHECK (included_credits >= 0),
    period            text NOT NULL CHECK (period IN ('hour', 'day', 'month')),
    carryover         text NOT NULL CHECK (carryover IN ('rollover', 'reset')),
    overage           text NOT NULL CHECK (overage IN ('allow', 'block')),
    grant_priority    integer NOT NULL DEFAULT 10,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customers (
    id                  text PRIMARY KEY,
    plan_key            text REFERENCES plans (key),
    stripe_customer_id  text UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per customer; always equal to the sum of its ledger entries.
CREATE TABLE balances (
    customer_id  text PRIMARY KEY,
    balance      numeric NOT NULL DEFAULT 0,
    -- credits of the grants currently in force: the base of the threshold percentages
    granted      numeric NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE grants (
    id            bigserial PRIMARY KEY,
    customer_id   text NOT NULL,
    amount        numeric NOT NULL CHECK (amount > 0),
    remaining     numeric NOT NULL CHECK (remaining >= 0),
    priority      integer NOT NULL DEFAULT 10,
    effective_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    -- config | plan_allocation | manual | stripe_invoice | stripe_checkout ...
    source        text NOT NULL,
    -- idempotency: one grant per (source, source_ref), e.g. a Stripe event id
    source_ref    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, source_ref)
);
CREATE INDEX grants_open_by_customer ON grants (customer_id) WHERE remaining > 0;

-- One row per flushed window (seq 0) or correction of it (seq 1, 2, ... for late events).
CREATE TABLE window_aggregates (
    -- deterministic, so it doubles as the Stripe meter-event identifier
    id              text PRIMARY KEY,
    customer_id     text NOT NULL,
    meter           text NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    seq             integer NOT NULL,
    quantity        numeric NOT NULL,   -- what this aggregate adds to the window
    window_value    numeric NOT NULL,   -- the window's value including this aggregate
    value_time_ms   bigint,             -- (time, offset) of the value, for `latest`
    value_offset    bigint,
    event_count     integer NOT NULL,
    credits         numeric NOT NULL,
    kafka_partition integer NOT NULL,
    first_offset    bigint NOT NULL,
    last_offset     bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, meter, window_start, seq)
);
CREATE INDEX window_aggregates_customer_time ON window_aggregates (customer_id, window_start);

-- Append-only: every balance change is one of these.
CREATE TABLE ledger_entries (
    id            bigserial PRIMARY KEY,
    customer_id   text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('grant', 'debit', 'expiry', 'void', 'adjustment')),
    amount        numeric NOT NULL,           -- signed: grants positive, debits negative
    overage       numeric NOT NULL DEFAULT 0, -- part of a debit no grant covered
    meter         text,
    aggregate_id  text REFERENCES window_aggregates (id),
    grant_id      bigint REFERENCES grants (id),
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_customer ON ledger_entries (customer_id, id);
CREATE INDEX ledger_entries_aggregate ON ledger_entries (aggregate_id) WHERE aggregate_id IS NOT NULL;

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

-- Which grants paid for a debit.
CREATE TABLE debit_allocations (
    ledger_entry_id  bigint NOT NULL REFERENCES ledger_entries (id),
    grant_id         bigint NOT NULL REFERENCES grants (id),
    credits          numeric NOT NULL CHECK (credits > 0),
    PRIMARY KEY (ledger_entry_id, grant_id)
);

-- Durable dedupe: 16-byte blake2b of CloudEvents (source, id).
-- A mark is *reserved* while its window is open (slot, epoch and the window's token)
-- and counts only once its token is in flush_tokens, which the flush transaction
-- that debits the window inserts. An unconfirmed mark of an older epoch of the same
-- partition slot is an orphan (its worker crashed or was fenced) and is taken over
-- by the partition's next owner when it replays the event.
CREATE TABLE dedupe_marks (
    key      bytea PRIMARY KEY,
    slot     bigint NOT NULL,
    epoch    bigint NOT NULL,
    token    bigint NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dedupe_marks_seen_at ON dedupe_marks USING brin (seen_at);

CREATE TABLE flush_tokens (
    token         bigint PRIMARY KEY,
    committed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX flush_tokens_committed_at ON flush_tokens USING brin (committed_at);

-- The Kafka offsets that matter: committed in the same transaction as the debits.
-- `epoch` is the fencing token: bumped on every claim, checked on every flush.
CREATE TABLE partition_checkpoints (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    -- a short id for (topic, partition), stamped on dedupe reservations
    slot         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    next_offset  bigint NOT NULL DEFAULT 0,
    epoch        bigint NOT NULL DEFAULT 0,
    owner        text,
    claimed_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Transactional outbox: rows become Kafka messages (relay), marked sent after delivery.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    key         text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
