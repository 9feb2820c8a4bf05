"""Baseline policies behind the `Policy` interface.

- `StaticPipelinePolicy`: xDiT style. Fixed replica groups of width k run all three stages;
  one queue per model, first-come-first-served (`order="fcfs"`, what xDiT and the paper's
  baseline do) or earliest-deadline-first (`order="edf"`).
- `DynamicPipelinePolicy`: shared GPU pool; each request picks its own width (smallest that
  meets its deadline, else the widest efficient one) and runs all three stages there, EDF. It
  reuses the sequence-parallel groups and models its GPUs last ran where it can (the runtime
  charges a regroup or a model load where it cannot).
- `StaticStagePolicy`: fixed encode and decode pools, diffuse groups of one fixed width; FCFS
  or EDF per stage.

Memory: a pipeline-level launch holds every stage's weights (`CostModel.launch_memory`). Where
they do not fit, the pipeline policies offload the text encoders to host memory between
requests, as diffusers' model CPU offload does (the runtime charges the transfer); where even
that does not fit, the launch is refused by the runtime and its requests fail.

Multi-model workloads: static policies split their groups between models by `models`
(model -> share of demand), which the runtime derives from a prior or from past traffic,
never from the workload being served.
The analytic upper bound lives in `trident_rs.policy.bound`.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Literal

from trident_rs.models.spec import REGISTRY as MODEL_SPECS
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import (
    STAGES, Cluster, ClusterState, Launch, PlacementPlan, ReplicaGroup, Request, SchedulerOutput, Shape,
)

WIDTHS = (1, 2, 4, 8)
ORDERS = ("fcfs", "edf")
Order = Literal["fcfs", "edf"]


def stage_width(model: str, stage: str, width: int) -> int:
    """The widest degree `stage` supports within `width` GPUs (encode is always 1)."""
    spec = MODEL_SPECS.get(model)
    if spec is None:
        return width
    return max([w for w in spec.widths.get(stage, (1,)) if w <= width] or [1])


def feasible_widths(cost, cluster: Cluster, model: str, stage: str, shape: Shape) -> tuple[int, ...]:
    """Widths the cost model has for `stage`, within a node, that fit in memory (the widest if
    none fits: the runtime refuses it)."""
    top = cluster.gpus_per_node
    ws = [w for w in cost.widths(model, stage) if w <= top] or [1]
    try:
        need = cost.min_width(model, stage, shape, cluster.gpu_memory_gb)
    except Exception:  # noqa: BLE001 - fits no width
        need = max(ws)
    return tuple(w for w in ws if w >= need) or (max(ws),)


def pipeline_offload(cost, model: str, shape: Shape, width: int, gpu_memory_gb: float,
                     stages: tuple[str, ...] = STAGES) -> tuple[str, ...] | None:
    """() if a pipeline-level launch fits with all weights resident, ("encode",) if only with
    the text encoders offloaded, None if not at all (a cost model without memory data: ())."""
    fn = getattr(cost, "pipeline_offload", None)
    return () if fn is None else fn(model, shape, width, gpu_memory_gb, stages)


def pipeline_time(cost, model: str, shape: Shape, steps: int, width: int, offload: tuple[str, ...] = ()) -> float:
    """All three stages back to back on `width` GPUs, one request, no queueing."""
    t = sum(cost.stage_time(model, s, shape, width=stage_width(model, s, width),
                            steps=steps if s == "diffuse" else 1) for s in STAGES)
    return t + (cost.offload_s(model, offload) if offload else 0.0)


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


def model_min_width(cost, model: str, stage: str, gpu_memory_gb: float) -> int:
    """The widest of the minimum widths `stage` needs over the shapes profiled for `model`
    (what a static deployment must provision; 1 if the cost model cannot tell)."""
    shapes = getattr(cost, "shapes", None)
    if shapes is None:
        return 1
    need = 1
    for shape in shapes(model):
        try:
            need = max(need, int(cost.min_width(model, stage, shape, gpu_memory_gb)))
        except Exception:  # noqa: BLE001 - fits nowhere: the runtime refuses it
            pass
    return min(need, max(WIDTHS))


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


class _PlannedQueues(Policy):
    """Shared machinery of the static policies: a fixed plan, one queue per (model, stage),
    served first-come-first-served or earliest-deadline-first. Every idle group takes the head
    of its queue, so no group idles while its queue holds work."""

    def __init__(self, cluster: Cluster, cost, order: Order = "fcfs") -> None:
        if order not in ORDERS:
            raise ValueError(f"queue order must be one of {ORDERS}, got {order!r}")
        self.cluster, self.cost, self.order = cluster, cost, order
        self.plan: PlacementPlan | None = None
        self.queues: dict[tuple[str, str], list[tuple[float, int, Request]]] = {}
        self.group_kind: dict[str, tuple[str, str]] = {}  # group id -> (model, first stage)
        self.waiting = 0
        self.by_group: dict[str, ReplicaGroup] = {}
        self._seq = itertools.count()
        self._offload: dict[tuple, tuple[str, ...]] = {}

    def _set_plan(self, groups: list[ReplicaGroup]) -> None:
        self.plan = PlacementPlan(tuple(groups))
        self.plan.check(self.cluster)
        for g in groups:
            self.group_kind[g.id] = (g.model, g.stages[0])
            self.by_group[g.id] = g
            self.queues.setdefault((g.model, g.stages[0]), [])

    def initial_plan(self, now: float) -> PlacementPlan | None:
        return self.plan

    def _enqueue(self, request: Request, stage: str) -> None:
        q = self.queues.get((request.model, stage))
        if q is None:
            raise ValueError(f"{self.name}: no {stage} replica for model {request.model!r}")
        seq = next(self._seq)
        heapq.heappush(q, (request.deadline if self.order == "edf" else seq, seq, request))
        self.waiting += 1

    def add_request(self, request: Request, now: float) -> None:
        self._enqueue(request, "encode")

    def pending(self) -> int:
        return self.waiting

    def _launch(self, req: Request, g: ReplicaGroup) -> Launch:
        offload: tuple[str, ...] = ()
        if len(g.stages) > 1:  # a pipeline-level group: offload the encoders if that is what fits
            key = (req.model, req.shape, g.width)
            if key not in self._offload:
                self._offload[key] = pipeline_offload(self.cost, req.model, req.shape, g.width,
                                                      self.cluster.gpu_memory_gb, g.stages) or ()
            offload = self._offload[key]
        return Launch((req.id,), g.model, g.stages, g.width, g.node, g.gpus, g.id, offload)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        if not self.waiting or not state.ready_groups:
            return SchedulerOutput()
        launches = []
        kinds, queues = self.group_kind, self.queues
        for gid in sorted(g for g in state.ready_groups if queues[kinds[g]]):
            q = queues[kinds[gid]]
            if not q:
                continue
            req = heapq.heappop(q)[2]
            self.waiting -= 1
            launches.append(self._launch(req, self.by_group[gid]))
            if not self.waiting:
                break
        return SchedulerOutput(tuple(launches))

    def on_launch_done(self, launch: Launch, now: float) -> None:
        """Pipeline launches run all three stages: nothing follows."""

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        """Pipeline launches: the request is already out of the queue; nothing to forget."""


class StaticPipelinePolicy(_PlannedQueues):
    """xDiT style: every node split into groups of `width` GPUs, each running whole requests."""

    name = "static-pipeline"

    def __init__(self, cluster: Cluster, cost, width: int = 1, models=None, order: Order = "fcfs",
                 **_: object) -> None:
        super().__init__(cluster, cost, order)
        if width not in WIDTHS or width > cluster.gpus_per_node:
            raise ValueError(f"static-pipeline width {width} must be one of {WIDTHS} and <= GPUs per node")
        self.width = width
        self.name = f"static-pipeline-w{width}" + ("-edf" if order == "edf" else "")
        slots = [(n, j) for n in range(cluster.nodes) for j in range(cluster.gpus_per_node // width)]
        owners = assign_models(len(slots), _shares(models))
        self._set_plan([
            ReplicaGroup(f"pipe-w{width}-n{n}-{j}", m, STAGES, width, n, tuple(range(j * width, (j + 1) * width)))
            for (n, j), m in zip(slots, owners)
        ])


class StaticStagePolicy(_PlannedQueues):
    """Stage-level, static: encode and decode replicas (packed on the last nodes) and the rest as
    diffuse groups of `width`; FCFS or EDF per stage. Encode and decode replicas are as wide as
    the widest shape the cost model knows for the model needs (decode of long videos does not
    fit one GPU)."""

    name = "static-stage"

    def __init__(self, cluster: Cluster, cost, width: int = 4, encode_gpus: int | None = None,
                 decode_gpus: int | None = None, models=None, order: Order = "fcfs", **_: object) -> None:
        super().__init__(cluster, cost, order)
        self.in_progress: dict[str, Request] = {}
        shares = _shares(models)
        total, gpn = cluster.total_gpus, cluster.gpus_per_node
        if width not in WIDTHS or width > gpn:
            raise ValueError(f"static-stage width {width} must be one of {WIDTHS} and <= GPUs per node")
        mem = cluster.gpu_memory_gb
        dec_w = {m: min(model_min_width(cost, m, "decode", mem), gpn) for m in shares}
        e = encode_gpus if encode_gpus is not None else max(len(shares), total // 32)
        d = decode_gpus if decode_gpus is not None else max(sum(dec_w.values()), total // 16)
        if e + d + width > total:
            raise ValueError(f"static-stage: {e} encode + {d} decode GPUs leave no diffuse group of width {width}")
        # decode groups (widest first, aligned) then encode singles, from the last GPU backwards
        taken: set[tuple[int, int]] = set()

        def take(w: int) -> tuple[int, tuple[int, ...]] | None:
            for n in range(cluster.nodes - 1, -1, -1):
                for start in range(gpn - w, -1, -w):
                    block = tuple(range(start, start + w))
                    if not any((n, i) in taken for i in block):
                        taken.update((n, i) for i in block)
                        return n, block
            return None

        decode_models = assign_models(max(len(shares), d // max(max(dec_w.values()), 1)), shares)
        decode_slots = []
        used = 0
        for m in decode_models:
            w = dec_w[m]
            if used + w > d and used >= sum(dec_w.values()):
                break
            slot = take(w)
            if slot is None:
                raise ValueError(f"static-stage: no room for a width-{w} decode group of {m}")
            decode_slots.append((slot, m))
            used += w
        encode_slots = [take(1) for _ in range(e)]
        if any(s is None for s in encode_slots):
            raise ValueError(f"static-stage: no room for {e} encode GPUs")
        diffuse = []
        for n in range(cluster.nodes):
            free = [i for i in range(gpn) if (n, i) not in taken]
            for j in range(len(free) // width):
                diffuse.append((n, tuple(free[j * width:(j + 1) * width])))
        if not diffuse:
            raise ValueError(f"static-stage: encode and decode GPUs leave no diffuse group of width {width}")
        groups = []
        for k, ((n, gpus), m) in enumerate(decode_slots):
            groups.append(ReplicaGroup(f"decode-w{len(gpus)}-{k}", m, ("decode",), len(gpus), n, gpus))
        for stage, slots in (("encode", encode_slots), ("diffuse", diffuse)):
            for k, ((n, gpus), m) in enumerate(zip(slots, assign_models(len(slots), shares))):
                groups.append(ReplicaGroup(f"{stage}-w{len(gpus)}-{k}", m, (stage,), len(gpus), n, gpus))
        self.width = width
        self.name = f"static-stage-w{width}" + ("-edf" if order == "edf" else "")
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

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        for rid in launch.request_ids:
            self.in_progress.pop(rid, None)


class DynamicPipelinePolicy(Policy):
    """Per-request width on a shared pool, all three stages on the same GPUs, EDF with backfill.

    Widths are those where the whole pipeline fits in memory (encoders offloaded if needed).
    A request goes, by preference, on a sequence-parallel group of its width that last ran its
    model and is free, else on the node that fits it most tightly (GPUs that last ran its model
    first), so regrouping and model loads are paid only when the mix needs them."""

    name = "dynamic-pipeline"

    def __init__(self, cluster: Cluster, cost, threshold: float = 0.8, scan_limit: int = 48, **_: object) -> None:
        self.cluster, self.cost = cluster, cost
        self.threshold, self.scan_limit = threshold, scan_limit
        self.queue: list[tuple[float, int, Request]] = []
        self.seq = 0
        self._times: dict[tuple, tuple[int, int, dict[int, float], dict[int, tuple[str, ...]]]] = {}
        self.last_model: dict[tuple[int, int], str] = {}  # (node, gpu) -> model it last ran
        self.groups: dict[tuple[int, int, str], set[tuple[int, ...]]] = {}  # (node, width, model) -> past groups

    def initial_plan(self, now: float) -> PlacementPlan | None:
        return None

    def add_request(self, request: Request, now: float) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (request.deadline, self.seq, request))

    def on_launch_done(self, launch: Launch, now: float) -> None:
        pass

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        pass

    def pending(self) -> int:
        return len(self.queue)

    def _options(self, r: Request) -> tuple[int, int, dict[int, float], dict[int, tuple[str, ...]]]:
        """(min fitting width, efficient width, pipeline time per width, offload per width)."""
        key = (r.model, r.shape, r.steps)
        if key not in self._times:
            mem, G = self.cluster.gpu_memory_gb, self.cluster.gpus_per_node
            fits = {w: pipeline_offload(self.cost, r.model, r.shape, w, mem) for w in WIDTHS if w <= G}
            widths = [w for w, o in fits.items() if o is not None]
            if not widths:  # fits nowhere: run at the widest and let the runtime refuse it
                widths, fits = [max(fits)], {max(fits): ()}
            lo = max(widths[0], min_fit_width(self.cost, r.model, r.shape, mem))
            widths = [w for w in widths if w >= lo] or widths[-1:]
            eff = max(widths[0], int(self.cost.best_width(r.model, r.shape, threshold=self.threshold)))
            eff = min(eff, widths[-1])
            if eff not in widths:
                eff = min(w for w in widths if w >= eff)
            self._times[key] = (widths[0], eff,
                                {w: pipeline_time(self.cost, r.model, r.shape, r.steps, w, fits[w]) for w in widths},
                                {w: fits[w] for w in widths})
        return self._times[key]

    def choose_width(self, r: Request, now: float) -> int:
        lo, eff, times, _ = self._options(r)
        for w, t in times.items():
            if now + t <= r.deadline:
                return w
        return eff

    def _place(self, model: str, w: int, free: dict[int, list[int]]) -> tuple[int, tuple[int, ...]] | None:
        """Node and GPUs for a width-`w` launch of `model`: a free past group of that model and
        width, else the tightest node, its GPUs that last ran `model` first."""
        fits = [n for n, g in free.items() if len(g) >= w]
        if not fits:
            return None
        for n in sorted(fits, key=lambda n: (len(free[n]), n)):
            have = set(free[n])
            for gpus in sorted(self.groups.get((n, w, model), ())):
                if have.issuperset(gpus):
                    return n, gpus
        n = min(fits, key=lambda n: (len(free[n]), n))
        ranked = sorted(free[n], key=lambda i: (self.last_model.get((n, i), model) != model, i))
        return n, tuple(sorted(ranked[:w]))

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
            spot = self._place(r.model, w, free) if w < blocked else None
            if spot is None:
                blocked = min(blocked, w)
                kept.append(item)
                continue
            node, gpus = spot
            rest = [i for i in free[node] if i not in gpus]
            if rest:
                free[node] = rest
            else:
                del free[node]
            for i in gpus:
                self.last_model[(node, i)] = r.model
            if w > 1:
                self.groups.setdefault((node, w, r.model), set()).add(gpus)
            launches.append(Launch((r.id,), r.model, STAGES, w, node, gpus, "", self._options(r)[3][w]))
        for item in kept:
            heapq.heappush(self.queue, item)
        return SchedulerOutput(tuple(launches))
