"""Re-shapes on a local 2-node Ray cluster (2 x 8 fake GPUs): no deadlock, no request lost.

On `trident_rs.devtools.cluster.local_cluster` (two raylets on this machine, 8 fake GPUs each),
the emulated app (sd3, encode-w1, diffuse-w1/w2/w4/w8, decode-w1; every replica reserves its GPUs,
a width-k one as a STRICT_PACK placement group) is driven through a sequence of replica counts
shaped to fragment the nodes (13-14 of the 16 GPUs for diffuse, widths mixed, a width-8 group in
most shapes). Each re-shape is handed to the controller (`Controller.reshape`), which rolls it
out as it does a plan: decreases first, then the widest deployments first (`Broker.roll`).
For each: the time until Serve runs exactly those counts, or "stuck" after `--timeout-s`
(`--direct` publishes the counts to Serve's autoscaler at once instead, for comparison). Meanwhile a client sends small requests and counts
any answer but 200. At the end: every placement group's bundles on one node (width-k groups
never span nodes) and the controller's replica registry (Ray node of each replica).

    .venv/bin/python benchmarks/serve_multinode.py [--timeout-s 90]
Prints a table and writes benchmarks/results/serve_multinode.json.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx
from ray import serve

from trident_rs.devtools.cluster import local_cluster, placement_groups_by_node
from trident_rs.serve.app import build_app

WIDTHS = (1, 2, 4, 8)
ARGS = {
    "models": ["sd3"], "executor": "emulated", "time_scale": 0.01,
    "cluster": {"nodes": 2, "gpus_per_node": 8},
    "deployments": [{"stage": "encode", "replicas": 1, "max_replicas": 1},
                    *({"stage": "diffuse", "width": w, "replicas": int(w == 1), "max_replicas": 16 // w}
                      for w in WIDTHS),
                    {"stage": "decode", "replicas": 1, "max_replicas": 1}],
    "policy": {"name": "greedy", "options": {"replan": False}},
}
# diffuse replicas per width (w1, w2, w4, w8); encode and decode keep one each
SHAPES = [(1, 0, 1, 1), (2, 0, 3, 0), (1, 2, 0, 1), (6, 0, 2, 0), (2, 6, 0, 0), (1, 0, 1, 1),
          (6, 0, 0, 1), (2, 4, 1, 0), (1, 2, 0, 1), (4, 5, 0, 0), (1, 0, 1, 1), (2, 0, 3, 0)]


def counts_of(shape: tuple[int, ...]) -> dict[str, int]:
    return {"encode-w1": 1, "decode-w1": 1, **{f"diffuse-w{w}": n for w, n in zip(WIDTHS, shape)}}


def replica_states(app: str) -> dict[str, dict[str, int]]:
    deps = serve.status().applications[app].deployments
    return {name: dict(d.replica_states) for name, d in deps.items() if "-w" in name}


def reached(states: dict[str, dict[str, int]], counts: dict[str, int]) -> bool:
    return all(states.get(d, {}).get("RUNNING", 0) == n and sum(states.get(d, {}).values()) == n
               for d, n in counts.items())


class Client(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.codes = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/v1/images/generations", json={"model": "sd3", "prompt": "x", "size": "256x256",
                                                               "steps": 4})
                    self.codes.append(r.status_code)
                except httpx.HTTPError as e:
                    self.codes.append(type(e).__name__)
                self.stop.wait(0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout-s", type=float, default=90.0)
    ap.add_argument("--shapes", type=int, default=len(SHAPES))
    ap.add_argument("--direct", action="store_true", help="publish each shape's counts at once (no roll-out)")
    args = ap.parse_args()
    rows = []
    with local_cluster(nodes=2, gpus_per_node=8) as port:
        serve.run(build_app(ARGS), name="multi", route_prefix="/")
        controller = serve.get_deployment_handle("Controller", "multi")
        url = f"http://127.0.0.1:{port}"
        client = Client(url)
        client.start()
        try:
            for i, shape in enumerate(SHAPES[:args.shapes]):
                counts = counts_of(shape)
                t0 = time.perf_counter()
                if args.direct:
                    from trident_rs.serve.scaling import publish_counts

                    publish_counts("multi", counts)
                else:
                    controller.reshape.remote(counts, f"benchmark shape {i + 1}").result()
                while not reached(states := replica_states("multi"), counts):
                    if time.perf_counter() - t0 > args.timeout_s:
                        break
                    time.sleep(0.1)
                took = time.perf_counter() - t0
                ok = reached(states, counts)
                rows.append({"step": i + 1, "target": {k: v for k, v in counts.items() if v},
                             "reached": ok, "seconds": round(took, 2),
                             "states": {d: s for d, s in states.items() if s}})
                print(f"re-shape {i + 1:2d} -> {shape} (w1,w2,w4,w8): "
                      f"{'RUNNING' if ok else 'STUCK'} after {took:.1f} s"
                      + ("" if ok else f"; {rows[-1]['states']}"), flush=True)
            time.sleep(1.0)
        finally:
            client.stop.set()
            client.join(150)
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        pgs = placement_groups_by_node()
    spanning = [p for p in pgs if len(p["nodes"]) > 1]
    registry = status.get("replicas", {})
    codes = client.codes
    result = {"reshapes": rows, "all_reached": all(r["reached"] for r in rows),
              "reshape_s": sorted(r["seconds"] for r in rows if r["reached"]),
              "requests": len(codes), "requests_not_200": [c for c in codes if c != 200],
              "placement_groups": len(pgs), "placement_groups_spanning_nodes": spanning,
              "registry_nodes": len(registry.get("nodes", {})), "registry_replicas": registry.get("replicas", []),
              "stats": status.get("stats"), "regrants": status.get("ingress", {})}
    print(f"{len(rows)} re-shapes, all reached: {result['all_reached']}; re-shape s: {result['reshape_s']}")
    print(f"requests: {len(codes)}, not 200: {len(result['requests_not_200'])}; placement groups: {len(pgs)}, "
          f"spanning nodes: {len(spanning)}; registry: {len(registry.get('replicas', []))} replicas on "
          f"{result['registry_nodes']} nodes")
    result["mode"] = "direct" if args.direct else "rolled out by the controller"
    out = Path(__file__).parent / "results" / ("serve_multinode_direct.json" if args.direct else "serve_multinode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
