-- Stripe refuses a meter event value with more than 15 significant digits (API 2026-04-22).
-- A coalesced report's sum can have more (and JSON-number quantities of 16-17 significant
-- digits are accepted at intake), so the sink sends each report rounded to 15 significant
-- digits and carries the rounding remainder into the next report of the same customer and
-- meter (stripe/reports.py: `stripe_value`): Stripe's total stays equal to the ledger's,
-- give or take the one remainder not yet sent.
-- reported_quantity: the value sent to Stripe, fixed when the report is sealed (a retry
-- sends the same value under the same identifier); NULL for reports sealed before this.
ALTER TABLE stripe_reports ADD COLUMN reported_quantity numeric;

CREATE TABLE stripe_report_carry (
    customer_id text NOT NULL,
    meter text NOT NULL,
    carry numeric NOT NULL DEFAULT 0,  -- sealed but not yet sent to Stripe (< half a unit
                                       -- of the 15th significant digit of the last report)
    PRIMARY KEY (customer_id, meter)
);
