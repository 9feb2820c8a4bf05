"""Soak: emulated load at 0.7x capacity for 30+ minutes on a local multi-node cluster, with a random
fault every 30-60 s (issue 20).

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/soak.py [--faults-s 1800] [--before-s 120]
        [--after-s 120] [--factor 0.7] [--seed 0] [--out benchmarks/results/soak.json]

The cluster and app of `benchmarks/cluster_faults.py` (head without GPUs; 3 worker raylets x 2 fake
GPUs; encode/diffuse/decode x 2 replicas; outputs padded to 256 KiB). Capacity is measured with a
closed loop, then Poisson requests at `--factor` x capacity run for `--before-s` without faults,
`--faults-s` with a fault every U(30, 60) s drawn uniformly from:
  - replica kill: a random stage replica (`ray.kill`, Serve replaces it);
  - node removal and re-add: a worker hosting no Ingress/Controller replica is removed
    (`Cluster.remove_node`), and a fresh node added back 15 s later;
  - controller kill: the Controller replica (`ray.kill`; Serve restarts it);
and `--after-s` without faults; then every answer is awaited. Every `--sample-s`: the RSS of the
ingress and controller processes, the objects in all nodes' object stores, requests in flight.
Reports sent/completed/lost; P95 before, during and after the faults; the RSS slope over the last
20 minutes (must be <= 1 MB/min); objects left over after the drain. Writes JSON and a PNG plot
under benchmarks/results/ and prints a table. SIGTERM and Ctrl-C stop the load and the whole
cluster (the `node_cluster` block), as does the normal end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from cluster_faults import (APP, Load, app_args, capacity, kill_controller, kill_stage_replica, pct,
                            plasma_objects, registry_nodes, remove_node, rss_mb, status, wait_for)

RESULTS = Path(__file__).parent / "results"
FAULTS = ("replica_kill", "node_remove_readd", "controller_kill")
NODE_DOWN_S = 15.0


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, MB) samples, in MB/min."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    return None if den == 0 else round(60 * sum((t - mt) * (v - mv) for t, v in samples) / den, 3)


class Soak:
    def __init__(self, lc, args):
        self.lc, self.a = lc, args
        self.rng = random.Random(args.seed)
        self.samples: list[dict] = []
        self.faults: list[dict] = []
        self.load: Load | None = None

    def sample(self) -> None:
        from trident_rs.devtools.cluster import actor_pids

        t = round(time.monotonic() - self.load.t0, 1)
        row: dict = {"t": t}
        for dep in ("Ingress", "Controller"):
            pids = list(actor_pids((dep,), APP).values())
            row[f"{dep.lower()}_pid"] = pids[0] if pids else None
            row[f"{dep.lower()}_rss_mb"] = round(rss_mb(pids[0]), 1) if pids and rss_mb(pids[0]) else None
        try:
            row["objects"], row["object_mib"] = plasma_objects()
        except Exception:  # noqa: BLE001 - a node being removed
            row["objects"], row["object_mib"] = None, None
        row["in_flight"] = sum("status" not in r for r in self.load.rows)
        row["sent"] = len(self.load.rows)
        self.samples.append(row)

    def fault(self, kind: str) -> dict:
        t = round(time.monotonic() - self.load.t0, 1)
        if kind == "replica_kill":
            ev = kill_stage_replica(self.rng)
        elif kind == "controller_kill":
            ev = kill_controller()
        else:
            ev = remove_node(self.lc, self.rng)
            if ev.get("node"):
                self.wait(NODE_DOWN_S)
                ev["added"] = self.lc.add()
        ev.update(t=t, kind=kind)
        return ev

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, sampling every `sample_s` meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not self.samples or time.monotonic() - self.load.t0 - self.samples[-1]["t"] >= self.a.sample_s:
                self.sample()
            time.sleep(min(left, 1.0))

    def run(self, rate: float) -> None:
        a = self.a
        total = a.before_s + a.faults_s + a.after_s
        self.load = Load(self.lc.url, rate=rate, seed=a.seed)
        self.load.t0 = time.monotonic()
        client = self.load.start(total)
        try:
            self.wait(a.before_s)
            end = a.before_s + a.faults_s
            while True:
                gap = self.rng.uniform(30, 60)
                if time.monotonic() - self.load.t0 + gap > end:
                    break
                self.wait(gap)
                ev = self.fault(self.rng.choice(FAULTS))
                self.faults.append(ev)
                print(f"[{ev['t']:7.1f} s] {ev['kind']}: {ev.get('replica') or ev.get('node') or ''}", flush=True)
            self.wait(max(0.0, total - (time.monotonic() - self.load.t0)))
            while client.is_alive():  # the last answers
                self.wait(2.0)
            self.wait(20.0)  # the object stores settle after the last request
        finally:
            if self.load._stop is not None:
                self.load._stop.set()
            client.join(timeout=5)


def report(soak: Soak, a, cap: float, rate: float, extra: dict) -> dict:
    load = soak.load
    rows = load.rows
    t1, t2 = a.before_s, a.before_s + a.faults_s
    phase = {"before": [r for r in rows if r["t"] < t1], "during": [r for r in rows if t1 <= r["t"] < t2],
             "after": [r for r in rows if r["t"] >= t2]}
    summary = load.summary()
    p95 = {k: pct([r["latency_s"] for r in v if r.get("status") == 200], 95) for k, v in phase.items()}
    end_t = soak.samples[-1]["t"] if soak.samples else 0
    win = [s for s in soak.samples if s["t"] >= end_t - 1200]
    slopes = {}
    for dep in ("ingress", "controller"):
        pts = [(s["t"], s[f"{dep}_rss_mb"]) for s in win if s.get(f"{dep}_rss_mb")]
        last_pid = win[-1].get(f"{dep}_pid") if win else None
        same = [(s["t"], s[f"{dep}_rss_mb"]) for s in win if s.get(f"{dep}_pid") == last_pid and s.get(f"{dep}_rss_mb")]
        slopes[dep] = {"slope_mb_per_min_last_20min": slope_mb_per_min(pts),
                       "slope_last_process_mb_per_min": slope_mb_per_min(same),
                       "last_process_span_min": round((same[-1][0] - same[0][0]) / 60, 1) if len(same) > 1 else 0,
                       "processes": len({s.get(f"{dep}_pid") for s in soak.samples if s.get(f"{dep}_pid")}),
                       "rss_mb_first": soak.samples[0].get(f"{dep}_rss_mb") if soak.samples else None,
                       "rss_mb_last": soak.samples[-1].get(f"{dep}_rss_mb") if soak.samples else None}
    objs = [s["objects"] for s in soak.samples if s.get("objects") is not None]
    per_min: dict[int, list[float]] = {}
    for r in rows:
        if r.get("status") == 200:
            per_min.setdefault(int(r["t"] // 60), []).append(r["latency_s"])
    return {
        "capacity_rps": round(cap, 3), "factor": a.factor, "rate_rps": round(rate, 3),
        "before_s": a.before_s, "faults_s": a.faults_s, "after_s": a.after_s, "seed": a.seed,
        **{k: summary[k] for k in ("sent", "completed", "lost", "other", "lost_detail", "stage_reruns",
                                   "rederived_stages", "rederived_requests")},
        "p95_s": p95, "p50_s": {k: pct([r["latency_s"] for r in v if r.get("status") == 200], 50)
                                for k, v in phase.items()},
        "p95_per_minute_s": {m: pct(v, 95) for m, v in sorted(per_min.items())},
        "faults": soak.faults, "fault_counts": {k: sum(f["kind"] == k for f in soak.faults) for k in FAULTS},
        "memory": slopes, "memory_ok": all((v["slope_mb_per_min_last_20min"] or 0) <= 1.0 for v in slopes.values()),
        "objects": {"first": objs[0] if objs else None, "max": max(objs) if objs else None,
                    "after_drain": objs[-1] if objs else None},
        "samples": soak.samples, **extra,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = [x["t"] / 60 for x in s]
    fig, ax = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for dep, c in (("ingress", "C0"), ("controller", "C1")):
        ax[0].plot(t, [x.get(f"{dep}_rss_mb") for x in s], c, label=f"{dep} RSS (MB)")
    ax[0].legend()
    ax[0].set_ylabel("MB")
    ax[1].plot(t, [x.get("objects") for x in s], "C2", label="objects in the object stores")
    ax[1].plot(t, [x.get("in_flight") for x in s], "C3", label="requests in flight")
    ax[1].legend()
    pm = res["p95_per_minute_s"]
    ax[2].step([int(m) + 0.5 for m in pm], list(pm.values()), "C4", where="mid", label="P95 latency per minute (s)")
    ax[2].legend()
    ax[2].set_xlabel("minutes")
    colors = {"replica_kill": "grey", "node_remove_readd": "red", "controller_kill": "purple"}
    for f in res["faults"]:
        for a in ax:
            a.axvline(f["t"] / 60, color=colors.get(f["kind"], "k"), alpha=0.3, lw=0.8)
    for a in ax:
        a.axvspan(0, res["before_s"] / 60, color="green", alpha=0.05)
        a.axvspan((res["before_s"] + res["faults_s"]) / 60, t[-1] if t else 0, color="green", alpha=0.05)
    ax[0].set_title(f"soak: {res['sent']} sent, {res['completed']} completed, {res['lost']} lost; faults "
                    f"{res['fault_counts']} (lines: grey replica kill, red node, purple controller)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults-s", type=float, default=1800)
    ap.add_argument("--before-s", type=float, default=120)
    ap.add_argument("--after-s", type=float, default=120)
    ap.add_argument("--factor", type=float, default=0.7)
    ap.add_argument("--measure-s", type=float, default=20)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    a = ap.parse_args()
    from ray import serve

    from trident_rs.devtools.cluster import node_cluster
    from trident_rs.serve.app import build_app

    t_start = time.time()
    res = None
    with node_cluster(workers=3, gpus_per_node=2, head_gpus=0, cpus_per_node=1, head_cpus=2) as lc:
        serve.run(build_app(app_args()), name=APP, route_prefix="/")
        if not wait_for(lambda: sum(map(len, registry_nodes(status(lc.url)).values())) == 6, 180):
            sys.exit("replicas did not register")
        asyncio.run(capacity(lc.url, 2, 5))  # warm-up
        cap = asyncio.run(capacity(lc.url, 8, a.measure_s))
        rate = a.factor * cap
        print(f"capacity {cap:.2f} req/s; load {rate:.2f} req/s for {a.before_s + a.faults_s + a.after_s:.0f} s",
              flush=True)
        soak = Soak(lc, a)
        try:
            soak.run(rate)
        finally:  # a partial report on SIGTERM / Ctrl-C too
            try:
                st = status(lc.url)
            except Exception:  # noqa: BLE001 - stopping: report without it
                st = {}
            extra = {"ingress_rederive": (st.get("ingress") or {}).get("rederive"),
                     "controller_link": (st.get("ingress") or {}).get("controller_link"),
                     "controller_stats": st.get("stats"), "wall_s": round(time.time() - t_start, 1),
                     "config": app_args()}
            if soak.load is not None:
                res = report(soak, a, cap, rate, extra)
                out = Path(a.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(res, indent=1, default=str))
                try:
                    plot(res, out.with_suffix(".png"))
                except Exception as e:  # noqa: BLE001 - the JSON is the record
                    print(f"plot failed: {e}")
                table(res, out)
    sys.exit(0 if res is not None and res["lost"] == 0 and res["memory_ok"] else 1)


def table(res: dict, out: Path) -> None:
    m = res["memory"]
    lines = [
        f"capacity {res['capacity_rps']} req/s, load {res['rate_rps']} req/s ({res['factor']}x), faults "
        f"{res['fault_counts']}",
        f"{'sent':>8} {'completed':>10} {'lost':>6} {'other':>6} {'re-runs':>8} {'re-derived':>11}",
        f"{res['sent']:>8} {res['completed']:>10} {res['lost']:>6} {res['other']:>6} {res['stage_reruns']:>8} "
        f"{res['rederived_stages']:>11}",
        f"P95 s   before {res['p95_s']['before']}  during {res['p95_s']['during']}  after {res['p95_s']['after']}",
        *(f"{d:<10} RSS {v['rss_mb_first']} -> {v['rss_mb_last']} MB; slope last 20 min "
          f"{v['slope_mb_per_min_last_20min']} MB/min (last process: {v['slope_last_process_mb_per_min']} over "
          f"{v['last_process_span_min']} min; {v['processes']} processes)" for d, v in m.items()),
        f"objects in the object stores: first {res['objects']['first']}, max {res['objects']['max']}, after the "
        f"drain {res['objects']['after_drain']}",
        f"written {out} and {out.with_suffix('.png')}",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
