-- Config plans (customers.plan_source = 'config'): one row per allocated calendar period, and
-- every plan the customer was seen on during it, so a plan changed in the config mid-period
-- is prorated by the same rule as a Stripe upgrade (billing/plans.py) instead of granting a
-- second full allocation, and missed rollover periods are allocated when a processor starts.
CREATE TABLE config_plan_periods (
    customer_id      text NOT NULL,
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL CHECK (period_end > period_start),
    plan_key         text NOT NULL,        -- the plan the period was allocated on (its base)
    base_credits     numeric NOT NULL CHECK (base_credits >= 0),
    upgrade_credits  numeric NOT NULL DEFAULT 0 CHECK (upgrade_credits >= 0),
    PRIMARY KEY (customer_id, period_start)
);

CREATE TABLE config_plan_changes (
    customer_id   text NOT NULL,
    period_start  timestamptz NOT NULL,
    plan_key      text NOT NULL,
    seen_at       timestamptz NOT NULL,    -- first seen on this plan in the period
    PRIMARY KEY (customer_id, period_start, plan_key),
    FOREIGN KEY (customer_id, period_start) REFERENCES config_plan_periods
);

-- Backfill from the allocations made so far (source_ref `<customer>:<plan>:<period start>`):
-- the first allocation of a period is its base; any later one (a plan changed in the config
-- used to grant a second full allocation) counts as upgrade credits already granted.
INSERT INTO config_plan_periods (customer_id, period_start, period_end, plan_key, base_credits,
                                 upgrade_credits)
SELECT a.customer_id, a.effective_at,
       coalesce(max(a.expires_at),
                (a.effective_at AT TIME ZONE 'UTC' + ('1 ' || min(p.period))::interval)
                    AT TIME ZONE 'UTC'),
       (array_agg(a.plan_key ORDER BY a.id))[1],
       (array_agg(a.amount ORDER BY a.id))[1],
       sum(a.amount) - (array_agg(a.amount ORDER BY a.id))[1]
FROM (SELECT id, customer_id, effective_at, expires_at, amount,
             split_part(substr(source_ref, length(customer_id) + 2), ':', 1) AS plan_key
      FROM grants
      WHERE source = 'plan_allocation'
        AND left(source_ref, length(customer_id) + 1) = customer_id || ':') a
LEFT JOIN plans p ON p.key = a.plan_key
GROUP BY a.customer_id, a.effective_at
HAVING coalesce(max(a.expires_at), min(a.effective_at) + ('1 ' || min(p.period))::interval)
       IS NOT NULL;

INSERT INTO config_plan_changes (customer_id, period_start, plan_key, seen_at)
SELECT customer_id, period_start, plan_key, period_start FROM config_plan_periods;
