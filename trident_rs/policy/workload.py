"""Request classes and forecasts: what the placement solver plans for.

A `RequestClass` is everything the cost model and the SLO rule key on (model, shape, steps,
SLO); a `Forecast` is an arrival rate per class. Forecasts come from a trace (CSV), from a
sliding window of arrivals (the controller), or are written by hand.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from trident_rs.errors import ConfigError
from trident_rs.policy.types import Request, Shape

if TYPE_CHECKING:  # the cost model is another module; only its methods are used here
    from trident_rs.policy.cost_model import CostModel

# Published traces by name -> (file name, model), shipped in benchmarks/data.
PAPER_WORKLOADS: dict[str, tuple[str, str]] = {
    "flux-paper": ("flux_paper_trace.csv", "flux"),
    "hunyuanvideo-paper": ("hunyuanvideo_paper_trace.csv", "hunyuanvideo"),
}
_SEARCH_DIRS = (Path("benchmarks/data"), Path(__file__).resolve().parents[2] / "benchmarks" / "data")


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
    """The authors' SLO: 1.1 * round(scale * t_best) + 2 s (shared/workloads/README.md).

    Uses `trident_rs.policy.slo.slo_seconds` when present so both agree.
    """
    try:
        from trident_rs.policy.slo import slo_seconds
    except ImportError:
        t_best = cost.stage_time(model, "diffuse", shape, width=cost.best_width(model, shape), steps=steps)
        return 1.1 * round(scale * t_best) + 2.0
    return float(slo_seconds(cost, model, shape, steps, scale=scale))


def find_trace(workload: str) -> tuple[Path, str]:
    """Path and model of a named published workload, or of a CSV path (model from the name)."""
    if workload in PAPER_WORKLOADS:
        name, model = PAPER_WORKLOADS[workload]
        for d in _SEARCH_DIRS:
            if (d / name).is_file():
                return d / name, model
        raise ConfigError(f"trace file {name} for workload {workload!r} not found in {[str(d) for d in _SEARCH_DIRS]}")
    path = Path(workload)
    if not path.is_file():
        raise ConfigError(f"unknown workload {workload!r}: not one of {sorted(PAPER_WORKLOADS)} nor a CSV file")
    model = next((m for n, m in PAPER_WORKLOADS.values() if m in path.name), "")
    if not model:
        raise ConfigError(f"cannot tell the model of {path.name}; name it like *flux*.csv or *hunyuanvideo*.csv")
    return path, model


def read_trace(path: Path) -> list[tuple[float, Shape, int]]:
    """(arrival_s, shape, steps) rows of a CSV with arrival_s,height,width,num_frames,num_inference_steps."""
    need = ("arrival_s", "height", "width", "num_frames", "num_inference_steps")
    rows: list[tuple[float, Shape, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"{path}: missing columns {missing}")
        for i, row in enumerate(reader, start=2):
            try:
                shape = Shape(int(row["height"]), int(row["width"]), int(row["num_frames"]))
                rows.append((float(row["arrival_s"]), shape, int(row["num_inference_steps"])))
            except ValueError as e:
                raise ConfigError(f"{path}:{i}: {e}") from None
    if not rows:
        raise ConfigError(f"{path}: no requests")
    return rows


def forecast_from_trace(
    rows: list[tuple[float, Shape, int]], model: str, cost: "CostModel", slo_scale: float = 4.0
) -> Forecast:
    """Average rate per (shape, steps) over the trace's span, with the paper's SLO at `slo_scale`."""
    span = max(r[0] for r in rows) - min(r[0] for r in rows)
    duration = span * len(rows) / max(len(rows) - 1, 1) if span > 0 else 1.0
    counts = Counter((shape, steps) for _, shape, steps in rows)
    return Forecast({
        RequestClass(model, shape, steps, paper_slo_s(cost, model, shape, steps, slo_scale)): n / duration
        for (shape, steps), n in sorted(counts.items())
    })
