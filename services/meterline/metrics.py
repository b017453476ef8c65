"""Every Prometheus metric meterline exports, defined once.

Names are `meterline_<thing>_<unit>`; dashboards and alert rules in deploy/
refer to these names and a test checks that every name they use exists here.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

# --- processor: intake -------------------------------------------------------
RECORDS_IN = Counter("meterline_records_in_total", "Kafka records read from the usage topic")
EVENTS_VALID = Counter("meterline_events_valid_total", "Events that passed validation", ["meter"])
EVENTS_INVALID = Counter(
    "meterline_events_invalid_total", "Events rejected to the DLQ, by reason", ["reason"]
)
EVENTS_DUPLICATE = Counter(
    "meterline_events_duplicate_total", "Events dropped as duplicates of an already-debited event"
)
EVENTS_LATE = Counter(
    "meterline_events_late_total", "Events that arrived after their window closed (corrections)",
    ["meter"],
)
EVENTS_DEBITED = Counter(
    "meterline_events_debited_total", "Events whose usage was committed to the ledger", ["meter"]
)
PENDING_EVENTS = Gauge("meterline_pending_events", "Events buffered in open windows, not yet flushed")
CONSUMER_LAG = Gauge(
    "meterline_consumer_lag_messages", "High watermark minus next offset, per partition", ["partition"]
)
CONSUMER_LAG_SECONDS = Gauge(
    "meterline_consumer_lag_seconds",
    "Age of the oldest record the group has not consumed, per partition (meterline/consumer_lag.py)",
    ["group", "topic", "partition"],
)
CHECKPOINT_OFFSET = Gauge(
    "meterline_checkpoint_offset", "Next offset committed to Postgres, per partition", ["partition"]
)
OWNED_PARTITIONS = Gauge("meterline_owned_partitions", "Usage-topic partitions this worker owns")
DEDUPE_DAYS_AHEAD = Gauge(
    "meterline_dedupe_days_ahead",
    "Days after today that already have dedupe partitions (housekeeping makes 3 ahead)",
)
DEDUPE_PARTITIONS_DROPPED = Counter(
    "meterline_dedupe_partitions_dropped_total",
    "Dedupe day partitions (marks, tokens) dropped after the dedupe horizon",
)
INTAKE_GAPS = Counter(
    "meterline_intake_gaps_total",
    "Runs fetched past the next unhandled record (an abandoned run): the partition was sought back",
)
INTAKE_INTERNAL_ERRORS = Counter(
    "meterline_intake_internal_errors_total",
    "Records whose handling raised unexpectedly, dead-lettered whole as internal_error",
)
INTAKE_STALLED = Gauge(
    "meterline_intake_stalled", "1 while intake waits at a record the DLQ refused, else 0"
)
INTAKE_DLQ_REFUSALS = Counter(
    "meterline_intake_dlq_refusals_total", "Attempts to dead-letter a record that the DLQ refused"
)
AGENT_CRASHES = Counter(
    "meterline_agent_crashes_total",
    "Runs abandoned because handling them raised, and processor agent restarts",
)

# --- processor: flush ---------------------------------------------------------
WINDOWS_FLUSHED = Counter(
    "meterline_windows_flushed_total", "Window aggregates written", ["kind"]  # regular | correction
)
FLUSH_DURATION = Histogram(
    "meterline_flush_duration_seconds", "Duration of one flush transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
FLUSH_FAILURES = Counter(
    "meterline_flush_failures_total", "Flushes that did not commit and will be retried", ["reason"]
)
FLUSHES_IN_DOUBT = Counter(
    "meterline_flushes_in_doubt_total",
    "Flushes whose transaction broke after it began (maybe at COMMIT), by what Postgres"
    " then said: committed (counted, not re-applied) or not_committed (retried)", ["outcome"]
)
FENCED_FLUSHES = Counter(
    "meterline_fenced_flushes_total", "Flushes rejected because another worker owns the partition"
)
LAST_COMMIT_TIMESTAMP = Gauge(
    "meterline_last_flush_commit_timestamp_seconds", "Unix time of the last committed flush"
)
# Quarter-second buckets up to 12 s: windows make 5-7 s normal, and the bench reads p50/p99 here.
DEBIT_LATENCY = Histogram(
    "meterline_event_to_debit_latency_seconds", "Event time to debit commit",
    buckets=(*(i / 4 for i in range(1, 49)), 15, 20, 30, 60, 120, 300, 900, 3600, 86400),
)

# --- ledger ---------------------------------------------------------------------
LEDGER_DEBITS = Counter("meterline_ledger_debits_total", "Debit ledger entries written")
CREDITS_DEBITED = Counter("meterline_debited_credits_total", "Credits debited")
LEDGER_GRANTS = Counter("meterline_ledger_grants_total", "Grants written to the ledger", ["source"])
THRESHOLD_CROSSINGS = Counter(
    "meterline_balance_threshold_crossings_total", "Balance thresholds crossed", ["threshold"]
)
GRANTS_EXPIRED = Counter("meterline_grants_expired_total", "Grants whose remainder was written off")

# --- DLQ ------------------------------------------------------------------------
DLQ_MESSAGES = Counter(
    "meterline_dlq_messages_total", "Messages written to a dead-letter topic", ["topic", "reason"]
)

DLQ_TRUNCATED = Counter(
    "meterline_dlq_truncated_total",
    "Dead letters too large for their DLQ topic, stored as a truncated copy (reason oversized)",
    ["topic"],
)

# --- producers and outages (every service) -----------------------------------------
PRODUCER_REPLACEMENTS = Counter(
    "meterline_producer_replacements_total",
    "Kafka producers replaced after a fatal, fencing or timed-out delivery, by client",
    ["client"],  # usage-dlq | aggregates-dlq | stripe-events-dlq | relay | webhook-bridge
)
DEPENDENCY_UP = Gauge(
    "meterline_dependency_up",
    "1 while the service's last use of a dependency succeeded, 0 while it backs off and retries",
    ["service", "dependency"],  # dependency: postgres | kafka
)
DEPENDENCY_RETRIES = Counter(
    "meterline_dependency_retries_total",
    "Operations a service retried after a database or broker error", ["service", "dependency"],
)
LOOP_FAILURES = Counter(
    "meterline_loop_failures_total",
    "Rounds of a service's loop that raised an unexpected exception (contained, retried)",
    ["service", "loop"],
)
LAST_PROGRESS = Gauge(
    "meterline_last_progress_timestamp_seconds",
    "Unix time a service's loops last completed a round (what /healthz judges)", ["service"],
)

# --- outbox relay ---------------------------------------------------------------
OUTBOX_PUBLISHED = Counter(
    "meterline_outbox_published_total", "Outbox rows delivered to Kafka", ["topic"]
)
OUTBOX_BACKLOG = Gauge("meterline_outbox_backlog_messages", "Outbox rows not yet delivered")
OUTBOX_OLDEST_AGE = Gauge(
    "meterline_outbox_oldest_age_seconds", "Age of the oldest undelivered outbox row"
)
OUTBOX_FAILURES = Counter(
    "meterline_outbox_failures_total", "Relay batches that failed and will be retried"
)

# --- stripe sink ---------------------------------------------------------------
STRIPE_REQUESTS = Counter(
    "meterline_stripe_requests_total",
    "Requests to Stripe's meter event APIs, by transport and outcome "
    "(accepted, duplicate, rejected, rate_limited, retryable_error)",
    ["transport", "outcome"],
)
STRIPE_REQUEST_DURATION = Histogram(
    "meterline_stripe_request_duration_seconds", "Duration of one Stripe request", ["transport"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STRIPE_EVENTS_ACCEPTED = Counter(
    "meterline_stripe_events_accepted_total", "Meter events (reports) Stripe accepted"
)
STRIPE_RETRIES = Counter(
    "meterline_stripe_retries_total", "Reports scheduled for another attempt, by error code",
    ["code"],
)
STRIPE_REPORTS_REJECTED = Counter(
    "meterline_stripe_reports_rejected_total",
    "Reports Stripe refused (non-retryable) and sent to the aggregates DLQ, by error code",
    ["code"],
)
STRIPE_CIRCUIT_OPEN = Gauge(
    "meterline_stripe_circuit_open", "1 while the circuit breaker keeps the sink off Stripe"
)
STRIPE_UNFINISHED_REPORTS = Gauge(
    "meterline_stripe_unfinished_reports", "Reports not yet accepted or rejected, by status",
    ["status"],
)
STRIPE_OLDEST_UNSENT_AGE = Gauge(
    "meterline_stripe_oldest_unsent_age_seconds",
    "Age of the oldest sealed report Stripe has not accepted yet",
)
STRIPE_AGGREGATES_STAGED = Counter(
    "meterline_stripe_aggregates_staged_total", "Window aggregates the sink took on"
)
STRIPE_AGGREGATES_SKIPPED = Counter(
    "meterline_stripe_aggregates_skipped_total",
    "Aggregates not reported to Stripe, by reason (not_billed, already_staged)", ["reason"],
)
DEBIT_TO_STRIPE_LATENCY = Histogram(
    "meterline_debit_to_stripe_latency_seconds",
    "From an aggregate's debit commit to Stripe accepting the event that carries it",
    buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 3600),
)

# --- reconciler ---------------------------------------------------------------
RECONCILE_VARIANCE = Gauge(
    "meterline_reconcile_variance_ratio",
    "Largest |ledger - Stripe| / ledger over customers in the last reconciliation, by meter",
    ["meter"],
)
RECONCILE_FLAGGED = Gauge(
    "meterline_reconcile_flagged", "(customer, meter, period) rows over the variance threshold"
)
RECONCILE_RESUBMITTED = Counter(
    "meterline_reconcile_resubmitted_total",
    "Aggregates or reports the reconciler queued again for Stripe, by kind", ["kind"],
)
RECONCILE_LAST_RUN = Gauge(
    "meterline_reconcile_last_run_timestamp_seconds", "Unix time of the last completed reconciliation"
)

# --- webhook bridge ---------------------------------------------------------------
# (metrics for webhook bridge go here)
# `outcome` is a closed set (meterline.webhooks.intake.Outcome): accepted, too_large,
# missing_signature, malformed_signature, bad_signature, expired, future_timestamp,
# malformed_body, kafka_unavailable. Event types are open-ended, so never a label.
WEBHOOK_REQUESTS = Counter(
    "meterline_webhook_requests_total",
    "Stripe webhook requests, by outcome (accepted = durably in Kafka, or why not)", ["outcome"],
)
WEBHOOK_REQUEST_DURATION = Histogram(
    "meterline_webhook_request_duration_seconds",
    "Stripe webhook request duration (accepted includes the broker's ack)", ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WEBHOOK_BROKER_READY = Gauge(
    "meterline_webhook_broker_ready",
    "1 while the bridge's producer recently reached the broker (what /readyz answers), else 0",
)

# --- ledger consumer (Stripe events) ---------------------------------------------------------------
# (metrics for ledger consumer (Stripe events) go here)
STRIPE_EVENTS = Counter(
    "meterline_ledger_consumer_events_total",
    "Stripe webhook events consumed from stripe.events, by type (known types, else 'other') "
    "and outcome",
    ["type", "outcome"],  # outcome: applied | noop | duplicate | ignored | dlq
)
STRIPE_EVENTS_REJECTED = Counter(
    "meterline_ledger_consumer_rejected_total", "Stripe events dead-lettered, by reason",
    ["reason"],
)
STRIPE_GRANTS = Counter(
    "meterline_grants_from_stripe_total", "Grants made from Stripe events, by grant source",
    ["source"],  # stripe_checkout | stripe_invoice | stripe_subscription
)
STRIPE_GRANTED_CREDITS = Counter(
    "meterline_stripe_granted_credits_total", "Credits granted from Stripe events, by grant source",
    ["source"],
)
STRIPE_VOIDED_CREDITS = Counter(
    "meterline_stripe_voided_credits_total", "Credits of refunded purchases voided"
)
CUSTOMERS_PAST_DUE = Gauge(
    "meterline_customers_past_due", "Customers flagged past due (a Stripe invoice payment failed)"
)
STRIPE_EVENT_LAG = Histogram(
    "meterline_stripe_event_lag_seconds", "Stripe event created -> applied to the ledger",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 3 * 86400),
)
LEDGER_CONSUMER_RETRIES = Counter(
    "meterline_ledger_consumer_retries_total",
    "Stripe events whose apply failed transiently and is retried", ["reason"],  # postgres | dlq
)
LEDGER_CONSUMER_LAST_COMMIT = Gauge(
    "meterline_ledger_consumer_last_commit_timestamp_seconds",
    "Unix time of the last Kafka offset commit of the ledger consumer",
)

# --- api ---------------------------------------------------------------
# (metrics for api go here)
API_REQUESTS = Counter(
    "meterline_api_requests_total", "API requests answered, by route template and status code",
    ["route", "status"],
)
# Sub-millisecond buckets: balance and entitlement checks aim at p99 < 10 ms.
API_REQUEST_DURATION = Histogram(
    "meterline_api_request_duration_seconds", "API request handling time, by route template",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
             2.5, 10),
)
API_AUTH_FAILURES = Counter(
    "meterline_api_auth_failures_total", "Requests refused for a missing or wrong bearer token",
    ["reason"],  # missing | invalid
)
API_MANUAL_CREDITS = Counter(
    "meterline_api_manual_credit_changes_total",
    "Manual grants and adjustments applied through the API (idempotent repeats not counted)",
    ["kind"],  # grant | adjustment
)
API_EXPORT_ROWS = Counter(
    "meterline_api_export_rows_total", "Window aggregate rows streamed by CSV exports"
)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """Record many observations at once (a flush debits up to hundreds of thousands of events).

    prometheus-client has no bulk observe; calling `observe` per event would be
    per-event work on the hot path, so count per bucket and add the counts.
    Relies on the client's internal `_upper_bounds`/`_buckets`/`_sum`
    (checked by tests/unit/test_metrics.py against `observe`).
    """
    if not values:
        return
    bounds = histogram._upper_bounds  # noqa: SLF001 - see docstring
    counts = [0] * len(bounds)
    for v in values:
        if v == v:  # NaN lands in no bucket, as with observe()
            counts[bisect_left(bounds, v)] += 1
    for bucket, n in zip(histogram._buckets, counts, strict=True):  # noqa: SLF001
        if n:
            bucket.inc(n)
    histogram._sum.inc(sum(values))  # noqa: SLF001


def observe_counts(histogram: Histogram, counted: Sequence[tuple[float, int]]) -> None:
    """Like observe_many, for (value, how many times) pairs."""
    bounds = histogram._upper_bounds  # noqa: SLF001 - see observe_many
    counts = [0] * len(bounds)
    total = 0.0
    for v, n in counted:
        if v == v:
            counts[bisect_left(bounds, v)] += n
        total += v * n
    for bucket, n in zip(histogram._buckets, counts, strict=True):  # noqa: SLF001
        if n:
            bucket.inc(n)
    if counted:
        histogram._sum.inc(total)  # noqa: SLF001


Probe = Callable[[], tuple[bool, dict[str, Any]]]


def run_service(
    port: int, serve_until: Callable[[asyncio.Event], Awaitable[None]],
    probes: Mapping[str, Probe] | None = None,
) -> None:
    """Blocking entry point of a long-running service: /metrics (and `probes`, e.g.
    meterline.health's /healthz and /readyz) on `port`, then `serve_until(stop)` in a fresh
    event loop; SIGINT/SIGTERM set `stop`."""
    serve(port, probes)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(stop)

    asyncio.run(main())


def serve(port: int, probes: Mapping[str, Probe] | None = None) -> None:
    """Expose /metrics on `port` (0 = don't serve), plus each probe path: 200 with its JSON
    detail when the probe says ok, else 503."""
    if not port:
        return
    if not probes:
        start_http_server(port)
        return
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        ok, detail = probe()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json")])
        return [json.dumps({"ok": ok, **detail}).encode()]

    httpd = make_server("", port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics-http").start()
