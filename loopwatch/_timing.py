"""Per-coroutine timing (placeholder until step timing lands): the histograms exporters read."""

from __future__ import annotations

from ._metrics import HistogramSnapshot


def histograms() -> tuple[dict[str, HistogramSnapshot], dict[str, HistogramSnapshot]]:
    """(wall time per coroutine label, busy time per coroutine label)."""
    return {}, {}
