"""Request classes and forecasts: what the placement solver plans for.

A `RequestClass` is everything the cost model and the SLO rule key on (model, shape, steps,
SLO); a `Forecast` is an arrival rate per class. Forecasts come from a trace (read by
`trident_rs.policy.traces`), from a sliding window of arrivals (the controller), or are
written by hand.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from trident_rs.errors import ConfigError
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.traces import TraceRow
from trident_rs.policy.types import Request, Shape

if TYPE_CHECKING:  # the cost model is another module; only its methods are used here
    from trident_rs.policy.cost_model import CostModel


@dataclass(frozen=True, order=True)
class RequestClass:
    """Requests the policy treats alike: same model, shape and steps, and the same SLO."""

    model: str
    shape: Shape
    steps: int
    slo_s: float

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"request class {self.model} {self.shape.key}: steps must be >= 1")
        if not self.slo_s > 0:
            raise ConfigError(f"request class {self.model} {self.shape.key}: SLO must be > 0 s")

    @property
    def key(self) -> tuple[str, Shape, int]:
        """Identity without the SLO (SLOs of one shape may differ slightly per request)."""
        return (self.model, self.shape, self.steps)

    @classmethod
    def of(cls, request: Request) -> "RequestClass":
        return cls(request.model, request.shape, request.steps, max(request.slo_s, 1e-6))


@dataclass(frozen=True)
class Forecast:
    """Arrival rate (requests/s) per request class."""

    rates: dict[RequestClass, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c, r in self.rates.items():
            if not (r >= 0):
                raise ConfigError(f"forecast rate for {c.model} {c.shape.key} must be >= 0, got {r}")

    @property
    def total_rate(self) -> float:
        return sum(self.rates.values())

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({c.model for c in self.rates}))

    def mix(self) -> dict[tuple[str, Shape, int], float]:
        """Share of arrivals per class key (sums to 1; empty forecast -> empty mix)."""
        total = self.total_rate
        out: dict[tuple[str, Shape, int], float] = {}
        if total <= 0:
            return out
        for c, r in self.rates.items():
            out[c.key] = out.get(c.key, 0.0) + r / total
        return out

    def scaled(self, factor: float) -> "Forecast":
        return Forecast({c: r * factor for c, r in self.rates.items()})

    @classmethod
    def from_requests(cls, requests: Iterable[Request], window_s: float) -> "Forecast":
        """Rates observed over `window_s` seconds; a class's SLO is the median of its requests'."""
        if window_s <= 0:
            raise ConfigError(f"forecast window must be > 0 s, got {window_s}")
        slos: dict[tuple[str, Shape, int], list[float]] = {}
        for r in requests:
            slos.setdefault((r.model, r.shape, r.steps), []).append(r.slo_s)
        rates: dict[RequestClass, float] = {}
        for (model, shape, steps), values in sorted(slos.items()):
            values.sort()
            rc = RequestClass(model, shape, steps, max(values[len(values) // 2], 1e-6))
            rates[rc] = len(values) / window_s
        return cls(rates)


def paper_slo_s(cost: "CostModel", model: str, shape: Shape, steps: int, scale: float = 4.0) -> float:
    """The authors' SLO: 1.1 * round(scale * t_best) + 2 s (`trident_rs.policy.slo`)."""
    return float(slo_seconds(cost, model, shape, steps, scale=scale))


def forecast_from_trace(rows: Sequence[TraceRow], cost: "CostModel", slo_scale: float = 4.0) -> Forecast:
    """Average rate per (model, shape, steps) over the trace's span, with the paper's SLO at `slo_scale`."""
    if not rows:
        raise ConfigError("cannot forecast from an empty trace")
    first, last = min(r.arrival for r in rows), max(r.arrival for r in rows)
    span = last - first
    duration = span * len(rows) / max(len(rows) - 1, 1) if span > 0 else 1.0
    counts = Counter((r.model, r.shape, r.steps) for r in rows)
    return Forecast({
        RequestClass(model, shape, steps, paper_slo_s(cost, model, shape, steps, slo_scale)): n / duration
        for (model, shape, steps), n in sorted(counts.items())
    })
