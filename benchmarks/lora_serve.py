"""Per-request LoRA adapters (issue 19) on an emulated Ray Serve cluster: adapter-aware vs
adapter-blind routing, the same trace through the real runtime.

A local Ray with fake GPUs serves FLUX with emulated executors (`time_scale`), as
`serve_vs_sim.py` does (every diffuse width deployable, Serve runs the policy's plan after a
warm-up request per shape): each diffuse
replica keeps an LRU of `--slots` adapters and sleeps `--load-s x time_scale` per adapter a
batch needs and it lacks (`EmulatedExecutor`), which is what the simulator charges
(`benchmarks/lora_routing.py`). trident (placement "groups", what Serve runs) grants diffuse to
named replicas, with `adapter_routing` on, then off, on the same requests: `--n` requests of the
`shift-flux` workload at `--rate-scale`, `--share` of them with one of `--adapters` adapters of
Zipf popularity, replayed over HTTP at their arrival times x time_scale with their SLO.

Reports per routing: adapter hit rate and loads per minute (from the replicas' own counts in each
answer's timings), SLO attainment and P95 latency (in the trace's seconds: wall / time_scale).

    .venv/bin/python benchmarks/lora_serve.py [--n 200] [--time-scale 0.25] [--gpus 8]
Prints a table and writes benchmarks/results/lora_serve.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import time
from pathlib import Path

import httpx
import numpy as np

from serve_vs_sim import wait_for_plan  # noqa: E402 - benchmarks/ is the script's directory
from trident_rs.devtools.local import private_serve
from trident_rs.policy.stage_estimate import default_cost_model
from trident_rs.sim.lora_workload import adapter_names, with_adapters
from trident_rs.sim.workloads import load_workload


def app_args(args, routing: bool) -> dict:
    """The app of `serve_vs_sim.py` (every diffuse width deployable, GPUs reserved, Serve runs the
    policy's plan), with adapters."""
    return {
        "models": ["flux"], "executor": "emulated", "time_scale": args.time_scale, "reserve_gpus": True,
        "cluster": {"nodes": 1, "gpus_per_node": args.gpus},
        "deployments": [{"stage": "encode", "width": 1, "replicas": 1, "max_replicas": 4},
                        *({"stage": "diffuse", "width": w, "replicas": int(w == 1)} for w in (1, 2, 4, 8)),
                        {"stage": "decode", "width": 1, "replicas": 1, "max_replicas": 4}],
        "loras": {name: f"/adapters/{name}" for name in adapter_names(args.adapters)},  # emulated: never read
        "lora_slots": args.slots,
        "policy": {"name": "trident", "tick_s": 0.5,
                   "options": {"placement": "groups", "models": ["flux"], "slo_scale": 4.0,
                               "adapter_routing": routing, "adapter_load_s": args.load_s}},
        "slo_scale": 4.0, "limits": {"max_loras": 1, "max_queue_per_model": 512},
    }


def replay(url: str, reqs, ts: float) -> list[dict]:
    """Send each request at its arrival x `ts` (wall seconds from now); its answer and latency."""
    def one(r):
        body = {"model": r.model, "prompt": r.id, "height": r.shape.height, "width": r.shape.width,
                "steps": r.steps, "seed": 0, "slo_ms": r.slo_s * ts * 1000.0,
                "lora": [{"name": n, "scale": s} for n, s in r.adapter_set]}
        delay = t0 + r.arrival * ts - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic()
        resp = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
        done = time.monotonic()
        timings = resp.json().get("timings", {}) if resp.status_code == 200 else {}
        return {"id": r.id, "status": resp.status_code, "latency_s": (done - sent) / ts, "slo_s": r.slo_s,
                "adapters": len(r.adapters), "loads": timings.get("diffuse_adapter_loads", 0),
                "hits": timings.get("diffuse_adapter_hits", 0)}

    t0 = time.monotonic() + 1.0
    with cf.ThreadPoolExecutor(64) as pool:
        return list(pool.map(one, reqs))


def summarise(rows: list[dict], span_s: float) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    loads, hits = sum(r["loads"] for r in ok), sum(r["hits"] for r in ok)
    lat = np.asarray([r["latency_s"] for r in ok])
    return {"requests": len(rows), "failed": len(rows) - len(ok),
            "hit_rate": hits / max(loads + hits, 1), "loads_per_min": loads / (span_s / 60.0),
            "slo_attainment": sum(r["latency_s"] <= r["slo_s"] for r in ok) / max(len(rows), 1),
            "p95_latency_s": float(np.percentile(lat, 95)) if len(lat) else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="requests replayed")
    ap.add_argument("--rate-scale", type=float, default=0.5)
    ap.add_argument("--time-scale", type=float, default=0.25)
    ap.add_argument("--gpus", type=int, default=8, help="fake GPUs (one node)")
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--share", type=float, default=0.8)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--load-s", type=float, default=1.0, help="seconds per adapter load (trace time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_serve.json"))
    args = ap.parse_args()

    cost = default_cost_model()
    base = load_workload("shift-flux", rate_scale=args.rate_scale, duration=3600.0, seed=args.seed, cost=cost)
    reqs = with_adapters(base, n=args.adapters, share=args.share, zipf_s=args.zipf, seed=args.seed)[: args.n]
    start = reqs[0].arrival
    reqs = [dataclasses.replace(r, arrival=r.arrival - start, deadline=r.deadline - start) for r in reqs]
    span = reqs[-1].arrival
    from ray import serve

    from trident_rs.serve.app import build_app

    results = {}
    with private_serve(num_gpus=args.gpus) as port:
        for routing in (True, False):
            name = "adapter-aware" if routing else "adapter-blind"
            serve.run(build_app(app_args(args, routing)), name="lora", route_prefix="/lora")
            with httpx.Client(timeout=300) as c:  # warm-up: one request per shape, then Serve runs the plan
                for shape in sorted({r.shape for r in reqs}, key=lambda x: x.pixels):
                    c.post(f"http://127.0.0.1:{port}/lora/v1/generate",
                           json={"model": "flux", "prompt": "warm", "height": shape.height, "width": shape.width})
            wait_for_plan("lora", 120)
            rows = replay(f"http://127.0.0.1:{port}/lora", reqs, args.time_scale)
            results[name] = summarise(rows, span)
            serve.delete("lora")
    print(f"{'routing':<15}{'reqs':>6}{'hit rate':>10}{'loads/min':>11}{'SLO att.':>10}{'P95 s':>9}{'failed':>8}")
    for name, m in results.items():
        print(f"{name:<15}{m['requests']:>6}{m['hit_rate']:>10.3f}{m['loads_per_min']:>11.1f}"
              f"{m['slo_attainment']:>10.3f}{m['p95_latency_s']:>9.1f}{m['failed']:>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "trace_span_s": span, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
