"""What one diffuse chunk boundary costs on the Serve runtime (issue 17), emulated, one node.

Two apps on one private Ray (8 fake GPUs), emulated executors with no emulated boundary sleep
(`executor_options.chunk_boundary_s: 0`), the `chunk-script` policy running one request at a time:
- `one`: diffuse in one chunk grant of all the steps;
- `chunked`: diffuse in chunk grants of `--chunk` steps each (steps / chunk chunks).
Both sleep the same total diffuse time, so the latency difference over the extra boundaries is
what a boundary costs the runtime: the chunk's result put in the object store as the ingress's
ref, the `acquire` round trip to the controller (reporting the chunk, the policy deciding, the
next grant), and the next stage call routed to its replica with that ref. Requests are sent one
after another, alternating apps, `--repeats` times; medians reported.

    .venv/bin/python benchmarks/chunk_overhead_serve.py [--steps 28] [--chunk 2] [--repeats 15] [--time-scale 0.05]

Writes benchmarks/results/chunk_overhead_serve.json. The figure sets `boundary_s` (the pool
policy's chunk cost, on the controller's clock) in the elastic Serve configs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx


def app_args(steps: int, chunk: int, time_scale: float) -> dict:
    return {
        "models": ["sd3"], "executor": "emulated", "time_scale": time_scale,
        "executor_options": {"chunk_boundary_s": 0.0},
        "cluster": {"nodes": 1, "gpus_per_node": 8},
        "deployments": [{"stage": "encode", "width": 1, "replicas": 1}, {"stage": "diffuse", "width": 1, "replicas": 1},
                        {"stage": "decode", "width": 1, "replicas": 1}],
        "policy": {"name": "chunk-script", "tick_s": 0.5, "options": {"chunks": [[chunk, 1]]}},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--chunk", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--time-scale", type=float, default=0.05)
    args = ap.parse_args()
    from ray import serve

    from trident_rs.devtools.local import private_serve
    from trident_rs.serve.app import build_app

    chunks = -(-args.steps // args.chunk)
    body = {"model": "sd3", "prompt": "overhead", "height": 512, "width": 512, "steps": args.steps}
    lat: dict[str, list[float]] = {"one": [], "chunked": []}
    with private_serve(num_gpus=8, log_to_driver=False) as port:
        serve.run(build_app(app_args(args.steps, args.steps, args.time_scale)), name="one", route_prefix="/one")
        serve.run(build_app(app_args(args.steps, args.chunk, args.time_scale)), name="chunked", route_prefix="/chunked")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for i in range(args.repeats + 2):  # two warm-up rounds
                for app in ("one", "chunked"):
                    t = time.perf_counter()
                    r = c.post(f"/{app}/v1/generate", json=body, headers={"X-Request-Id": f"{app}-{i}"})
                    took = time.perf_counter() - t
                    assert r.status_code == 200, r.text
                    if i >= 2:
                        lat[app].append(took)
            prog = c.get("/chunked/v1/requests/chunked-2").json()
    assert prog["chunks"] == chunks, prog
    med = {k: statistics.median(v) for k, v in lat.items()}
    per_chunk = (med["chunked"] - med["one"]) / (chunks - 1)
    diffs = sorted((b - a) / (chunks - 1) for a, b in zip(lat["one"], lat["chunked"]))
    doc = {"steps": args.steps, "chunk": args.chunk, "chunks": chunks, "repeats": args.repeats,
           "time_scale": args.time_scale, "median_latency_s": med, "per_chunk_overhead_s": per_chunk,
           "per_chunk_overhead_pairs_s": {"p25": diffs[len(diffs) // 4], "median": statistics.median(diffs),
                                          "p75": diffs[3 * len(diffs) // 4]},
           "latencies_s": lat}
    print(f"sd3 512x512 {args.steps} steps, time_scale {args.time_scale}: one chunk {med['one'] * 1000:.0f} ms, "
          f"{chunks} chunks {med['chunked'] * 1000:.0f} ms (medians of {args.repeats}) -> "
          f"{per_chunk * 1000:.1f} ms per extra chunk boundary "
          f"(pairwise p25/median/p75 {', '.join(f'{1000 * v:.1f}' for v in doc['per_chunk_overhead_pairs_s'].values())} ms)")
    out = Path(__file__).parent / "results" / "chunk_overhead_serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
