"""`PaperPolicy`: TridentServe's published dispatch rule, as the authors' Hetu-DiT code runs it
(arXiv 2510.02838; `hetu_dit/core/request_manager/multi_machine_efficient_ilp.py` and
`scheduler.py`, `Efficient_ILP_Multi_Machine_Strategy`).

Taken from the authors' code:
- **Re-solve cadence.** Whenever at least `tick_s` (0.5 s) has passed since the last solve and
  the queue is not empty, it solves which queued jobs start now; the rest wait.
- **The ILP.** Binary x(j, k, m) = start job j at width k on node m; per node,
  sum_k k * x(j, k, m) + idle_m = free GPUs of m; each job starts at most once;
  reward(j, k) = 1000 if now + t_k <= deadline, else
  min(1000, floor(100 * (1 + lateness / t_best)) + (k - 1)), with t_best the fastest among the
  widths that pass the efficiency filter and fit the node; maximise sum reward * x - sum idle.
  The whole queue is offered (`max_candidates=None`, the default, as the authors do); the
  model keeps only the jobs an optimal solution can need (`_exchangeable_top`, exact).
- **Width filter.** A width k is a candidate only if its parallel efficiency (t1 / tk) / k is at
  least 0.8 *and* it meets the authors' minimum widths: images of 2048² pixels or more need
  k >= 2; videos of more than 720x1280x17 pixel-frames need k >= 2, more than 720x1280x33 need
  k >= 4, more than 720x1280x65 need k >= 8 (the authors' thresholds, applied by volume to every
  model as their code does; capped at the node size).
- **Batching.** An image request joins a queued job of the same shape while that job holds
  fewer than the profiled best batch size; the job keeps the first request's deadline. Videos
  are never batched.
- Encode runs with diffuse on the same k GPUs (one launch); decode then goes to a separate
  GPU group on the same node (a second launch, as soon as GPUs there are free).

Where this differs, and which way it cuts:
- Memory is checked (the authors' filter is their proxy for it): a width whose encode +
  diffuse launch does not fit even with the encoders offloaded is dropped, and decode runs at
  the narrowest width it fits. Helps `paper` (no OOMs), as every policy here is helped.
- Where no width passes both filters (the authors' code would never start the job), the
  narrowest width that fits and meets the minimum widths is kept. Helps `paper` (nothing is
  starved).
- The best batch size is the one with the highest throughput in our cost model (the authors
  take the largest whose batch time grows by less than a profiled proportion). Neutral.
- CP-SAT with a deterministic work limit (`time_limit_s`, one worker; `policy/cpsat.py`)
  replaces CBC's exact solve; a solve can stop at a feasible, not optimal, assignment. Can
  cut either way.
- Solves happen at runtime events (arrival, completion) and at `next_wakeup`, not in a polling
  loop; with the wakeup at last solve + `tick_s`, no solve is later than the authors' would be.
GPUs are one shared pool: `initial_plan` returns None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ortools.sat.python import cp_model

from trident_rs.errors import ConfigError
from trident_rs.policy.baselines import pipeline_offload
from trident_rs.policy.batching import best_batch_size
from trident_rs.policy.cpsat import limited_solver
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import Cluster, ClusterState, Launch, PlacementPlan, Request, SchedulerOutput, Shape

if TYPE_CHECKING:
    from trident_rs.policy.cost_model import CostModel

EFFICIENCY_THRESHOLD = 0.8
REFERENCE_FRAME = 720 * 1280  # the authors' video thresholds are in units of 720x1280 frames


def authors_min_width(shape: Shape) -> int:
    """The minimum widths hard-coded in the authors' width filter."""
    if shape.frames <= 1:
        return 2 if shape.height * shape.width >= 2048 * 2048 else 1
    volume = shape.pixels
    for frames, width in ((65, 8), (33, 4), (17, 2)):
        if volume > REFERENCE_FRAME * frames:
            return width
    return 1


@dataclass
class Job:
    """Same-shape requests that start together (a batch); the first one's deadline."""

    requests: list[Request] = field(default_factory=list)

    @property
    def head(self) -> Request:
        return self.requests[0]

    @property
    def deadline(self) -> float:
        return self.head.deadline

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.requests)


class PaperPolicy(Policy):
    name = "paper"

    def __init__(self, cluster: Cluster, cost: "CostModel", **options: Any):
        known = {"tick_s", "efficiency_threshold", "max_candidates", "time_limit_s", "seed", "max_batch",
                 "batch_max_pixels"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown paper option(s) {unknown}; known: {sorted(known)}")
        self.cluster, self.cost = cluster, cost
        self.tick_s = float(options.get("tick_s", 0.5))
        self.threshold = float(options.get("efficiency_threshold", EFFICIENCY_THRESHOLD))
        cap = options.get("max_candidates")
        self.max_candidates = None if cap is None else int(cap)
        self.time_limit_s = float(options.get("time_limit_s", 0.05))
        self.seed = int(options.get("seed", 0))
        self.max_batch = int(options.get("max_batch", 8))
        self.batch_max_pixels = int(options.get("batch_max_pixels", 512 * 512))
        if self.tick_s <= 0 or (self.max_candidates is not None and self.max_candidates < 1) \
                or self.time_limit_s <= 0 or self.max_batch < 1:
            raise ConfigError("paper policy needs tick_s > 0, max_candidates >= 1 (or None), "
                              "time_limit_s > 0, max_batch >= 1")
        self.queue: list[Job] = []  # waiting for encode+diffuse
        self.decode_queue: list[tuple[int, Job]] = []  # (node, job), in the order diffuse finished
        self.requests: dict[str, Request] = {}
        self.in_diffuse: set[str] = set()  # started, decode not yet launched
        self.last_solve = -math.inf
        self._widths: dict[tuple, list[int]] = {}
        self._offload: dict[tuple, tuple[str, ...]] = {}
        self._batch: dict[tuple, int] = {}
        self.solve_stats: list[float] = []  # CP-SAT wall time per solve
        self._nothing_fit: tuple | None = None

    # ---- Policy interface ------------------------------------------------------------------
    def initial_plan(self, now: float) -> PlacementPlan | None:
        return None

    def add_request(self, request: Request, now: float) -> None:
        if not self._widths_of(request):
            raise ConfigError(f"request {request.id}: {request.shape.key} fits no width on "
                              f"{self.cluster.gpus_per_node}-GPU nodes")
        self.requests[request.id] = request
        size = self._best_batch(request)
        if size > 1:  # join a queued job of the same shape that has room (the authors' merge)
            for job in self.queue:
                h = job.head
                if (h.model, h.shape, h.steps) == (request.model, request.shape, request.steps) \
                        and len(job.requests) < size:
                    job.requests.append(request)
                    return
        self.queue.append(Job([request]))

    def on_launch_done(self, launch: Launch, now: float) -> None:
        if launch.stages[-1] == "diffuse":
            self.in_diffuse.difference_update(launch.request_ids)
            self.decode_queue.append((launch.node, Job([self.requests[rid] for rid in launch.request_ids])))
        else:
            for rid in launch.request_ids:
                self.requests.pop(rid, None)

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        for rid in launch.request_ids:
            self.in_diffuse.discard(rid)
            self.requests.pop(rid, None)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        free = {n: sorted(g) for n, g in state.free_gpus.items()}
        launches = self._dispatch_decodes(free)
        if self.queue and state.now + 1e-9 >= self.last_solve + self.tick_s:
            self.last_solve = state.now
            launches += self._dispatch_diffuse(state.now, free)
        return SchedulerOutput(tuple(launches))

    def next_wakeup(self, now: float) -> float | None:
        if not self.queue:
            return None
        return max(self.last_solve + self.tick_s, now)

    def pending(self) -> int:
        return sum(len(j.requests) for j in self.queue) + len(self.in_diffuse) \
            + sum(len(j.requests) for _, j in self.decode_queue)

    # ---- decisions -------------------------------------------------------------------------
    def _best_batch(self, r: Request) -> int:
        """Profiled best batch size of an image shape (the most requests per second); 1 for video."""
        key = (r.model, r.shape, r.steps)
        b = self._batch.get(key)
        if b is None:
            b = 1
            if r.shape.frames <= 1 and r.shape.pixels <= self.batch_max_pixels:
                w = self._widths_of(r)[0]
                b = best_batch_size(lambda size: self._time(r, w, size), self.max_batch)
            self._batch[key] = b
        return b

    def _widths_of(self, r: Request) -> list[int]:
        """Candidate widths: efficient ones (>= threshold) at or above the authors' minimum
        width, that fit in memory (see the module docstring for the fallback)."""
        key = (r.model, r.shape)
        ws = self._widths.get(key)
        if ws is None:
            G, mem = self.cluster.gpus_per_node, self.cluster.gpu_memory_gb
            need = max(min(authors_min_width(r.shape), G), self.cost.min_width(r.model, "diffuse", r.shape, mem))
            fits = []
            for w in self.cost.widths(r.model, "diffuse"):
                if not need <= w <= G:
                    continue
                offload = pipeline_offload(self.cost, r.model, r.shape, w, self.cluster.gpu_memory_gb,
                                           ("encode", "diffuse"))
                if offload is not None:
                    self._offload[(r.model, r.shape, w)] = offload
                    fits.append(w)
            ws = [w for w in fits if self.cost.efficiency(r.model, r.shape, w) >= self.threshold] or fits[:1]
            self._widths[key] = ws
        return ws

    def _time(self, r: Request, width: int, batch: int = 1) -> float:
        c = self.cost
        # the text encoders do not run sequence-parallel: encode takes its 1-GPU time
        t = (c.stage_time(r.model, "encode", r.shape, 1, batch, r.steps)
             + c.stage_time(r.model, "diffuse", r.shape, width, batch, r.steps))
        offload = self._offload.get((r.model, r.shape, width), ())
        return t + (c.offload_s(r.model, offload) if offload else 0.0)

    @staticmethod
    def _exchangeable_top(candidates: list[Job], rewards: dict[int, dict[int, int]], free: int) -> list[int]:
        """The jobs an optimal solution needs: per class of interchangeable jobs (same model,
        shape, steps and batch size: same widths, times and places), the `free` best by reward
        at each width. At most `free` jobs start, so a solution using a job outside its class's
        top at its width can swap it for an unused one of the top with a reward at least as high
        (in EDF order on ties): the optimum is the same as over the whole queue."""
        classes: dict[tuple, list[int]] = {}
        for j in rewards:
            h = candidates[j].head
            classes.setdefault((h.model, h.shape, h.steps, len(candidates[j].requests)), []).append(j)
        keep: set[int] = set()
        for js in classes.values():
            if len(js) <= free:
                keep.update(js)
                continue
            for k in rewards[js[0]]:
                keep.update(sorted(js, key=lambda j: (-rewards[j][k], j))[:free])
        return sorted(keep)

    def _dispatch_decodes(self, free: dict[int, list[int]]) -> list[Launch]:
        launches, waiting = [], []
        for node, job in self.decode_queue:
            r = job.head
            need = self.cost.min_width(r.model, "decode", r.shape, self.cluster.gpu_memory_gb)
            width = min((w for w in self.cost.widths(r.model, "decode") if w >= need), default=need)
            if len(free.get(node, ())) >= width:
                gpus = tuple(free[node][:width])
                del free[node][:width]
                launches.append(Launch(job.ids, r.model, ("decode",), width, node, gpus))
            else:
                waiting.append((node, job))
        self.decode_queue = waiting
        return launches

    def _dispatch_diffuse(self, now: float, free: dict[int, list[int]]) -> list[Launch]:
        nodes = [n for n in sorted(free) if free[n]]
        if not self.queue or not nodes:
            return []
        # every start has reward >= 100 > the idle it fills, so if nothing fit these free GPUs
        # and this queue last solve, nothing fits now either: skip the solve
        signature = (tuple((n, len(free[n])) for n in nodes), len(self.queue), self.queue[0].head.id,
                     self.queue[-1].head.id, sum(len(j.requests) for j in self.queue))
        if signature == self._nothing_fit:
            return []
        self.queue.sort(key=lambda j: (j.deadline, j.head.arrival, j.head.id))
        candidates = self.queue if self.max_candidates is None else self.queue[: self.max_candidates]
        most = max(len(free[n]) for n in nodes)
        rewards: dict[int, dict[int, int]] = {}  # job index -> {width: reward}
        for j, job in enumerate(candidates):
            r, b = job.head, len(job.requests)
            widths = [k for k in self._widths_of(r) if k <= most]
            if not widths:
                continue
            times = {k: self._time(r, k, b) for k in widths}
            t_best = min(times.values())
            rewards[j] = {k: 1000 if now + times[k] <= job.deadline else
                          min(1000, math.floor(100 * (1 + (now + times[k] - job.deadline) / t_best)) + (k - 1))
                          for k in widths}
        keep = self._exchangeable_top(candidates, rewards, sum(len(free[n]) for n in nodes))
        m = cp_model.CpModel()
        x: dict[tuple[int, int, int], cp_model.IntVar] = {}
        reward: dict[tuple[int, int, int], int] = {}
        for j in keep:
            for k, rew in rewards[j].items():
                for n in nodes:
                    if k <= len(free[n]):
                        x[j, k, n] = m.new_bool_var(f"x{j}_{k}_{n}")
                        reward[j, k, n] = rew
        if not x:
            self._nothing_fit = signature
            return []
        by_job: dict[int, list] = {}
        by_node: dict[int, list] = {}
        for (j, k, n), v in x.items():
            by_job.setdefault(j, []).append(v)
            by_node.setdefault(n, []).append(k * v)
        for vs in by_job.values():
            m.add_at_most_one(vs)
        idle = {}
        for n in nodes:
            idle[n] = m.new_int_var(0, len(free[n]), f"idle{n}")
            m.add(sum(by_node.get(n, [])) + idle[n] == len(free[n]))
        m.maximize(sum(reward[key] * v for key, v in x.items()) - sum(idle.values()))
        solver = limited_solver(self.time_limit_s, self.seed)
        status = solver.solve(m)
        self.solve_stats.append(solver.wall_time)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return []
        launches, started = [], set()
        for (j, k, n), v in sorted(x.items(), key=lambda kv: (kv[0][2], -kv[0][1], kv[0][0])):
            if solver.value(v):
                job = candidates[j]
                gpus = tuple(free[n][:k])
                del free[n][:k]
                r = job.head
                launches.append(Launch(job.ids, r.model, ("encode", "diffuse"), k, n, gpus, "",
                                       self._offload.get((r.model, r.shape, k), ())))
                started.add(id(job))
                self.in_diffuse.update(job.ids)
        self._nothing_fit = signature if not started else None
        self.queue = [j for j in self.queue if id(j) not in started]
        return launches
