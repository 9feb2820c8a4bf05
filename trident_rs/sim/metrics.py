"""Serving metrics of one simulated run: SLO attainment, latency percentiles, goodput, utilisation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from trident_rs.sim.records import SimResult
from trident_rs.vocab import percentile


@dataclass(frozen=True)
class Metrics:
    policy: str
    requests: int  # arrived
    completed: int
    slo_attainment: float  # share of arrived requests finished by their deadline (unfinished = miss)
    mean_latency_s: float  # over completed requests
    # latency percentiles over every arrived request, one never finished (failed) counting as
    # infinitely late: a policy that cannot serve the largest requests gets no shorter tail for it
    p50_latency_s: float
    p95_latency_s: float
    p99_latency_s: float
    goodput_rps: float  # requests finished by their deadline per second of makespan
    gpu_utilisation: float  # busy GPU-seconds / (GPUs × makespan)
    makespan_s: float
    plan_changes: int
    decision_time_s: float  # wall time inside policy.schedule()
    sim_wall_s: float
    failed: int = 0  # requests that failed (launch refused for memory)
    memory_refusals: int = 0  # launches refused for memory
    schedule_calls: int = 0  # calls of policy.schedule() (decision_time_s / this = time per call)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(result: SimResult) -> Metrics:
    """Compute `Metrics` from a `SimResult`."""
    reqs = result.requests
    n = len(reqs)
    latencies = []
    met = 0
    for r in reqs:
        done = result.finish.get(r.id)
        if done is None:
            continue
        latencies.append(done - r.arrival)
        if done <= r.deadline + 1e-9:
            met += 1
    lat = np.asarray(latencies, dtype=float)
    start = min((r.arrival for r in reqs), default=0.0)
    makespan = max(result.end_time - start, 1e-9)
    unfinished = [math.inf] * (n - len(latencies))
    pct = lambda q: percentile(latencies + unfinished, q)  # noqa: E731
    return Metrics(
        policy=result.policy,
        requests=n,
        completed=len(latencies),
        slo_attainment=met / n if n else float("nan"),
        mean_latency_s=float(lat.mean()) if lat.size else float("nan"),
        p50_latency_s=pct(50),
        p95_latency_s=pct(95),
        p99_latency_s=pct(99),
        goodput_rps=met / makespan,
        gpu_utilisation=result.busy_gpu_seconds / (result.cluster.total_gpus * makespan),
        makespan_s=makespan,
        plan_changes=result.plan_changes,
        decision_time_s=result.decision_time_s,
        sim_wall_s=result.wall_time_s,
        failed=len(result.failed),
        memory_refusals=result.memory_refusals,
        schedule_calls=result.schedule_calls,
    )
