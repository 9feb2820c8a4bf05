"""Policy-layer speed: placement solve time by cluster size, dispatcher decision time by queue length.

Dispatcher, two events, each timed on a dispatcher holding `queued` stage-tasks (13 classes, 3
stages; warm cost and class-prediction caches, as in a running dispatcher; wall and thread CPU
time, the latter unaffected by other processes on the machine):
- "one free group of each kind": the queue built at t = 10 s from arrivals every 10 ms;
- "backlog": every group of the plan busy but one (each call frees another), arrivals spread
  over the last two SLOs so about half the tasks are late.

    .venv/bin/python benchmarks/policy_speed.py            # prints a table, writes benchmarks/results/policy_speed.json
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.dispatcher import Dispatcher, RunningLaunch
from trident_rs.policy.solver import PlacementSolver
from trident_rs.policy.types import Cluster, Launch, Request
from trident_rs.policy.traces import read_named_trace
from trident_rs.policy.workload import Forecast, forecast_from_trace
from trident_rs.vocab import STAGES, percentile

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


def _warm(d: Dispatcher, warm: Dispatcher) -> Dispatcher:
    """Share the caches a running dispatcher has warm (cost lookups, class predictions)."""
    d._times, d._min_width, d._best_batch, d._infos, d._ideal = (warm._times, warm._min_width, warm._best_batch,
                                                                  warm._infos, warm._ideal)
    return d


def _row(queued: int, wall: list[float], cpu: list[float], calls: int, **extra) -> dict:
    q = lambda xs, p: 1e3 * percentile(xs, 100 * p)  # noqa: E731
    return {"queued": queued, "p50_ms": q(wall, 0.5), "p99_ms": q(wall, 0.99), "cpu_p50_ms": q(cpu, 0.5),
            "cpu_p99_ms": q(cpu, 0.99), "calls": calls, **extra}


def dispatch_times(cost, forecast, queued_list=(10, 100, 1000), calls=300) -> list[dict]:
    cluster = Cluster(16, 8)
    plan = PlacementSolver(cluster, cost).solve(forecast)
    free = {n: frozenset(range(8)) for n in range(cluster.nodes)}
    classes = sorted(forecast.rates)
    # a typical event: one group of each kind is free
    free_groups, seen = [], set()
    for g in plan.groups:
        if (g.model, g.stages, g.width) not in seen:
            seen.add((g.model, g.stages, g.width))
            free_groups.append(g)
    rows = []
    for queued in queued_list:
        wall, cpu = [], []
        warm = Dispatcher(cost)
        for call in range(calls):
            d = _warm(Dispatcher(cost), warm)
            for i in range(queued):
                c = classes[(i * 7 + call) % len(classes)]
                arrival = i * 0.01
                d.add(Request(f"r{i}", c.model, c.shape, c.steps, arrival, arrival + c.slo_s),
                      STAGES[i % 3])
            c0, w0 = time.thread_time(), time.perf_counter()
            d.dispatch(10.0, free_groups, free)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.thread_time() - c0)
        rows.append(_row(queued, wall, cpu, calls, free_groups=len(free_groups), plan_groups=len(plan.groups)))
    return rows


def dispatch_backlog_times(cost, forecast, queued_list=(1000, 10000), calls=100) -> list[dict]:
    cluster = Cluster(16, 8)
    plan = PlacementSolver(cluster, cost).solve(forecast)
    classes = sorted(forecast.rates)
    now, rows = 1000.0, []
    for queued in queued_list:
        wall, cpu = [], []
        warm = Dispatcher(cost)
        for call in range(calls):
            rng = random.Random(call)
            d = _warm(Dispatcher(cost), warm)
            for i in range(queued):
                c = classes[rng.randrange(len(classes))]
                arrival = now - rng.uniform(0, 2 * c.slo_s)
                d.add(Request(f"r{i}", c.model, c.shape, c.steps, arrival, arrival + c.slo_s),
                      rng.choice(STAGES))
            freed = plan.groups[call % len(plan.groups)]
            busy: dict[int, set[int]] = {}
            for g in plan.groups:
                if g is not freed:
                    d.running[g.id] = RunningLaunch(Launch(("x",), g.model, g.stages, g.width, g.node, g.gpus, g.id),
                                                    now + rng.uniform(1, 300))
                    busy.setdefault(g.node, set()).update(g.gpus)
            free = {n: frozenset(set(range(8)) - busy.get(n, set())) for n in range(cluster.nodes)}
            c0, w0 = time.thread_time(), time.perf_counter()
            d.dispatch(now, plan.groups, free)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.thread_time() - c0)
        rows.append(_row(queued, wall, cpu, calls, plan_groups=len(plan.groups)))
    return rows


def main() -> None:
    cost = CostModel.default()
    forecast = forecasts(cost)
    solver = solver_times(cost, forecast)
    dispatch = dispatch_times(cost, forecast)
    backlog = dispatch_backlog_times(cost, forecast)
    print(f"{'GPUs':>6} {'solve median s':>15} {'max s':>8} {'status':>9} {'groups':>7} {'pred. att.':>10}")
    for r in solver:
        print(f"{r['gpus']:>6} {r['solve_s_median']:>15.3f} {r['solve_s_max']:>8.3f} {r['status']:>9} "
              f"{r['groups']:>7} {r['predicted_attainment']:>10.3f}")
    for title, rows in (("one free group of each kind", dispatch), ("backlog: all groups busy but one", backlog)):
        print(f"\ndispatch, {title}")
        print(f"{'queued':>7} {'wall p50 ms':>12} {'p99 ms':>8} {'cpu p50 ms':>11} {'p99 ms':>8}")
        for r in rows:
            print(f"{r['queued']:>7} {r['p50_ms']:>12.3f} {r['p99_ms']:>8.3f} {r['cpu_p50_ms']:>11.3f} "
                  f"{r['cpu_p99_ms']:>8.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"solver": solver, "dispatcher": dispatch, "dispatcher_backlog": backlog}, indent=1))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
