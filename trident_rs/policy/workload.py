"""Request classes and forecasts: what the placement solver plans for.

A `RequestClass` is everything the cost model and the SLO rule key on (model, shape, steps,
SLO); a `Forecast` is an arrival rate per class. Forecasts come from a trace (read by
`trident_rs.policy.traces`), from a sliding window of arrivals (the controller), or are
written by hand.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from trident_rs.errors import ConfigError
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.traces import TraceRow
from trident_rs.policy.types import STAGES, Request, Shape

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


def prior_forecast(cost: "CostModel", models: Mapping[str, float], total_gpus: int, gpus_per_node: int,
                   gpu_memory_gb: float, slo_scale: float = 4.0, utilization: float = 0.85,
                   steps: Mapping[str, int] | None = None) -> Forecast:
    """What to plan for before any request has arrived: every shape the cost model has
    profiled for each of `models` (that fits a node), at the model's default steps and the
    paper's SLO, each taking an equal share of its model's GPU time. `models` maps a model to its share of the GPU
    time (the runtime's deployment config, or the simulator's workload); the rates fill
    `utilization` of `total_gpus`, each class costed at its efficient width (the widest with
    parallel efficiency >= 0.8). The plan built from it covers every class the cost model
    knows, so the first arrivals find groups ready; the controller replaces it as soon as it
    has seen a window of real arrivals.
    """
    from trident_rs.models.spec import REGISTRY  # default steps per model

    total_share = sum(v for v in models.values() if v > 0)
    if total_share <= 0:
        raise ConfigError(f"prior forecast needs a positive share for some model, got {dict(models)}")
    rates: dict[RequestClass, float] = {}
    for model, share in sorted(models.items()):
        if share <= 0:
            continue
        n_steps = (steps or {}).get(model) or (REGISTRY[model].default_steps if model in REGISTRY else 1)
        classes: list[RequestClass] = []
        gpu_s: list[float] = []  # GPU-seconds of one request of each class
        for shape in cost.shapes(model):
            need = {st: cost.min_width(model, st, shape, gpu_memory_gb) for st in STAGES}
            if max(need.values()) > gpus_per_node:
                continue
            need["diffuse"] = max(need["diffuse"], min(cost.best_width(model, shape), gpus_per_node))
            gpu_s.append(sum(w * cost.stage_time(model, st, shape, w, 1, n_steps) for st, w in need.items()))
            classes.append(RequestClass(model, shape, n_steps, paper_slo_s(cost, model, shape, n_steps, slo_scale)))
        if not classes:
            raise ConfigError(f"prior forecast: the cost model has no shape of {model!r} that fits a node")
        # every class gets an equal share of the model's GPU time (not an equal share of its
        # requests: a 4096² image costs 700 128² ones, and a prior that expects them as often
        # would plan most of the cluster for the rarest, costliest shapes)
        budget = (share / total_share) * utilization * total_gpus / len(classes)
        rates.update({c: budget / max(g, 1e-9) for c, g in zip(classes, gpu_s)})
    return Forecast(rates)
