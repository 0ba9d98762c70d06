"""Plain-Python histograms: the hot path pays a bisect and two additions, never a metrics library.

Exporters turn these into Prometheus histograms at scrape time. Writers are single threads
(the loop that owns the value); a reader in another thread may see one observation half-applied
(count ahead of sum by one sample), which a scrape tolerates.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Loop latencies: from a millisecond to ten seconds, with 0.1 s kept as an edge because it is the
# usual slow-callback threshold.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Cumulative-at-read histogram: ``counts[i]`` holds observations in bucket ``i`` only."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), list(self.counts), strict=True):
            running += n
            out.append((bound, running))
        return out
