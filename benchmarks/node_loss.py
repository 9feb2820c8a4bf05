"""A worker node removed under load and added back, on a local multi-node Ray cluster (issue 20).

    PYTHONPATH=. .venv/bin/python benchmarks/node_loss.py --seeds 1 2 3 [--load-s 60] [--rate 1.2]

For each seed, on a fresh cluster (`benchmarks/cluster_faults.py`: a head with no GPUs, 3 worker
raylets x 2 fake GPUs, encode/diffuse/decode x 2 replicas filling them, outputs padded to 256 KiB
so they live in the maker node's object store): open-loop Poisson requests at `--rate` for
`--load-s`; at a random time in [15, 25] s a worker node hosting no Ingress/Controller replica is
removed (`Cluster.remove_node`: its raylet killed, with its replicas and objects); `--down-s` later
a fresh node of the same size is added. Reports per seed: sent/completed/lost, stage re-runs
(replica deaths) and re-derived stages (outputs lost with the node), how long the controller's
registry took to drop the node's replicas and to register replicas on the new node, and whether
the plan's groups are bound there again. `--policy trident` runs the solver's replica groups
(load re-plans off): the controller tells the policy the node is down (`ClusterState.down`, from
Ray's node list) and it re-plans onto the nodes left, then back when the new node takes the
lost one's place; the re-plans and how long after the removal and the add they came are reported.
Writes benchmarks/results/node_loss[_<policy>].json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from cluster_faults import (APP, Load, app_args, registry_nodes, remove_node, status, wait_for)


def one_seed(seed: int, load_s: float, rate: float, down_s: float, policy: str = "greedy") -> dict:
    from ray import serve

    from trident_rs.devtools.cluster import node_cluster
    from trident_rs.serve.app import build_app

    rng = random.Random(seed)
    with node_cluster(workers=3, gpus_per_node=2, head_gpus=0, cpus_per_node=1, head_cpus=2) as lc:
        serve.run(build_app(app_args(policy=policy)), name=APP, route_prefix="/")
        url = lc.url
        def planned_replicas_registered() -> bool:  # greedy: all 6; trident: its first plan's
            st = status(url)
            return sum(map(len, registry_nodes(st).values())) == sum(st["counts"].values())

        assert wait_for(planned_replicas_registered, 120), "replicas"
        warm = Load(url, rate=2.0, seed=1000 + seed)
        asyncio.run(warm.run(4))
        load = Load(url, rate=rate, seed=seed)
        events: dict = {}

        def faults() -> None:
            time.sleep(rng.uniform(15, 25))
            t = time.monotonic()
            events["removed"] = remove_node(lc, rng)
            events["removed"]["t"] = round(t - load.t0, 2)
            gone = events["removed"]["node"]
            events["registry_dropped_s"] = (round(time.monotonic() - t, 2) if wait_for(
                lambda: gone not in registry_nodes(status(url)), 60, 0.2) else None)
            events["policy_told_down_s"] = (round(time.monotonic() - t, 2) if wait_for(
                lambda: status(url)["cluster"]["down"], 60, 0.2) else None)
            time.sleep(max(0.0, down_s - (time.monotonic() - t)))
            t2 = time.monotonic()
            new = lc.add()
            events["added"] = {"node": new, "t": round(t2 - load.t0, 2)}
            seen: dict[str, float] = {}  # when each was first seen, polled together
            checks = {"registry_new_node_s": lambda st: new in registry_nodes(st),
                      "policy_told_back_s": lambda st: not st["cluster"]["down"]}
            while len(seen) < len(checks) and time.monotonic() - t2 < 120:
                st = status(url)
                seen.update({k: round(time.monotonic() - t2, 2) for k, ok in checks.items() if k not in seen and ok(st)})
                time.sleep(0.2)
            events.update({k: seen.get(k) for k in checks})

        load.t0 = time.monotonic()
        client = load.start(load_s)  # in its own thread: Ray adds nodes from the main thread only
        try:
            faults()
        finally:
            client.join()
        st = status(url)
        new = events.get("added", {}).get("node")
        regs = registry_nodes(st)
        bound_new = sorted({g.get("replica") for g in st.get("plan", [])}
                           & {r["replica_id"] for r in st.get("replicas", {}).get("replicas", []) if r["node_id"] == new})
        after = Load(url, rate=2.0, seed=2000 + seed)  # the cluster as it is now serves
        asyncio.run(after.run(5))
    res = {"seed": seed, "rate_rps": rate, "load_s": load_s, "down_s": down_s, **load.summary(),
           "after": {k: v for k, v in after.summary().items() if k in ("sent", "completed", "lost")},
           "events": events, "registry_after": {k[:12]: v for k, v in regs.items()},
           "groups_bound_on_new_node": len(bound_new),
           "ingress_rederive": (st.get("ingress") or {}).get("rederive"),
           "node_replans": [{"reason": r["reason"], "counts": r["counts"], "wall": r["wall"]}
                            for r in st.get("replans", []) if "node(s)" in r["reason"]],
           "controller_stats": st.get("stats")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--load-s", type=float, default=60)
    ap.add_argument("--rate", type=float, default=1.2)
    ap.add_argument("--down-s", type=float, default=15)
    ap.add_argument("--policy", choices=("greedy", "trident"), default="greedy")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    a.out = a.out or str(Path(__file__).parent / "results" / f"node_loss{'' if a.policy == 'greedy' else '_' + a.policy}.json")
    runs = []
    for seed in a.seeds:
        r = one_seed(seed, a.load_s, a.rate, a.down_s, a.policy)
        runs.append(r)
        ev = r["events"]
        print(f"seed {seed}: sent {r['sent']} completed {r['completed']} lost {r['lost']} | stage re-runs "
              f"{r['stage_reruns']}, re-derived stages {r['rederived_stages']} ({r['rederived_requests']} requests) | "
              f"node {str(ev.get('removed', {}).get('node'))[:12]} removed at {ev.get('removed', {}).get('t')} s with "
              f"{ev.get('removed', {}).get('replicas')}; registry dropped it after {ev.get('registry_dropped_s')} s; "
              f"new node registered after {ev.get('registry_new_node_s')} s, {r['groups_bound_on_new_node']} groups "
              f"bound there | policy told down after {ev.get('policy_told_down_s')} s, back after "
              f"{ev.get('policy_told_back_s')} s; node re-plans {[x['reason'] for x in r['node_replans']]} | "
              f"P95 {r['p95_s']} s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "config": app_args(policy=a.policy)}, indent=1, default=str))
    ok = all(r["lost"] == 0 for r in runs)
    print(f"{len(runs)} runs, lost {sum(r['lost'] for r in runs)}, re-derived stages "
          f"{sum(r['rederived_stages'] for r in runs)}; written {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
