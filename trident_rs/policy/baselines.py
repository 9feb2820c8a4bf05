"""Baseline policies behind the `Policy` interface, and the analytic upper bound.

- `StaticPipelinePolicy`: xDiT style. Fixed replica groups of width k run all three stages, FCFS.
- `DynamicPipelinePolicy`: shared GPU pool; each request picks its own width (smallest that
  meets its deadline, else the widest efficient one) and runs all three stages there, EDF.
- `StaticStagePolicy`: fixed encode and decode pools, diffuse groups of one fixed width.
- `BoundPolicy`: not simulated; an upper bound on SLO attainment (each request alone at its
  best width, and a fluid capacity relaxation).

Multi-model workloads: static policies split their groups between models by `models`
(model -> share of demand), which the runtime derives from the workload.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from trident_rs.models.spec import REGISTRY as MODEL_SPECS
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import (
    STAGES, Cluster, ClusterState, Launch, PlacementPlan, ReplicaGroup, Request, SchedulerOutput, Shape,
)

WIDTHS = (1, 2, 4, 8)


def stage_width(model: str, stage: str, width: int) -> int:
    """The widest degree `stage` supports within `width` GPUs (encode is always 1)."""
    spec = MODEL_SPECS.get(model)
    if spec is None:
        return width
    return max([w for w in spec.widths.get(stage, (1,)) if w <= width] or [1])


def pipeline_time(cost, model: str, shape: Shape, steps: int, width: int) -> float:
    """All three stages back to back on `width` GPUs, one request, no queueing."""
    return sum(cost.stage_time(model, s, shape, width=stage_width(model, s, width),
                               steps=steps if s == "diffuse" else 1) for s in STAGES)


def min_fit_width(cost, model: str, shape: Shape, gpu_memory_gb: float) -> int:
    """Smallest width on which diffuse and decode fit in memory (1 if the cost model cannot tell)."""
    fn = getattr(cost, "min_width", None)
    if fn is None:
        return 1
    w = 1
    for stage in ("diffuse", "decode"):
        try:
            w = max(w, int(fn(model, stage, shape, gpu_memory_gb) or 1))
        except Exception:  # noqa: BLE001 - a shape outside the tables: assume it fits
            pass
    return min(w, max(WIDTHS))


def assign_models(count: int, shares: dict[str, float]) -> list[str]:
    """`count` slots split between models in proportion to `shares`, each model >= 1 slot,
    contiguous per model (largest remainder)."""
    models = sorted(shares)
    if count < len(models):
        raise ValueError(f"{count} replica groups cannot serve {len(models)} models")
    total = sum(shares.values()) or 1.0
    exact = {m: count * shares[m] / total for m in models}
    n = {m: max(1, int(exact[m])) for m in models}
    while sum(n.values()) > count:
        m = max(models, key=lambda m: n[m] - exact[m])
        n[m] -= 1
    while sum(n.values()) < count:
        m = max(models, key=lambda m: exact[m] - n[m])
        n[m] += 1
    return [m for m in models for _ in range(n[m])]


def _shares(models) -> dict[str, float]:
    if not models:
        return {"flux": 1.0}
    if isinstance(models, dict):
        return dict(models)
    return {m: 1.0 for m in models}


class _PlannedFCFS(Policy):
    """Shared machinery of the static policies: a fixed plan, one FCFS queue per (model, stage)."""

    def __init__(self, cluster: Cluster, cost) -> None:
        self.cluster, self.cost = cluster, cost
        self.plan: PlacementPlan | None = None
        self.queues: dict[tuple[str, str], deque[Request]] = {}
        self.group_kind: dict[str, tuple[str, str]] = {}  # group id -> (model, first stage)
        self.waiting = 0
        self.by_group: dict[str, ReplicaGroup] = {}

    def _set_plan(self, groups: list[ReplicaGroup]) -> None:
        self.plan = PlacementPlan(tuple(groups))
        self.plan.check(self.cluster)
        for g in groups:
            self.group_kind[g.id] = (g.model, g.stages[0])
            self.by_group[g.id] = g
            self.queues.setdefault((g.model, g.stages[0]), deque())

    def initial_plan(self, now: float) -> PlacementPlan | None:
        return self.plan

    def _enqueue(self, request: Request, stage: str) -> None:
        q = self.queues.get((request.model, stage))
        if q is None:
            raise ValueError(f"{self.name}: no {stage} replica for model {request.model!r}")
        q.append(request)
        self.waiting += 1

    def add_request(self, request: Request, now: float) -> None:
        self._enqueue(request, "encode")

    def pending(self) -> int:
        return self.waiting

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        if not self.waiting or not state.ready_groups:
            return SchedulerOutput()
        launches = []
        kinds, queues = self.group_kind, self.queues
        for gid in sorted(g for g in state.ready_groups if queues[kinds[g]]):
            q = queues[kinds[gid]]
            if not q:
                continue
            req = q.popleft()
            self.waiting -= 1
            g = self.by_group[gid]
            launches.append(Launch((req.id,), g.model, g.stages, g.width, g.node, g.gpus, gid))
            if not self.waiting:
                break
        return SchedulerOutput(tuple(launches))

    def on_launch_done(self, launch: Launch, now: float) -> None:
        """Pipeline launches run all three stages: nothing follows."""


class StaticPipelinePolicy(_PlannedFCFS):
    """xDiT style: every node split into groups of `width` GPUs, each running whole requests."""

    name = "static-pipeline"

    def __init__(self, cluster: Cluster, cost, width: int = 1, models=None, **_: object) -> None:
        super().__init__(cluster, cost)
        if width not in WIDTHS or width > cluster.gpus_per_node:
            raise ValueError(f"static-pipeline width {width} must be one of {WIDTHS} and <= GPUs per node")
        self.width = width
        self.name = f"static-pipeline-w{width}"
        slots = [(n, j) for n in range(cluster.nodes) for j in range(cluster.gpus_per_node // width)]
        owners = assign_models(len(slots), _shares(models))
        self._set_plan([
            ReplicaGroup(f"pipe-w{width}-n{n}-{j}", m, STAGES, width, n, tuple(range(j * width, (j + 1) * width)))
            for (n, j), m in zip(slots, owners)
        ])


class StaticStagePolicy(_PlannedFCFS):
    """Stage-level, static: `encode_gpus` and `decode_gpus` single-GPU replicas (packed on the last
    nodes), the rest as diffuse groups of `width`; FCFS per stage."""

    name = "static-stage"

    def __init__(self, cluster: Cluster, cost, width: int = 4, encode_gpus: int | None = None,
                 decode_gpus: int | None = None, models=None, **_: object) -> None:
        super().__init__(cluster, cost)
        self.in_progress: dict[str, Request] = {}
        shares = _shares(models)
        total, gpn = cluster.total_gpus, cluster.gpus_per_node
        e = encode_gpus if encode_gpus is not None else max(len(shares), total // 32)
        d = decode_gpus if decode_gpus is not None else max(len(shares), total // 16)
        if e + d + width > total:
            raise ValueError(f"static-stage: {e} encode + {d} decode GPUs leave no diffuse group of width {width}")
        singles = [(n, i) for n in range(cluster.nodes - 1, -1, -1) for i in range(gpn - 1, -1, -1)][: e + d]
        taken = set(singles)
        diffuse = []
        for n in range(cluster.nodes):
            free = [i for i in range(gpn) if (n, i) not in taken]
            for j in range(len(free) // width):
                diffuse.append((n, tuple(free[j * width:(j + 1) * width])))
        groups = []
        for stage, slots in (("encode", [(n, (i,)) for n, i in singles[:e]]),
                             ("decode", [(n, (i,)) for n, i in singles[e:]]),
                             ("diffuse", diffuse)):
            for k, ((n, gpus), m) in enumerate(zip(slots, assign_models(len(slots), shares))):
                groups.append(ReplicaGroup(f"{stage}-w{len(gpus)}-{k}", m, (stage,), len(gpus), n, gpus))
        self.width = width
        self._set_plan(groups)

    def add_request(self, request: Request, now: float) -> None:
        self.in_progress[request.id] = request
        super().add_request(request, now)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        """Queue each request for its next stage; forget it after decode."""
        i = STAGES.index(launch.stages[-1]) + 1
        for rid in launch.request_ids:
            if i < len(STAGES):
                self._enqueue(self.in_progress[rid], STAGES[i])
            else:
                del self.in_progress[rid]


class DynamicPipelinePolicy(Policy):
    """Per-request width on a shared pool, all three stages on the same GPUs, EDF with backfill."""

    name = "dynamic-pipeline"

    def __init__(self, cluster: Cluster, cost, threshold: float = 0.8, scan_limit: int = 48, **_: object) -> None:
        self.cluster, self.cost = cluster, cost
        self.threshold, self.scan_limit = threshold, scan_limit
        self.queue: list[tuple[float, int, Request]] = []
        self.seq = 0
        self._times: dict[tuple, tuple[int, int, dict[int, float]]] = {}

    def initial_plan(self, now: float) -> PlacementPlan | None:
        return None

    def add_request(self, request: Request, now: float) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (request.deadline, self.seq, request))

    def on_launch_done(self, launch: Launch, now: float) -> None:
        pass

    def pending(self) -> int:
        return len(self.queue)

    def _options(self, r: Request) -> tuple[int, int, dict[int, float]]:
        """(min fitting width, efficient width, pipeline time per width) for r's class."""
        key = (r.model, r.shape, r.steps)
        if key not in self._times:
            lo = min_fit_width(self.cost, r.model, r.shape, self.cluster.gpu_memory_gb)
            widths = [w for w in WIDTHS if lo <= w <= self.cluster.gpus_per_node] or [self.cluster.gpus_per_node]
            eff = max(lo, int(self.cost.best_width(r.model, r.shape, threshold=self.threshold)))
            eff = min(eff, widths[-1])
            self._times[key] = (widths[0], eff, {w: pipeline_time(self.cost, r.model, r.shape, r.steps, w)
                                                  for w in widths})
        return self._times[key]

    def choose_width(self, r: Request, now: float) -> int:
        lo, eff, times = self._options(r)
        for w, t in times.items():
            if now + t <= r.deadline:
                return w
        return eff

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        if not self.queue:
            return SchedulerOutput()
        free = {n: sorted(g) for n, g in state.free_gpus.items() if g}
        if not free:
            return SchedulerOutput()
        launches, kept = [], []
        blocked = 10**9  # smallest width that found no room: later requests needing >= it wait
        scanned = 0
        while self.queue and scanned < self.scan_limit and free and blocked > 1:
            item = heapq.heappop(self.queue)
            r = item[2]
            scanned += 1
            w = self.choose_width(r, state.now)
            node = None
            if w < blocked:
                fits = [n for n, g in free.items() if len(g) >= w]
                node = min(fits, key=lambda n: (len(free[n]), n)) if fits else None
            if node is None:
                blocked = min(blocked, w)
                kept.append(item)
                continue
            gpus, rest = tuple(free[node][:w]), free[node][w:]
            if rest:
                free[node] = rest
            else:
                del free[node]
            launches.append(Launch((r.id,), r.model, STAGES, w, node, gpus))
        for item in kept:
            heapq.heappush(self.queue, item)
        return SchedulerOutput(tuple(launches))


@dataclass(frozen=True)
class BoundResult:
    """Upper bounds on SLO attainment."""

    alone_attainment: float  # every request alone on the cluster at its fastest width
    fluid_attainment: float  # capacity relaxation: GPU-seconds demanded vs available
    attainment: float  # min of the two
    alone_latencies: tuple[float, ...]


class BoundPolicy:
    """Analytic upper bound; evaluated, not simulated (`evaluate(requests)`)."""

    name = "bound"

    def __init__(self, cluster: Cluster, cost, **_: object) -> None:
        self.cluster, self.cost = cluster, cost
        self._cache: dict[tuple, tuple[float, float | None]] = {}

    def _class_bound(self, r: Request) -> tuple[float, float | None]:
        """(fastest latency alone, fewest GPU-seconds among widths meeting the SLO or None)."""
        key = (r.model, r.shape, r.steps, round(r.slo_s, 6))
        if key not in self._cache:
            lo = min_fit_width(self.cost, r.model, r.shape, self.cluster.gpu_memory_gb)
            widths = [w for w in WIDTHS if lo <= w <= self.cluster.gpus_per_node] or [self.cluster.gpus_per_node]
            best_latency, least_gpu_s = float("inf"), None
            for w in widths:
                t = pipeline_time(self.cost, r.model, r.shape, r.steps, w)
                best_latency = min(best_latency, t)
                if t <= r.slo_s + 1e-9:  # stage-level: encode/decode on their own narrow GPUs
                    gpu_s = sum(self.cost.stage_time(r.model, s, r.shape, width=sw, steps=r.steps if s == "diffuse" else 1) * sw
                                for s, sw in (("encode", 1), ("diffuse", w), ("decode", stage_width(r.model, "decode", 1))))
                    least_gpu_s = gpu_s if least_gpu_s is None else min(least_gpu_s, gpu_s)
            self._cache[key] = (best_latency, least_gpu_s)
        return self._cache[key]

    def evaluate(self, requests: list[Request]) -> BoundResult:
        if not requests:
            return BoundResult(float("nan"), float("nan"), float("nan"), ())
        lat, demands = [], []
        for r in requests:
            t, gpu_s = self._class_bound(r)
            lat.append(t)
            if gpu_s is not None:
                demands.append(gpu_s)
        n = len(requests)
        window = max(r.deadline for r in requests) - min(r.arrival for r in requests)
        capacity = self.cluster.total_gpus * window
        admitted, used = 0, 0.0
        for d in sorted(demands):  # most requests fit when the cheapest go first
            if used + d > capacity:
                break
            used += d
            admitted += 1
        alone, fluid = len(demands) / n, admitted / n
        return BoundResult(alone, fluid, min(alone, fluid), tuple(lat))
