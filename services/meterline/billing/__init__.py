"""Stripe-driven credits: Stripe events (stripe.events) applied to the credits ledger.

- `ledger_actions`: the vocabulary — decisions (apply / ignore / reject), actions, reasons;
- `stripe_events`: pure — parse a Stripe event and decide what it means for the ledger;
- `plans`: pure — subscription periods, mid-period upgrade proration, latest snapshot;
- `stripe_ledger`: the one Postgres transaction that applies an event's decision;
- `consumer`: the Kafka consumer (`meterline ledger-consumer`), DLQ and offsets.
"""
