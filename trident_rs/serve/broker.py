"""The broker: runs the policy and turns its launches into grants (the controller's dispatch job).

It holds the policy, the running plan and what is in flight: launches and the requests each
still holds, grants made but not yet collected, and requests waiting for a grant. The policy
sees a `ClusterState` built from the launches in flight and from the registry of real
replicas (`trident_rs.serve.registry`): a plan group is ready when a live replica is bound to
it and it runs nothing. Plans become replica counts published for Serve's autoscaler
(`trident_rs.serve.scaling`). No Serve calls here: the controller deployment wraps it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from trident_rs.policy.interface import Policy
from trident_rs.policy.types import ClusterState, Launch, PlacementPlan
from trident_rs.vocab import STAGES, DeploymentKey, Stage
from trident_rs.serve.config import AppConfig
from trident_rs.serve.grant import Grant
from trident_rs.serve.registry import ReplicaRegistry

logger = logging.getLogger("ray.serve")
MAX_ENDED = 100_000
STEP_WAIT_S = 20.0  # a re-shape step waits at most this long for Serve before the next one


class Broker:
    def __init__(self, cfg: AppConfig, policy: Policy, now: Callable[[], float],
                 publish: Callable[[dict[str, int]], None], on_grant: Callable[[Grant], None] = lambda g: None,
                 metrics: Any = None):
        self.cfg, self.policy, self.now, self._publish_counts = cfg, policy, now, publish
        self.on_grant, self.metrics = on_grant, metrics
        self.cluster = cfg.cluster.to_cluster()
        self.registry = ReplicaRegistry()
        self.plan: PlacementPlan = PlacementPlan(())
        self.counts: dict[str, int] = {}  # the plan's counts (the target)
        self.published: dict[str, int] | None = None  # what Serve is told to run now
        self._step: tuple[float, dict[str, tuple[int, bool]]] = (0.0, {})  # (since, deployment -> (count, down))
        self.replans: deque[dict] = deque(maxlen=50)
        self._ids = itertools.count()
        self.inflight: dict[int, tuple[Launch, set[str]]] = {}
        self.launch_t: dict[int, float] = {}  # launch id -> monotonic start
        self.granted: dict[tuple[str, str], Grant] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()  # ended unfinished: later launches are void

    # -- plan --------------------------------------------------------------------------------------
    def publish(self, plan: PlacementPlan, reason: str) -> None:
        if (getattr(plan, "stats", None) or {}).get("fallback"):  # the solver timed out (policy layer)
            reason += " (the solver found no plan within its time limit: greedy plan)"
        enabled = {d.name for d in self.cfg.deployments}
        counts = {name: 0 for name in enabled}
        for name, n in plan.count().items():
            if name in enabled:  # Serve bounds it by max_replicas anyway; publish what will run
                counts[name] = min(n, self.cfg.max_replicas(self.cfg.deployment(name)))
            else:
                logger.warning("plan asks for %s which this app does not deploy; ignored", name)
        if self.replans and self.metrics is not None:
            self.metrics.replan()
        self.plan, self.counts = plan, counts
        self.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason, "counts": counts})
        self.roll()

    def roll(self) -> None:
        """Move the counts Serve runs toward the plan's, in steps that keep nodes from fragmenting:
        first every decrease, then (once the removed replicas are gone) the increases of the
        widest deployments, then the next width, each step waiting until its replicas have
        registered (or `STEP_WAIT_S`). Ray places a wide STRICT_PACK group while whole nodes are
        still free, and the narrow ones fill what is left, as the plan packed them. Without a
        replica registry (nothing registered yet, tests), the counts are published at once."""
        target = self.counts
        if self.published is None or not self.registry.enabled:
            if target != self.published:
                self.published = dict(target)
                self._publish_counts(dict(target))
            return
        live = self.registry.live_counts()
        pub = dict(self.published)
        since, awaited = self._step
        now = time.monotonic()
        if awaited and now - since < STEP_WAIT_S and any(
                live.get(d, 0) > n if down else live.get(d, 0) < n for d, (n, down) in awaited.items()):
            return  # the last step is still under way
        fewer = {d: n for d, n in target.items() if n < pub.get(d, 0)}
        if fewer:
            self._set(pub, fewer, True, now)
            return
        more = {d: n for d, n in target.items() if n > pub.get(d, 0)}
        if more:
            widest = max(self.cfg.deployment(d).width for d in more)
            self._set(pub, {d: n for d, n in more.items() if self.cfg.deployment(d).width == widest}, False, now)
        elif awaited:
            self._step = (now, {})

    def _set(self, pub: dict[str, int], step: dict[str, int], down: bool, now: float) -> None:
        pub.update(step)
        self.published = pub
        self._step = (now, {d: (n, down) for d, n in step.items()})
        self._publish_counts(dict(pub))

    def keep(self, counts: dict[str, int], reason: str) -> None:
        """Adopt counts published earlier (a restarted controller) until the policy's first plan."""
        self.counts = dict(counts)
        self.published = dict(counts)
        self.replans.append({"t": 0.0, "wall": time.time(), "reason": reason, "counts": dict(counts)})

    def deployment_for(self, stage: Stage, width: int) -> str:
        """The deployment that runs a launch of `stage` at `width` (the widest configured <= it)."""
        widths = self.cfg.widths(stage)
        if width not in widths:
            width = max([w for w in widths if w <= width] or [widths[0]])
        return DeploymentKey(stage, width).name

    # -- state and scheduling ------------------------------------------------------------------------
    def bindings(self) -> dict[str, str]:
        """Plan group id -> live replica id (empty while no replica has registered)."""
        if not self.registry.enabled:
            return {}
        return self.registry.bind([(g.id, self.deployment_for(g.stages[0], g.width), g.node)
                                   for g in self.plan.groups], time.monotonic())

    def state(self) -> ClusterState:
        busy = {(l.node, g) for l, _ in self.inflight.values() for g in l.gpus}
        free = {n: frozenset(g for g in range(self.cluster.gpus_per_node) if (n, g) not in busy)
                for n in range(self.cluster.nodes)}
        bound = self.bindings()
        ready = frozenset(g.id for g in self.plan.groups
                          if (not self.registry.enabled or g.id in bound)
                          and not any((g.node, x) in busy for x in g.gpus))
        return ClusterState(self.now(), free, ready)

    def schedule(self) -> None:
        """Run the policy until it launches nothing more. A policy that raises is logged and
        counted, and tried again on the next event or tick: the controller itself stays up."""
        for _ in range(100):
            t = time.perf_counter()
            try:
                out = self.policy.schedule(self.state())
            except Exception:
                logger.exception("policy.schedule failed; retrying on the next event or tick")
                if self.metrics is not None:
                    self.metrics.policy_error()
                return
            if out.new_plan is not None:
                if self.metrics is not None:
                    self.metrics.solver_time(time.perf_counter() - t)
                self.publish(out.new_plan, out.replan_reason or "policy re-plan")
            if not out.launches:
                return
            for launch in out.launches:
                self._start(launch)

    def _start(self, launch: Launch) -> None:
        launch_id = next(self._ids)
        self.inflight[launch_id] = (launch, set(launch.request_ids))
        self.launch_t[launch_id] = time.monotonic()
        deployment = self.deployment_for(launch.stages[0], launch.width)
        replica = self.bindings().get(launch.group_id) if launch.group_id else None
        for rid in launch.request_ids:
            grant = Grant.for_launch(rid, launch, launch_id, deployment, replica)
            self.on_grant(grant)
            key = (rid, grant.stage)
            if rid in self.ended:  # the request already failed: nobody will run it
                self.done(grant)
            elif key in self.waiters:
                fut = self.waiters.pop(key)
                if not fut.done():
                    fut.set_result(grant)
            else:
                self.granted[key] = grant

    def done(self, grant: Grant) -> float | None:
        """The request no longer holds its launch; returns the launch's age if it was in flight."""
        entry = self.inflight.get(grant.batch_id) if grant.batch_id is not None else None
        if entry is None:
            return None
        launch, remaining = entry
        took = time.monotonic() - self.launch_t.get(grant.batch_id, time.monotonic())
        remaining.discard(grant.request_id)
        if not remaining:
            del self.inflight[grant.batch_id]
            self.launch_t.pop(grant.batch_id, None)
            self.policy.on_launch_done(launch, self.now())
        return took

    def take(self, rid: str, stage: Stage) -> Grant | None:
        return self.granted.pop((rid, stage), None)

    def wait(self, rid: str, stage: Stage) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[(rid, stage)] = fut
        return fut

    def release(self, rid: str, ended_unfinished: bool) -> None:
        """`rid` ended: drop its grants, free what it holds; void later launches if unfinished."""
        if ended_unfinished:
            self.ended[rid] = None
            while len(self.ended) > MAX_ENDED:
                self.ended.popitem(last=False)
        for key in [k for k in self.granted if k[0] == rid]:
            del self.granted[key]
        for key in [k for k in self.waiters if k[0] == rid]:
            fut = self.waiters.pop(key)
            if not fut.done():
                fut.cancel()
        for launch_id, (launch, remaining) in list(self.inflight.items()):
            if rid in remaining:
                self.done(Grant.for_launch(rid, launch, launch_id, "", None))

    def regrant(self, grant: Grant, here: str | None = None) -> Grant | None:
        """The same launch on another live replica of its deployment (the granted one is gone)."""
        if grant.batch_id not in self.inflight:
            return None
        node = grant.node if grant.node is not None else 0
        replica = self.registry.rebind(grant.group, grant.deployment, node, grant.replica_id,
                                                time.monotonic(), prefer=here) if grant.group else None
        if replica is None:
            return None
        return Grant(grant.request_id, grant.stage, grant.deployment, grant.width, grant.batch_id, grant.batch,
                     replica, grant.group, grant.node, grant.gpus)

    def queues(self) -> tuple[dict[str, int], dict[str, int]]:
        """(granted but not done per deployment, waiting for a launch per stage)."""
        per_dep = {d.name: 0 for d in self.cfg.deployments}
        for launch, remaining in self.inflight.values():
            name = self.deployment_for(launch.stages[0], launch.width)
            per_dep[name] = per_dep.get(name, 0) + len(remaining)
        waiting = {s: 0 for s in STAGES}
        for (_, stage) in self.waiters:
            waiting[stage] = waiting.get(stage, 0) + 1
        return per_dep, waiting
