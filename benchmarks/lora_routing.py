"""Per-request LoRA adapters (issue 19): adapter-aware vs adapter-blind routing, in the simulator.

A workload's requests get, with probability `--share`, one of `--adapters` (50) LoRA adapters
drawn with Zipf popularity (`--zipf`, weight 1/k^s); the rest carry none. trident (placement
"groups", what Serve runs) dispatches them twice on the same trace: with `adapter_routing` (a
diffuse launch prefers a group whose LRU holds its adapter; the width choice weighs the loads;
a group lacking the head's adapter may run a later task it holds them for) and without (groups
by id, adapter-blind). The simulator keeps an LRU of `--slots` adapters per diffuse group and
charges `--load-s` seconds per adapter a launch's group lacks.

Reports per scenario and routing: adapter hit rate (adapters found loaded / adapters used),
adapter loads per minute, SLO attainment and P95 latency. `--tiny` also measures real load and
unload times of a random rank-4 LoRA on the tiny models' diffuse pipelines (needs torch, peft).

    .venv/bin/python benchmarks/lora_routing.py [--adapters 50] [--share 0.8] [--zipf 1.0] [--tiny]
Prints a table and writes benchmarks/results/lora_routing.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trident_rs.policy.stage_estimate import default_cost_model
from trident_rs.policy.types import Cluster
from trident_rs.sim import SimConfig
from trident_rs.sim.lora_workload import with_adapters
from trident_rs.sim.runner import run_policy
from trident_rs.sim.workloads import load_workload

# (workload, rate scale, nodes): a light image mix on one node, the FLUX paper mix on 4 nodes
SCENARIOS = (("shift-flux", 0.5, 1), ("poisson-flux", 2.0, 4))


def run_scenario(workload: str, rate_scale: float, nodes: int, args) -> list[dict]:
    cost = default_cost_model()
    base = load_workload(workload, rate_scale=rate_scale, duration=args.duration, seed=args.seed, cost=cost)
    reqs = with_adapters(base, n=args.adapters, share=args.share, zipf_s=args.zipf, seed=args.seed)
    config = SimConfig(noise=args.noise, seed=args.seed, adapter_load_s=args.load_s, lora_slots=args.slots)
    rows = []
    for routing in (True, False):
        run = run_policy("trident", reqs, Cluster(nodes, 8), cost, config, keep_result=True, placement="groups",
                         adapter_routing=routing, adapter_load_s=args.load_s, lora_slots=args.slots)
        res, m = run.result, run.metrics
        used = res.adapter_hits + res.adapter_loads
        rows.append({"workload": workload, "rate_scale": rate_scale, "gpus": nodes * 8, "requests": len(reqs),
                     "with_adapter": sum(1 for r in reqs if r.adapters),
                     "routing": "adapter-aware" if routing else "adapter-blind",
                     "hit_rate": res.adapter_hits / used if used else 1.0, "adapter_loads": res.adapter_loads,
                     "loads_per_min": res.adapter_loads / (m["makespan_s"] / 60.0),
                     "slo_attainment": m["slo_attainment"], "p95_latency_s": m["p95_latency_s"],
                     "mean_latency_s": m["mean_latency_s"]})
    return rows


def measure_tiny(models=("tiny-sd3", "tiny-flux"), repeats: int = 5) -> list[dict]:
    """Real load/unload seconds of a random rank-4 LoRA on the tiny diffuse pipelines (CPU)."""
    import tempfile

    from trident_rs.models.adapters import AdapterCache
    from trident_rs.models.loading import load_pipeline
    from trident_rs.models.tiny_lora import make_random_lora
    from trident_rs.request import LoraRef

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            sources = {f"l{i}": make_random_lora(model, Path(tmp) / f"{model}-{i}", seed=i) for i in range(repeats + 1)}
            cache = AdapterCache(load_pipeline(model, stage="diffuse"), sources, slots=1)
            for name in sources:  # one slot: every activation after the first loads one and evicts one
                cache.activate([LoraRef(name=name, scale=1.0)])
            s = cache.stats
            out.append({"model": model, "loads": s.loads, "mean_load_ms": 1e3 * s.load_s / s.loads,
                        "evictions": s.evictions, "mean_unload_ms": 1e3 * s.unload_s / max(s.evictions, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--share", type=float, default=0.8, help="share of requests with an adapter")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=4, help="adapters each diffuse replica keeps")
    ap.add_argument("--load-s", type=float, default=1.0, help="seconds per adapter load")
    ap.add_argument("--duration", type=float, default=1200.0)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="also measure load/unload on the tiny models")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_routing.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [row for sc in SCENARIOS for row in run_scenario(*sc, args)]
    head = f"{'workload':13} {'GPUs':>4} {'reqs':>5} {'routing':14} {'hit rate':>8} {'loads/min':>9} {'SLO att.':>8} {'P95 s':>8}"
    print(head)
    for r in rows:
        print(f"{r['workload']:13} {r['gpus']:>4} {r['requests']:>5} {r['routing']:14} {r['hit_rate']:8.3f} "
              f"{r['loads_per_min']:9.1f} {r['slo_attainment']:8.3f} {r['p95_latency_s']:8.1f}")
    out = {"args": vars(args), "simulator": rows, "wall_s": time.perf_counter() - t0}
    if args.tiny:
        out["tiny_load_times"] = tiny = measure_tiny()
        for t in tiny:
            print(f"{t['model']}: load {t['mean_load_ms']:.1f} ms (mean of {t['loads']}), "
                  f"unload {t['mean_unload_ms']:.1f} ms (mean of {t['evictions']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
