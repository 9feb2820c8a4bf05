"""`trident sim`: simulate policies on a workload in virtual time and compare them."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from trident_rs.errors import ConfigError
from trident_rs.policy.types import Cluster
from trident_rs.sim import SimConfig
from trident_rs.sim.runner import expand, run_policy
from trident_rs.sim.workloads import describe, load_workload, workload_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="flux-paper", help=f"one of {', '.join(workload_names())}, or a CSV path")
    parser.add_argument("--model", default=None, help="model of a CSV workload (e.g. flux)")
    parser.add_argument("--gpus", type=int, default=128)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=48.0)
    parser.add_argument("--policy", nargs="+", default=["all"], help="policy names, or 'all'")
    parser.add_argument("--width", type=int, default=None, help="width k of static-pipeline / static-stage")
    parser.add_argument("--slo-scale", type=float, default=4.0)
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    parser.add_argument("--steps", type=int, default=None, help="override every request's steps")
    parser.add_argument("--duration", type=float, default=None, help="cut the trace after S seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="lognormal sigma on stage times")
    parser.add_argument("--start-cost", type=float, default=20.0, help="seconds to start a replica group")
    parser.add_argument("--ideal", action="store_true",
                        help="the engine before the fair yardstick: no memory check, no runtime overheads or regroup costs")
    parser.add_argument("--json", default=None, help="write results here")


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from trident_rs.policy.cost_model import CostModel

    if args.gpus % args.gpus_per_node:
        raise ConfigError(f"--gpus {args.gpus} is not a multiple of --gpus-per-node {args.gpus_per_node}")
    cost = CostModel.default()
    cluster = Cluster(args.gpus // args.gpus_per_node, args.gpus_per_node, args.gpu_memory_gb)
    requests = load_workload(args.workload, model=args.model, rate_scale=args.rate_scale,
                             duration=args.duration, steps=args.steps, slo_scale=args.slo_scale,
                             seed=args.seed, cost=cost)
    console = Console(width=max(Console().width, 110))
    console.print(f"{args.workload}: {describe(requests)} on {args.gpus} GPUs ({cluster.nodes} × {args.gpus_per_node})")
    config = (SimConfig.ideal if args.ideal else SimConfig)(noise=args.noise, seed=args.seed, start_cost_s=args.start_cost)
    results = {}
    for name in expand(args.policy):
        bar = tqdm(total=len(requests), desc=name, leave=False, disable=len(requests) < 5000, mininterval=0.5)

        def progress(i: int, bar=bar) -> None:
            if i % 1000 == 0:
                bar.n = i
                bar.refresh()

        out = run_policy(name, requests, cluster, cost, config, width=args.width, progress=progress)
        bar.close()
        if out is not None:
            results[name] = {**out.metrics, **({"detail": out.detail} if out.detail else {})}
    table = Table(title=f"{args.workload}, {args.gpus} GPUs, SLO scale {args.slo_scale:g}, rate ×{args.rate_scale:g}")
    for col in ("policy", "SLO attainment", "mean s", "P50 s", "P95 s", "P99 s", "GPU util", "done/failed/sent"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name, m in results.items():
        label = name + (f" ({m['detail']['variant']})" if name.startswith("static-best") else "")
        table.add_row(label, _fmt(m["slo_attainment"], 3), _fmt(m["mean_latency_s"]), _fmt(m["p50_latency_s"]),
                      _fmt(m["p95_latency_s"]), _fmt(m["p99_latency_s"]), _fmt(m.get("gpu_utilisation"), 3),
                      f"{m['completed']}/{m.get('failed', 0)}/{m['requests']}")
    console.print(table)
    if args.json:
        doc = {"workload": args.workload, "gpus": args.gpus, "gpus_per_node": args.gpus_per_node,
               "slo_scale": args.slo_scale, "rate_scale": args.rate_scale, "seed": args.seed,
               "policies": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
    return 0
