"""Run named policies (from the registry) on a workload and collect their metrics.

Handles the names that are not a single simulated policy: `static-best` (every static variant,
FCFS and EDF, pipeline and stage, at every width; the best by SLO attainment then mean
latency), `static-best-fcfs` (the best FCFS static-pipeline width) and `bound` (analytic).

No policy gets the future: the static policies and trident's first plan are told each model's
share of GPU time from `history` (past traffic of the same service, e.g. the previous day) or,
without one, equal shares of the models served (a prior). Never from the requests being run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trident_rs.policy import registry
from trident_rs.policy.types import Cluster, Request
from trident_rs.sim import SimConfig, SimResult, simulate
from trident_rs.sim.metrics import summarize
from trident_rs.vocab import percentile

# policies told which models the workload serves and their shares of GPU time, as a deployment
# config would (trident uses them for its first plan, before any request has arrived)
_TAKES_MODELS = {"static-pipeline", "static-best", "static-best-fcfs", "static-stage", "trident"}
_TAKES_WIDTH = {"static-pipeline", "static-stage"}


@dataclass
class PolicyRun:
    """One row of a comparison: the metrics, plus what was chosen (e.g. static-best's width)."""

    name: str
    metrics: dict
    detail: dict = field(default_factory=dict)
    result: SimResult | None = None  # the simulation (per-request timelines), when one ran


def model_shares(requests: list[Request], cost) -> dict[str, float]:
    """Share of single-GPU diffuse GPU-seconds demanded per model in `requests` (past traffic)."""
    demand: dict[str, float] = {}
    for r in requests:
        t = cost.stage_time(r.model, "diffuse", r.shape, width=1, steps=r.steps)
        demand[r.model] = demand.get(r.model, 0.0) + t
    total = sum(demand.values()) or 1.0
    return {m: d / total for m, d in sorted(demand.items())} or {"flux": 1.0}


def prior_shares(requests: list[Request]) -> dict[str, float]:
    """Equal shares of the models served (which models a deployment serves is its config)."""
    models = sorted({r.model for r in requests}) or ["flux"]
    return {m: 1.0 / len(models) for m in models}


def rank(metrics: dict) -> tuple[float, float]:
    """How static variants are compared: SLO attainment, then lower mean latency."""
    mean = metrics["mean_latency_s"]
    return metrics["slo_attainment"], -(mean if not math.isnan(mean) else math.inf)


def static_variants(name: str, cluster: Cluster) -> list[tuple[str, str, int]]:
    """(policy, order, width) triples that the swept name `name` runs."""
    variants = registry.STATIC_VARIANTS if name == "static-best" else (("static-pipeline", "fcfs"),)
    return [(p, o, w) for p, o in variants for w in registry.STATIC_BEST_WIDTHS if w <= cluster.gpus_per_node]


def run_policy(name: str, requests: list[Request], cluster: Cluster, cost,
               config: SimConfig | None = None, width: int | None = None, progress=None,
               history: list[Request] | None = None, keep_result: bool = False,
               **options) -> PolicyRun | None:
    """Simulate policy `name`; None if the registry cannot build it (not installed)."""
    if registry.factory(name) is None:
        return None
    opts = dict(options)
    if name in _TAKES_MODELS:
        opts.setdefault("models", model_shares(history, cost) if history else prior_shares(requests))
    if name in _TAKES_WIDTH and width is not None:
        opts["width"] = width
    if name in registry.ANALYTIC:
        bound = registry.make_policy(name, cluster, cost, **opts).evaluate(requests)
        lat = sorted(bound.alone_latencies)  # sorted: the mean sums in the same order as before
        pct = lambda q: percentile(lat, 100 * q)  # noqa: E731
        return PolicyRun(name, {
            "slo_attainment": bound.attainment, "mean_latency_s": sum(lat) / max(len(lat), 1),
            "p50_latency_s": pct(0.50), "p95_latency_s": pct(0.95), "p99_latency_s": pct(0.99),
            "requests": len(requests), "completed": len(requests), "gpu_utilisation": math.nan,
        }, {"alone_attainment": bound.alone_attainment, "fluid_attainment": bound.fluid_attainment,
            "energetic_attainment": bound.energetic_attainment,
            "time_indexed_attainment": bound.time_indexed_attainment})
    if name in registry.SWEPT:
        best, best_key, best_res, by_variant, metrics = None, None, None, {}, {}
        for policy_name, order, w in static_variants(name, cluster):
            try:
                policy = registry.make_policy(policy_name, cluster, cost, **{**opts, "width": w, "order": order})
            except ValueError:  # e.g. static-stage with no room for a diffuse group of this width
                continue
            res = simulate(cluster, policy, cost, requests, config, progress)
            m = summarize(res).to_dict()
            by_variant[policy.name] = m["slo_attainment"]
            metrics[policy.name] = m
            if best is None or rank(m) > rank(best):
                best, best_key, best_res = m, (policy.name, w, order), res
        detail = {"variant": best_key[0], "width": best_key[1], "order": best_key[2], "attainment_by_variant": by_variant,
                  "metrics_by_variant": metrics}
        return PolicyRun(name, best, detail, best_res if keep_result else None)
    policy = registry.make_policy(name, cluster, cost, **opts)
    res = simulate(cluster, policy, cost, requests, config, progress)
    m = summarize(res)
    return PolicyRun(name, m.to_dict(), {"width": width} if width else {}, res if keep_result else None)


def best_of(metrics_by_variant: dict[str, dict], names) -> tuple[str, dict]:
    """The best (by `rank`) of the named variants' metrics."""
    present = [n for n in names if n in metrics_by_variant]
    if not present:
        return None, {}
    name = max(present, key=lambda n: rank(metrics_by_variant[n]))
    return name, metrics_by_variant[name]


def expand(names: list[str]) -> list[str]:
    """`all` -> every registered policy name (static-pipeline needs a width: not in `all`)."""
    out: list[str] = []
    for n in names:
        out.extend([p for p in registry.policy_names() if p != "static-pipeline"] if n == "all" else [n])
    return list(dict.fromkeys(out))
