"""Statistics: spreads, a distribution-free confidence interval for a median, the rounds of one
(workload, loop kind, variant) (``Cell``), and a variant compared with another of the same
workload and loop kind, as a ratio and in ns per operation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .workloads import Workload


def spread(values: Sequence[float]) -> tuple[float, float, str]:
    """The interquartile range with 5 values or more, else min-max; and which one it is."""
    if len(values) >= 5:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, q3, "IQR"
    return min(values), max(values), "min-max"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median (from the sign test): the k-th
    smallest and k-th largest values, k as large as keeps the coverage at ``level`` or above.
    Returns (low, high, coverage); with few values the coverage is lower (3 values: 75%)."""
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) < k)
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


@dataclass(slots=True)
class Cell:
    """All rounds of one (workload, loop kind, variant)."""

    workload: str
    loop: str
    variant: str
    values: list[float] = field(default_factory=list)  # one per round, in round order
    # Wake-ups per second of the watchdog (or control) thread, one per round; None without one.
    wakes: list[float | None] = field(default_factory=list)
    # Every timed run of each round's process, from which ``values`` was taken.
    runs: list[list[float]] = field(default_factory=list)
    # HTTP workloads: wrk's latency percentiles (ms) of the run ``values`` was taken from.
    latency: list[dict[str, float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A variant against the baseline of the same workload and loop kind."""

    ratio: float  # variant median / baseline median, in the workload's own unit
    overhead: float  # extra time per operation that ratio means, percent (> 0: slower)
    # The overhead within each round (the variant against the baseline run next to it in time):
    # its median and a confidence interval for that median.
    paired: float
    ci_low: float
    ci_high: float
    ci_level: float


def compare(workload: Workload, cell: Cell, base: Cell) -> Comparison:
    paired = [
        (workload.cost_ratio(v, b) - 1.0) * 100.0
        for v, b in zip(cell.values, base.values, strict=True)
    ]
    low, high, level = median_interval(paired)
    return Comparison(
        ratio=cell.median / base.median,
        overhead=(workload.cost_ratio(cell.median, base.median) - 1.0) * 100.0,
        paired=statistics.median(paired),
        ci_low=low,
        ci_high=high,
        ci_level=level,
    )


@dataclass(frozen=True, slots=True)
class Added:
    """Nanoseconds per operation a variant adds to another (the reference): what one task step,
    task creation or round trip costs more."""

    ns: float  # difference of the two medians, each in ns per operation
    # The difference within each round (the two runs next to each other in time): its median
    # and a confidence interval for that median.
    paired: float
    ci_low: float
    ci_high: float
    ci_level: float


def added_ns(workload: Workload, cell: Cell, base: Cell) -> Added:
    paired = [
        workload.ns_per_op(v) - workload.ns_per_op(b)
        for v, b in zip(cell.values, base.values, strict=True)
    ]
    low, high, level = median_interval(paired)
    return Added(
        ns=workload.ns_per_op(cell.median) - workload.ns_per_op(base.median),
        paired=statistics.median(paired),
        ci_low=low,
        ci_high=high,
        ci_level=level,
    )
