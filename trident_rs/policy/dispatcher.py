"""Online, receding-horizon dispatcher for stage-level plans.

Holds one queue per (model, stage). On every arrival, completion and tick, `dispatch()` looks
at the free replica groups of the plan and decides which queued stage-tasks start now, at
which width, batched with whom; everything else stays queued (nothing is promised ahead).

Rules (the fast path):
- **Order.** Tasks are served by priority key: a task that can still make its deadline has
  key = deadline (EDF). A task that cannot (even at the fastest width in the plan) is *late*:
  it drops to the best-effort tier with key = deadline + `late_delay` (default: its own SLO).
  Late tasks are never dropped and never starved: every newer request has a key of at least
  its arrival + its SLO, so a late task overtakes all new arrivals after a bounded wait.
- **Width.** An on-time task takes the *smallest* free width whose predicted finish (this
  stage plus the remaining stages) meets its deadline. If no free width does but a busy group
  would when it frees up, the task waits for it. Otherwise (and for late tasks) it takes, by
  `late_width`: `"best"` (default) the width with the earliest predicted finish among those
  with parallel efficiency >= 0.8 (waiting if a busy one finishes earlier), so a late request
  neither wastes GPUs nor holds one GPU for hours; `"efficient"` the free width with the least
  GPU-seconds; `"fastest"` the fastest free width.
- **Batching.** Same-shape, same-steps small requests (<= `batch_max_pixels`) share a launch,
  up to the batch size with the best throughput, as long as every batched on-time task still
  meets its deadline.

`mode="exact"` instead assigns the first `exact_max_tasks` tasks of each queue to free groups
with CP-SAT (one task per group, maximise on-time starts, then narrow widths, then EDF rank),
to compare the fast path against on small instances.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Literal

from trident_rs.errors import ConfigError
from trident_rs.policy.types import Launch, ReplicaGroup, Request, STAGES, Shape, Stage

if TYPE_CHECKING:
    from trident_rs.policy.cost_model import CostModel

QueueKey = tuple[str, Stage]  # (model, stage)


@dataclass(eq=False)
class StageTask:
    """One stage of one request, waiting to start."""

    request: Request
    stage: Stage
    seq: int
    late: bool = False
    key: float = field(default=0.0)

    def sort_key(self) -> tuple[float, int]:
        return (self.key, self.seq)


@dataclass(frozen=True)
class RunningLaunch:
    launch: Launch
    expected_end: float


class Dispatcher:
    """Decides which stage-tasks start now on which free replica group. Never touches a device."""

    def __init__(self, cost: "CostModel", *, gpu_memory_gb: float = 48.0, mode: Literal["fast", "exact"] = "fast",
                 late_width: Literal["best", "efficient", "fastest"] = "best", late_delay_s: float | None = None,
                 max_batch: int = 8, batch_max_pixels: int = 512 * 512, exact_max_tasks: int = 16,
                 exact_time_limit_s: float = 0.05, max_width: int = 8):
        if mode not in ("fast", "exact"):
            raise ConfigError(f"dispatcher mode must be 'fast' or 'exact', got {mode!r}")
        if late_width not in ("best", "efficient", "fastest"):
            raise ConfigError(f"late_width must be 'best', 'efficient' or 'fastest', got {late_width!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.cost, self.gpu_memory_gb, self.mode, self.late_width = cost, gpu_memory_gb, mode, late_width
        self.late_delay_s, self.max_batch, self.batch_max_pixels = late_delay_s, max_batch, batch_max_pixels
        self.exact_max_tasks, self.exact_time_limit_s = exact_max_tasks, exact_time_limit_s
        self.max_width = max_width
        self._ideal: dict[tuple, tuple[int, float]] = {}
        self.queues: dict[QueueKey, list[tuple[tuple[float, int], StageTask]]] = {}
        self.running: dict[str, RunningLaunch] = {}  # group id -> what runs there
        self.unlaunched: set[str] = set()  # requests whose decode has not started
        self.requests: dict[str, Request] = {}  # requests not finished yet
        self._seq = itertools.count()
        self._times: dict[tuple, float] = {}
        self._min_width: dict[tuple, int] = {}
        self._best_batch: dict[tuple, int] = {}

    # ---- queue -------------------------------------------------------------------------
    def add(self, request: Request, stage: Stage = "encode") -> None:
        """Queue `stage` of `request` (encode on arrival; later stages on completion)."""
        task = StageTask(request, stage, next(self._seq), key=request.deadline)
        q = self.queues.setdefault((request.model, stage), [])
        bisect.insort(q, (task.sort_key(), task))
        self.unlaunched.add(request.id)
        self.requests[request.id] = request

    def on_done(self, launch: Launch) -> list[str]:
        """A launch finished: free its group, queue the next stages. Returns finished request ids."""
        self.running.pop(launch.group_id, None)
        finished = []
        for rid in launch.request_ids:
            nxt = STAGES.index(launch.stages[-1]) + 1
            if nxt == len(STAGES):
                finished.append(rid)
                self.requests.pop(rid, None)
            else:
                self.add(self.requests[rid], STAGES[nxt])
        return finished

    def pending(self) -> int:
        return len(self.unlaunched)

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def busy_groups(self) -> frozenset[str]:
        return frozenset(self.running)

    # ---- cost lookups (cached) -----------------------------------------------------------
    def time(self, model: str, stage: str, shape: Shape, width: int, steps: int, batch: int = 1) -> float:
        k = (model, stage, shape, width, steps, batch)
        t = self._times.get(k)
        if t is None:
            t = self._times[k] = self.cost.stage_time(model, stage, shape, width, batch, steps)
        return t

    def min_width(self, model: str, stage: str, shape: Shape) -> int:
        k = (model, stage, shape)
        w = self._min_width.get(k)
        if w is None:
            w = self._min_width[k] = self.cost.min_width(model, stage, shape, self.gpu_memory_gb)
        return w

    def best_batch(self, model: str, stage: str, shape: Shape, width: int, steps: int) -> int:
        """Batch size with the most requests per second (1 for large shapes)."""
        k = (model, stage, shape, width, steps)
        b = self._best_batch.get(k)
        if b is None:
            b, best = 1, 1.0 / self.time(model, stage, shape, width, steps)
            if shape.pixels <= self.batch_max_pixels:
                size = 2
                while size <= self.max_batch:
                    try:
                        rate = size / self.time(model, stage, shape, width, steps, size)
                    except Exception:  # the cost model has no batch data: do not batch
                        break
                    if rate > best * 1.05:
                        b, best = size, rate
                    size *= 2
            self._best_batch[k] = b
        return b

    def ideal_diffuse(self, request: Request) -> tuple[int, float]:
        """(width, diffuse time) a request's diffuse should get, whatever the plan has: the
        narrowest width that meets its SLO, else the widest with efficiency >= 0.8."""
        k = (request.model, request.shape, request.steps, round(request.slo_s, 3))
        out = self._ideal.get(k)
        if out is None:
            m, shape, steps = request.model, request.shape, request.steps
            need = self.min_width(m, "diffuse", shape)
            ws = [w for w in self.cost.widths(m, "diffuse") if need <= w <= self.max_width] or [need]
            times = {w: self.time(m, "diffuse", shape, w, steps) for w in ws}
            fixed = sum(self.time(m, s, shape, self.min_width(m, s, shape), steps) for s in ("encode", "decode"))
            on_time = [w for w in sorted(ws) if fixed + times[w] <= request.slo_s]
            w0 = min(ws)
            eff = [w for w in ws if times[w0] * w0 / (times[w] * w) >= 0.8]
            w = on_time[0] if on_time else max(eff, default=w0)
            out = self._ideal[k] = (w, times[w])
        return out

    def remaining_after(self, request: Request, stage: Stage, widths: dict[QueueKey, list[int]]) -> float:
        """Fastest possible time of the stages after `stage`, on widths the plan has."""
        total = 0.0
        for s in STAGES[STAGES.index(stage) + 1:]:
            ws = [w for w in widths.get((request.model, s), ()) if w >= self.min_width(request.model, s, request.shape)]
            if ws:
                total += min(self.time(request.model, s, request.shape, w, request.steps) for w in ws)
        return total

    # ---- decision ----------------------------------------------------------------------
    def dispatch(self, now: float, groups: Iterable[ReplicaGroup], free_gpus: dict[int, frozenset[int]]) -> list[Launch]:
        """Launches that start now on free groups among `groups` (the plan's dispatchable groups)."""
        all_widths: dict[QueueKey, list[int]] = {}
        free: dict[QueueKey, dict[int, list[ReplicaGroup]]] = {}
        busy_end: dict[QueueKey, dict[int, float]] = {}
        for g in groups:
            qk = (g.model, g.stages[0])
            all_widths.setdefault(qk, [])
            if g.width not in all_widths[qk]:
                all_widths[qk].append(g.width)
            run = self.running.get(g.id)
            if run is not None:
                ends = busy_end.setdefault(qk, {})
                ends[g.width] = min(ends.get(g.width, float("inf")), run.expected_end)
            elif all(i in free_gpus.get(g.node, ()) for i in g.gpus):
                free.setdefault(qk, {}).setdefault(g.width, []).append(g)
        launches: list[Launch] = []
        for qk in sorted(free):
            queue = self.queues.get(qk)
            if not queue:
                continue
            for gs in free[qk].values():
                gs.sort(key=lambda g: g.id, reverse=True)  # pop() takes the lowest id
            if self.mode == "exact":
                launches += self._dispatch_exact(now, qk, free[qk], all_widths)
            else:
                launches += self._dispatch_fast(now, qk, free[qk], busy_end.get(qk, {}), all_widths)
        for launch in launches:
            t = self.time(launch.model, launch.stages[0], self._shape_of(launch), launch.width,
                          self._steps_of(launch), len(launch.request_ids))
            self.running[launch.group_id] = RunningLaunch(launch, now + t)
            if launch.stages[-1] == "decode":
                self.unlaunched.difference_update(launch.request_ids)
        return launches

    def _shape_of(self, launch: Launch) -> Shape:
        return self.requests[launch.request_ids[0]].shape

    def _steps_of(self, launch: Launch) -> int:
        return self.requests[launch.request_ids[0]].steps

    def _mark_late(self, task: StageTask) -> None:
        task.late = True
        delay = self.late_delay_s if self.late_delay_s is not None else max(task.request.slo_s, 1.0)
        task.key = task.request.deadline + delay

    def _class_info(self, memo: dict, model: str, stage: Stage, r: Request, all_widths) -> tuple:
        """(min width, time of the later stages, {width: time}, fastest time) for r's class."""
        k = (r.shape, r.steps)
        info = memo.get(k)
        if info is None:
            need = self.min_width(model, stage, r.shape)
            times = {w: self.time(model, stage, r.shape, w, r.steps) for w in all_widths[(model, stage)] if w >= need}
            info = memo[k] = (need, self.remaining_after(r, stage, all_widths), times,
                              min(times.values(), default=float("inf")))
        return info

    def _dispatch_fast(self, now, qk, free, busy_end, all_widths) -> list[Launch]:
        queue = self.queues[qk]
        model, stage = qk
        launches: list[Launch] = []
        taken: set[int] = set()  # seq of tasks launched this call
        memo: dict = {}
        i = 0
        while i < len(queue) and any(free.values()):
            task = queue[i][1]
            if task.seq in taken:
                i += 1
                continue
            r = task.request
            need, rest, times, fastest = self._class_info(memo, model, stage, r, all_widths)
            if not task.late and now + fastest + rest > r.deadline:
                # demote and re-insert further back; revisit it there
                queue.pop(i)
                self._mark_late(task)
                bisect.insort(queue, (task.sort_key(), task))
                continue
            usable = sorted(w for w, gs in free.items() if gs and w >= need)
            if not usable:
                i += 1
                continue
            width = None
            if not task.late:
                width = next((w for w in usable if now + times[w] + rest <= r.deadline), None)
                if width is None and any(end + times[w] + rest <= r.deadline
                                         for w, end in busy_end.items() if w in times):
                    i += 1  # a busy group will make it: wait
                    continue
            if width is None and self.late_width == "best":
                width = self._late_best(now, usable, times, busy_end)
                if width is not None and stage == "diffuse" and now < r.deadline:
                    # no dispatchable group is as wide as the request's ideal width (draining,
                    # starting, or a re-plan on its way) and the free one is much slower: wait
                    # for a fitting one rather than hold a narrow group for far longer — until
                    # the deadline, so the wait is bounded
                    ideal_w, ideal_t = self.ideal_diffuse(r)
                    if max(times) < ideal_w and times[width] > 1.5 * ideal_t:
                        width = None
                if width is None:
                    i += 1  # an efficient width frees up soon enough to finish earlier: wait
                    continue
            if width is None:
                if self.late_width == "fastest":
                    width = min(usable, key=lambda w: (times[w], w))
                else:
                    width = min(usable, key=lambda w: (w * times[w], w))
            batch = self._companions(now, queue, i, task, width, rest, taken)
            group = free[width].pop()
            taken.update(t.seq for t in batch)
            launches.append(self._launch(batch, stage, group))
            i += 1
        if taken:
            self.queues[qk] = [e for e in queue if e[1].seq not in taken]
        return launches

    def _late_best(self, now, usable, times, busy_end, threshold: float = 0.8) -> int | None:
        """For a task that cannot make its deadline on a free width: the width with the earliest
        predicted finish among the efficient ones (efficiency >= `threshold` relative to the
        narrowest), counting busy widths from when they free up; None if that is a busy one.
        Falls back to the free width with the least GPU-seconds."""
        w0 = min(times)
        eff = {w for w, t in times.items() if times[w0] * w0 / (t * w) >= threshold}
        finish = {w: now + times[w] for w in usable if w in eff}
        if not finish:
            return min(usable, key=lambda w: (w * times[w], w))
        best = min(finish.values())
        if any(end + times[w] < best for w, end in busy_end.items() if w in eff):
            return None
        return min(finish, key=lambda w: (finish[w], w))

    def _companions(self, now, queue, i, task, width, rest, taken) -> list[StageTask]:
        """`task` plus same-shape tasks after it that can share its launch."""
        r = task.request
        model, stage = r.model, task.stage
        size = self.best_batch(model, stage, r.shape, width, r.steps)
        batch = [task]
        if size == 1:
            return batch
        t_batch = self.time(model, stage, r.shape, width, r.steps, size)
        if not task.late and now + t_batch + rest > r.deadline:
            return batch
        for _, other in queue[i + 1: i + 1 + 64]:
            if len(batch) == size:
                break
            o = other.request
            if other.seq in taken or o.shape != r.shape or o.steps != r.steps:
                continue
            if not other.late and now + t_batch + rest > o.deadline:
                continue
            batch.append(other)
        return batch

    def _launch(self, batch: list[StageTask], stage: Stage, group: ReplicaGroup) -> Launch:
        return Launch(tuple(t.request.id for t in batch), group.model, (stage,), group.width, group.node,
                      group.gpus, group.id)

    def _dispatch_exact(self, now, qk, free, all_widths) -> list[Launch]:
        from ortools.sat.python import cp_model

        model_name, stage = qk
        queue = self.queues[qk]
        tasks = [e[1] for e in queue[: self.exact_max_tasks]]
        groups = [g for w in sorted(free) for g in sorted(free[w], key=lambda g: g.id)]
        m = cp_model.CpModel()
        x, reward = {}, {}
        for j, task in enumerate(tasks):
            r = task.request
            rest = self.remaining_after(r, stage, all_widths)
            for gi, g in enumerate(groups):
                if g.width < self.min_width(model_name, stage, r.shape):
                    continue
                on_time = now + self.time(model_name, stage, r.shape, g.width, r.steps) + rest <= r.deadline
                x[j, gi] = m.new_bool_var(f"x{j}_{gi}")
                reward[j, gi] = (100_000 if on_time else 0) + 1000 * (len(tasks) - j) - g.width
        if not x:
            return []
        for j in range(len(tasks)):
            m.add_at_most_one(v for (jj, _), v in x.items() if jj == j)
        for gi in range(len(groups)):
            m.add_at_most_one(v for (_, gg), v in x.items() if gg == gi)
        m.maximize(sum(reward[k] * v for k, v in x.items()))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.exact_time_limit_s
        solver.parameters.num_workers = 1
        if solver.solve(m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return []
        launches, taken = [], set()
        for (j, gi), v in sorted(x.items()):
            if solver.value(v):
                launches.append(self._launch([tasks[j]], stage, groups[gi]))
                taken.add(tasks[j].seq)
                free[groups[gi].width].remove(groups[gi])
        self.queues[qk] = [e for e in queue if e[1].seq not in taken]
        return launches
