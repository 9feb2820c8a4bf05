"""`StepLevelPolicy`: the shared-pool, step-level machinery of the `tetriserve` and `genserve`
baselines (their modules say what each takes from its paper).

What both do the same way: request bookkeeping; diffuse in chunks of steps (`Launch.steps`) with
pauses at chunk boundaries, bounded by `max_preemptions` and by `host_memory_gb` of paused state;
encode and decode as their own launches, earliest deadline first, at the narrowest width that
fits memory and keeps the request on time; GPU placement priced with `WeightResidency`; a
knapsack over the free GPUs (`knapsack`) that subclasses fill with their values (`_pack`); and
cached cost-model lookups. Options are coerced from strings (`parse_options`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from trident_rs.errors import ConfigError
from trident_rs.policy.interface import Policy
from trident_rs.policy.stage_costs import StageCosts
from trident_rs.policy.paused_state import PausedState
from trident_rs.policy.residency import DEFAULT_REGROUP_S, WeightResidency
from trident_rs.policy.types import STAGES, Cluster, ClusterState, Launch, Request, SchedulerOutput, Shape

# options the runtimes give every policy they build; the step-level baselines do not use them
SHARED_OPTIONS = frozenset({"slo_scale", "seed", "tick_s", "forecast", "workload", "models"})
# name -> (type, default, check, what the check requires)
COMMON_OPTIONS: dict[str, tuple[type, object, object, str]] = {
    "threshold": (float, 0.8, lambda v: 0 < v <= 1, "0 < threshold <= 1"),
    "scan_limit": (int, 32, lambda v: v >= 1, "scan_limit >= 1"),
    "max_preemptions": (int, 8, lambda v: v >= 0, "max_preemptions >= 0"),
    "host_memory_gb": (float, 512.0, lambda v: v >= 0, "host_memory_gb >= 0"),
    "regroup_s": (float, DEFAULT_REGROUP_S, lambda v: v >= 0, "regroup_s >= 0"),
    "model_load_s": (float, 20.0, lambda v: v >= 0, "model_load_s >= 0"),
    "overhead_s": (float, 0.035, lambda v: v >= 0, "overhead_s >= 0"),
}
_ENCODE, _DIFFUSE, _DECODE = 0, 1, 2
# knapsack value scales: the count of on-time requests first, then running now (earliest
# deadline first), then late work, then latency (GenServe's elastic degrees), then fewer GPUs
EPS_RUN, EPS_LATE, EPS_SPEED, EPS_GPU = 1e-3, 1e-4, 1e-5, 1e-8
AGED = 0.5  # a late request waiting past its deadline + SLO
MAX_PASSES = 4  # batches of `scan_limit` candidates a schedule call packs while GPUs stay free


def parse_options(policy: str, given: dict, spec: dict[str, tuple[type, object, object, str]]) -> dict:
    """`given` coerced to the types of `spec` (numbers may come as strings: YAML, the suite's
    `name:key=value` variants), defaults filled in; ConfigError for unknown or bad options."""
    unknown = sorted(set(given) - set(spec) - SHARED_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown {policy} option(s) {unknown}; known: {sorted(spec)}")
    out = {}
    for key, (typ, default, check, rule) in spec.items():
        value = given.get(key, default)
        try:  # (a bool is 0 or 1: the suite's variant parser turns "1" into True)
            number = float(value)
            if typ is int:
                if number != int(number):
                    raise ValueError
                number = int(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{policy}: option {key} must be a{'n integer' if typ is int else ' number'}, "
                              f"got {value!r}") from None
        if not check(number):
            raise ConfigError(f"{policy}: need {rule}, got {key}={number!r}")
        out[key] = number
    return out


def knapsack(items: list[list[tuple[int, float]]], capacity: int) -> list[int]:
    """Multiple-choice knapsack: `items[i]` lists (GPUs, value) options, option 0 being (0, value
    of waiting). The option per item that maximises the total value within `capacity` GPUs."""
    f = [0.0] * (capacity + 1)  # best value using at most c GPUs
    choices = []
    for options in items:
        w0, v0 = options[0]
        g = [x + v0 for x in f]
        chosen = [0] * (capacity + 1)
        for j in range(1, len(options)):
            w, v = options[j]
            for c in range(w, capacity + 1):
                val = f[c - w] + v
                if val > g[c]:
                    g[c] = val
                    chosen[c] = j
        f = g
        choices.append(chosen)
    out = [0] * len(items)
    c = capacity
    for i in range(len(items) - 1, -1, -1):
        out[i] = j = choices[i][c]
        c -= items[i][j][0]
    return out


@dataclass
class _Req:
    """A request between its arrival and its last launch."""

    request: Request
    stage: int = _ENCODE  # index of the next stage
    done: int = 0  # diffuse steps done
    node: int = -1  # where its last launch ran
    gpus: tuple[int, ...] = ()
    running: bool = False
    preemptions: int = 0  # times it was paused at a chunk boundary
    late: bool = False  # could not meet its deadline at any degree when last planned
    ticket: int = 0  # sequence number of its live queue entry (older entries are stale)

    @property
    def left(self) -> int:
        return self.request.steps - self.done


@dataclass
class Plan:
    """A diffuse launch being planned: request(s), width, place, predicted load."""

    req: _Req
    width: int
    node: int
    gpus: tuple[int, ...]
    load: float
    on_time: bool
    companions: list[_Req] = field(default_factory=list)


class StepLevelPolicy(Policy):
    """Shared-pool, step-level machinery of the TetriServe and GenServe baselines: request
    bookkeeping, chunk boundaries (pauses, their bound and host memory), encode and decode,
    cost lookups, placement. Subclasses decide the diffuse launches (`_pack`)."""

    name = "step-level"

    def __init__(self, cluster: Cluster, cost, opts: dict) -> None:
        self.cluster, self.cost = cluster, cost
        self.threshold = opts["threshold"]
        self.scan_limit, self.max_preemptions = opts["scan_limit"], opts["max_preemptions"]
        self.regroup_s, self.overhead_s = opts["regroup_s"], opts["overhead_s"]
        self.model_load_s = opts["model_load_s"]
        self.residency = WeightResidency(cost, cluster.gpu_memory_gb, opts["model_load_s"], opts["regroup_s"])
        self._own_free: dict[tuple[str, int], float] = {}  # per schedule call, see `_may_load`
        self._kinds: dict[tuple, int] = {}
        self._loads: dict[tuple, float] = {}
        self.busy_until: dict[tuple[int, int], float] = {}  # GPU -> predicted end of its launch
        self.reqs: dict[str, _Req] = {}
        self.stage_q: list[tuple[float, int, str]] = []  # encode / decode ready: (deadline, seq, id)
        self.diffuse_q: list[tuple[float, int, str]] = []  # diffuse ready (not running): (key, seq, id)
        self.seq = 0
        self.boundary: dict[str, float] = {}  # request -> when its chunk ended (resumable now)
        self.paused = PausedState(opts["host_memory_gb"] * 1e9)  # chunk state in host memory
        self.costs = StageCosts(cost, cluster)
        self._eff_cache: dict[tuple, int] = {}
        self._times_cache: dict[tuple, dict[int, float]] = {}
        self._after_cache: dict[tuple, float] = {}

    # ---- Policy interface ------------------------------------------------------------------
    def initial_plan(self, now: float):
        return None  # one shared pool

    def add_request(self, request: Request, now: float) -> None:
        self.reqs[request.id] = _Req(request)
        self._ready(request.id)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        for rid in launch.request_ids:
            r = self.reqs.get(rid)
            if r is None:
                continue
            r.running = False
            r.node, r.gpus = launch.node, launch.gpus
            if launch.stages == ("diffuse",) and not launch.finishes_stage(r.request.steps):
                r.done = launch.steps[1]
                self.boundary[rid] = now
            else:
                r.stage += len(launch.stages)
                r.done = 0
                if r.stage >= len(STAGES):
                    del self.reqs[rid]
                    continue
            self._ready(rid)

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        for rid in launch.request_ids:
            self.reqs.pop(rid, None)
            self.boundary.pop(rid, None)
            self.paused.release(rid)

    def pending(self) -> int:
        return len(self.reqs)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        now = state.now
        if state.down != self.cluster.down:  # nodes lost or back
            self.cluster = replace(self.cluster, down=state.down)
        for rid, t in list(self.boundary.items()):  # not resumed when their chunk ended: paused
            if t < now:
                del self.boundary[rid]
                r = self.reqs[rid]
                r.preemptions += 1
                self.paused.pause(r.request, t)
        free = {n: set(g) for n, g in state.free_gpus.items() if g}
        if not free or not (self.stage_q or self.diffuse_q):
            return SchedulerOutput()
        self._own_free = {}
        self._kinds: dict[tuple, int] = {}  # per call: what a free GPU holds, for `_place`
        self._loads: dict[tuple, float] = {}  # per call: load seconds of a free GPU set
        launches: list[Launch] = []
        self._continue_pinned(now, free, launches)
        reserved = {(self.reqs[rid].node, i) for rid in self.boundary for i in self.reqs[rid].gpus
                    if not self.reqs[rid].running}
        if free and self.stage_q:
            self._launch_stages(now, free, launches, reserved)
        if free and self.diffuse_q:
            self._pack(now, free, launches)
        return SchedulerOutput(tuple(launches))

    # ---- chunk boundaries ------------------------------------------------------------------
    def _continue_pinned(self, now: float, free: dict[int, set[int]], launches: list[Launch]) -> None:
        """Requests at a chunk boundary that may not pause (their pauses used up, or no host
        memory left for their state) continue at once, on their own GPUs at the same degree."""
        if not self.boundary:
            return
        room = self.paused.room
        order = sorted(self.boundary, key=lambda rid: self.reqs[rid].request.deadline, reverse=True)
        for rid in order:
            r = self.reqs[rid]
            if r.running:
                continue
            size = PausedState.size(r.request)
            if r.preemptions < self.max_preemptions and size <= room:
                room -= size  # it may pause: keep room for its state
                continue
            if not set(r.gpus) <= free.get(r.node, set()):  # cannot happen: its chunk just freed them
                continue
            k = len(r.gpus)
            load = self.residency.load_s(r.request.model, ("diffuse",), r.node, r.gpus)
            launches.append(self._emit(Plan(r, k, r.node, r.gpus, load, True), now, free))

    def _may_load(self, req: Request, k: int, load: float, now: float, finish: float) -> bool:
        """A width-`k` launch that loads its model onto GPUs holding another (the start cost)
        goes ahead only if the request stays on time with it, or if waiting for `k` GPUs of one
        node that hold its model (or nothing) would take longer than the load; otherwise it
        waits for them."""
        if self.model_load_s <= 0 or load < self.model_load_s or finish <= req.deadline:
            return True
        key = (req.model, k)
        when = self._own_free.get(key)
        if when is None:
            when = self._own_free[key] = self.residency.first_free_for(
                req.model, k, self.cluster.up, self.cluster.gpus_per_node, self.busy_until, now)
        return when >= now + load

    # ---- encode and decode -----------------------------------------------------------------
    def _launch_stages(self, now: float, free: dict[int, set[int]], launches: list[Launch],
                       reserved: set[tuple[int, int]]) -> None:
        """Encodes and decodes, earliest deadline first, at the narrowest width that fits memory
        and keeps the request on time (the narrowest that fits if none does). The first one that
        finds no room holds its best node's free GPUs, so they add up until it fits."""
        kept = []
        scanned = 0
        held = False
        while self.stage_q and free and scanned < 2 * self.scan_limit:
            item = heapq.heappop(self.stage_q)
            r = self.reqs.get(item[2])
            if r is None or r.ticket != item[1] or r.running or r.stage not in (_ENCODE, _DECODE):
                continue
            scanned += 1
            req, stage = r.request, STAGES[r.stage]
            widths = self._feasible(req.model, stage, req.shape)
            after = self._after(req, r.stage)
            on_time = [k for k in widths if now + self._time(req.model, stage, req.shape, k) + after
                       + self.overhead_s <= req.deadline]
            spot = None
            for k in on_time + [k for k in widths if k not in on_time]:
                spot = self._place(r, stage, k, free, reserved)
                if spot is not None:
                    break
            if spot is not None and not self._may_load(req, len(spot[1]), spot[2], now, now + spot[2] + self._time(
                    req.model, stage, req.shape, len(spot[1])) + after):
                kept.append(item)
                continue
            if spot is None:
                kept.append(item)
                if not held:  # hold them: the next free GPUs of that node join them
                    held = True
                    del free[max(free, key=lambda n: (len(free[n]), -n))]
                continue
            node, gpus, load = spot
            launches.append(self._launch(r, (stage,), len(gpus), node, gpus, None, now, free))
        for item in kept:
            heapq.heappush(self.stage_q, item)

    # ---- diffuse --------------------------------------------------------------------------
    def _pack(self, now: float, free: dict[int, set[int]], launches: list[Launch]) -> None:
        """The diffuse launches: the subclass packs the `scan_limit` most urgent ready requests
        onto the free GPUs; while GPUs stay free (the scanned ones wait for GPUs of their model,
        or have slack), the next `scan_limit` are packed, up to `MAX_PASSES` times."""
        popped: list[_Req] = []
        for i in range(MAX_PASSES):
            cands = self._candidates(now, first=i == 0)
            if not cands:
                break
            popped += cands
            self._pack_once(now, free, launches, cands)
            if not free:
                break
        self._requeue(popped)

    def _pack_once(self, now: float, free: dict[int, set[int]], launches: list[Launch], cands: list[_Req]) -> None:
        raise NotImplementedError

    def _candidates(self, now: float, first: bool = True) -> list[_Req]:
        """Up to `scan_limit` diffuse-ready requests, by key (deadline; deadline + SLO for late
        ones). The caller pushes back those it does not launch (`_requeue`)."""
        out = []
        while self.diffuse_q and len(out) < self.scan_limit:
            _, seq, rid = heapq.heappop(self.diffuse_q)
            r = self.reqs.get(rid)
            if r is None or r.ticket != seq or r.running or r.stage != _DIFFUSE:
                continue
            out.append(r)
        return out

    def _requeue(self, rs) -> None:
        for r in rs:
            if not r.running and r.request.id in self.reqs:
                self._ready(r.request.id)

    def _times(self, r: _Req, now: float, free: dict[int, set[int]], chunk_s: float) -> dict[int, float]:
        """Predicted seconds from now to the request's finish, per diffuse width: a degree change
        costs a regroup, each chunk the runtime's overhead, then the fastest decode."""
        req = r.request
        own = len(r.gpus) if r.done and r.node in free and free[r.node].issuperset(r.gpus) else 0
        key = (req.model, req.shape, req.steps, r.left, own, chunk_s)
        out = self._times_cache.get(key)
        if out is None:
            out = {}
            tail = self._after(req, _DIFFUSE)
            for k in self._feasible(req.model, "diffuse", req.shape):
                run = r.left * self._time(req.model, "diffuse", req.shape, k)
                chunks = max(1, math.ceil(run / chunk_s)) if chunk_s > 0 else 1
                load = 0.0 if k == 1 or k == own else self.regroup_s
                out[k] = load + run + chunks * self.overhead_s + tail
            self._times_cache[key] = out
        return out

    def _can_wait(self, r: _Req, now: float, times: dict[int, float], wait_s: float) -> bool:
        """Whether the request still meets its deadline if it starts `wait_s` later, at its
        widest efficient degree."""
        k = self._efficient(r.request)
        return now + wait_s + times.get(k, min(times.values())) <= r.request.deadline

    def _is_aged(self, r: _Req, now: float) -> bool:
        """A late request that has waited past its deadline + SLO: it runs before on-time
        requests that can wait (bounded wait), never instead of one that cannot."""
        return now >= r.request.deadline + r.request.slo_s

    def _values(self, r: _Req, rank: int, n: int, now: float, times: dict[int, float],
                widths: list[int], wait_s: float) -> tuple[list[tuple[int, float]], list[int]]:
        """Knapsack options (wait first) and the on-time widths of a candidate; marks late ones."""
        req = r.request
        on_time = [k for k in widths if now + times[k] <= req.deadline]
        run = EPS_RUN * (2.0 - rank / n)
        if on_time:
            r.late = False
            return [(0, 1.0 if self._can_wait(r, now, times, wait_s) else 0.0)], on_time
        if not r.late and all(now + t > req.deadline for t in times.values()):
            r.late = True
        if not widths:
            return [(0, 0.0)], []
        k = min(widths)
        if self._is_aged(r, now):  # ahead of on-time requests that can wait, never of one that cannot
            return [(0, 0.0), (k, AGED + run - EPS_GPU * k)], []
        return [(0, 0.0), (k, EPS_LATE * (2.0 - rank / n) - EPS_GPU * k)], []

    def _place_plans(self, chosen: list[tuple[_Req, int, bool, list[int], dict[int, float]]],
                     free: dict[int, set[int]], now: float) -> tuple[list[Plan], list[_Req]]:
        """Place the chosen (request, width, on time, fallback widths, predicted seconds per
        width): requests continuing on their own GPUs first, then the widest. A width with no
        room falls back to the others."""
        others = {(r.node, i) for r, *_ in chosen if r.done for i in r.gpus}
        order = sorted(chosen, key=lambda c: (c[0].request.id not in self.boundary, -c[1], c[0].request.deadline))
        plans, unplaced = [], []
        for r, k, on_time, fallback, times in order:
            mine = {(r.node, i) for i in r.gpus} if r.done else set()
            spot = None
            for w in [k] + [w for w in fallback if w != k]:
                spot = self._place(r, "diffuse", w, free, others - mine)
                if spot is not None:
                    break
            if spot is not None and not self._may_load(r.request, len(spot[1]), spot[2], now,
                                                       now + spot[2] + times[len(spot[1])]):
                spot = None
            if spot is None:
                unplaced.append(r)
                continue
            node, gpus, load = spot
            free[node] -= set(gpus)
            if not free[node]:
                del free[node]
            plans.append(Plan(r, len(gpus), node, gpus, load, on_time))
        return plans, unplaced

    def _chunk_steps(self, plan: Plan, now: float) -> int:
        """Steps of the chunk a plan runs (subclasses); all the rest by default."""
        return plan.req.left

    def _emit(self, plan: Plan, now: float, free: dict[int, set[int]] | None = None) -> Launch:
        r = plan.req
        n = max(1, min(r.left, self._chunk_steps(plan, now)))
        batch = [r] + plan.companions
        steps = (r.done, r.done + n)
        return self._launch(batch[0], ("diffuse",), plan.width, plan.node, plan.gpus, steps, now, free,
                            [c.request.id for c in batch[1:]])

    # ---- launches --------------------------------------------------------------------------
    def _launch(self, r: _Req, stages: tuple[str, ...], width: int, node: int, gpus: tuple[int, ...],
                steps: tuple[int, int] | None, now: float, free: dict[int, set[int]] | None,
                companions: list[str] = ()) -> Launch:
        ids = (r.request.id, *companions)
        for rid in ids:
            q = self.reqs[rid]
            q.running = True
            self.boundary.pop(rid, None)
            self.paused.release(rid)
        if free is not None and node in free:
            free[node] -= set(gpus)
            if not free[node]:
                del free[node]
        gpus = tuple(sorted(gpus))
        req = r.request
        took = self.residency.load_s(req.model, stages, node, gpus) + self.overhead_s
        for s in stages:
            took += self._time(req.model, s, req.shape, width, len(ids)) * (
                (steps[1] - steps[0] if steps else r.left) if s == "diffuse" else 1)
        for i in gpus:
            self.busy_until[(node, i)] = now + took
        self.residency.record(req.model, stages, node, gpus, req.shape)
        if steps is not None and steps == (0, req.steps):
            steps = None  # the whole diffuse: an ordinary launch
        return Launch(ids, r.request.model, stages, width, node, gpus, steps=steps)

    def _place(self, r: _Req, stage: str, k: int, free: dict[int, set[int]],
               avoid: set[tuple[int, int]] = frozenset()) -> tuple[int, tuple[int, ...], float] | None:
        """(node, GPUs, load seconds) for a width-`k` launch of `stage`, or None: the request's own
        GPUs, a past group of width k holding the model, or the free GPUs ranked by what they
        hold; cheapest to start on first (`WeightResidency`), then fewest of `avoid` (GPUs other
        requests would continue on), then the node with the fewest free GPUs."""
        model = r.request.model
        best = None
        for n, g in free.items():
            if len(g) < k:
                continue
            cands = []
            if r.node == n and r.gpus and set(r.gpus[:k]) <= g and len(r.gpus) >= k:
                cands.append(tuple(sorted(r.gpus[:k])))
            if k > 1:
                for i in g:
                    held = self.residency.holds(n, i)
                    if held is not None and held.group is not None and len(held.group) == k \
                            and set(held.group) <= g and held.stages_of(model) is not None:
                        cands.append(held.group)
                        break

            kind = {}  # 0: holds the stage's weights, 1: the model's (or nothing), 2: another model's
            for i in g:
                c = self._kinds.get((n, i, model, stage))
                if c is None:  # a free GPU's weights do not change within a call: cached
                    held = self.residency.holds(n, i)
                    mine = None if held is None else held.stages_of(model)
                    c = self._kinds[(n, i, model, stage)] = \
                        1 if held is None else 2 if mine is None else 0 if stage in mine else 1
                kind[i] = c
            cands.append(tuple(sorted(sorted(g, key=lambda i: (kind[i], (n, i) in avoid, i))[:k])))
            if avoid:
                cands.append(tuple(sorted(sorted(g, key=lambda i: ((n, i) in avoid, kind[i], i))[:k])))
            for gpus in cands:
                load = self._loads.get((model, stage, n, gpus))
                if load is None:
                    load = self._loads[(model, stage, n, gpus)] = self.residency.load_s(model, (stage,), n, gpus)
                score = (load, sum((n, i) in avoid for i in gpus), n != r.node, len(g), n)
                if best is None or score < best[0]:
                    best = (score, n, gpus, load)
        if best is None:
            return None
        return best[1], best[2], best[3]

    # ---- queues and cost lookups -----------------------------------------------------------
    def _ready(self, rid: str) -> None:
        r = self.reqs[rid]
        self.seq += 1
        r.ticket = self.seq
        req = r.request
        if r.stage == _DIFFUSE:
            key = req.deadline + (req.slo_s if r.late else 0.0)
            heapq.heappush(self.diffuse_q, (key, self.seq, rid))
        else:
            heapq.heappush(self.stage_q, (req.deadline, self.seq, rid))

    def _feasible(self, model: str, stage: str, shape: Shape) -> tuple[int, ...]:
        return self.costs.feasible(model, stage, shape)

    def _time(self, model: str, stage: str, shape: Shape, width: int, batch: int = 1) -> float:
        """Seconds of one call (one step for diffuse)."""
        return self.costs.time(model, stage, shape, width, 1, batch)

    def _after(self, req: Request, stage_index: int) -> float:
        """Fastest seconds of the stages after `stage_index` (the rest of the diffuse excluded),
        with the runtime's per-launch and per-request overheads."""
        key = (req.model, req.shape, req.steps, stage_index)
        t = self._after_cache.get(key)
        if t is None:
            t = self.overhead_s
            for i in range(stage_index + 1, len(STAGES)):
                s = STAGES[i]
                per = min(self._time(req.model, s, req.shape, k) for k in self._feasible(req.model, s, req.shape))
                t += per * (req.steps if s == "diffuse" else 1) + self.overhead_s
            self._after_cache[key] = t
        return t

    def _efficient(self, req: Request) -> int:
        """The widest diffuse width whose parallel efficiency against the narrowest feasible is
        >= `threshold`."""
        key = (req.model, req.shape)
        k = self._eff_cache.get(key)
        if k is None:
            ws = self._feasible(req.model, "diffuse", req.shape)
            t0 = ws[0] * self._time(req.model, "diffuse", req.shape, ws[0])
            k = self._eff_cache[key] = max(w for w in ws if t0 / (w * self._time(req.model, "diffuse", req.shape, w))
                                           >= self.threshold or w == ws[0])
        return k
