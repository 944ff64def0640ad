"""Nearest-rank percentiles, as the serving benchmarks report them: a module of its own, free of the load
generators' imports (aiohttp, redis), so that `bench generate` runs where they are not installed."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank: always one of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
