-- Dedupe for the whole lateness horizon (issue 11): marks keyed by their event's
-- window, range-partitioned by that window's start (one partition per UTC day),
-- retired by dropping whole partitions (storage/dedupe.py explains the rules).
--
-- Why the window leads the key: live traffic reserves marks for the current
-- windows only, so every insert lands on the right edge of today's index instead
-- of a random page of a table holding the whole horizon; the cost of a
-- reservation no longer depends on how much history is kept.
--
-- Upgrade note: the 24 h marks of 001 are keyed by (source, id) alone and carry no
-- event time, so they cannot be moved into windows; they are dropped here. Drain
-- the processor (let every open window flush) before applying this migration, and
-- expect no protection against re-publications of events accepted before it.
DROP TABLE dedupe_marks;
DROP TABLE flush_tokens;

CREATE TABLE dedupe_marks (
    window_start_ms  bigint NOT NULL,
    key              bytea NOT NULL,   -- blake2b-128 of CloudEvents (source, id)
    slot             bigint NOT NULL,
    epoch            bigint NOT NULL,
    token            bigint NOT NULL,
    PRIMARY KEY (window_start_ms, key)
) PARTITION BY RANGE (window_start_ms);

-- One row per window flush. Tokens are random 63-bit numbers, so no global unique
-- constraint is needed (a partitioned table could not keep one on `token` alone).
CREATE TABLE flush_tokens (
    token         bigint NOT NULL,
    committed_at  timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (committed_at);
CREATE INDEX flush_tokens_token ON flush_tokens (token);

-- Partitions: one per UTC day, named <table>_YYYYMMDD. Created ahead of time and
-- dropped after the horizon by the processor's housekeeping (Pipeline.maintain ->
-- dedupe.retain); created on demand by a reservation that finds no partition.
CREATE FUNCTION dedupe_add_days(first_day date, last_day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d date;
BEGIN
    FOR d IN SELECT generate_series(first_day, last_day, interval '1 day')::date LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS dedupe_marks_%s PARTITION OF dedupe_marks '
            'FOR VALUES FROM (%s) TO (%s)',
            to_char(d, 'YYYYMMDD'), extract(epoch FROM d)::bigint * 1000,
            extract(epoch FROM d + 1)::bigint * 1000);
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS flush_tokens_%s PARTITION OF flush_tokens '
            'FOR VALUES FROM (%L) TO (%L)',
            to_char(d, 'YYYYMMDD'), d::timestamp AT TIME ZONE 'UTC',
            (d + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END $$;

-- Drop whole partitions: marks of windows starting before `marks_before`, tokens
-- committed before `tokens_before`. Returns the names of the tables dropped.
CREATE FUNCTION dedupe_drop_days(marks_before date, tokens_before date) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE (p.relname = 'dedupe_marks'
               AND to_date(right(c.relname, 8), 'YYYYMMDD') < marks_before)
           OR (p.relname = 'flush_tokens'
               AND to_date(right(c.relname, 8), 'YYYYMMDD') < tokens_before)
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', t.relname);
        RETURN NEXT t.relname;
    END LOOP;
END $$;

SELECT dedupe_add_days(current_date - 37, current_date + 3);
