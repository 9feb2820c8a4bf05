"""The old headline comparison (128 GPUs, 16 x 8; flux x4.5, hunyuanvideo x0.5, azure-mixed x1.2;
600 s of arrivals, SLO scale 4, start cost 20 s), rerun as the fair yardstick is switched on
step by step, so each change's effect on every policy shows:

    .venv/bin/python benchmarks/yardstick_steps.py

steps (cumulative): `fair-baselines` (EDF and stage variants in static-best, the paper rule as
the authors run it; the old engine: no memory check, no noise, no overheads, and shares of GPU
time from the served trace itself), `+memory`, `+noise` (lognormal sigma 0.2, the mean of seeds
0 and 1), `+overheads` (Serve's per-hop and per-request overhead, shared-pool regroup and model
loads), `+no-future` (shares from a prior: equal per model). Writes
benchmarks/results/yardstick_steps.json and prints a table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.types import Cluster
from trident_rs.sim import SimConfig
from trident_rs.sim.runner import run_policy
from trident_rs.sim.workloads import load_workload

COST = CostModel.default()
CLUSTER = Cluster(16, 8)
POINTS = (("flux-paper", 4.5), ("hunyuanvideo-paper", 0.5), ("azure-mixed", 1.2))
POLICIES = ("static-best-fcfs", "static-best", "dynamic-pipeline", "paper", "trident", "bound")
IDEAL = dict(enforce_memory=False, hop_overhead_s=0.0, request_overhead_s=0.0, regroup_s=0.0, model_load_s=0.0)
STEPS = (
    ("fair-baselines", dict(IDEAL), (None,), True),
    ("+memory", dict(IDEAL, enforce_memory=True), (None,), True),
    ("+noise", dict(IDEAL, enforce_memory=True), (0, 1), True),
    ("+overheads", {}, (0, 1), True),
    ("+no-future", {}, (0, 1), False),
)


def main() -> int:
    out: dict = {}
    for wl, rate in POINTS:
        reqs = load_workload(wl, rate_scale=rate, duration=600, slo_scale=4.0, cost=COST)
        out[wl] = {"rate_scale": rate, "requests": len(reqs), "steps": {}}
        for step, overrides, seeds, future in STEPS:
            row = {}
            for name in POLICIES:
                vals = []
                for seed in seeds:
                    cfg = SimConfig(start_cost_s=20.0, noise=0.0 if seed is None else 0.2, seed=seed or 0, **overrides)
                    t0 = time.perf_counter()
                    run = run_policy(name, reqs, CLUSTER, COST, cfg, history=reqs if future else None)
                    vals.append({**run.metrics, "wall_s": time.perf_counter() - t0,
                                 "variant": run.detail.get("variant", "")})
                row[name] = {k: sum(v.get(k, 0) for v in vals) / len(vals) for k in
                             ("slo_attainment", "mean_latency_s", "p95_latency_s", "failed")}
                row[name]["variant"] = vals[0]["variant"]
                print(f"{wl:20} {step:15} {name:18} {row[name]['slo_attainment']:.3f} "
                      f"mean {row[name]['mean_latency_s']:7.1f} P95 {row[name]['p95_latency_s']:7.1f} "
                      f"failed {row[name]['failed']:.0f} {row[name]['variant']}", flush=True)
            out[wl]["steps"][step] = row
            Path("benchmarks/results/yardstick_steps.json").write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
