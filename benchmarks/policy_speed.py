"""Policy-layer speed: placement solve time by cluster size, dispatcher decision time by queue length.

    .venv/bin/python benchmarks/policy_speed.py            # prints a table, writes benchmarks/results/policy_speed.json
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.dispatcher import Dispatcher
from trident_rs.policy.solver import PlacementSolver
from trident_rs.policy.types import Cluster, Request
from trident_rs.policy.traces import read_named_trace
from trident_rs.policy.workload import Forecast, forecast_from_trace

OUT = Path(__file__).parent / "results" / "policy_speed.json"


def forecasts(cost) -> Forecast:
    """Both paper traces' class mixes together (13 classes, 2 models)."""
    rates = {}
    for name in ("flux-paper", "hunyuanvideo-paper"):
        rates.update(forecast_from_trace(read_named_trace(name), cost).rates)
    return Forecast(rates)


def solver_times(cost, forecast, gpus_list=(8, 64, 128, 512, 1024), repeats=3) -> list[dict]:
    rows = []
    for gpus in gpus_list:
        cluster = Cluster(gpus // 8, 8)
        f = forecast.scaled(gpus / 128)
        walls, plan = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            plan = PlacementSolver(cluster, cost, time_limit_s=0.5).solve(f, plan)
            walls.append(time.perf_counter() - start)
        rows.append({"gpus": gpus, "solve_s_median": statistics.median(walls), "solve_s_max": max(walls),
                     "status": plan.stats["status"], "groups": len(plan.groups),
                     "predicted_attainment": plan.predicted_attainment})
    return rows


def dispatch_times(cost, forecast, queued_list=(10, 100, 1000), calls=300) -> list[dict]:
    cluster = Cluster(16, 8)
    plan = PlacementSolver(cluster, cost).solve(forecast)
    free = {n: frozenset(range(8)) for n in range(cluster.nodes)}
    classes = sorted(forecast.rates)
    rows = []
    for queued in queued_list:
        samples = []
        warm = Dispatcher(cost)  # cost lookups are cached across calls in a running dispatcher
        for call in range(calls):
            d = Dispatcher(cost)
            d._times, d._min_width, d._best_batch = warm._times, warm._min_width, warm._best_batch
            for i in range(queued):
                c = classes[(i * 7 + call) % len(classes)]
                arrival = i * 0.01
                d.add(Request(f"r{i}", c.model, c.shape, c.steps, arrival, arrival + c.slo_s),
                      ("encode", "diffuse", "decode")[i % 3])
            # a typical event: one group of each kind is free
            free_groups, seen = [], set()
            for g in plan.groups:
                if (g.model, g.stages, g.width) not in seen:
                    seen.add((g.model, g.stages, g.width))
                    free_groups.append(g)
            start = time.perf_counter()
            d.dispatch(10.0, free_groups, free)
            samples.append(time.perf_counter() - start)
        samples.sort()
        rows.append({"queued": queued, "p50_ms": 1e3 * samples[len(samples) // 2],
                     "p99_ms": 1e3 * samples[int(0.99 * (len(samples) - 1))], "calls": calls,
                     "free_groups": len(plan.groups)})
    return rows


def main() -> None:
    cost = CostModel.default()
    forecast = forecasts(cost)
    solver = solver_times(cost, forecast)
    dispatch = dispatch_times(cost, forecast)
    print(f"{'GPUs':>6} {'solve median s':>15} {'max s':>8} {'status':>9} {'groups':>7} {'pred. att.':>10}")
    for r in solver:
        print(f"{r['gpus']:>6} {r['solve_s_median']:>15.3f} {r['solve_s_max']:>8.3f} {r['status']:>9} "
              f"{r['groups']:>7} {r['predicted_attainment']:>10.3f}")
    print(f"\n{'queued':>7} {'dispatch p50 ms':>16} {'p99 ms':>8}")
    for r in dispatch:
        print(f"{r['queued']:>7} {r['p50_ms']:>16.3f} {r['p99_ms']:>8.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"solver": solver, "dispatcher": dispatch}, indent=1))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
