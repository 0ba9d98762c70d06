"""Plain-Python histograms: the hot path pays a bisect and two additions, never a metrics library.

Exporters turn these into Prometheus histograms at scrape time. Writers are single threads
(the loop that owns the value); a reader in another thread may see one observation half-applied
(count ahead of sum by one sample), which a scrape tolerates.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

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

    def reset(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe_zeros(self, n: int) -> None:
        """``n`` observations of 0 (a loop that was waiting, not late, for ``n`` periods)."""
        self.counts[0] += n
        self.count += n

    def merge(self, counts: Sequence[int], total: float) -> None:
        """Add another histogram's per-bucket counts (same buckets) and sum."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.sum += total
        self.count += sum(counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), list(self.counts), strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class HistogramSnapshot:
    """Cumulative buckets ``(upper bound, count <= bound)`` ending with ``(inf, count)``: a
    histogram as a reader (a scrape, a snapshot) takes it, detached from the one still counting."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramSnapshot:
        buckets = histogram.cumulative()
        return cls(buckets=buckets, sum=histogram.sum, count=buckets[-1][1])

    @classmethod
    def of_counts(
        cls, bounds: Sequence[float], counts: Sequence[int], total: float
    ) -> HistogramSnapshot:
        """From per-bucket counts (the last one +Inf) over ``bounds``."""
        running = 0
        buckets: list[tuple[float, int]] = []
        for bound, n in zip((*bounds, float("inf")), counts, strict=True):
            running += n
            buckets.append((bound, running))
        return cls(buckets=buckets, sum=total, count=running)

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> HistogramSnapshot:
        return cls(buckets=[(b, 0) for b in (*bounds, float("inf"))], sum=0.0, count=0)


class Counter:
    """A count many threads add to without a lock: ``next()`` on ``itertools.count`` is one C call
    under the GIL, so no increment is lost however the threads interleave (and a finalizer that
    runs in the middle of an increment only adds one of its own)."""

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def add(self) -> None:
        next(self._count)

    @property
    def value(self) -> int:
        # repr is "count(N)" with N the next value to be given: N - 1 were added.
        return int(repr(self._count)[6:-1]) - 1
