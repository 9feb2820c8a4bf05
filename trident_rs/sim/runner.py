"""Run named policies (from the registry) on a workload and collect their metrics.

Handles the two names that are not a single simulated policy: `static-best` (static-pipeline at
every width, the best by SLO attainment then mean latency) and `bound` (analytic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trident_rs.policy import registry
from trident_rs.policy.types import Cluster, Request
from trident_rs.sim.engine import SimConfig, simulate
from trident_rs.sim.metrics import Metrics, summarize

# policies told which models the workload serves and their shares of GPU time, as a deployment
# config would (trident uses them for its first plan, before any request has arrived)
_TAKES_MODELS = {"static-pipeline", "static-best", "static-stage", "trident"}
_TAKES_WIDTH = {"static-pipeline", "static-stage"}


@dataclass
class PolicyRun:
    """One row of a comparison: the metrics, plus what was chosen (e.g. static-best's width)."""

    name: str
    metrics: dict
    detail: dict = field(default_factory=dict)


def model_shares(requests: list[Request], cost) -> dict[str, float]:
    """Share of single-GPU diffuse GPU-seconds demanded per model (how static policies split GPUs)."""
    demand: dict[str, float] = {}
    for r in requests:
        t = cost.stage_time(r.model, "diffuse", r.shape, width=1, steps=r.steps)
        demand[r.model] = demand.get(r.model, 0.0) + t
    total = sum(demand.values()) or 1.0
    return {m: d / total for m, d in sorted(demand.items())} or {"flux": 1.0}


def _better(a: Metrics, b: Metrics | None) -> bool:
    if b is None:
        return True
    mean_a = a.mean_latency_s if not math.isnan(a.mean_latency_s) else math.inf
    mean_b = b.mean_latency_s if not math.isnan(b.mean_latency_s) else math.inf
    return (a.slo_attainment, -mean_a) > (b.slo_attainment, -mean_b)


def run_policy(name: str, requests: list[Request], cluster: Cluster, cost,
               config: SimConfig | None = None, width: int | None = None, progress=None,
               **options) -> PolicyRun | None:
    """Simulate policy `name`; None if the registry cannot build it (not installed)."""
    if registry.factory(name) is None:
        return None
    opts = dict(options)
    if name in _TAKES_MODELS:
        opts.setdefault("models", model_shares(requests, cost))
    if name in _TAKES_WIDTH and width is not None:
        opts["width"] = width
    if name in registry.ANALYTIC:
        bound = registry.make_policy(name, cluster, cost, **opts).evaluate(requests)
        lat = sorted(bound.alone_latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan  # noqa: E731
        return PolicyRun(name, {
            "slo_attainment": bound.attainment, "mean_latency_s": sum(lat) / max(len(lat), 1),
            "p50_latency_s": pct(0.50), "p95_latency_s": pct(0.95), "p99_latency_s": pct(0.99),
            "requests": len(requests), "completed": len(requests), "gpu_utilisation": math.nan,
        }, {"alone_attainment": bound.alone_attainment, "fluid_attainment": bound.fluid_attainment})
    if name in registry.SWEPT:
        best, best_w, per_width = None, None, {}
        for w in registry.STATIC_BEST_WIDTHS:
            if w > cluster.gpus_per_node:
                continue
            policy = registry.make_policy("static-pipeline", cluster, cost, **{**opts, "width": w})
            m = summarize(simulate(cluster, policy, cost, requests, config, progress))
            per_width[w] = m.slo_attainment
            if _better(m, best):
                best, best_w = m, w
        return PolicyRun(name, best.to_dict(), {"width": best_w, "attainment_by_width": per_width})
    policy = registry.make_policy(name, cluster, cost, **opts)
    m = summarize(simulate(cluster, policy, cost, requests, config, progress))
    return PolicyRun(name, m.to_dict(), {"width": width} if width else {})


def expand(names: list[str]) -> list[str]:
    """`all` -> every registered policy name."""
    out: list[str] = []
    for n in names:
        out.extend(registry.policy_names() if n == "all" else [n])
    return list(dict.fromkeys(out))
