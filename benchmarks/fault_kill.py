"""Stage replicas killed at random under load, through Ray Serve (private local cluster).

    .venv/bin/python benchmarks/fault_kill.py [--load-s 60] [--factor 0.7] [--kill-every-s 3]
                                              [--out benchmarks/results/fault_kill.json]

1. Start a private Ray (`address="local"`, fake GPUs) and the emulated app on 127.0.0.1.
2. Capacity: a closed loop of clients (benchmarks/load_2x.py's `measure`); completions/s.
3. Open loop (Poisson) at `--factor` x capacity for `--load-s` through `POST /v1/generate`,
   while every `--kill-every-s` a replica chosen at random among all stage replicas is killed
   (`trident_rs.devtools.chaos.kill_replica`). Every request is then awaited.
Counts: sent / completed / rejected (429) / lost (5xx, timeouts, connection errors: must be 0),
and the latency of the requests that had a stage re-run against those that did not.
"""
import argparse
import asyncio
import random
import statistics
import time

import httpx

from trident_rs.vocab import STAGES, DeploymentKey, percentile

from load_2x import finish, measure

STAGE_DEPLOYMENTS = tuple(DeploymentKey(s, 1).name for s in STAGES)
ARGS = {
    "models": ["sd3"],
    "executor": "emulated",
    "time_scale": 0.25,  # sd3 512x512, 28 steps: ~0.45 s a request on one set of replicas
    "cluster": {"nodes": 1, "gpus_per_node": 8},
    "deployments": [{"stage": "encode", "width": 1, "replicas": 2},
                    {"stage": "diffuse", "width": 1, "replicas": 4},
                    {"stage": "decode", "width": 1, "replicas": 2}],
    "policy": {"name": "greedy", "options": {"replan": False}},
    "limits": {"max_queue_per_model": 256},
    "faults": {"stage_retries": 4, "retry_backoff_s": 0.25},
}
BODY = {"model": "sd3", "prompt": "chaos", "height": 512, "width": 512, "steps": 28}


async def _one(c: httpx.AsyncClient, rows: list, timeout: float) -> None:
    t0 = time.perf_counter()
    try:
        r = await c.post("/v1/generate", json=BODY, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a request without an answer is lost
        rows.append({"status": "lost", "error": type(e).__name__})
        return
    row = {"status": r.status_code, "latency_s": time.perf_counter() - t0}
    if r.status_code == 200:
        row["retries"] = int(r.json()["timings"].get("retries", 0))
    else:
        row["error"] = r.text[:200]
    rows.append(row)


async def killer(app: str, every_s: float, until: float, rng: random.Random, kills: list) -> None:
    from trident_rs.devtools.chaos import kill_replica

    while time.perf_counter() + every_s < until:
        await asyncio.sleep(every_s)
        name = await asyncio.to_thread(kill_replica, app, STAGE_DEPLOYMENTS, rng)
        dep = name.split("#")[1] if name else None
        kills.append({"t": round(time.perf_counter(), 2), "deployment": dep, "replica": name})


async def load_with_kills(url: str, app: str, rate: float, seconds: float, every_s: float, timeout: float,
                          seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows: list = []
    kills: list = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, limits=limits) as c:
        t0 = time.perf_counter()
        chaos = asyncio.create_task(killer(app, every_s, t0 + seconds, rng, kills))
        tasks, next_t = [], t0
        while next_t - t0 < seconds:
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(c, rows, timeout)))
            next_t += rng.expovariate(rate)
        await asyncio.gather(*tasks, chaos)
        wall = time.perf_counter() - t0
    for k in kills:
        k["t"] = round(k["t"] - t0, 2)
    done = [r for r in rows if r["status"] == 200]
    retried = sorted(r["latency_s"] for r in done if r["retries"] > 0)
    clean = sorted(r["latency_s"] for r in done if r["retries"] == 0)

    def pct(vals, q):
        return round(percentile(vals, 100 * q), 3) if vals else None

    lost = [r for r in rows if r["status"] == "lost" or (isinstance(r["status"], int) and r["status"] >= 500)]
    return {
        "sent": len(rows), "completed": len(done), "rejected_429": sum(r["status"] == 429 for r in rows),
        "lost": len(lost), "lost_detail": lost[:10], "kills": kills, "wall_s": round(wall, 1),
        "retried_requests": len(retried), "stage_reruns": sum(r["retries"] for r in done),
        "latency_s": {"not_retried": {"p50": pct(clean, 0.5), "p95": pct(clean, 0.95), "n": len(clean)},
                      "retried": {"p50": pct(retried, 0.5), "p95": pct(retried, 0.95), "n": len(retried)}},
        "extra_latency_of_retried_s": {
            "p50": round(statistics.median(retried) - statistics.median(clean), 3) if retried and clean else None,
            "mean": round(statistics.fmean(retried) - statistics.fmean(clean), 3) if retried and clean else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-s", type=float, default=60)
    ap.add_argument("--factor", type=float, default=0.7)
    ap.add_argument("--kill-every-s", type=float, default=3)
    ap.add_argument("--measure-s", type=float, default=8)
    ap.add_argument("--req-timeout-s", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fault_kill.json")
    a = ap.parse_args()
    from ray import serve

    from trident_rs.serve.app import build_app
    from trident_rs.devtools.local import private_serve

    warm = {"model": "sd3", "prompt": "warm", "size": "512x512", "steps": 28}  # BODY on the images endpoint
    app = "chaos"
    with private_serve(num_gpus=8, log_to_driver=False) as port:
        serve.run(build_app(ARGS), name=app, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(measure(url, 2, 2.0, warm))  # warm-up
        cap = asyncio.run(measure(url, 8, a.measure_s, warm))
        res = asyncio.run(load_with_kills(url, app, a.factor * cap, a.load_s, a.kill_every_s, a.req_timeout_s,
                                          a.seed))
        health = httpx.get(f"{url}/healthz", timeout=30).status_code
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
    res = {"capacity_rps": round(cap, 2), "factor": a.factor, "offered_rps": round(a.factor * cap, 2),
           "kill_every_s": a.kill_every_s, "healthz_after": health,
           "controller_stats": status.get("stats"), "config": ARGS, "body": BODY, **res}
    print(f"{len(res['kills'])} kills: " + ", ".join(f"{k['t']}s {k['deployment']}" for k in res["kills"]))
    finish(res, a.out, ok=res["lost"] == 0 and health == 200, hide=("config", "kills"))


if __name__ == "__main__":
    main()
