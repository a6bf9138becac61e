"""The per-request histogram: each value lands in the bucket Prometheus' rule puts it in."""

from __future__ import annotations

import math
import random
from bisect import bisect_left

from lb.histogram import LATENCY_BUCKETS_S, Histogram


def test_a_value_lands_in_the_first_bucket_whose_bound_is_at_or_above_it() -> None:
    rng = random.Random(3)
    values = [*LATENCY_BUCKETS_S, 0.0, -1.0, 1e9, math.inf, -math.inf]
    values += [rng.uniform(0.0, 700.0) for _ in range(2_000)]
    values += [bound * (1 + rng.uniform(-1e-9, 1e-9)) for bound in LATENCY_BUCKETS_S]
    for value in values:
        histogram = Histogram()
        histogram.observe(value)
        expected = [0] * (len(LATENCY_BUCKETS_S) + 1)
        expected[bisect_left(LATENCY_BUCKETS_S, value)] = 1
        assert histogram.counts == expected, value


def test_observing_many_times_counts_and_sums_them_all() -> None:
    histogram = Histogram((1.0, 2.0))
    histogram.observe_many(1.5, 4)
    histogram.observe(3.0)
    assert histogram.counts == [0, 4, 1]
    assert histogram.count == 5
    assert histogram.sum == 9.0
