"""A node lost for the middle third of each workload, in the simulator (issue 20): what every
policy keeps of its SLO attainment, on the quick suite's 32 points (4 nodes x 8 GPUs).

    .venv/bin/python benchmarks/node_loss_sim.py [--points 0,1,2] [--policies trident static-best ...]

At each point the same requests run twice per policy, without and with a fault: node 1 lost at a
third of the arrival window and back at two thirds (`SimConfig.node_faults`; a launch running
there is re-run from its start elsewhere, the node's groups start again once it is back). The
policies see the node in `ClusterState.down`: trident's pool stops placing there, its replica
groups (`trident:placement=groups`) re-plan onto the nodes left at once and back when it returns;
the baselines' groups there are simply not ready while it is down. Reported: attainment without
and with the fault, of all requests and of those arriving while the node is down, side by side.
Writes `benchmarks/results/node_loss_sim.json` and `.png` and prints a table; `--report JSON`
reprints the table and redraws the plot of a run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import NOISE, parse_variant, requests_for, suite_points  # noqa: E402

from trident_rs.policy.cost_model import CostModel  # noqa: E402
from trident_rs.policy.types import Cluster  # noqa: E402
from trident_rs.sim import SimConfig  # noqa: E402
from trident_rs.sim.runner import run_policy  # noqa: E402

POLICIES = ("trident", "trident:placement=groups", "static-best", "dynamic-pipeline", "paper", "tetriserve",
            "genserve")
LOST_NODE = 1


def attainment(result, reqs, window: tuple[float, float] | None = None) -> float | None:
    chosen = [r for r in reqs if window is None or window[0] <= r.arrival < window[1]]
    if not chosen:
        return None
    return sum(result.finish.get(r.id, float("inf")) <= r.deadline + 1e-9 for r in chosen) / len(chosen)


def run_point(args: tuple) -> dict:
    point, policies = args
    cost = CostModel.default()
    reqs = requests_for(point, cost)
    history = requests_for(point, cost, seed=point.seed + 1000)
    cluster = Cluster(point.gpus // 8, 8)
    first, last = reqs[0].arrival, reqs[-1].arrival
    lost, back = first + (last - first) / 3, first + 2 * (last - first) / 3
    row = {"name": point.name, "lost_s": lost, "back_s": back, "requests": len(reqs), "policies": {}}
    for name in policies:
        base, options = parse_variant(name)
        out = {}
        for tag, faults in (("healthy", ()), ("node_lost", ((lost, LOST_NODE, back),))):
            config = SimConfig(noise=NOISE, seed=point.seed, node_faults=faults)
            run = run_policy(base, reqs, cluster, cost, config, history=history, keep_result=True, **options)
            res = run.result
            out[tag] = {"attainment": attainment(res, reqs), "attainment_while_down": attainment(res, reqs, (lost, back)),
                        "completed": len(res.finish), "p95_latency_s": run.metrics["p95_latency_s"]}
        row["policies"][name] = out
    return row


def table(rows: list[dict], policies: list[str]) -> str:
    lines = ["| policy | attainment healthy | with node 1 lost | arriving while down: healthy | lost | completed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in policies:
        mean = lambda tag, key: sum(r["policies"][name][tag][key] or 0 for r in rows) / len(rows)  # noqa: E731
        done = sum(r["policies"][name]["node_lost"]["completed"] for r in rows)
        total = sum(r["requests"] for r in rows)
        lines.append(f"| {name} | {mean('healthy', 'attainment'):.3f} | {mean('node_lost', 'attainment'):.3f} | "
                     f"{mean('healthy', 'attainment_while_down'):.3f} | {mean('node_lost', 'attainment_while_down'):.3f} | "
                     f"{done}/{total} |")
    return "\n".join(lines)


def plot(rows: list[dict], policies: list[str], path: Path) -> None:
    """Mean attainment per policy, healthy beside node lost, of all requests and of those arriving
    while the node is down."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    x = np.arange(len(policies))
    for ax, key, title in ((axes[0], "attainment", "all requests"),
                           (axes[1], "attainment_while_down", "requests arriving while node 1 is down")):
        for k, (tag, label) in enumerate((("healthy", "healthy"), ("node_lost", "node 1 lost"))):
            means = [sum(r["policies"][n][tag][key] or 0 for r in rows) / len(rows) for n in policies]
            ax.bar(x + (k - 0.5) * 0.38, means, 0.38, label=label)
        ax.set_xticks(x, policies, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0.6, 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean SLO attainment (quick suite, 32 points)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="", help="comma-separated indices of the quick suite's points")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/node_loss_sim.json")
    ap.add_argument("--report", default="", help="reprint the table and redraw the plot of this JSON; run nothing")
    args = ap.parse_args()
    if args.report:
        rows = json.loads(Path(args.report).read_text())["points"]
        names = [n for n in args.policies if n in rows[0]["policies"]]
        print(table(rows, names))
        plot(rows, names, Path(args.report).with_suffix(".png"))
        return 0
    points = suite_points(quick=True)
    if args.points:
        keep = {int(x) for x in args.points.split(",")}
        points = [p for p in points if p.index in keep]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, args.jobs)) as pool:
        rows = sorted(pool.imap_unordered(run_point, [(p, tuple(args.policies)) for p in points]),
                      key=lambda r: r["name"])
    wall = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"lost_node": LOST_NODE, "noise": NOISE, "wall_s": wall, "points": rows},
                                         indent=1, default=float))
    print(table(rows, args.policies))
    plot(rows, args.policies, Path(args.out).with_suffix(".png"))
    print(f"\n{len(rows)} points in {wall:.0f} s; wrote {args.out} and its .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
