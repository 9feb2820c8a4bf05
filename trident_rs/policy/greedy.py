"""`GreedyStagePolicy`: a simple stage-level policy; the serve runtime falls back on it.

Dispatch: earliest deadline first; each ready stage goes to the idle replica group of its
stage whose width gives the shortest predicted time (ties: the narrower width).
Re-planning: every `replan_s`, the GPUs are shared between the configured (stage, width)
deployments in proportion to the GPU-seconds the recent arrivals need at their best width
(the narrowest width that finishes diffuse within half the request's SLO), keeping at least
one replica of every stage. It exists so the runtime works before/without the TridentPolicy.
"""
from __future__ import annotations

from collections import deque
from typing import Any

from trident_rs.policy.interface import Policy
from trident_rs.policy.stage_estimate import predict_stage_s
from trident_rs.policy.types import (
    STAGES, Cluster, DeploymentKey, ClusterState, Launch, PlacementPlan, ReplicaGroup, Request, SchedulerOutput, Stage,
)


def pack_plan(cluster: Cluster, counts: dict[str, int]) -> PlacementPlan:
    """Place `counts` (deployment name -> replicas) on nodes, widest first; drop what does not fit."""
    free = {n: list(range(cluster.gpus_per_node)) for n in range(cluster.nodes)}
    groups: list[ReplicaGroup] = []
    order = sorted(counts.items(), key=lambda kv: -DeploymentKey.parse(kv[0]).width)
    for name, n in order:
        stage, width = DeploymentKey.parse(name).stage, DeploymentKey.parse(name).width
        for i in range(n):
            node = next((nd for nd in free if len(free[nd]) >= width), None)
            if node is None:
                break
            gpus, free[node] = tuple(free[node][:width]), free[node][width:]
            groups.append(ReplicaGroup(f"{name}#{i}", "*", (stage,), width, node, gpus))  # type: ignore[arg-type]
    return PlacementPlan(tuple(groups))


class GreedyStagePolicy(Policy):
    name = "greedy"

    def __init__(self, cluster: Cluster, cost: Any, initial: dict[str, int], *,
                 replan_s: float = 2.0, window_s: float = 10.0, replan: bool = True):
        self.cluster = cluster
        self.cost = cost
        self.initial = dict(initial)
        self.widths: dict[str, list[int]] = {s: sorted(DeploymentKey.parse(k).width for k in initial
                                                       if DeploymentKey.parse(k).stage == s) for s in STAGES}
        self.replan_s, self.window_s, self.replan = replan_s, window_s, replan
        self.plan = pack_plan(cluster, self.initial)
        self.requests: dict[str, Request] = {}
        self.next_stage: dict[str, int] = {}
        self.ready: set[str] = set()
        self.recent: deque[Request] = deque()
        self.last_replan = 0.0

    def initial_plan(self, now: float) -> PlacementPlan:
        return self.plan

    def add_request(self, request: Request, now: float) -> None:
        self.requests[request.id] = request
        self.next_stage[request.id] = 0
        self.ready.add(request.id)
        self.recent.append(request)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        for rid in launch.request_ids:
            self.next_stage[rid] += 1
            if self.next_stage[rid] >= len(STAGES):
                del self.next_stage[rid], self.requests[rid]
            else:
                self.ready.add(rid)

    def pending(self) -> int:
        return len(self.requests)

    def next_wakeup(self, now: float) -> float | None:
        return now + self.replan_s if self.replan else None

    def _time(self, req: Request, stage: Stage, width: int) -> float:
        return predict_stage_s(self.cost, req.model, stage, req.shape, width, 1, req.steps)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        new_plan, reason = self._maybe_replan(state.now)
        idle = [g for g in self.plan.groups if g.id in state.ready_groups]
        launches = []
        for rid in sorted(self.ready, key=lambda r: (self.requests[r].deadline, r)):
            req, stage = self.requests[rid], STAGES[self.next_stage[rid]]
            options = [g for g in idle if g.stages == (stage,)]
            if not options:
                continue
            best = min(options, key=lambda g: (self._time(req, stage, g.width), g.width))
            idle.remove(best)
            self.ready.discard(rid)
            launches.append(Launch((rid,), req.model, (stage,), best.width, best.node, best.gpus, best.id))
        return SchedulerOutput(tuple(launches), new_plan, reason)

    def _maybe_replan(self, now: float) -> tuple[PlacementPlan | None, str]:
        if not self.replan or now - self.last_replan < self.replan_s:
            return None, ""
        self.last_replan = now
        while self.recent and self.recent[0].arrival < now - self.window_s:
            self.recent.popleft()
        if not self.recent:
            return None, ""
        demand: dict[str, float] = {}
        for req in self.recent:
            for stage in STAGES:
                widths = self.widths[stage]
                fits = [w for w in widths if self._time(req, stage, w) <= 0.5 * req.slo_s]
                w = min(fits) if fits else min(widths, key=lambda x: self._time(req, stage, x))
                name = DeploymentKey(stage, w).name
                demand[name] = demand.get(name, 0.0) + self._time(req, stage, w) * w
        counts = self._share(demand)
        if counts == self.plan.count():
            return None, ""
        self.plan = pack_plan(self.cluster, counts)
        return self.plan, f"mix shifted: demand GPU-s {({k: round(v, 2) for k, v in sorted(demand.items())})}"

    def _share(self, demand: dict[str, float]) -> dict[str, int]:
        total_gpus, total = self.cluster.total_gpus, sum(demand.values()) or 1.0
        counts = {name: 0 for name in self.initial}
        for name, d in demand.items():
            counts[name] = max(1, int(total_gpus * d / total) // DeploymentKey.parse(name).width)
        for stage in STAGES:  # every stage keeps at least one replica
            if not any(counts[DeploymentKey(stage, w).name] for w in self.widths[stage]):
                counts[DeploymentKey(stage, self.widths[stage][0]).name] = 1
        used = lambda: sum(n * DeploymentKey.parse(k).width for k, n in counts.items())  # noqa: E731
        while used() > total_gpus:
            name = max((k for k in counts if counts[k] > 1 or (counts[k] == 1 and self._spare(counts, k))),
                       key=lambda k: counts[k] * DeploymentKey.parse(k).width, default=None)
            if name is None:
                break
            counts[name] -= 1
        return counts

    def _spare(self, counts: dict[str, int], name: str) -> bool:
        stage = DeploymentKey.parse(name).stage
        return sum(n for k, n in counts.items() if DeploymentKey.parse(k).stage == stage) > 1
