"""The controller's request log: each request's progress, and the counts and latencies of all.

Nothing here decides anything: the broker (`trident_rs.serve.broker`) dispatches, this records
what happened for `GET /v1/requests/{id}`, `/v1/status` and `/metrics`. Diffuse progress:
`step` (steps done) of `steps`, `progress` (their ratio), `width` (of the running or last
stage), `chunk` ([a, b) running, None between chunks), `chunks` (done) and `paused` (at a chunk
boundary with no next chunk granted yet: preempted or waiting for GPUs). Bounded: the last 1,000
requests' progress, the last 1,000 latencies, the last 200 outcomes.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from trident_rs.vocab import STAGES
from trident_rs.request import RequestState
from trident_rs.serve.grant import Grant
from trident_rs.serve.metrics import ServeMetrics

MAX_PROGRESS = 1000
PAUSE_S = 0.05  # a request at a boundary granted its next chunk later than this was paused (counted)


class RequestLog:
    def __init__(self, metrics: ServeMetrics | None = None):
        self.metrics = metrics or ServeMetrics()
        self.stats: dict[str, int] = {"submitted": 0, "completed": 0, "on_time": 0, "failed": 0, "cancelled": 0,
                                      "timed_out": 0, "stage_retries": 0}
        self.active: dict[str, float] = {}  # rid -> deadline (controller clock), admitted and not finished
        self.arrivals: dict[str, tuple[float, str]] = {}  # rid -> (monotonic arrival, model)
        self.progress: OrderedDict[str, dict] = OrderedDict()  # rid -> stage and state
        self.latencies: deque[float] = deque(maxlen=1000)
        self.outcomes: deque[tuple[float, bool]] = deque(maxlen=200)  # (wall, on time) of finished
        self.stage_lat: dict[str, deque[float]] = {}  # deployment -> recent stage latencies

    def submitted(self, rid: str, model: str, shape_key: str, steps: int, deadline: float, slo_s: float) -> None:
        self.active[rid] = deadline
        self.arrivals[rid] = (time.monotonic(), model)
        self.progress[rid] = {"id": rid, "model": model, "shape": shape_key, "steps": steps,
                              "state": RequestState.QUEUED.value, "stage": None, "slo_s": round(slo_s, 3),
                              "created": time.time(), "stages_done": [], "retries": 0,
                              "step": 0, "width": None, "paused": False, "chunk": None, "chunks": 0}
        while len(self.progress) > MAX_PROGRESS:
            self.progress.popitem(last=False)
        self.stats["submitted"] += 1

    def granted(self, grant: Grant) -> None:
        prog = self.progress.get(grant.request_id)
        if prog is not None:
            prog.update(stage=grant.stage, state=RequestState.running(grant.stage).value,
                        deployment=grant.deployment, node=grant.node, gpus=list(grant.gpus),
                        replica=grant.replica_id, width=grant.width, paused=False)
            if grant.stage == "diffuse":
                prog["chunk"] = list(grant.steps) if grant.steps is not None else [prog["step"], prog["steps"]]
                prog["chunk_started"] = time.time()
                if grant.steps is not None:  # elasticity at work, counted for /v1/status
                    self.stats["chunk_grants"] = self.stats.get("chunk_grants", 0) + 1
                    last_w, paused_at = prog.pop("last_width", None), prog.pop("paused_at", None)
                    if last_w is not None and last_w != grant.width:
                        self.stats["width_changes"] = self.stats.get("width_changes", 0) + 1
                    if paused_at is not None and time.monotonic() - paused_at >= PAUSE_S:
                        self.stats["resumed_after_pause"] = self.stats.get("resumed_after_pause", 0) + 1

    def stage_done(self, grant: Grant, took_s: float | None) -> None:
        if took_s is not None:
            self.metrics.stage_done(grant.stage, grant.width, grant.deployment, took_s)
            self.stage_lat.setdefault(grant.deployment, deque(maxlen=200)).append(took_s)
        prog = self.progress.get(grant.request_id)
        if prog is not None and grant.stage == "diffuse":
            prog["step"] = grant.steps[1] if grant.steps is not None else prog["steps"]
            prog["chunks"] += 1
            prog.pop("chunk_started", None)
            prog["chunk"] = None
            if prog["step"] < prog["steps"]:  # a boundary: paused until its next chunk is granted
                prog.update(paused=True, state=RequestState.QUEUED.value, last_width=grant.width,
                            paused_at=time.monotonic())
                return
            prog["paused"] = False
        if prog is not None and grant.stage not in prog["stages_done"]:
            prog["stages_done"].append(grant.stage)
            if grant.stage != STAGES[-1] and prog["state"] == RequestState.running(grant.stage).value:
                prog["state"] = RequestState.QUEUED.value  # for its next stage

    def retried(self, grant: Grant, error: str) -> None:
        self.metrics.stage_retry(grant.stage)
        self.stats["stage_retries"] += 1
        prog = self.progress.get(grant.request_id)
        if prog is not None:
            prog.update(retries=prog.get("retries", 0) + 1, last_error=error)
            if grant.steps is not None:  # a chunk re-run from its boundary: the steps lost
                prog.setdefault("rerun_chunks", []).append(list(grant.steps))

    def finished(self, rid: str, final: RequestState, now: float) -> None:
        """Record the end of an admitted request (`rid` in `active`)."""
        deadline = self.active.pop(rid, None)
        arrived, model = self.arrivals.pop(rid, (None, ""))
        ok = final is RequestState.DONE
        on_time = ok and deadline is not None and now <= deadline
        latency = time.monotonic() - arrived if arrived is not None else None
        if ok:
            self.stats["completed"] += 1
            self.stats["on_time"] += on_time
            if latency is not None:
                self.latencies.append(latency)
                self.metrics.request_done(model, latency)
        else:
            self.stats[final.value] = self.stats.get(final.value, 0) + 1
        if deadline is not None:  # counted once, for requests this controller admitted
            self.metrics.outcome(("on_time" if on_time else "late") if ok else final.value)
            self.outcomes.append((time.time(), on_time))
        prog = self.progress.get(rid)
        if prog is not None:
            prog.update(state=final.value, stage=None, on_time=on_time,
                        latency_s=round(latency, 4) if latency is not None else None)

    def rejected(self) -> None:
        self.stats["rejected"] = self.stats.get("rejected", 0) + 1
        self.metrics.outcome("rejected")

    def status(self, rid: str) -> dict | None:
        prog = self.progress.get(rid)
        if prog is None:
            return None
        out = dict(prog, stages_done=list(prog["stages_done"]))
        for k in ("chunk_started", "last_width", "paused_at"):
            out.pop(k, None)
        out["progress"] = round(prog["step"] / prog["steps"], 4) if prog.get("steps") else None
        return out

    def attainment(self, window_s: float = 60.0) -> float | None:
        cut = time.time() - window_s
        recent = [ok for t, ok in self.outcomes if t >= cut]
        return sum(recent) / len(recent) if recent else None

    def inflight(self, limit: int = 50) -> list[dict[str, Any]]:
        return [self.status(r) for r in self.active if r in self.progress][:limit]
