"""A monotone curve y(tokens) through profiled points: exact at the points, fitted between.

The form (chosen on the shipped L20 table; see benchmarks/cost_model_fit.py):

    fit(T)  = c0 + c1*T + c2*T**2,  c >= 0          (fixed cost + linear layers + attention)
    y(T)    = fit(T) * r(T)

where the coefficients minimise the *relative* squared error (rows weighted by 1/y), and
r(T) = y_i / fit(T_i) at each profiled token count, interpolated linearly in log T between
them and held constant beyond them. So the curve passes through every point, follows the
quadratic's curvature between points, and extrapolates as the quadratic scaled to the nearest
end point. Between points it is additionally bounded below by the running maximum of the
points, which makes it non-decreasing in T even where the data dips (a quadratic with
non-negative coefficients times a power of T is decreasing-then-increasing, so the max with a
constant stays monotone). Pure numpy.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, for a handful of columns (exact, by active sets)."""
    n = a.shape[1]
    best, best_err = np.zeros(n), float(np.sum(b**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x_sub, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(n)
            x[list(cols)] = x_sub
            err = float(np.sum((a @ x - b) ** 2))
            if err < best_err - 1e-15 * max(1.0, best_err):
                best, best_err = x, err
    return best


@dataclass(frozen=True)
class TokenCurve:
    """y as a non-decreasing function of token count, built by `TokenCurve.fit`."""

    coef: tuple[float, float, float]  # c0, c1, c2 of the quadratic
    knots: tuple[float, ...]  # distinct token counts, ascending
    log_ratio: tuple[float, ...]  # log(y_i / fit(T_i)) at each knot
    envelope: tuple[float, ...]  # running max of the curve's value at the knots

    @classmethod
    def fit(cls, tokens: list[float] | np.ndarray, values: list[float] | np.ndarray) -> "TokenCurve":
        """Fit through (tokens, value) pairs; repeated token counts are merged (geometric mean).

        One distinct point: y proportional to T. Two: c0 + c1*T. Three or more: the quadratic.
        """
        t = np.asarray(tokens, dtype=float)
        y = np.asarray(values, dtype=float)
        if t.size == 0 or t.shape != y.shape or np.any(t <= 0) or np.any(y <= 0):
            raise ValueError("TokenCurve.fit needs matching, positive tokens and values")
        knots, inverse = np.unique(t, return_inverse=True)
        log_y = np.bincount(inverse, weights=np.log(y)) / np.bincount(inverse)
        y_k = np.exp(log_y)
        if knots.size == 1:
            coef = np.array([0.0, y_k[0] / knots[0], 0.0])
        else:
            degree = 2 if knots.size >= 3 else 1
            design = np.vander(knots, degree + 1, increasing=True) / y_k[:, None]  # relative error
            coef = np.zeros(3)
            coef[: degree + 1] = nonnegative_lstsq(design, np.ones_like(knots))
            if not np.any(coef > 0):  # degenerate: fall back to proportional
                coef = np.array([0.0, float(np.mean(y_k / knots)), 0.0])
        base = coef[0] + coef[1] * knots + coef[2] * knots**2
        log_ratio = log_y - np.log(base)
        envelope = np.maximum.accumulate(y_k)
        return cls(tuple(float(c) for c in coef), tuple(knots), tuple(log_ratio), tuple(envelope))

    def base(self, tokens: float) -> float:
        """The fitted quadratic alone (no correction through the points)."""
        c0, c1, c2 = self.coef
        return c0 + c1 * tokens + c2 * tokens * tokens

    @property
    def is_constant(self) -> bool:
        """True when the data showed no dependence on size (only a fixed cost was fitted)."""
        return self.coef[1] == 0.0 and self.coef[2] == 0.0

    def __call__(self, tokens: float) -> float:
        knots = self.knots
        if tokens <= knots[0]:
            return self.base(tokens) * float(np.exp(self.log_ratio[0]))
        if tokens >= knots[-1]:
            return max(self.base(tokens) * float(np.exp(self.log_ratio[-1])), self.envelope[-1])
        i = int(np.searchsorted(knots, tokens, side="right")) - 1
        frac = (np.log(tokens) - np.log(knots[i])) / (np.log(knots[i + 1]) - np.log(knots[i]))
        log_r = self.log_ratio[i] + frac * (self.log_ratio[i + 1] - self.log_ratio[i])
        return max(self.base(tokens) * float(np.exp(log_r)), self.envelope[i])
