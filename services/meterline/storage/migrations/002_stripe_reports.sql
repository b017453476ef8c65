-- Stripe sink: every report of usage to Stripe, and which window aggregates it carries.
--
-- A report is one Stripe meter event. It coalesces the aggregates of one
-- (customer, meter) whose windows fall into one coalescing bucket
-- ([bucket_start, bucket_start + interval)). Its membership is written here
-- *before* anything is sent, and its identifier is fixed when it is sealed, so
-- a retry or a restarted sink sends the very same event again and Stripe's
-- identifier dedupe makes that harmless. Aggregates that arrive for a bucket
-- whose report is already sealed open the next part of that bucket.
--
-- status: open      collecting aggregates, not sent yet
--         pending   sealed; waiting to be sent (first try or retry at next_attempt_at)
--         sending   claimed by a sink until lease_until
--         accepted  Stripe accepted it (or already had its identifier)
--         rejected  Stripe refused it (non-retryable 4xx) or it cannot be sent;
--                   a copy is on usage.aggregates.dlq
CREATE TABLE stripe_reports (
    id                  bigserial PRIMARY KEY,
    customer_id         text NOT NULL,
    meter               text NOT NULL,
    event_name          text NOT NULL,
    bucket_start        timestamptz NOT NULL,
    part                integer NOT NULL,
    quantity            numeric NOT NULL DEFAULT 0,
    aggregate_count     integer NOT NULL DEFAULT 0,
    seal_after          timestamptz NOT NULL,
    status              text NOT NULL DEFAULT 'open'
                        CHECK (status IN ('open', 'pending', 'sending', 'accepted', 'rejected')),
    -- the Stripe meter-event identifier, fixed at sealing; the aggregate id when the
    -- report carries one aggregate, else derived from the report's key
    identifier          text UNIQUE,
    stripe_customer_id  text,
    transport           text,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz,
    lease_until         timestamptz,
    last_error          text,
    error_code          text,
    -- Stripe's Request-Id of the accepting call, for support tickets with Stripe
    stripe_response_id  text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sealed_at           timestamptz,
    accepted_at         timestamptz,
    UNIQUE (customer_id, meter, bucket_start, part)
);
-- at most one open report per bucket: staging adds to it with ON CONFLICT
CREATE UNIQUE INDEX stripe_reports_one_open ON stripe_reports (customer_id, meter, bucket_start)
    WHERE status = 'open';
CREATE INDEX stripe_reports_unfinished ON stripe_reports (status, next_attempt_at)
    WHERE status IN ('open', 'pending', 'sending');
CREATE INDEX stripe_reports_period ON stripe_reports (customer_id, meter, bucket_start);

CREATE TABLE stripe_report_items (
    aggregate_id     text PRIMARY KEY,
    report_id        bigint REFERENCES stripe_reports (id),
    customer_id      text NOT NULL,
    meter            text NOT NULL,
    window_start     timestamptz NOT NULL,
    quantity         numeric NOT NULL,
    -- where the sink read it (NULL for aggregates the reconciler resubmitted)
    kafka_partition  integer,
    kafka_offset     bigint,
    staged_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_report_items_report ON stripe_report_items (report_id);
