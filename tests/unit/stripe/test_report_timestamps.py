"""A report's Stripe timestamp stays inside Stripe's 35 days when its events were inside
meterline's max lateness (issue 10.11): `reports.stripe_timestamp`, one case per line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meterline.stripe.reports import (
    STRIPE_AGE_MARGIN_SECONDS,
    STRIPE_MAX_AGE_SECONDS,
    stripe_timestamp,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OLDEST = int(NOW.timestamp()) - STRIPE_MAX_AGE_SECONDS + STRIPE_AGE_MARGIN_SECONDS
LIMIT = NOW - timedelta(seconds=STRIPE_MAX_AGE_SECONDS)


@pytest.mark.parametrize(("bucket_start", "expected"), [
    # a recent bucket: its own start
    (NOW - timedelta(minutes=5), int((NOW - timedelta(minutes=5)).timestamp())),
    # a 60 s bucket starting 55 s past Stripe's limit, for events accepted 5 s inside it:
    # stamped at the oldest instant Stripe accepts
    (LIMIT - timedelta(seconds=55), OLDEST),
    # starting just inside the limit but within the margin: moved by seconds, no more
    (LIMIT + timedelta(seconds=30), OLDEST),
    # far older than one bucket past the limit: not moved (Stripe refuses, the DLQ keeps it)
    (LIMIT - timedelta(hours=3), int((LIMIT - timedelta(hours=3)).timestamp())),
])
def test_stripe_timestamp(bucket_start: datetime, expected: int) -> None:
    stamped = stripe_timestamp(bucket_start, NOW, 60)

    assert stamped == expected
    if stamped == OLDEST:
        assert stamped >= int(NOW.timestamp()) - STRIPE_MAX_AGE_SECONDS  # Stripe takes it
