# SPDX-License-Identifier: Apache-2.0
"""Paired ratios with a confidence interval: how a benchmark says "within 2%" on a noisy machine.

Runs in the benchmarking process. Two engines measured in the same round (one
right after the other, the order alternating) share that round's machine
noise, so the per-round ratio cancels most of it; the spread of those ratios
over many rounds is what is left. The interval is a percentile bootstrap of
their geometric mean (ratios multiply, so their logs are averaged): no
normality is assumed, and a one-sided target such as "cost ≤ 1.02x" is met
only when the whole interval is below it.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class RatioCI:
    """Geometric mean of per-round ratios and its 95% bootstrap interval, over ``rounds`` rounds."""

    ratio: float
    low: float
    high: float
    rounds: int

    def verdict(self, at_most: float | None = None, at_least: float | None = None) -> str:
        """``yes`` if the whole interval meets the bound, ``no`` if none of it does, else ``not resolved``."""
        if at_most is not None:
            return "yes" if self.high <= at_most else "**no**" if self.low > at_most else "not resolved"
        assert at_least is not None
        return "yes" if self.low >= at_least else "**no**" if self.high < at_least else "not resolved"

    def __str__(self) -> str:
        return f"{self.ratio:.3f}x (95% CI {self.low:.3f}–{self.high:.3f}, {self.rounds} rounds)"


def paired_ratio_ci(numerators: list[float], denominators: list[float], resamples: int = 10_000,
                    seed: int = 0) -> RatioCI:
    """Per-round ``numerators[i] / denominators[i]``, summarised with a bootstrap interval.

    Raises:
        ValueError: fewer than two rounds, unequal lengths or a non-positive value.
    """
    if len(numerators) != len(denominators) or len(numerators) < 2:
        raise ValueError("need two or more paired rounds")
    if min(numerators + denominators) <= 0:
        raise ValueError("ratios need positive measurements")
    logs = [math.log(a / b) for a, b in zip(numerators, denominators)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    return RatioCI(math.exp(statistics.fmean(logs)), math.exp(low), math.exp(high), len(logs))
