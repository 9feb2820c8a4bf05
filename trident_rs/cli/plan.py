"""`trident plan`: the placement plan trident would deploy for a workload, and its prediction."""
from __future__ import annotations

import argparse
import json

from trident_rs.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True,
                        help="flux-paper, hunyuanvideo-paper, or a CSV path (arrival_s,height,width,num_frames,num_inference_steps)")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=48.0)
    parser.add_argument("--slo-scale", type=float, default=4.0, help="the 4 in deadline = 1.1 * round(4 * t_best) + 2 s")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's arrival rate")
    parser.add_argument("--time-limit", type=float, default=1.0, help="CP-SAT time limit, seconds")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from trident_rs.policy.cost_model import CostModel
    from trident_rs.policy.solver import PlacementSolver
    from trident_rs.policy.types import Cluster
    from trident_rs.policy.traces import find_trace, read_trace
    from trident_rs.policy.workload import forecast_from_trace

    if args.gpus < 1 or args.gpus_per_node < 1 or args.gpus % args.gpus_per_node:
        raise ConfigError(f"--gpus ({args.gpus}) must be a positive multiple of --gpus-per-node ({args.gpus_per_node})")
    if not args.rate_scale > 0:
        raise ConfigError(f"--rate-scale must be > 0, got {args.rate_scale}")
    cluster = Cluster(args.gpus // args.gpus_per_node, args.gpus_per_node, args.gpu_memory_gb)
    cost = CostModel.default()
    path, model = find_trace(args.workload)
    forecast = forecast_from_trace(read_trace(path, model), cost, args.slo_scale).scaled(args.rate_scale)
    plan = PlacementSolver(cluster, cost, time_limit_s=args.time_limit).solve(forecast)
    plan.check(cluster)
    if args.json:
        print(json.dumps({
            "groups": [{"id": g.id, "node": g.node, "gpus": list(g.gpus), "deployment": g.deployment,
                        "model": g.model, "width": g.width} for g in plan.groups],
            "predicted_attainment": plan.predicted_attainment, "stats": plan.stats,
            "forecast": [{"shape": c.shape.key, "steps": c.steps, "slo_s": c.slo_s, "rate": r}
                         for c, r in forecast.rates.items()],
        }, indent=1, default=str))
        return 0
    _print_table(plan, forecast, cluster, path.name)
    return 0


def _print_table(plan, forecast, cluster, trace_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"placement plan: {trace_name} on {cluster.nodes}x{cluster.gpus_per_node} GPUs")
    for col in ("node", "GPUs", "deployment", "width", "group id"):
        table.add_column(col)
    for g in sorted(plan.groups, key=lambda g: (g.node, g.gpus[0])):
        table.add_row(str(g.node), ",".join(map(str, g.gpus)), f"{g.model}/{g.deployment}", str(g.width), g.id)
    console.print(table)
    classes = Table(title="forecast (per request class)")
    for col in ("shape", "steps", "rate req/s", "SLO s"):
        classes.add_column(col)
    for c, r in forecast.rates.items():
        classes.add_row(c.shape.key, str(c.steps), f"{r:.3f}", f"{c.slo_s:.0f}")
    console.print(classes)
    counts = ", ".join(f"{k} x{v}" for k, v in sorted(plan.count().items()))
    pa = plan.predicted_attainment
    console.print(f"replicas: {counts}")
    console.print(f"predicted SLO attainment: {'n/a (greedy fallback)' if pa is None else f'{pa:.3f}'}"
                  f"  (goodput {plan.stats['goodput_rps']:.3f} of {plan.stats['demand_rps']:.3f} req/s)")
    console.print(f"solver: {plan.stats['status']}, {plan.stats['wall_s'] * 1000:.0f} ms, "
                  f"fallback={plan.stats['fallback']}")
