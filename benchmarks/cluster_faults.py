"""Shared by benchmarks/node_loss.py, benchmarks/soak.py and tests/test_serve_cluster_faults.py (issue 20):
the emulated app on a local multi-node cluster, an open-loop client that records every request,
and the faults (replica kill, node removal and re-add, controller kill, controller pause).

The cluster: a head node with no GPUs (Serve's controller and HTTP proxy) and `workers` worker
raylets of `gpus` fake GPUs; stage replicas fill the workers' GPUs exactly (one replica per GPU), so a
node removed takes its replicas with it and their replacements wait for a node to come back.
Outputs are padded (`payload_kb`) so that they live in the object store of the node that made them.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from trident_rs.devtools.cluster import HEAD_RESOURCE
from trident_rs.vocab import STAGES, DeploymentKey, percentile

APP = "faults"
STAGE_DEPLOYMENTS = tuple(DeploymentKey(s, 1).name for s in STAGES)
BODY = {"model": "sd3", "prompt": "cluster faults", "height": 512, "width": 512, "steps": 28}


POLICIES = {"greedy": {"name": "greedy", "options": {"replan": False}},
            # the solver's replica groups; load re-plans off, so that only nodes lost or back re-plan
            "trident": {"name": "trident", "options": {"placement": "groups", "replan": False}}}


def app_args(replicas: tuple[int, int, int] = (2, 2, 2), time_scale: float = 0.5, payload_kb: int = 256,
             nodes: int = 3, gpus: int = 2, policy: str = "greedy") -> dict[str, Any]:
    """sd3 512x512 28 steps at `time_scale` 0.5: encode ~0.05 s, diffuse ~0.85 s, decode ~0.03 s."""
    return {
        "models": ["sd3"], "executor": "emulated", "time_scale": time_scale,
        "executor_options": {"payload_kb": payload_kb},
        "cluster": {"nodes": nodes, "gpus_per_node": gpus},
        "deployments": [{"stage": s, "width": 1, "replicas": n, "max_replicas": n}
                        for s, n in zip(STAGES, replicas)],
        "policy": POLICIES[policy],
        "control_resources": {HEAD_RESOURCE: 0.01},  # the request path on the head: any worker may go
        "limits": {"max_queue_per_model": 100_000, "request_timeout_s": 600},
        "faults": {"stage_retries": 6, "retry_backoff_s": 0.25, "controller_timeout_s": 2.0,
                   "controller_probe_s": 5.0},
    }


def pct(vals: list[float], q: float) -> float | None:
    return round(percentile(sorted(vals), q), 3) if vals else None


# -- the client ---------------------------------------------------------------------------------------
@dataclass
class Load:
    """Open-loop Poisson requests to `POST /v1/generate`; one row per request."""

    url: str
    rate: float
    seed: int = 0
    timeout_s: float = 600.0
    rows: list[dict] = field(default_factory=list)
    t0: float = 0.0

    async def one(self, c: httpx.AsyncClient, i: int) -> None:
        t = time.monotonic()
        row: dict[str, Any] = {"i": i, "t": round(t - self.t0, 3)}
        self.rows.append(row)
        try:
            r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": f"s{self.seed}-{i}"},
                             timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a request without an answer is lost
            row.update(status="lost", error=type(e).__name__, end=round(time.monotonic() - self.t0, 3))
            return
        row.update(status=r.status_code, latency_s=round(time.monotonic() - t, 3),
                   end=round(time.monotonic() - self.t0, 3))
        if r.status_code == 200:
            tm = r.json().get("timings", {})
            row.update(retries=int(tm.get("retries", 0)), rederived=int(tm.get("rederived_stages", 0)))
        else:
            row["error"] = r.text[:300]

    async def run(self, seconds: float, stop: asyncio.Event | None = None) -> None:
        """Send for `seconds` (or until `stop`), then wait for every answer."""
        rng = random.Random(self.seed)
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=self.url, limits=limits) as c:
            self.t0 = self.t0 or time.monotonic()
            tasks, nxt, i = set(), time.monotonic(), len(self.rows)
            while time.monotonic() - self.t0 < seconds and not (stop is not None and stop.is_set()):
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                task = asyncio.get_running_loop().create_task(self.one(c, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                nxt += rng.expovariate(self.rate)
            if tasks:
                await asyncio.gather(*tasks)

    def start(self, seconds: float) -> threading.Thread:
        """`run(seconds)` in a thread of its own (with its own event loop); `stop()` ends it early."""
        def go() -> None:
            async def body() -> None:
                self._stop = asyncio.Event()
                await self.run(seconds, self._stop)
            asyncio.run(body())

        self._stop: asyncio.Event | None = None
        th = threading.Thread(target=go, daemon=True)
        th.start()
        return th

    def summary(self, rows: list[dict] | None = None) -> dict[str, Any]:
        rows = self.rows if rows is None else rows
        done = [r for r in rows if r.get("status") == 200]
        lost = [r for r in rows if r.get("status") == "lost" or (isinstance(r.get("status"), int)
                                                                  and r["status"] >= 500)]
        lat = [r["latency_s"] for r in done]
        return {"sent": len(rows), "completed": len(done), "lost": len(lost),
                "other": len(rows) - len(done) - len(lost), "lost_detail": lost[:10],
                "stage_reruns": sum(r.get("retries", 0) for r in done),
                "rederived_stages": sum(r.get("rederived", 0) for r in done),
                "rederived_requests": sum(r.get("rederived", 0) > 0 for r in done),
                "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}


async def capacity(url: str, concurrency: int, seconds: float) -> float:
    """Completions/s of a closed loop of `concurrency` clients."""
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                r = await c.post("/v1/generate", json=BODY)
                done += r.status_code == 200
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


# -- what the cluster looks like --------------------------------------------------------------------
def status(url: str) -> dict:
    r = httpx.get(f"{url}/v1/status", timeout=30)
    return r.json() if r.status_code == 200 else {"http_status": r.status_code}


def registry_nodes(st: dict) -> dict[str, list[str]]:
    """Ray node id -> the deployments of the replicas registered there (controller's registry)."""
    out: dict[str, list[str]] = {}
    for rep in (st.get("replicas") or {}).get("replicas", []):
        out.setdefault(rep["node_id"], []).append(rep["deployment"])
    return {n: sorted(d) for n, d in out.items()}


def wait_for(pred, timeout_s: float, every_s: float = 0.5) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001 - not yet (the controller restarting, ...)
            pass
        time.sleep(every_s)
    return False


def plasma_objects() -> tuple[int, float]:
    """(objects, MiB) in the object stores of all nodes."""
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB, (\d+) objects", text)
    return (int(m.group(2)), float(m.group(1))) if m else (-1, -1.0)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- faults -------------------------------------------------------------------------------------------
def kill_stage_replica(rng: random.Random) -> dict:
    from trident_rs.devtools.chaos import kill_replica

    name = kill_replica(APP, STAGE_DEPLOYMENTS, rng)
    return {"kind": "replica_kill", "replica": name}


def kill_controller() -> dict:
    from trident_rs.devtools.chaos import kill_replica

    return {"kind": "controller_kill", "replica": kill_replica(APP, "Controller")}


def remove_node(lc: Any, rng: random.Random) -> dict:
    """Remove a worker node hosting no Ingress/Controller replica; the node id (None if none)."""
    nodes = lc.removable(APP)
    if not nodes:
        return {"kind": "node_remove", "node": None}
    node = rng.choice(nodes)
    from trident_rs.devtools.cluster import actor_nodes

    on_it = sorted(n.split("#")[1] for n, nid in actor_nodes(STAGE_DEPLOYMENTS, APP).items() if nid == node.node_id)
    lc.remove(node)
    return {"kind": "node_remove", "node": node.node_id, "replicas": on_it}


def pause_controller(seconds: float) -> dict:
    """SIGSTOP the Controller replica's process for `seconds`, then SIGCONT: unreachable, not dead
    (a partition as the ingress sees it: calls are not answered)."""
    from trident_rs.devtools.cluster import actor_pids

    pids = list(actor_pids(("Controller",), APP).values())
    if not pids:
        return {"kind": "controller_pause", "pid": None}
    pid = pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return {"kind": "controller_pause", "pid": pid, "seconds": seconds}
