"""Asynchronous successive-halving rungs, pure bookkeeping (no Ray).

Reproduces the rung and cutoff rules of Ray Tune's ``AsyncHyperBandScheduler`` bracket, so
that PostHocASHA decides as stock ASHA does on the same values, with two differences: the
unit is an *arm* (a trial, or a seed group), and a NaN value ranks worst (Ray's comparison
lets NaN pass every cutoff). Scores are "higher is better" (the caller negates for ``min``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Bracket:
    """One ASHA bracket: rungs at ``grace_period * reduction_factor ** (k + s)``."""

    grace_period: float
    max_t: float
    reduction_factor: float
    s: int
    stop_last_trials: bool = True
    milestones: list[float] = field(init=False)
    recorded: list[dict[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        rf = self.reduction_factor
        n_rungs = int(np.log(self.max_t / self.grace_period) / np.log(rf) - self.s + 1)
        self.milestones = [self.grace_period * rf ** (k + self.s) for k in range(n_rungs)]
        self.recorded = [{} for _ in self.milestones]

    def next_rung(self, arm: str, t: float) -> int | None:
        """The rung an arm at time ``t`` is judged at now, or None.

        As in Ray: the highest milestone <= t the arm has no value at; a later result fills the
        next lower unfilled rung. With ``stop_last_trials=False`` an arm that already has a
        value at the highest milestone <= t is not judged again.
        """
        for i in reversed(range(len(self.milestones))):
            milestone, recorded = self.milestones[i], self.recorded[i]
            if t >= milestone and arm in recorded and not self.stop_last_trials:
                return None
            if t < milestone or arm in recorded:
                continue
            return i
        return None

    def cutoff(self, rung: int) -> float | None:
        """The ``(1 - 1/rf)`` quantile of the finite values recorded at a rung; None if none."""
        values = [v for v in self.recorded[rung].values() if not math.isnan(v)]
        if not values:
            return None
        return _percentile(values, (1 - 1 / self.reduction_factor) * 100)

    def record(self, arm: str, rung: int, score: float) -> tuple[bool, float | None]:
        """Judge ``score`` against the rung's cutoff, then record it; returns (stop, cutoff).

        The first arm at a rung always passes. A NaN score stops whenever the rung has a
        finite value to compare with (NaN ranks worst).
        """
        cutoff = self.cutoff(rung)
        stop = cutoff is not None and (math.isnan(score) or score < cutoff)
        self.recorded[rung][arm] = score
        return stop, cutoff


def _percentile(values: list[float], q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation, as Ray's cutoff), also where a
    neighbour is infinite: numpy's interpolation gives NaN between a finite value and +-inf
    (inf - inf), which would let every arm pass; the infinite neighbour is the limit there."""
    x = sorted(values)
    pos = q / 100 * (len(x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(x) - 1)
    a, b = x[lo], x[hi]
    if math.isfinite(a) and math.isfinite(b):
        return float(np.percentile(values, q))
    if pos == lo or a == b:
        return a
    return a if a == -math.inf else b
