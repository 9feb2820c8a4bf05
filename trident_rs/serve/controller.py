"""The Controller deployment: hosts the policy layer inside Ray Serve.

The ingress tells it of arrivals (`submit`) and asks, stage by stage, where and when a stage
may start (`acquire` blocks until the policy launches it); stage replicas report each finished
stage (`stage_done`); the ingress reports re-runs (`stage_retry`) and the end of a request
(`finish`, with its final state), which also frees anything an unfinished request still held.
Plans the policy produces are turned into replica counts per deployment and published for
Serve's autoscaler to follow (see `trident_rs.serve.scaling` for the mechanism and why).
One replica: it is the single source of dispatch truth. If it dies, Serve restarts it with an
empty queue; it then keeps the replica counts last published (not the empty plan of a policy
that has seen no traffic), refuses `acquire` for requests it does not know (the ingress finishes
those on the last plan, see `controller_link`) and ignores reports about them.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from typing import Any

from ray import serve

from trident_rs.errors import UnknownRequestError
from trident_rs.models.spec import get_spec
from trident_rs.policy.greedy import GreedyStagePolicy
from trident_rs.policy.interface import Policy
from trident_rs.policy.stage_estimate import default_cost_model, predict_stage_s
from trident_rs.policy.types import ClusterState, Launch, PlacementPlan, Request
from trident_rs.request import RequestState
from trident_rs.serve.config import AppConfig
from trident_rs.serve.metrics import ServeMetrics
from trident_rs.serve.scaling import publish_counts, read_count
from trident_rs.vocab import STAGES, DeploymentKey, Shape, percentile

logger = logging.getLogger("ray.serve")


def load_cost_model() -> Any:
    """The shipped cost model, or None (the fallback estimate) when it or its profiles are missing."""
    cost = default_cost_model()
    if cost is None:
        logger.warning("no cost model; using the rough fallback estimate")
    return cost


def make_policy(cfg: AppConfig, cost: Any) -> Policy:
    """The configured policy (`trident_rs.policy.registry` names, or 'greedy').

    Falls back to the greedy stage policy, with a warning, when the named policy or the cost
    model is not installed, so the runtime always serves.
    """
    cluster = cfg.cluster.to_cluster()
    initial = {d.name: d.replicas for d in cfg.deployments}
    if cfg.policy.name != "greedy":
        from trident_rs.policy.registry import factory

        cls = factory(cfg.policy.name)  # ConfigError for names it does not know
        if cls is not None and cost is not None:
            return cls(cluster, cost, **_policy_options(cfg, cost))
        logger.warning("policy %r or the cost model is unavailable; using the greedy stage policy",
                       cfg.policy.name)
        return GreedyStagePolicy(cluster, cost, initial)
    return GreedyStagePolicy(cluster, cost, initial, **cfg.policy.options)


def _policy_options(cfg: AppConfig, cost: Any) -> dict[str, Any]:
    """The configured options; for `trident` without a forecast, the served models (those the
    cost model knows) as its prior, so that its first plan is ready before the first request."""
    options = dict(cfg.policy.options)
    if cfg.policy.name == "trident" and not {"forecast", "workload", "models"} & options.keys():
        known = set(cost.models())
        served = [m for m in cfg.models if m in known]
        if served:
            options["models"] = served
            options.setdefault("slo_scale", cfg.slo_scale)
    return options


class Controller:
    def __init__(self, config: dict):
        self.cfg = AppConfig.parse(config)
        self.app_name = serve.get_replica_context().app_name
        self.cost = load_cost_model()  # real-time predictions: the SLO rule is defined on them
        # Emulated executors sleep for the predicted time x time_scale, and so runs this clock:
        # the policy must plan on the same scaled times, or every deadline looks hopeless.
        self.clock_scale = self.cfg.time_scale if self.cfg.executor == "emulated" else 1.0
        scaled = self.cost.scaled(self.clock_scale) if self.cost is not None and self.clock_scale != 1.0 else self.cost
        self.policy = make_policy(self.cfg, scaled)
        self.cluster = self.cfg.cluster.to_cluster()
        self.t0 = time.monotonic()
        self.plan: PlacementPlan = self.policy.initial_plan(0.0) or PlacementPlan(())
        self.counts: dict[str, int] = {}
        self.replans: deque[dict] = deque(maxlen=50)
        self._ids = itertools.count()
        self.inflight: dict[int, tuple[Launch, set[str]]] = {}
        self.granted: dict[tuple[str, str], dict] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()  # ended unfinished; bounded, oldest dropped
        self.active: dict[str, float] = {}
        self.stats = {"submitted": 0, "completed": 0, "on_time": 0, "failed": 0, "cancelled": 0, "timed_out": 0,
                      "stage_retries": 0}
        self.latencies: deque[float] = deque(maxlen=1000)
        self.metrics = ServeMetrics()
        self.arrivals: dict[str, tuple[float, str]] = {}  # rid -> (monotonic arrival, model)
        self.launch_t: dict[int, float] = {}  # launch id -> monotonic start
        self.outcomes: deque[tuple[float, bool]] = deque(maxlen=200)  # (wall, on time) of finished
        self.stage_lat: dict[str, deque[float]] = {}  # deployment -> recent stage latencies
        self.progress: OrderedDict[str, dict] = OrderedDict()  # rid -> stage and state, bounded
        self._ticker: asyncio.Task | None = None
        kept = self._published_counts() if not self.plan.groups else None
        if kept:  # a restart: keep the running replicas until the policy's first real plan
            self.counts = kept
            self.replans.append({"t": 0.0, "wall": time.time(), "reason": "restarted: kept the last published "
                                 "counts", "counts": dict(kept)})
        else:
            self._publish(self.plan, "initial plan")

    # -- time and plan ---------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _publish(self, plan: PlacementPlan, reason: str) -> None:
        if (getattr(plan, "stats", None) or {}).get("fallback"):  # the solver timed out (policy layer)
            reason += " (the solver found no plan within its time limit: greedy plan)"
        enabled = {d.name for d in self.cfg.deployments}
        counts = {name: 0 for name in enabled}
        for name, n in plan.count().items():
            if name in enabled:  # Serve bounds it by max_replicas anyway; publish what will run
                counts[name] = min(n, self.cfg.max_replicas(self.cfg.deployment(name)))
            else:
                logger.warning("plan asks for %s which this app does not deploy; ignored", name)
        if self.replans:
            self.metrics.replan()
        self.plan, self.counts = plan, counts
        publish_counts(self.app_name, counts)
        self.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason, "counts": counts})

    def _published_counts(self) -> dict[str, int] | None:
        """The counts a previous incarnation of this controller published, if any."""
        try:
            counts = {d.name: read_count(self.app_name, d.name) for d in self.cfg.deployments}
        except Exception:  # noqa: BLE001 - no KV (tests): nothing was published
            return None
        if any(n is None for n in counts.values()) or not any(counts.values()):
            return None
        return {k: int(v) for k, v in counts.items() if v is not None}

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.policy.tick_s)
            try:
                self._schedule()
            except Exception:
                logger.exception("policy tick failed")

    # -- dispatch ----------------------------------------------------------------------------
    def _state(self) -> ClusterState:
        busy = {(l.node, g) for l, _ in self.inflight.values() for g in l.gpus}
        free = {n: frozenset(g for g in range(self.cluster.gpus_per_node) if (n, g) not in busy)
                for n in range(self.cluster.nodes)}
        ready = frozenset(g.id for g in self.plan.groups if not any((g.node, x) in busy for x in g.gpus))
        return ClusterState(self.now(), free, ready)

    def _deployment_for(self, launch: Launch) -> str:
        stage = launch.stages[0]
        widths = self.cfg.widths(stage)
        if launch.width in widths:
            return DeploymentKey(stage, launch.width).name
        return DeploymentKey(stage, max([w for w in widths if w <= launch.width] or [widths[0]])).name

    def _schedule(self) -> None:
        """Run the policy until it launches nothing more. A policy that raises is logged and
        counted, and tried again on the next event or tick: the controller itself stays up."""
        for _ in range(100):
            t = time.perf_counter()
            try:
                out = self.policy.schedule(self._state())
            except Exception:
                logger.exception("policy.schedule failed; retrying on the next event or tick")
                self.metrics.policy_error()
                return
            if out.new_plan is not None:
                self.metrics.solver_time(time.perf_counter() - t)
                self._publish(out.new_plan, out.replan_reason or "policy re-plan")
            if not out.launches:
                return
            for launch in out.launches:
                self._start(launch)

    def _start(self, launch: Launch) -> None:
        launch_id = next(self._ids)
        self.inflight[launch_id] = (launch, set(launch.request_ids))
        self.launch_t[launch_id] = time.monotonic()
        for rid in launch.request_ids:
            grant = {"request_id": rid, "stage": launch.stages[0], "launch_id": launch_id,
                     "deployment": self._deployment_for(launch), "width": launch.width,
                     "batch": len(launch.request_ids)}
            if rid in self.progress:
                self.progress[rid].update(stage=grant["stage"], state=RequestState.running(grant["stage"]).value,
                                          deployment=grant["deployment"], node=launch.node, gpus=list(launch.gpus))
            key = (rid, launch.stages[0])
            if rid in self.finished:  # the request already failed: nobody will run it
                self._done(launch_id, rid)
            elif key in self.waiters:
                fut = self.waiters.pop(key)
                if not fut.done():
                    fut.set_result(grant)
            else:
                self.granted[key] = grant

    def _done(self, launch_id: int, rid: str) -> None:
        entry = self.inflight.get(launch_id)
        if entry is None:
            return
        launch, remaining = entry
        remaining.discard(rid)
        if not remaining:
            del self.inflight[launch_id]
            self.launch_t.pop(launch_id, None)
            self.policy.on_launch_done(launch, self.now())

    # -- the API the ingress and the replicas call ----------------------------------------------
    async def submit(self, request_id: str, model: str, shape: Shape, steps: int,
                     slo_ms: float | None = None) -> dict:
        """A request arrived. Returns its deadline (seconds from now) and the current replica
        counts (the ingress dispatches on them if this controller becomes unreachable)."""
        self._ensure_ticker()
        if request_id in self.finished or request_id in self.active:  # late (the ingress gave up) or twice
            return {"slo_s": 0.0, "counts": dict(self.counts), "ignored": True}
        slo_s = slo_ms / 1000.0 if slo_ms else self._default_slo(model, shape, steps)
        now = self.now()
        self.policy.add_request(Request(request_id, model, shape, steps, now, now + slo_s), now)
        self.active[request_id] = now + slo_s
        self.arrivals[request_id] = (time.monotonic(), model)
        self.progress[request_id] = {"id": request_id, "model": model, "shape": shape.key, "steps": steps,
                                     "state": RequestState.QUEUED.value, "stage": None, "slo_s": round(slo_s, 3),
                                     "created": time.time(), "stages_done": [], "retries": 0}
        while len(self.progress) > 1000:
            self.progress.popitem(last=False)
        self.stats["submitted"] += 1
        self._schedule()
        return {"slo_s": slo_s, "counts": dict(self.counts)}

    def _default_slo(self, model: str, shape: Shape, steps: int) -> float:
        try:
            from trident_rs.policy.slo import slo_seconds

            return self.clock_scale * float(slo_seconds(self.cost, get_spec(model).profile_model or model, shape,
                                                        steps, scale=self.cfg.slo_scale))
        except Exception:  # slo module absent or no profile: sum of stage times at width 1
            total = sum(predict_stage_s(self.cost, model, s, shape, 1, 1, steps) for s in STAGES)
            return self.cfg.slo_scale * total * self.clock_scale

    async def acquire(self, request_id: str, stage: str) -> dict:
        """Wait until the policy launches `stage` of the request; return the grant (deployment...).

        `UnknownRequestError` for a request this controller was never told of (it restarted)."""
        key = (request_id, stage)
        if key in self.granted:
            return self.granted.pop(key)
        if request_id not in self.active:
            raise UnknownRequestError(request_id)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[key] = fut
        self._schedule()
        return await fut

    async def stage_done(self, grant: dict) -> None:
        started = self.launch_t.get(grant["launch_id"])
        if started is not None:
            took = time.monotonic() - started
            self.metrics.stage_done(grant["stage"], grant["width"], grant["deployment"], took)
            self.stage_lat.setdefault(grant["deployment"], deque(maxlen=200)).append(took)
        prog = self.progress.get(grant["request_id"])
        if prog is not None and grant["stage"] not in prog["stages_done"]:
            prog["stages_done"].append(grant["stage"])
            if grant["stage"] != STAGES[-1]:
                prog["state"] = RequestState.QUEUED.value  # for its next stage
        self._done(grant["launch_id"], grant["request_id"])
        self._schedule()

    async def stage_retry(self, grant: dict, attempt: int, error: str = "") -> None:
        """The ingress re-runs a stage whose replica died; the grant stays held until it is done."""
        self.metrics.stage_retry(grant["stage"])
        self.stats["stage_retries"] = self.stats.get("stage_retries", 0) + 1
        prog = self.progress.get(grant["request_id"])
        if prog is not None:
            prog.update(retries=prog.get("retries", 0) + 1, last_error=error)

    async def finish(self, request_id: str, state: str) -> None:
        """The request ended in `state` (a final `RequestState`): free everything it still holds."""
        final = RequestState(state)
        ok = final is RequestState.DONE
        if not ok:  # its later stages may still be launched by the policy: release them at once
            self.finished[request_id] = None
            while len(self.finished) > 100_000:
                self.finished.popitem(last=False)
        if request_id not in self.active:  # not submitted here (restarted controller, late report)
            return
        deadline = self.active.pop(request_id, None)
        arrived, model = self.arrivals.pop(request_id, (None, ""))
        now = self.now()
        on_time = ok and deadline is not None and now <= deadline
        if ok:
            self.stats["completed"] += 1
            if on_time:
                self.stats["on_time"] += 1
            if arrived is not None:
                self.latencies.append(time.monotonic() - arrived)
                self.metrics.request_done(model, time.monotonic() - arrived)
        else:
            self.stats[final.value] = self.stats.get(final.value, 0) + 1
        if deadline is not None:  # counted once, for requests this controller admitted
            self.metrics.outcome(("on_time" if on_time else "late") if ok else final.value)
            self.outcomes.append((time.time(), on_time))
        prog = self.progress.get(request_id)
        if prog is not None:
            prog.update(state=final.value, stage=None, on_time=on_time,
                        latency_s=round(time.monotonic() - arrived, 4) if arrived is not None else None)
        for stage in STAGES:
            self.granted.pop((request_id, stage), None)
        for launch_id, (launch, remaining) in list(self.inflight.items()):
            if request_id in remaining:
                self._done(launch_id, request_id)
        self._schedule()

    async def reject(self, reason: str = "") -> None:
        """The ingress refused a request before admission (bad input, unknown model...)."""
        self.stats["rejected"] = self.stats.get("rejected", 0) + 1
        self.metrics.outcome("rejected")

    async def request_status(self, request_id: str) -> dict | None:
        """Progress of one request: queued, running (which stage, where), completed or failed."""
        prog = self.progress.get(request_id)
        return None if prog is None else dict(prog, stages_done=list(prog["stages_done"]))

    def _queues(self) -> tuple[dict[str, int], dict[str, int]]:
        """(granted but not done per deployment, waiting for a launch per stage)."""
        per_dep = {d.name: 0 for d in self.cfg.deployments}
        for lid, (launch, remaining) in self.inflight.items():
            name = self._deployment_for(launch)
            per_dep[name] = per_dep.get(name, 0) + len(remaining)
        waiting = {s: 0 for s in STAGES}
        for (_, stage) in self.waiters:
            waiting[stage] = waiting.get(stage, 0) + 1
        return per_dep, waiting

    def _attainment(self, window_s: float = 60.0) -> float | None:
        cut = time.time() - window_s
        recent = [ok for t, ok in self.outcomes if t >= cut]
        return sum(recent) / len(recent) if recent else None

    def _update_gauges(self) -> tuple[dict[str, int], dict[str, int], float | None]:
        per_dep, waiting = self._queues()
        att = self._attainment()
        self.metrics.gauges(per_dep, waiting, len(self.active), att)
        return per_dep, waiting, att

    async def metrics_text(self) -> str:
        """Prometheus text exposition of the runtime metrics (served by the ingress)."""
        self._update_gauges()
        return self.metrics.text()

    async def status(self) -> dict:
        """The whole picture: plan per node, queues, in-flight requests, attainment, latency, re-plans."""
        per_dep, waiting, att = self._update_gauges()
        nodes = [{"node": n, "gpus": self.cluster.gpus_per_node,
                  "groups": [{"id": g.id, "deployment": g.deployment, "stages": list(g.stages), "width": g.width,
                              "model": g.model, "gpus": list(g.gpus)}
                             for g in self.plan.groups if g.node == n]}
                 for n in range(self.cluster.nodes)]
        return {
            "policy": getattr(self.policy, "name", type(self.policy).__name__),
            "time_s": round(self.now(), 3),
            "cluster": {"nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node},
            "counts": dict(self.counts),
            "plan": [{"id": g.id, "deployment": g.deployment, "stage": "+".join(g.stages), "width": g.width,
                      "node": g.node, "gpus": list(g.gpus)} for g in self.plan.groups],
            "nodes": nodes,
            "queues": per_dep,
            "waiting": waiting,
            "pending": self.policy.pending(),
            "inflight_launches": len(self.inflight),
            "active_requests": len(self.active),
            "inflight": [dict(self.progress[r], stages_done=list(self.progress[r]["stages_done"]))
                         for r in self.active if r in self.progress][:50],
            "stats": dict(self.stats),
            "attainment": {"recent_60s": att, "finished": len(self.outcomes),
                           "overall": (self.stats["on_time"] / self.stats["completed"]
                                       if self.stats["completed"] else None)},
            "latency_s": _percentiles(self.latencies),
            "stage_latency_s": {d: _percentiles(v) for d, v in self.stage_lat.items()},
            "replans": list(self.replans),
            "metrics": {"prometheus": "/metrics", "ray_serve_metrics": bool(self.metrics.ray.m)},
        }


def _percentiles(values: Any) -> dict:
    vals = list(values)
    if not vals:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    pick = lambda q: round(percentile(vals, q), 4)  # noqa: E731
    return {"n": len(vals), "p50": pick(50), "p90": pick(90), "p99": pick(99),
            "mean": round(sum(vals) / len(vals), 4)}


ControllerDeployment = serve.deployment(
    Controller, name="Controller", num_replicas=1, max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
)
