"""Workloads for the simulator: published traces, a real arrival trace with drawn shapes,
synthetic Poisson/Gamma arrivals, and a mix that shifts mid-run. The files are read by
`trident_rs.policy.traces` (shared with the policy layer's forecasts).

`load_workload(name_or_path, ...)` returns `Request`s with deadlines from the paper's SLO rule
(`trident_rs.policy.slo`), scaled by `slo_scale`. Names are listed in `WORKLOADS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trident_rs.errors import ConfigError
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.traces import TraceRow, azure_arrivals, read_named_trace, read_trace
from trident_rs.policy.types import Request, Shape

# The paper's request mixes (uniform over shapes), with their steps and trace rates.
FLUX_SHAPES = tuple(Shape(s, s) for s in (128, 256, 512, 1024, 2048))
HUNYUAN_SHAPES = tuple(Shape(h, w, f) for h, w in ((720, 1280), (960, 544)) for f in (17, 33, 65, 129))
FLUX_STEPS, HUNYUAN_STEPS = 28, 50


@dataclass(frozen=True)
class MixEntry:
    model: str
    shape: Shape
    steps: int
    weight: float = 1.0


def _uniform(model: str, shapes: tuple[Shape, ...], steps: int, weight: float = 1.0) -> tuple[MixEntry, ...]:
    return tuple(MixEntry(model, s, steps, weight / len(shapes)) for s in shapes)


MIXES: dict[str, tuple[MixEntry, ...]] = {
    "flux": _uniform("flux", FLUX_SHAPES, FLUX_STEPS),
    "hunyuanvideo": _uniform("hunyuanvideo", HUNYUAN_SHAPES, HUNYUAN_STEPS),
    "mixed": _uniform("flux", FLUX_SHAPES, FLUX_STEPS, 0.8) + _uniform("hunyuanvideo", HUNYUAN_SHAPES, HUNYUAN_STEPS, 0.2),
    "flux-small": _uniform("flux", FLUX_SHAPES[:3], FLUX_STEPS),
    "flux-large": _uniform("flux", FLUX_SHAPES[3:], FLUX_STEPS),
}


@dataclass(frozen=True)
class WorkloadSpec:
    """A named workload: where arrivals come from, which mix the shapes come from."""

    arrivals: str  # "csv" (a published trace of the same name) | "azure" | "poisson" | "gamma"
    mix: str = ""  # MIXES key ("" for csv traces, whose shapes are in the file)
    rate: float = 1.0  # mean requests/s before rate_scale
    cv: float = 1.0  # coefficient of variation of gaps (gamma)
    duration: float = 1800.0  # seconds (synthetic arrivals)
    shift_to: str = ""  # a second mix for the second half of the run


WORKLOADS: dict[str, WorkloadSpec] = {
    "flux-paper": WorkloadSpec("csv", rate=1.5),
    "hunyuanvideo-paper": WorkloadSpec("csv", rate=1.0),
    "azure-flux": WorkloadSpec("azure", "flux", rate=1.5),
    "azure-hunyuanvideo": WorkloadSpec("azure", "hunyuanvideo", rate=1.0),
    "azure-mixed": WorkloadSpec("azure", "mixed", rate=1.0),
    "poisson-flux": WorkloadSpec("poisson", "flux", rate=1.5),
    "gamma-flux": WorkloadSpec("gamma", "flux", rate=1.5, cv=4.0),
    "poisson-hunyuanvideo": WorkloadSpec("poisson", "hunyuanvideo", rate=1.0),
    "shift-flux": WorkloadSpec("poisson", "flux-small", rate=1.5, shift_to="flux-large"),
}


def workload_names() -> list[str]:
    return sorted(WORKLOADS)


def synthetic_arrivals(kind: str, rate: float, duration: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (exponential gaps) or Gamma gaps with coefficient of variation `cv`, mean 1/rate."""
    n = int(rate * duration * 1.2 + 20)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        k = 1.0 / (cv * cv)
        gaps = rng.gamma(k, 1.0 / (rate * k), n)
    else:
        raise ConfigError(f"unknown arrival process {kind!r}")
    t = np.cumsum(gaps) - gaps[0]
    while t[-1] < duration:  # rare: draw more
        more = synthetic_arrivals(kind, rate, duration, cv, rng)
        t = np.concatenate([t, t[-1] + gaps.mean() + more])
    return t[t < duration]


def _draw(mix: tuple[MixEntry, ...], keys: np.ndarray, seed: int) -> list[MixEntry]:
    """Deterministic draw of one mix entry per request, seeded by `seed` and the per-request keys."""
    w = np.asarray([e.weight for e in mix], dtype=float)
    cdf = np.cumsum(w / w.sum())
    u = np.random.default_rng([seed, len(keys)]).random(len(keys))
    u = np.modf(u + (keys % 1_000_003) / 1_000_003.0)[0]  # the token counts perturb the draw
    return [mix[min(int(i), len(mix) - 1)] for i in np.searchsorted(cdf, u, side="right")]


def _rows_for(name: str, spec: WorkloadSpec, seed: int) -> list[TraceRow]:
    if spec.arrivals == "csv":
        return read_named_trace(name)
    rng = np.random.default_rng(seed)
    if spec.arrivals == "azure":
        times, keys = azure_arrivals()
        times = times * (len(times) / max(times[-1], 1e-9)) / spec.rate  # mean rate -> spec.rate
    else:
        times = synthetic_arrivals(spec.arrivals, spec.rate, spec.duration, spec.cv, rng)
        keys = rng.integers(0, 2**31, len(times))
    entries = _draw(MIXES[spec.mix], keys, seed)
    if spec.shift_to:  # second half of the run draws from the second mix
        half = len(times) // 2
        entries = entries[:half] + _draw(MIXES[spec.shift_to], keys[half:], seed + 1)
    return [TraceRow(float(t), e.model, e.shape, e.steps) for t, e in zip(times, entries)]


def load_workload(name_or_path: str, model: str | None = None, rate_scale: float = 1.0,
                  duration: float | None = None, steps: int | None = None, slo_scale: float = 4.0,
                  seed: int = 0, cost=None) -> list[Request]:
    """Requests of a named workload (see `WORKLOADS`) or of a CSV file (`model` required).

    `rate_scale` multiplies the arrival rate (divides times), `duration` cuts the scaled trace,
    `steps` overrides every request's steps, `slo_scale` is the multiplier of the SLO rule.
    """
    if name_or_path in WORKLOADS:
        spec = WORKLOADS[name_or_path]
        rows = _rows_for(name_or_path, spec, seed)
        label = name_or_path
    elif Path(name_or_path).exists():
        if not model:
            raise ConfigError(f"workload file {name_or_path}: pass the model name (--model)")
        rows = read_trace(name_or_path, model)
        label = Path(name_or_path).stem
    else:
        raise ConfigError(f"unknown workload {name_or_path!r}; known: {', '.join(workload_names())} or a CSV path")
    if model:
        rows = [TraceRow(r.arrival, model, r.shape, r.steps) for r in rows]
    if not rate_scale > 0:
        raise ConfigError(f"rate scale must be > 0, got {rate_scale}")
    if cost is None:
        from trident_rs.policy.cost_model import CostModel
        cost = CostModel.default()
    slo_cache: dict[tuple, float] = {}
    t0 = min((r.arrival for r in rows), default=0.0)
    out = []
    for i, r in enumerate(sorted(rows, key=lambda r: r.arrival)):
        arrival = (r.arrival - t0) / rate_scale
        if duration is not None and arrival >= duration:
            break
        n_steps = steps or r.steps
        key = (r.model, r.shape, n_steps)
        if key not in slo_cache:
            slo_cache[key] = float(slo_seconds(cost, r.model, r.shape, n_steps, scale=slo_scale))
        out.append(Request(f"{label}-{i}", r.model, r.shape, n_steps, arrival, arrival + slo_cache[key]))
    return out


def describe(requests: list[Request]) -> str:
    """One line: count, span, rate."""
    if not requests:
        return "0 requests"
    span = requests[-1].arrival - requests[0].arrival
    rate = len(requests) / span if span > 0 else math.inf
    return f"{len(requests)} requests over {span:.0f} s ({rate:.2f} req/s)"
