"""Consumer lag in seconds (meterline/consumer_lag.py): the rules as a table, one comment each."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from meterline.consumer_lag import ConsumerLag

NOW = 1_800_000_000.0
MS = 1000


@pytest.mark.parametrize(("steps", "highwater_at_check", "expected"), [
    # Nothing delivered yet: the position is unknown, nothing to say.
    ([], 10, 0.0),
    # A batch that reaches the high watermark leaves nothing waiting.
    ([(9, (NOW - 30) * MS, 10, NOW)], 10, 0.0),
    # A batch that stops short: the next record is no older than the last one handed over.
    ([(4, (NOW - 30) * MS, 10, NOW)], 10, 30.0),
    # ... and the value keeps growing while nothing more is consumed (read 5 s later).
    ([(4, (NOW - 35) * MS, 10, NOW - 5)], 10, 35.0),
    # Caught up, then records arrive that are not consumed: counted from when it was noticed.
    ([(9, (NOW - 30) * MS, 10, NOW - 3)], 12, 0.0),
    # A producer clock ahead of ours never makes lag negative.
    ([(4, (NOW + 60) * MS, 10, NOW)], 10, 0.0),
    # No timestamp on the record (-1 or None): waiting from the delivery on, at least.
    ([(4, None, 10, NOW - 7)], 10, 7.0),
    # Catching up after lagging resets it.
    ([(4, (NOW - 30) * MS, 10, NOW - 1), (9, (NOW - 20) * MS, 10, NOW)], 10, 0.0),
    # High watermark unknown (not fetched yet): a short batch still counts its last record.
    ([(4, (NOW - 12) * MS, None, NOW)], None, 12.0),
])
def test_lag_seconds(steps: list[tuple[int, float | None, int | None, float]],
                     highwater_at_check: int | None, expected: float) -> None:
    lag = ConsumerLag("g", "t")
    for last_offset, ts_ms, highwater, at in steps:
        lag.delivered(0, last_offset, None if ts_ms is None else int(ts_ms), highwater, at)

    assert lag.seconds(0, highwater_at_check, NOW) == pytest.approx(expected, abs=1e-3)


def test_records_noticed_while_caught_up_age_from_then() -> None:
    lag = ConsumerLag("g", "t")
    lag.delivered(0, 9, int((NOW - 30) * MS), 10, NOW - 10)

    assert lag.seconds(0, 12, NOW - 4) == 0.0     # first noticed here
    assert lag.seconds(0, 12, NOW) == pytest.approx(4.0)


def test_fetched_records_age_from_the_first_one_until_consumed() -> None:
    lag = ConsumerLag("g", "t")
    lag.fetched(0, 0, int((NOW - 40) * MS), NOW - 1)  # a consumer stuck on its first batch

    assert lag.seconds(0, 100, NOW) == pytest.approx(40.0)
    lag.fetched(0, 50, int((NOW - 5) * MS), NOW)       # a prefetch further on changes nothing
    assert lag.seconds(0, 100, NOW) == pytest.approx(40.0)
    lag.delivered(0, 99, int((NOW - 5) * MS), 100, NOW)
    assert lag.seconds(0, 100, NOW) == 0.0


def test_a_fetch_of_the_very_next_record_gives_the_exact_age() -> None:
    lag = ConsumerLag("g", "t")
    lag.delivered(0, 9, int((NOW - 30) * MS), 20, NOW)  # short batch: bound from the last record
    assert lag.seconds(0, 20, NOW) == pytest.approx(30.0)

    lag.fetched(0, 10, int((NOW - 12) * MS), NOW)       # offset 10 is the next one
    assert lag.seconds(0, 20, NOW) == pytest.approx(12.0)


def _sample(group: str, partition: str) -> float | None:
    return REGISTRY.get_sample_value(
        "meterline_consumer_lag_seconds", {"group": group, "topic": "t", "partition": partition})


def test_publish_sets_assigned_partitions_and_drops_revoked_ones() -> None:
    lag = ConsumerLag("unit-publish", "t")
    lag.delivered(0, 4, int((NOW - 8) * MS), 10, NOW)
    lag.delivered(1, 9, int((NOW - 8) * MS), 10, NOW)

    lag.publish({0, 1}, lambda p: 10, NOW)
    assert _sample("unit-publish", "0") == pytest.approx(8.0)
    assert _sample("unit-publish", "1") == 0.0

    lag.publish({1}, lambda p: 10, NOW + 1)           # partition 0 was revoked
    assert _sample("unit-publish", "0") is None
    assert _sample("unit-publish", "1") == 0.0
