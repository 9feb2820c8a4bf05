"""Overhead of the Serve runtime with near-zero work (emulated executors, time_scale ~ 0).

Measures, on a fresh local Ray with fake GPUs:
- one stage hop: `handle.run.remote(payload)` to a stage deployment, awaited;
- a 3-stage chain passing DeploymentResponses unawaited (per hop = total / 3);
- a full HTTP request through the ingress (controller grants + 3 hops + PNG);
- re-shape: time from the controller publishing a new replica count to Serve showing it RUNNING.

    .venv/bin/python benchmarks/serve_overhead.py [--n 200]
Prints a table and writes benchmarks/results/serve_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve

from trident_rs.executors.base import StagePayload
from trident_rs.request import GenerationParams
from trident_rs.serve.app import build_app
from trident_rs.serve.scaling import publish_counts
from trident_rs.vocab import percentile

ARGS = {
    "models": ["sd3"], "executor": "emulated", "time_scale": 1e-9,
    "cluster": {"nodes": 1, "gpus_per_node": 8},
    "deployments": [{"stage": "encode"}, {"stage": "diffuse", "max_replicas": 4}, {"stage": "decode"}],
    "policy": {"name": "greedy", "options": {"replan": False}},
}


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(percentile(a, 50), 2), "p99_ms": round(percentile(a, 99), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(xs)}


def running(dep: str) -> int:
    return serve.status().applications["bench"].deployments[dep].replica_states.get("RUNNING", 0)


def reshape_s(dep: str, n: int, timeout_s: float = 120) -> float:
    t0 = time.perf_counter()
    publish_counts("bench", {dep: n})
    while running(dep) != n:
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{dep} never reached {n} replicas")
        time.sleep(0.05)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_gpus=8, num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name="bench", route_prefix="/")
        h = {n: serve.get_deployment_handle(n, "bench") for n in ("encode-w1", "diffuse-w1", "decode-w1")}
        p = StagePayload(GenerationParams(model="sd3", prompt="x", height=256, width=256, steps=1).resolved())
        for _ in range(10):
            h["encode-w1"].run.remote(p).result()
        one, chain, http = [], [], []
        for _ in range(args.n):
            t = time.perf_counter()
            h["encode-w1"].run.remote(p).result()
            one.append(time.perf_counter() - t)
        for _ in range(args.n):
            t = time.perf_counter()
            h["decode-w1"].run.remote(h["diffuse-w1"].run.remote(h["encode-w1"].run.remote(p))).result()
            chain.append((time.perf_counter() - t) / 3)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            body = {"model": "sd3", "prompt": "x", "size": "256x256", "steps": 1}
            for _ in range(5):
                c.post("/v1/images/generations", json=body)
            for _ in range(args.n):
                t = time.perf_counter()
                assert c.post("/v1/images/generations", json=body).status_code == 200
                http.append(time.perf_counter() - t)
        up, down = reshape_s("diffuse-w1", 3), reshape_s("diffuse-w1", 1)
        result = {"one_hop": pct(one), "chained_per_hop": pct(chain), "http_request_3_stages": pct(http),
                  "reshape_up_1_to_3_s": round(up, 2), "reshape_down_3_to_1_s": round(down, 2)}
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'measure':28s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    for k in ("one_hop", "chained_per_hop", "http_request_3_stages"):
        r = result[k]
        print(f"{k:28s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['mean_ms']:8.2f}")
    print(f"re-shape diffuse-w1 1->3 RUNNING: {result['reshape_up_1_to_3_s']} s; 3->1: {result['reshape_down_3_to_1_s']} s")
    out = Path(__file__).parent / "results" / "serve_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
