"""Bounded load at 2x the emulated config's capacity through Ray Serve (private local cluster).

    .venv/bin/python benchmarks/load_2x.py [--measure-s 8] [--load-s 15] [--out benchmarks/results/load_2x.json]

1. Start a private Ray (`address="local"`, fake GPUs) and the emulated app on 127.0.0.1.
2. Capacity: a closed loop of `--concurrency` clients for `--measure-s`; completions/s.
3. Open loop (Poisson) at `--factor` x capacity for `--load-s`; every request is then awaited
   (timeout `--req-timeout-s`). Counts: sent / completed (200) / rejected (429, with Retry-After)
   / other 4xx / lost (5xx, timeouts, connection errors: must be 0).
"""
import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time

import httpx

from trident_rs.vocab import percentile

ARGS = {
    "models": ["sd3"],
    "executor": "emulated",
    "time_scale": 0.02,
    "cluster": {"nodes": 1, "gpus_per_node": 8},
    "deployments": [
        {"stage": "encode", "width": 1, "replicas": 1},
        {"stage": "diffuse", "width": 1, "replicas": 2},
        {"stage": "decode", "width": 1, "replicas": 1},
    ],
    "policy": {"name": "greedy", "options": {"replan": False}},
    "limits": {"max_queue_per_model": 8},
}
BODY = {"model": "sd3", "prompt": "load", "size": "512x512", "steps": 8}



async def _one(c: httpx.AsyncClient, out: collections.Counter, lat: list, retry_after: list, timeout: float):
    t0 = time.perf_counter()
    try:
        r = await c.post("/v1/images/generations", json=BODY, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a request without an answer is lost
        out["lost"] += 1
        out[f"lost:{type(e).__name__}"] += 1
        return
    if r.status_code == 200:
        out["completed"] += 1
        lat.append(time.perf_counter() - t0)
    elif r.status_code == 429:
        out["rejected_429"] += 1
        if "retry-after" in r.headers:
            retry_after.append(float(r.headers["retry-after"]))
    elif r.status_code >= 500:
        out["lost"] += 1
        out[f"lost:{r.status_code}"] += 1
    else:
        out[f"other_{r.status_code}"] += 1


async def measure(url: str, concurrency: int, seconds: float, body: dict | None = None) -> float:
    """Completions/s of a closed loop of `concurrency` clients sending `body` (default BODY)."""
    body = body or BODY
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def worker():
            nonlocal done
            while time.perf_counter() < stop:
                r = await c.post("/v1/images/generations", json=body)
                done += r.status_code == 200
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def load(url: str, rate: float, seconds: float, timeout: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out: collections.Counter = collections.Counter()
    lat: list = []
    retry_after: list = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, limits=limits) as c:
        tasks = []
        t0 = time.perf_counter()
        next_t = t0
        while next_t - t0 < seconds and len(tasks) < int(rate * seconds * 2) + 10:  # bounded in count and time
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(c, out, lat, retry_after, timeout)))
            next_t += rng.expovariate(rate)
        send_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        drain_s = time.perf_counter() - t0 - send_s
    lat.sort()
    pct = (lambda q: round(percentile(lat, 100 * q), 3) if lat else None)
    return {"sent": len(tasks), "completed": out["completed"], "rejected_429": out["rejected_429"],
            "lost": out["lost"], "detail": dict(out), "offered_rps": round(len(tasks) / send_s, 2),
            "goodput_rps": round(out["completed"] / (send_s + drain_s), 2), "send_s": round(send_s, 1),
            "drain_s": round(drain_s, 1), "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "retry_after_s": {"min": min(retry_after, default=None), "max": max(retry_after, default=None)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure-s", type=float, default=8)
    ap.add_argument("--load-s", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--req-timeout-s", type=float, default=60)
    ap.add_argument("--admission", choices=["best_effort", "reject"], default="best_effort")
    ap.add_argument("--out", default="benchmarks/results/load_2x.json")
    a = ap.parse_args()
    ARGS["limits"]["admission"] = a.admission
    from ray import serve

    from trident_rs.serve.app import build_app
    from trident_rs.devtools.local import private_serve

    with private_serve(num_gpus=8, log_to_driver=False) as port:
        t = time.perf_counter()
        serve.run(build_app(ARGS), name="load", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        startup_s = time.perf_counter() - t
        asyncio.run(measure(url, 2, 2.0))  # warm-up
        cap = asyncio.run(measure(url, a.concurrency, a.measure_s))
        res = asyncio.run(load(url, a.factor * cap, a.load_s, a.req_timeout_s))
        health = httpx.get(f"{url}/healthz", timeout=30).status_code
    res = {"capacity_rps": round(cap, 2), "factor": a.factor, "admission": a.admission, "startup_s": round(startup_s, 1),
           "healthz_after": health, "config": ARGS, "body": BODY, **res}
    finish(res, a.out, ok=res["lost"] == 0 and health == 200)


def finish(res: dict, out: str, ok: bool, hide: tuple[str, ...] = ("config",)) -> None:
    """Print the result (without `hide`), write it as JSON to `out`, exit 0 if `ok` else 1."""
    print(json.dumps({k: v for k, v in res.items() if k not in hide}, indent=1))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
