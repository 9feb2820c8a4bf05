"""Emulated Ray Serve run vs `trident sim` on the same trace (issue 6, time-scaled).

The same requests (flux-paper, arrivals × 1/rate-scale, cut to the first N), the same cluster
shape (1 node × 8 GPUs, L20 cost model), the same SLO rule (slo_scale × ...) and the same policy
(`trident`) are run twice:

(a) in the discrete-event simulator (`trident_rs.sim`), in virtual unscaled seconds;
(b) on a fresh private Ray (8 fake GPUs) with the Serve app built from `build_app` with emulated
    executors (each stage sleeps cost-model time × `time_scale`). An async httpx client replays
    the arrivals in scaled time (arrival × time_scale), sends `slo_ms` = SLO × time_scale, and
    computes each request's latency and on-time-ness client-side; latencies are reported divided
    by time_scale (unscaled seconds) so the two columns compare directly.

Before the replay a few warm-up requests (one per shape) make the controller publish its first
plan, and the script waits (bounded) until Serve runs the published replica counts, so replica
start-up (~8 s real, i.e. ~8/time_scale unscaled seconds) is not charged to the trace. The
simulator is run twice: with its default replica start cost (20 s) and with none (0 s), which
brackets the warm-started Serve run.

    .venv/bin/python benchmarks/serve_vs_sim.py [--n 80] [--rate-scale 0.0625] [--time-scale 0.05]
    .venv/bin/python benchmarks/serve_vs_sim.py --nodes 2 --workload shift-flux ...   # 2 x 8 fake GPUs
With `--placement pool [--elastic]` both sides run trident's shared pool (issue 17): Serve on slot
replicas of every width (no GPUs held in Ray, each launch mapped to one; diffuse in chunk grants
with --elastic), the simulator charging every launch Serve's measured boundary cost
(`--chunk-overhead-ms`, in unscaled seconds), both planning chunks with it (`boundary_s`).
With `--nodes` > 1 Serve runs on a local multi-node Ray cluster (`trident_rs.devtools.cluster`:
one raylet per node, 8 fake GPUs each), the simulator on the same nodes x GPUs.
Prints a table and writes benchmarks/results/serve_vs_sim.json (`serve_vs_sim_<n>nodes_<workload>.json`
for other node counts or workloads).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from pathlib import Path

import httpx
import numpy as np

from trident_rs.policy import registry
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.types import Cluster, Request
from trident_rs.sim import SimConfig, simulate
from trident_rs.sim.metrics import summarize
from trident_rs.sim.workloads import describe, load_workload
from trident_rs.vocab import percentile

NODES, GPUS_PER_NODE, GPU_MEM = 1, 8, 48.0
TIME_SCALE = 0.05
MODEL = "flux"


def stats(lat: list[float], ok: list[bool], n: int) -> dict:
    a = np.asarray(lat, dtype=float)
    return {"requests": n, "completed": int(len(a)), "slo_attainment": sum(ok) / n if n else math.nan,
            "mean_latency_s": float(a.mean()) if len(a) else math.nan,
            "p50_latency_s": percentile(lat, 50), "p95_latency_s": percentile(lat, 95)}


PLACEMENT, ELASTIC = "groups", False  # --placement, --elastic
CHUNK_OVERHEAD_S = 0.0225  # real seconds a chunk boundary costs on Serve (--chunk-overhead-ms;
# benchmarks/chunk_overhead_serve.py, RESULTS.md issue 17)
POOL_WIDTHS = {"encode": [1], "diffuse": [1, 2, 4, 8], "decode": [1]}  # what the pool app deploys


def policy_options(prior: bool, serve_clock: float | None = None) -> dict:
    """trident's options on both sides. With `prior`, what the Serve controller gives it by
    default (the served models: a first plan before any request); without, a cold first plan.
    Pool placement: the widths the Serve app deploys, and the chunk cost `boundary_s` on the
    side's clock: Serve's measured boundary in real seconds (plus the emulated restore sleep,
    scaled) for the controller (`serve_clock` = time_scale), the same in unscaled seconds for the
    simulator (None)."""
    out = {"models": [MODEL] if prior else [], "slo_scale": 4.0, "placement": PLACEMENT}
    if PLACEMENT == "pool":
        from trident_rs.policy.payload_size import CHUNK_BOUNDARY_S

        boundary = CHUNK_OVERHEAD_S + CHUNK_BOUNDARY_S * serve_clock if serve_clock \
            else CHUNK_OVERHEAD_S / TIME_SCALE + CHUNK_BOUNDARY_S
        out.update(elastic=ELASTIC, boundary_s=round(boundary, 5))
        if serve_clock is None:
            out["widths"] = POOL_WIDTHS  # the Serve controller derives them from its deployments
    return out


def sim_config(start_cost_s: float) -> SimConfig:
    """The simulator's runtime costs. Pool placement: every launch pays Serve's measured per-hop
    cost (the chunk boundary's, in unscaled seconds: the emulated run pays it in real time);
    groups: the simulator's defaults, as before."""
    if PLACEMENT == "pool":
        return SimConfig(start_cost_s=start_cost_s, hop_overhead_s=CHUNK_OVERHEAD_S / TIME_SCALE)
    return SimConfig(start_cost_s=start_cost_s)


def run_sim(requests: list[Request], cost, start_cost_s: float, prior: bool = True) -> dict:
    cluster = Cluster(NODES, GPUS_PER_NODE, GPU_MEM)
    policy = registry.make_policy("trident", cluster, cost, **policy_options(prior))
    res = simulate(cluster, policy, cost, requests, sim_config(start_cost_s))
    m = summarize(res).to_dict()
    lat = [res.finish[r.id] - r.arrival for r in requests if r.id in res.finish]
    ok = [r.id in res.finish and res.finish[r.id] <= r.deadline for r in requests]
    out = stats(lat, ok, len(requests))
    out["plan_changes"] = res.plan_changes
    out["elasticity"] = sim_elasticity(res)
    out["engine_metrics"] = {k: m[k] for k in ("slo_attainment", "mean_latency_s", "p95_latency_s")}
    return out


def sim_elasticity(res) -> dict:
    """What the Serve controller counts (`request_log`), from the simulator's timelines: chunk
    launches, chunks at another width than the previous one, and chunks resumed after a pause
    (queued longer than the controller's PAUSE_S, in unscaled seconds)."""
    from trident_rs.serve.request_log import PAUSE_S

    out = {"chunk_grants": 0, "width_changes": 0, "resumed_after_pause": 0}
    for recs in res.timeline.values():
        chunks = [r for r in recs if r.steps is not None]
        out["chunk_grants"] += len(chunks)
        out["width_changes"] += sum(a.width != b.width for a, b in zip(chunks, chunks[1:]))
        out["resumed_after_pause"] += sum(r.steps[0] > 0 and r.queued_s >= PAUSE_S / TIME_SCALE for r in chunks)
    return out


def app_args(time_scale: float, prior: bool = True) -> dict:
    if PLACEMENT == "pool":  # slot replicas (no GPU held in Ray): each pool launch goes to one
        return {
            "models": [MODEL], "executor": "emulated", "time_scale": time_scale, "reserve_gpus": False,
            "cluster": {"nodes": NODES, "gpus_per_node": GPUS_PER_NODE, "gpu_memory_gb": GPU_MEM, "gpu_name": "L20"},
            "deployments": [{"stage": "encode", "width": 1, "replicas": 2 * NODES},
                            {"stage": "decode", "width": 1, "replicas": 2 * NODES}]
            + [{"stage": "diffuse", "width": w, "replicas": (2 if w == 1 else 1) * NODES} for w in (1, 2, 4, 8)],
            "policy": {"name": "trident", "tick_s": 0.5, "options": policy_options(prior, time_scale)},
            "slo_scale": 4.0,
            "limits": {"max_queue_per_model": 256},
        }
    return {
        "models": [MODEL], "executor": "emulated", "time_scale": time_scale, "reserve_gpus": True,
        "cluster": {"nodes": NODES, "gpus_per_node": GPUS_PER_NODE, "gpu_memory_gb": GPU_MEM, "gpu_name": "L20"},
        "deployments": [
            {"stage": "encode", "width": 1, "replicas": 1, "max_replicas": 4},
            {"stage": "diffuse", "width": 1, "replicas": 1},
            {"stage": "diffuse", "width": 2, "replicas": 0},
            {"stage": "diffuse", "width": 4, "replicas": 0},
            {"stage": "diffuse", "width": 8, "replicas": 0},
            {"stage": "decode", "width": 1, "replicas": 1, "max_replicas": 4},
        ],
        "policy": {"name": "trident", "tick_s": 0.5, "options": policy_options(prior)},
        "slo_scale": 4.0,
        "limits": {"max_queue_per_model": 256},
    }


def body(r: Request, time_scale: float, slo_scale: bool = True) -> dict:
    b = {"model": r.model, "prompt": "a red fox", "size": f"{r.shape.width}x{r.shape.height}", "steps": r.steps}
    if slo_scale:
        b["slo_ms"] = (r.deadline - r.arrival) * time_scale * 1000.0
    return b


async def replay(base: str, requests: list[Request], time_scale: float, timeout_s: float) -> list[dict]:
    """Send each request at arrival × time_scale after the start; one task per request (bounded)."""
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as c:
        t0 = time.perf_counter()

        async def one(r: Request) -> dict:
            at = r.arrival * time_scale
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            sent = time.perf_counter()
            try:
                resp = await c.post("/v1/images/generations", json=body(r, time_scale))
                status = resp.status_code
            except httpx.HTTPError as e:
                status = f"{type(e).__name__}"
            done = time.perf_counter()
            return {"id": r.id, "status": status, "arrival_scaled_s": at, "send_lag_s": sent - t0 - at,
                    "latency_scaled_s": done - t0 - at, "slo_scaled_s": (r.deadline - r.arrival) * time_scale}

        return await asyncio.gather(*(one(r) for r in requests))


def wait_for_plan(app: str, timeout_s: float) -> tuple[dict, float]:
    """Wait until every stage deployment RUNS the replica count the controller published."""
    from ray import serve

    from trident_rs.serve.scaling import read_count

    t0 = time.perf_counter()
    while True:
        deps = serve.status().applications[app].deployments
        want = {d: read_count(app, d) for d in deps if d not in ("Ingress", "Controller")}
        have = {d: deps[d].replica_states.get("RUNNING", 0) for d in want}
        if all(w is None or have[d] == w for d, w in want.items()) or time.perf_counter() - t0 > timeout_s:
            return have, time.perf_counter() - t0
        time.sleep(0.25)


def run_serve(requests: list[Request], time_scale: float, warm_shapes: list[Request], prior: bool = True) -> dict:
    from ray import serve

    from trident_rs.serve.app import build_app
    from trident_rs.devtools.cluster import local_cluster
    from trident_rs.devtools.local import private_serve

    ray_cluster = (local_cluster(nodes=NODES, gpus_per_node=GPUS_PER_NODE) if NODES > 1
                   else private_serve(num_gpus=NODES * GPUS_PER_NODE))
    with ray_cluster as port:
        base = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        serve.run(build_app(app_args(time_scale, prior)), name="svs", route_prefix="/")
        start_s = time.perf_counter() - t
        # warm-up: one request per shape (no SLO) so the policy plans and Serve starts replicas
        with httpx.Client(base_url=base, timeout=300) as c:
            for r in warm_shapes:
                assert c.post("/v1/images/generations", json=body(r, time_scale, slo_scale=False)).status_code == 200
        replicas, settle_s = wait_for_plan("svs", 120)
        load_before = os.getloadavg()[0]
        per = asyncio.run(replay(base, requests, time_scale, timeout_s=300))
        load_after = os.getloadavg()[0]  # a machine shared with other jobs: how loaded it was
        with httpx.Client(base_url=base, timeout=30) as c:
            status = c.get("/v1/status").json()
    done = [p for p in per if p["status"] == 200]
    lat = [p["latency_scaled_s"] / time_scale for p in done]
    ok = [p["status"] == 200 and p["latency_scaled_s"] <= p["slo_scaled_s"] for p in per]
    out = stats(lat, ok, len(requests))
    out.update(errors=[p for p in per if p["status"] != 200][:5],
               max_send_lag_ms=round(1000 * max(p["send_lag_s"] for p in per), 1),
               load_avg_1min=[round(load_before, 1), round(load_after, 1)], app_start_s=round(start_s, 1), warm_settle_s=round(settle_s, 1), replicas_at_start=replicas,
               replans=len(status.get("replans", [])), last_counts=(status.get("replans") or [{}])[-1].get("counts"),
               controller_stage_latency_s=status.get("stage_latency_s"),
               elasticity={k: status.get("stats", {}).get(k, 0) for k in ("chunk_grants", "width_changes",
                                                                          "resumed_after_pause")},
               per_request=per)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="flux-paper")
    ap.add_argument("--n", type=int, default=80, help="first N requests of the trace")
    ap.add_argument("--rate-scale", type=float, default=1 / 16, help="flux-paper is for 128 GPUs; 8 here")
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--slo-scale", type=float, default=4.0)
    ap.add_argument("--no-serve", action="store_true", help="simulator only")
    ap.add_argument("--no-prior", action="store_true", help="trident without the served models as its prior")
    ap.add_argument("--nodes", type=int, default=1, help="nodes of 8 GPUs (> 1: a local multi-node Ray cluster)")
    ap.add_argument("--placement", choices=["groups", "pool"], default="groups",
                    help="trident's placement on both sides (pool: the simulator's shared pool, on slot replicas)")
    ap.add_argument("--elastic", action="store_true", help="pool: step-level elasticity (diffuse chunk grants)")
    ap.add_argument("--chunk-overhead-ms", type=float, default=22.5,
                    help="pool: Serve's measured cost of a chunk boundary (benchmarks/chunk_overhead_serve.py)")
    ap.add_argument("--skip", type=int, default=0, help="start at request SKIP of the trace (time shifted to 0): "
                    "e.g. around the mid-run shift of shift-flux")
    args = ap.parse_args()
    global NODES, PLACEMENT, ELASTIC, CHUNK_OVERHEAD_S, TIME_SCALE
    NODES, PLACEMENT, ELASTIC = args.nodes, args.placement, args.elastic
    CHUNK_OVERHEAD_S, TIME_SCALE = args.chunk_overhead_ms / 1000, args.time_scale
    cost = CostModel.default()
    reqs = load_workload(args.workload, model=MODEL, rate_scale=args.rate_scale, slo_scale=args.slo_scale,
                         cost=cost)[args.skip: args.skip + args.n]
    if args.skip and reqs:
        import dataclasses

        t0 = reqs[0].arrival
        reqs = [dataclasses.replace(r, arrival=r.arrival - t0, deadline=r.deadline - t0) for r in reqs]
    print(f"{args.workload} ×{args.rate_scale:g}, {len(reqs)} from #{args.skip}: {describe(reqs)}; "
          f"{NODES}×{GPUS_PER_NODE} GPUs; time_scale {args.time_scale:g}")
    prior = not args.no_prior
    sim20, sim0 = run_sim(reqs, cost, 20.0, prior), run_sim(reqs, cost, 0.0, prior)
    warm = list({(r.shape, r.steps): r for r in reqs}.values())
    name = "serve_vs_sim" if (NODES, args.workload) == (1, "flux-paper") else \
        f"serve_vs_sim_{NODES}nodes_{args.workload}"
    if PLACEMENT == "pool":
        name += "_pool" + ("_elastic" if ELASTIC else "") + (f"_ts{args.time_scale:g}" if args.time_scale != 0.05 else "")
    out = Path(__file__).parent / "results" / f"{name}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    same = old.get("n") == len(reqs) and old.get("rate_scale") == args.rate_scale and \
        old.get("time_scale") == args.time_scale and old.get("workload") == args.workload
    runs = old.get("serve", {}) if same and isinstance(old.get("serve"), dict) and "requests" not in old["serve"] else {}
    runs.pop("scaled-policy", None)  # a benchmark-only patch from before the controller scaled its cost model
    if not args.no_serve:
        runs["shipped"] = run_serve(reqs, args.time_scale, warm, prior)
    rows = [("sim, start cost 20 s", sim20), ("sim, start cost 0 s", sim0)]
    rows += [(f"Serve ×{args.time_scale:g} {v}", r) for v, r in runs.items()]
    print(f"\n{'run':28s} {'attainment':>10s} {'mean s':>8s} {'P50 s':>8s} {'P95 s':>8s} {'done':>7s}")
    for name, m in rows:
        print(f"{name:28s} {m['slo_attainment']:10.3f} {m['mean_latency_s']:8.2f} {m['p50_latency_s']:8.2f} "
              f"{m['p95_latency_s']:8.2f} {m['completed']:>3d}/{m['requests']}")
    ratios = {}
    for v, serve_res in runs.items():
        for key, sim in (("vs_sim20", sim20), ("vs_sim0", sim0)):
            ratios[f"{v}_{key}"] = {k: serve_res[k] / sim[k] if sim[k] else math.nan
                                    for k in ("slo_attainment", "mean_latency_s", "p50_latency_s", "p95_latency_s")}
        print(f"\n{v}: app start {serve_res['app_start_s']} s, warm settle {serve_res['warm_settle_s']} s, "
              f"replicas {serve_res['replicas_at_start']}, final plan {serve_res['last_counts']}, "
              f"max send lag {serve_res['max_send_lag_ms']} ms, errors {len(serve_res['errors'])}, "
              f"elasticity {serve_res.get('elasticity')}, load average {serve_res.get('load_avg_1min')}")
    if ratios:
        print("\nServe / sim ratio:")
        for key, r in ratios.items():
            print(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    doc = {"workload": args.workload, "n": len(reqs), "rate_scale": args.rate_scale, "time_scale": args.time_scale,
           "slo_scale": args.slo_scale, "cluster": f"{NODES}x{GPUS_PER_NODE}", "policy": "trident",
           "placement": PLACEMENT, "elastic": ELASTIC, "chunk_overhead_s": CHUNK_OVERHEAD_S if PLACEMENT == "pool" else None,
           "sim_policy_options": policy_options(prior), "serve_policy_options": policy_options(prior, args.time_scale),
           "sim_start_cost_20": sim20, "sim_start_cost_0": sim0, "serve": runs, "ratios": ratios}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
