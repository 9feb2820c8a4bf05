"""The paper's comparison in the simulator: every registered policy on FLUX, HunyuanVideo and the
Azure-arrival mix at 128 GPUs (16 × 8), at a rate where static-best attains 0.2-0.5; attainment
vs rate and vs SLO scale; simulator speed at 1,024 GPUs and 100,000 requests.

    .venv/bin/python benchmarks/sim_paper.py [--quick] [--skip-speed] [--out benchmarks/results]

Prints tables, writes benchmarks/results/sim_paper.json and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from trident_rs.policy import registry
from trident_rs.policy.baselines import DynamicPipelinePolicy, StaticPipelinePolicy
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.types import Cluster, Request
from trident_rs.sim import PolicyViolation, SimConfig, simulate, summarize
from trident_rs.sim.runner import run_policy
from trident_rs.sim.workloads import load_workload

CLUSTER = Cluster(16, 8)
WORKLOADS = ("flux-paper", "hunyuanvideo-paper", "azure-mixed")
RATE_GRID = (0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0, 4.5, 7.0, 10.0, 15.0)


def load(name: str, rate: float, duration: float, slo_scale: float = 4.0) -> list[Request]:
    return load_workload(name, rate_scale=rate, duration=duration, slo_scale=slo_scale, cost=COST)


def run_all(reqs: list[Request], policies: list[str], config: SimConfig) -> dict[str, dict]:
    out = {}
    for name in policies:
        t0 = time.perf_counter()
        try:
            r = run_policy(name, reqs, CLUSTER, COST, config)
        except PolicyViolation as e:  # a policy broke the contract: report it, keep the others
            print(f"  {name}: {e}")
            out[name] = {"error": str(e)}
            continue
        if r is not None:
            out[name] = {**r.metrics, "detail": r.detail, "wall_s": time.perf_counter() - t0}
    return out


def find_rate(name: str, duration: float, config: SimConfig) -> tuple[float, dict]:
    """Lowest rate scale on the grid where static-best attains <= 0.5 (the paper's regime)."""
    seen = {}
    for rate in RATE_GRID:
        reqs = load(name, rate, duration)
        if len(reqs) < 50:
            continue
        att = run_policy("static-best", reqs, CLUSTER, COST, config).metrics["slo_attainment"]
        seen[rate] = att
        print(f"  {name} rate ×{rate:g}: {len(reqs)} requests, static-best attainment {att:.3f}")
        if att <= 0.5:
            return rate, seen
    return RATE_GRID[-1], seen


def table(title: str, rows: dict[str, dict]) -> str:
    lines = [title, f"{'policy':<18}{'attain':>8}{'mean s':>9}{'P95 s':>9}{'P99 s':>9}{'util':>7}{'done':>12}"]
    for n, m in rows.items():
        if "error" in m:
            lines.append(f"{n:<18}  error: {m['error'][:90]}")
            continue
        lines.append(f"{n:<18}{m['slo_attainment']:>8.3f}{m['mean_latency_s']:>9.1f}{m['p95_latency_s']:>9.1f}"
                     f"{m['p99_latency_s']:>9.1f}{m.get('gpu_utilisation', math.nan):>7.2f}"
                     f"{m['completed']:>6}/{m['requests']:<5}")
    return "\n".join(lines)


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    out = {}
    t = rows.get("trident")
    for other in ("static-best", "paper", "bound"):
        o = rows.get(other)
        if t is None or o is None or "error" in t or "error" in o:
            continue
        if other == "bound":
            out["bound_minus_trident_attainment"] = o["slo_attainment"] - t["slo_attainment"]
            continue
        out[f"trident/{other}_attainment"] = t["slo_attainment"] / max(o["slo_attainment"], 1e-9)
        out[f"{other}/trident_p95"] = o["p95_latency_s"] / max(t["p95_latency_s"], 1e-9)
        out[f"{other}/trident_mean"] = o["mean_latency_s"] / max(t["mean_latency_s"], 1e-9)
    return out


def speed(n_requests: int, gpus: int) -> dict:
    """Engine speed with a trivial policy (static pipeline w2) and the dynamic pipeline."""
    cluster = Cluster(gpus // 8, 8)
    one = load_workload("poisson-flux", cost=COST)  # 30 min of Poisson FLUX; tiled to n_requests
    scale = (gpus / 128) * 3.0  # keep the load per GPU comparable to 128 GPUs at rate ×3
    reqs = []
    while len(reqs) < n_requests:
        k, off = len(reqs) // len(one), 1800.0 * (len(reqs) // len(one))
        reqs += [Request(f"{r.id}-{k}", r.model, r.shape, r.steps, (r.arrival + off) / scale,
                         (r.arrival + off) / scale + r.slo_s) for r in one]
    reqs = reqs[:n_requests]
    out = {"gpus": gpus, "requests": len(reqs)}
    for label, policy in (("static-pipeline-w2", StaticPipelinePolicy(cluster, COST, width=2)),
                          ("dynamic-pipeline", DynamicPipelinePolicy(cluster, COST))):
        t0 = time.perf_counter()
        res = simulate(cluster, policy, COST, reqs)
        wall = time.perf_counter() - t0
        out[label] = {"wall_s": wall, "policy_s": res.decision_time_s, "engine_s": wall - res.decision_time_s,
                      "events": res.schedule_calls, "attainment": summarize(res).slo_attainment}
        print(f"  speed {label}: {wall:.1f} s wall ({res.decision_time_s:.1f} s in the policy) "
              f"for {len(reqs)} requests on {gpus} GPUs")
    return out


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, xlabel, fname in (("vs_rate", "arrival rate scale", "attainment_vs_rate.png"),
                               ("vs_slo", "SLO scale", "attainment_vs_slo.png")):
        curves = results.get(key, {})
        if not curves:
            continue
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
        for ax, (wl, points) in zip(axes[0], curves.items()):
            xs = sorted(points, key=float)
            names = sorted({p for x in xs for p in points[x]})
            for n in names:
                ax.plot([float(x) for x in xs], [points[x].get(n, {}).get("slo_attainment", math.nan) for x in xs],
                        marker="o", label=n, linestyle="--" if n == "bound" else "-")
            ax.set_title(wl)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("SLO attainment")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    main = results.get("main", {})
    if main:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for ax, metric in zip(axes, ("slo_attainment", "mean_latency_s", "p95_latency_s")):
            wls = list(main)
            names = [n for n in registry.policy_names() if any(n in main[w]["policies"] for w in wls)]
            width = 0.8 / max(len(names), 1)
            for i, n in enumerate(names):
                ax.bar([j + i * width for j in range(len(wls))],
                       [main[w]["policies"].get(n, {}).get(metric, math.nan) for w in wls], width, label=n)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wls))], wls, fontsize=8)
            ax.set_title(metric)
            if metric != "slo_attainment":
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "policies_128gpus.png", dpi=120)
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter traces, fewer sweep points")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--no-curves", action="store_true", help="skip the rate and SLO-scale sweeps")
    ap.add_argument("--start-cost", type=float, default=0.0, help="replica start cost (s) for plan changes")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = SimConfig(start_cost_s=args.start_cost)
    duration = 600.0 if args.quick else 1800.0
    policies = [n for n in registry.policy_names() if registry.factory(n) is not None and n != "static-pipeline"]
    path = out / "sim_paper.json"
    results: dict = json.loads(path.read_text()) if path.exists() else {}  # merge with earlier runs
    results.update({"cluster": "16 x 8", "duration_s": duration, "start_cost_s": args.start_cost})
    if not args.speed_only:
        for key in ("main", "vs_rate", "vs_slo"):
            results.setdefault(key, {})
        for wl in args.workloads:
            rate, sweep = find_rate(wl, duration, config)
            rows = run_all(load(wl, rate, duration), policies, config)
            results["main"][wl] = {"rate_scale": rate, "static_best_sweep": sweep, "policies": rows,
                                   "ratios": ratios(rows)}
            print(table(f"\n{wl} at rate ×{rate:g} (128 GPUs)", rows))
            print("  ratios:", {k: round(v, 2) for k, v in ratios(rows).items()})
            path.write_text(json.dumps(results, indent=1, default=float))
            if args.no_curves:
                continue
            curve_rates = [r for r in RATE_GRID if rate / 4 <= r <= rate * 2][:: (2 if args.quick else 1)]
            results["vs_rate"][wl] = {str(r): run_all(load(wl, r, duration), policies, config) for r in curve_rates}
            if wl == "flux-paper":
                results["vs_slo"][wl] = {str(s): run_all(load(wl, rate, duration, s), policies, config)
                                         for s in ((2, 4, 8) if args.quick else (1.5, 2, 3, 4, 6, 8))}
            path.write_text(json.dumps(results, indent=1, default=float))
    if not args.skip_speed:
        results["speed"] = speed(100_000, 1024)
    path.write_text(json.dumps(results, indent=1, default=float))
    plot(results, out)
    print(f"wrote {path} and plots in {out}")
    return 0


COST = CostModel.default()

if __name__ == "__main__":
    raise SystemExit(main())
