"""A histogram cheap enough to observe on the per-request hot path."""

from __future__ import annotations

from typing import Final

# Inference requests span milliseconds (an embedding, a cached reply) to minutes (a long
# generation): buckets from 5 ms to 10 minutes.
LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


class Histogram:
    """Bucket counts (non-cumulative, last slot is +Inf), a sum and a count."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[self._slot(value)] += 1
        self.sum += value

    def observe_many(self, value: float, times: int) -> None:
        """``observe(value)`` ``times`` times over."""
        self.counts[self._slot(value)] += times
        self.sum += value * times

    def _slot(self, value: float) -> int:
        """``bisect_left(self.buckets, value)``: the first bound at or above ``value``.

        A scan from the smallest bound: most observations fall in the first few buckets, and
        the compiled build runs it as a C loop, where calling bisect costs more.
        """
        buckets = self.buckets
        n = len(buckets)
        i = 0
        while i < n and buckets[i] < value:
            i += 1
        return i

    @property
    def count(self) -> int:
        return sum(self.counts)
