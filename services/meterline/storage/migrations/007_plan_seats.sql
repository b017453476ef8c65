-- Seats: a plan's included credits are per unit of the subscription item (billing/plans.py).
-- Existing rows were allocated for one unit, which is what the default says.
ALTER TABLE stripe_subscription_snapshots ADD COLUMN quantity integer NOT NULL DEFAULT 1
    CHECK (quantity >= 0);
ALTER TABLE stripe_plan_periods ADD COLUMN quantity integer NOT NULL DEFAULT 1
    CHECK (quantity >= 0);
