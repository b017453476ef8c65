"""Every Prometheus metric meterline exports, defined once.

Names are `meterline_<thing>_<unit>`; dashboards and alert rules in deploy/
refer to these names and a test checks that every name they use exists here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
CHECKPOINT_OFFSET = Gauge(
    "meterline_checkpoint_offset", "Next offset committed to Postgres, per partition", ["partition"]
)
OWNED_PARTITIONS = Gauge("meterline_owned_partitions", "Usage-topic partitions this worker owns")

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
# (metrics for stripe sink go here)

# --- reconciler ---------------------------------------------------------------
# (metrics for reconciler go here)

# --- webhook bridge ---------------------------------------------------------------
# (metrics for webhook bridge go here)

# --- ledger consumer (Stripe events) ---------------------------------------------------------------
# (metrics for ledger consumer (Stripe events) go here)

# --- api ---------------------------------------------------------------
# (metrics for api go here)


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


def serve(port: int) -> None:
    """Expose /metrics on `port` (0 = don't serve)."""
    if port:
        start_http_server(port)
