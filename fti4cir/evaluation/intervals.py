"""How precise a measured number is: 95% intervals for an accuracy and for a difference between two methods.

Both describe the sampling of *these* photos or queries, nothing more: another set of photos of the same world (the
validation split, say) can move a number by more than its interval, because the photos themselves differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion (stays inside [0, 1] and is sound for small counts)."""
    if trials <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def describe(bounds: tuple[float, float]) -> str:
    """An interval of a proportion as the reports write it: "95% interval 63.4%-72.8%"."""
    return f"{LEVEL:.0%} interval {bounds[0]:.1%}-{bounds[1]:.1%}"


@dataclass(frozen=True)
class Difference:
    """`better - other` of a per-query metric's mean, with a paired-bootstrap interval."""

    better: str
    other: str
    metric: str
    difference: float
    low: float
    high: float
    queries: int
    resamples: int
    level: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    a, b, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, chunk: int = 1000
) -> tuple[float, float, float]:
    """mean(a - b) and its percentile interval, resampling queries with replacement (the same queries for both
    methods, so what the two share cancels)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError("paired values must be two 1-D sequences of the same, non-zero length")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            diff[rng.integers(0, diff.size, size=(min(chunk, resamples - start), diff.size))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def compare(
    per_query: dict[str, list[float]],
    pairs: list[tuple[str, str]],
    metric: str,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[Difference]:
    """A `Difference` for each (better, other) pair of methods, from their per-query values of `metric`."""
    out = []
    for better, other in pairs:
        a, b = per_query[better], per_query[other]
        if len(a) != len(b):
            raise ValueError(f"{better} has {len(a)} queries, {other} {len(b)}: not paired")
        difference, low, high = paired_bootstrap(a, b, resamples=resamples, level=level, seed=seed)
        out.append(Difference(better, other, metric, difference, low, high, len(a), resamples, level))
    return out
