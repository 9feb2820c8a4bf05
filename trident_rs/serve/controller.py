"""The Controller deployment: hosts the policy layer inside Ray Serve.

The ingress tells it of arrivals (`submit`) and asks, stage by stage, where and when a stage
may start (`acquire` blocks until the policy launches it); stage replicas report each finished
stage (`stage_done`); the ingress reports the end of a request (`finish`), which also frees
anything a failed request still held. Plans the policy produces are turned into replica counts
per deployment and published for Serve's autoscaler to follow (see `trident_rs.serve.scaling`
for the mechanism and why). One replica: it is the single source of dispatch truth.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any

from ray import serve

from trident_rs.errors import TridentError
from trident_rs.executors.emulated import predict_stage_s
from trident_rs.models.spec import get_spec
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import STAGES, ClusterState, Launch, PlacementPlan, Request, Shape
from trident_rs.serve.config import AppConfig
from trident_rs.serve.greedy_policy import GreedyStagePolicy
from trident_rs.serve.scaling import publish_counts

logger = logging.getLogger("ray.serve")


def load_cost_model() -> Any:
    """The shipped cost model, or None (the fallback estimate) when it or its profiles are missing."""
    try:
        from trident_rs.policy.cost_model import CostModel

        return CostModel.default()
    except (ImportError, TridentError) as e:
        logger.warning("no cost model (%s); using the rough fallback estimate", e)
        return None


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
            return cls(cluster, cost, **cfg.policy.options)
        logger.warning("policy %r or the cost model is unavailable; using the greedy stage policy",
                       cfg.policy.name)
        return GreedyStagePolicy(cluster, cost, initial)
    return GreedyStagePolicy(cluster, cost, initial, **cfg.policy.options)


class Controller:
    def __init__(self, config: dict):
        self.cfg = AppConfig.parse(config)
        self.app_name = serve.get_replica_context().app_name
        self.cost = load_cost_model()
        self.policy = make_policy(self.cfg, self.cost)
        self.cluster = self.cfg.cluster.to_cluster()
        self.t0 = time.monotonic()
        self.plan: PlacementPlan = self.policy.initial_plan(0.0) or PlacementPlan(())
        self.counts: dict[str, int] = {}
        self.replans: deque[dict] = deque(maxlen=50)
        self._ids = itertools.count()
        self.inflight: dict[int, tuple[Launch, set[str]]] = {}
        self.granted: dict[tuple[str, str], dict] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.finished: set[str] = set()
        self.active: dict[str, float] = {}
        self.stats = {"submitted": 0, "completed": 0, "failed": 0, "on_time": 0}
        self.latencies: deque[float] = deque(maxlen=1000)
        self._ticker: asyncio.Task | None = None
        self._publish(self.plan, "initial plan")

    # -- time and plan ---------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _publish(self, plan: PlacementPlan, reason: str) -> None:
        enabled = {d.name for d in self.cfg.deployments}
        counts = {name: 0 for name in enabled}
        for name, n in plan.count().items():
            if name in enabled:  # Serve bounds it by max_replicas anyway; publish what will run
                counts[name] = min(n, self.cfg.max_replicas(self.cfg.deployment(name)))
            else:
                logger.warning("plan asks for %s which this app does not deploy; ignored", name)
        self.plan, self.counts = plan, counts
        publish_counts(self.app_name, counts)
        self.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason, "counts": counts})

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
        name = f"{stage}-w{launch.width}"
        widths = self.cfg.widths(stage)
        if launch.width in widths:
            return name
        return f"{stage}-w{max([w for w in widths if w <= launch.width] or [widths[0]])}"

    def _schedule(self) -> None:
        for _ in range(100):
            out = self.policy.schedule(self._state())
            if out.new_plan is not None:
                self._publish(out.new_plan, out.replan_reason or "policy re-plan")
            if not out.launches:
                return
            for launch in out.launches:
                self._start(launch)

    def _start(self, launch: Launch) -> None:
        launch_id = next(self._ids)
        self.inflight[launch_id] = (launch, set(launch.request_ids))
        for rid in launch.request_ids:
            grant = {"request_id": rid, "stage": launch.stages[0], "launch_id": launch_id,
                     "deployment": self._deployment_for(launch), "width": launch.width,
                     "batch": len(launch.request_ids)}
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
            self.policy.on_launch_done(launch, self.now())

    # -- the API the ingress and the replicas call ----------------------------------------------
    async def submit(self, request_id: str, model: str, shape_key: str, steps: int,
                     slo_ms: float | None = None) -> dict:
        """A request arrived. Returns its deadline (seconds from now)."""
        self._ensure_ticker()
        shape = Shape.parse(shape_key)
        slo_s = slo_ms / 1000.0 if slo_ms else self._default_slo(model, shape, steps)
        now = self.now()
        self.policy.add_request(Request(request_id, model, shape, steps, now, now + slo_s), now)
        self.active[request_id] = now + slo_s
        self.stats["submitted"] += 1
        self._schedule()
        return {"slo_s": slo_s}

    def _default_slo(self, model: str, shape: Shape, steps: int) -> float:
        try:
            from trident_rs.policy.slo import slo_seconds

            return float(slo_seconds(self.cost, get_spec(model).profile_model or model, shape, steps,
                                     scale=self.cfg.slo_scale))
        except Exception:  # slo module absent or no profile: sum of stage times at width 1
            total = sum(predict_stage_s(self.cost, model, s, shape, 1, 1, steps) for s in STAGES)
            return self.cfg.slo_scale * total * self.cfg.time_scale

    async def acquire(self, request_id: str, stage: str) -> dict:
        """Wait until the policy launches `stage` of the request; return the grant (deployment...)."""
        key = (request_id, stage)
        if key in self.granted:
            return self.granted.pop(key)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[key] = fut
        self._schedule()
        return await fut

    async def stage_done(self, grant: dict) -> None:
        self._done(grant["launch_id"], grant["request_id"])
        self._schedule()

    async def finish(self, request_id: str, ok: bool) -> None:
        """The request ended (ok or not): free everything it still holds."""
        if not ok:  # its later stages may still be launched by the policy: release them at once
            self.finished.add(request_id)
        deadline = self.active.pop(request_id, None)
        now = self.now()
        if ok:
            self.stats["completed"] += 1
            if deadline is not None and now <= deadline:
                self.stats["on_time"] += 1
        else:
            self.stats["failed"] += 1
        for stage in STAGES:
            self.granted.pop((request_id, stage), None)
        for launch_id, (launch, remaining) in list(self.inflight.items()):
            if request_id in remaining:
                self._done(launch_id, request_id)
        self._schedule()

    async def status(self) -> dict:
        """Plan, queue and counters (the status API of a later issue builds on this)."""
        return {
            "policy": getattr(self.policy, "name", type(self.policy).__name__),
            "counts": dict(self.counts),
            "plan": [{"id": g.id, "deployment": g.deployment, "node": g.node, "gpus": list(g.gpus)}
                     for g in self.plan.groups],
            "pending": self.policy.pending(),
            "inflight_launches": len(self.inflight),
            "active_requests": len(self.active),
            "stats": dict(self.stats),
            "replans": list(self.replans),
        }


ControllerDeployment = serve.deployment(
    Controller, name="Controller", num_replicas=1, max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
)
