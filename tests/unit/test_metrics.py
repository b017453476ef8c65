"""meterline.metrics: observe_many must export exactly what per-value observe would."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from meterline import metrics
from meterline.metrics import observe_many

# the real histograms' buckets, without the implicit +Inf
FLUSH_BUCKETS = tuple(metrics.FLUSH_DURATION._upper_bounds[:-1])  # noqa: SLF001
LATENCY_BUCKETS = tuple(metrics.DEBIT_LATENCY._upper_bounds[:-1])  # noqa: SLF001

Sample = tuple[str, tuple[tuple[str, str], ...], float]


def exported(registry: CollectorRegistry) -> list[Sample]:
    """Everything the registry exports, minus the `_created` timestamps (they differ by clock)."""
    return [
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def both_ways(
    values: Sequence[float], buckets: Sequence[float], before: Sequence[float] = ()
) -> tuple[list[Sample], list[Sample]]:
    """(observe per value, observe_many) on two identical private histograms."""
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("t_seconds", "test", registry=one, buckets=buckets)
    h_many = Histogram("t_seconds", "test", registry=many, buckets=buckets)
    for v in before:
        h_one.observe(v)
        h_many.observe(v)
    for v in values:
        h_one.observe(v)
    observe_many(h_many, values)
    return exported(one), exported(many)


FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(values=st.lists(st.one_of(FINITE, st.sampled_from(LATENCY_BUCKETS)), max_size=50))
@settings(max_examples=200, deadline=None)
def test_observe_many_exports_the_same_histogram_as_observe_per_value(values: list[float]) -> None:
    per_value, bulk = both_ways(values, LATENCY_BUCKETS)

    assert bulk == per_value


@given(values=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_observe_many_matches_observe_for_the_flush_duration_buckets(values: list[float]) -> None:
    per_value, bulk = both_ways(values, FLUSH_BUCKETS)

    assert bulk == per_value


BOUNDARY_BUCKETS = (0.5, 1, 5, 300)

BOUNDARIES = [
    # exactly on a bound: `le` is inclusive, the value belongs to that bucket
    (0.5, "0.5"),
    (5.0, "5.0"),
    (300.0, "300.0"),
    # the smallest float above a bound belongs to the next bucket
    (0.5000000000000001, "1.0"),
    # above the last finite bound: only +Inf
    (300.5, "+Inf"),
    (float("inf"), "+Inf"),
    # below the first bound, negative included: the first bucket
    (0.0, "0.5"),
    (-3.0, "0.5"),
]


@pytest.mark.parametrize(("value", "first_bucket"), BOUNDARIES)
def test_observe_many_puts_a_value_in_the_first_bucket_whose_bound_is_not_below_it(
    value: float, first_bucket: str
) -> None:
    per_value, bulk = both_ways([value], BOUNDARY_BUCKETS)

    assert bulk == per_value
    buckets = [(dict(labels)["le"], v) for name, labels, v in bulk if name == "t_seconds_bucket"]
    first = next(le for le, count in buckets if count == 1)
    assert first == first_bucket


def test_observe_many_of_nothing_changes_nothing() -> None:
    per_value, bulk = both_ways([], LATENCY_BUCKETS, before=[1.0, 2.0])

    assert bulk == per_value
    assert ("t_seconds_count", (), 2.0) in bulk


def test_observe_many_counts_every_value() -> None:
    _, bulk = both_ways([0.1] * 1000 + [7.5] * 3, (0.5, 8))

    samples = {(name, labels): v for name, labels, v in bulk}
    assert samples[("t_seconds_count", ())] == 1003
    assert samples[("t_seconds_bucket", (("le", "0.5"),))] == 1000
    assert samples[("t_seconds_bucket", (("le", "8.0"),))] == 1003


def test_observe_many_works_on_a_labelled_child() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("t_seconds", "test", ["meter"], registry=one, buckets=(1, 2))
    h_many = Histogram("t_seconds", "test", ["meter"], registry=many, buckets=(1, 2))
    values = [0.5, 1.0, 1.5, 3.0]
    for v in values:
        h_one.labels("api_calls").observe(v)

    observe_many(h_many.labels("api_calls"), values)

    assert exported(many) == exported(one)


def test_observe_many_after_earlier_observations_exports_the_same_sum() -> None:
    per_value, bulk = both_ways([0.2, 0.3], LATENCY_BUCKETS, before=[0.1])

    # Same series and counts; the _sum may differ in the last float bit (addition order).
    assert [(n, labels) for n, labels, _ in bulk] == [(n, labels) for n, labels, _ in per_value]
    assert [v for _, _, v in bulk] == pytest.approx([v for _, _, v in per_value], rel=1e-12)


def test_observe_many_of_nan_matches_observe() -> None:
    per_value, bulk = both_ways([float("nan")], LATENCY_BUCKETS)

    # compare with NaN-safe equality: the _sum is NaN both ways
    def nan_safe(samples: list[Sample]) -> list[tuple[str, object, str]]:
        return [(name, labels, repr(v)) for name, labels, v in samples]

    assert nan_safe(bulk) == nan_safe(per_value)
