"""`LaunchError`: how far observed launch times stray from the cost model's predictions.

The pool policy learns it online (every finished launch adds observed / predicted seconds) and
turns it into a slack factor: predictions are multiplied by `exp(mean + z * std)` of the log
ratio, z from the confidence it wants to be on time with (z = 0: the median)."""
from __future__ import annotations

import math


class LaunchError:
    """Running mean and variance of log(observed / predicted) (Welford)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, ratio: float) -> None:
        x = math.log(max(ratio, 1e-6))
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def factor(self, z: float, min_samples: int = 10) -> float:
        """The factor to multiply predictions by; 1 until `min_samples` launches are measured."""
        if self.n < min_samples:
            return 1.0
        return math.exp(self.mean + z * math.sqrt(self.m2 / (self.n - 1)))
