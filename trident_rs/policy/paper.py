"""`PaperPolicy`: TridentServe's published dispatch rule (arXiv 2510.02838, Hetu-DiT code).

Every `tick_s` (0.5 s) it solves, with CP-SAT, which queued requests start now:
binary x(j, k, m) = start request j at width k on node m, where
- widths with parallel efficiency (t1 / tk) / k < 0.8 are pruned (the minimum width a shape
  needs for memory is always kept), as are widths above node m's free GPUs;
- per node, sum_k k * x(j, k, m) + idle_m = free GPUs of m; each request starts at most once;
- reward(j, k) = 1000 if now + t_k <= deadline, else
  min(1000, floor(100 * (1 + lateness / t_best)) + (k - 1));
- maximise sum reward * x - sum idle.
Only the chosen starts launch; the rest wait for the next tick. Encode runs with diffuse on the
same k GPUs (one launch, stages ("encode", "diffuse")); decode then goes to a separate
1-GPU executor on the same node (a second launch, as soon as a GPU there is free).
GPUs are one shared pool: `initial_plan` returns None.

To stay fast, only the `max_candidates` most urgent requests (earliest deadline) are offered
to the solver, and it gets `time_limit_s`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ortools.sat.python import cp_model

from trident_rs.errors import ConfigError
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import Cluster, ClusterState, Launch, PlacementPlan, Request, SchedulerOutput

if TYPE_CHECKING:
    from trident_rs.policy.cost_model import CostModel


class PaperPolicy(Policy):
    name = "paper"

    def __init__(self, cluster: Cluster, cost: "CostModel", **options: Any):
        known = {"tick_s", "efficiency_threshold", "max_candidates", "time_limit_s", "seed"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown paper option(s) {unknown}; known: {sorted(known)}")
        self.cluster, self.cost = cluster, cost
        self.tick_s = float(options.get("tick_s", 0.5))
        self.threshold = float(options.get("efficiency_threshold", 0.8))
        self.max_candidates = int(options.get("max_candidates", 32))
        self.time_limit_s = float(options.get("time_limit_s", 0.05))
        self.seed = int(options.get("seed", 0))
        if self.tick_s <= 0 or self.max_candidates < 1 or self.time_limit_s <= 0:
            raise ConfigError("paper policy needs tick_s > 0, max_candidates >= 1, time_limit_s > 0")
        self.queue: list[Request] = []  # waiting for encode+diffuse, earliest deadline first
        self.decode_queue: list[tuple[int, Request]] = []  # (node, request), in arrival order of the task
        self.requests: dict[str, Request] = {}
        self.in_diffuse: set[str] = set()  # started, decode not yet launched
        self.next_tick = 0.0
        self._widths: dict[tuple, list[int]] = {}
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
        self.queue.append(request)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        if launch.stages[-1] == "diffuse":
            self.in_diffuse.difference_update(launch.request_ids)
            for rid in launch.request_ids:
                self.decode_queue.append((launch.node, self.requests[rid]))
        else:
            for rid in launch.request_ids:
                self.requests.pop(rid, None)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        free = {n: sorted(g) for n, g in state.free_gpus.items()}
        launches = self._dispatch_decodes(free)
        if state.now + 1e-9 >= self.next_tick:
            on_tick = abs(state.now / self.tick_s - round(state.now / self.tick_s)) < 1e-6
            self.next_tick = math.floor(state.now / self.tick_s + 1e-6) * self.tick_s + self.tick_s
            if on_tick:
                launches += self._dispatch_diffuse(state.now, free)
        return SchedulerOutput(tuple(launches))

    def next_wakeup(self, now: float) -> float | None:
        if not self.queue:
            return None
        return max(self.next_tick, now)

    def pending(self) -> int:
        return len(self.queue) + len(self.in_diffuse) + len(self.decode_queue)

    # ---- decisions -------------------------------------------------------------------------
    def _widths_of(self, r: Request) -> list[int]:
        """Candidate widths: efficient ones (>= threshold) at or above the memory minimum."""
        key = (r.model, r.shape)
        ws = self._widths.get(key)
        if ws is None:
            need = self.cost.min_width(r.model, "diffuse", r.shape, self.cluster.gpu_memory_gb)
            ok = [w for w in self.cost.widths(r.model, "diffuse") if need <= w <= self.cluster.gpus_per_node]
            ws = [w for w in ok if w == min(ok) or self.cost.efficiency(r.model, r.shape, w) >= self.threshold]
            self._widths[key] = ws
        return ws

    def _time(self, r: Request, width: int) -> float:
        c = self.cost
        # the text encoders do not run sequence-parallel: encode takes its 1-GPU time
        return (c.stage_time(r.model, "encode", r.shape, 1, 1, r.steps)
                + c.stage_time(r.model, "diffuse", r.shape, width, 1, r.steps))

    def _dispatch_decodes(self, free: dict[int, list[int]]) -> list[Launch]:
        launches, waiting = [], []
        for node, r in self.decode_queue:
            need = self.cost.min_width(r.model, "decode", r.shape, self.cluster.gpu_memory_gb)
            width = min((w for w in self.cost.widths(r.model, "decode") if w >= need), default=need)
            if len(free.get(node, ())) >= width:
                gpus = tuple(free[node][:width])
                del free[node][:width]
                launches.append(Launch((r.id,), r.model, ("decode",), width, node, gpus))
            else:
                waiting.append((node, r))
        self.decode_queue = waiting
        return launches

    def _dispatch_diffuse(self, now: float, free: dict[int, list[int]]) -> list[Launch]:
        nodes = [n for n in sorted(free) if free[n]]
        if not self.queue or not nodes:
            return []
        # every start has reward >= 100 > the idle it fills, so if nothing fit these free GPUs
        # and this queue last tick, nothing fits now either: skip the solve
        signature = (tuple((n, len(free[n])) for n in nodes), len(self.queue), self.queue[0].id, self.queue[-1].id)
        if signature == self._nothing_fit:
            return []
        self.queue.sort(key=lambda r: (r.deadline, r.arrival, r.id))
        candidates = self.queue[: self.max_candidates]
        m = cp_model.CpModel()
        x: dict[tuple[int, int, int], cp_model.IntVar] = {}
        reward: dict[tuple[int, int, int], int] = {}
        for j, r in enumerate(candidates):
            best = self.cost.best_width(r.model, r.shape, self.threshold)
            t_best = self.cost.stage_time(r.model, "diffuse", r.shape, best, 1, r.steps)
            for k in self._widths_of(r):
                t_k = self._time(r, k)
                if now + t_k <= r.deadline:
                    rew = 1000
                else:
                    rew = min(1000, math.floor(100 * (1 + (now + t_k - r.deadline) / t_best)) + (k - 1))
                for n in nodes:
                    if k <= len(free[n]):
                        x[j, k, n] = m.new_bool_var(f"x{j}_{k}_{n}")
                        reward[j, k, n] = rew
        if not x:
            return []
        for j in range(len(candidates)):
            m.add_at_most_one(v for (jj, _, _), v in x.items() if jj == j)
        idle = {}
        for n in nodes:
            idle[n] = m.new_int_var(0, len(free[n]), f"idle{n}")
            m.add(sum(k * v for (_, k, nn), v in x.items() if nn == n) + idle[n] == len(free[n]))
        m.maximize(sum(reward[key] * v for key, v in x.items()) - sum(idle.values()))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.time_limit_s
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = self.seed
        status = solver.solve(m)
        self.solve_stats.append(solver.wall_time)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return []
        launches, started = [], set()
        for (j, k, n), v in sorted(x.items(), key=lambda kv: (kv[0][2], -kv[0][1], kv[0][0])):
            if solver.value(v):
                r = candidates[j]
                gpus = tuple(free[n][:k])
                del free[n][:k]
                launches.append(Launch((r.id,), r.model, ("encode", "diffuse"), k, n, gpus))
                started.add(r.id)
        self.in_diffuse.update(started)
        self._nothing_fit = signature if not started else None
        self.queue = [r for r in self.queue if r.id not in started]
        return launches
