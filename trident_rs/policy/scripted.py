"""`ChunkScriptPolicy` ("chunk-script"): diffuse in a fixed sequence of chunks and widths.

A shared-pool policy (no plan, GPUs picked per launch) that runs one request at a time, in
arrival order: encode and decode at width 1, diffuse as the chunks `chunks=[[steps, width], ...]`
say (a script shorter than the request's steps repeats its last entry; a chunk ends at the
last step at the latest). It decides nothing: it is what tests and demos use to drive a request
down a known path through the runtime (w1 -> w2 -> w1, a pause of `pause_s` before chunk
`pause_before`, ...), where the `trident` pool policy would choose by the cost model.
Pure Python, no Ray, no torch.
"""
from __future__ import annotations

from collections import deque

from trident_rs.errors import ConfigError
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import STAGES, Cluster, ClusterState, Launch, Request, SchedulerOutput

_SHARED_OPTIONS = frozenset({"slo_scale", "seed", "tick_s", "forecast", "workload", "models", "widths"})


class ChunkScriptPolicy(Policy):
    name = "chunk-script"

    def __init__(self, cluster: Cluster, cost=None, chunks=((1, 1),), pause_before: int | None = None,
                 pause_s: float = 0.0, **ignored: object) -> None:
        unknown = sorted(set(ignored) - _SHARED_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown chunk-script option(s) {unknown}")
        try:
            self.chunks = [(int(n), int(w)) for n, w in chunks]
        except (TypeError, ValueError):
            raise ConfigError(f"chunk-script: chunks must be [[steps, width], ...], got {chunks!r}") from None
        if not self.chunks or any(n < 1 or not 1 <= w <= cluster.gpus_per_node for n, w in self.chunks):
            raise ConfigError(f"chunk-script: each chunk needs steps >= 1 and 1 <= width <= "
                              f"{cluster.gpus_per_node}, got {self.chunks}")
        self.cluster = cluster
        self.pause_before, self.pause_s = pause_before, float(pause_s)
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.stage = 0
        self.done = 0  # diffuse steps done
        self.chunk = 0  # diffuse chunks launched
        self.running = False
        self.paused_until: float | None = None

    def initial_plan(self, now: float):
        return None  # one shared pool

    def add_request(self, request: Request, now: float) -> None:
        self.queue.append(request)

    def pending(self) -> int:
        return len(self.queue) + (self.current is not None)

    def next_wakeup(self, now: float) -> float | None:
        return self.paused_until

    def on_launch_done(self, launch: Launch, now: float) -> None:
        self.running = False
        if launch.stages == ("diffuse",) and not launch.finishes_stage(self.current.steps):
            self.done = launch.steps[1]
            self.chunk += 1
            if self.pause_before == self.chunk and self.pause_s > 0:
                self.paused_until = now + self.pause_s
            return
        self.stage += 1
        self.done = 0
        if self.stage == len(STAGES):
            self.current, self.stage, self.chunk = None, 0, 0

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        if self.running:
            return SchedulerOutput()
        if self.paused_until is not None:
            if state.now < self.paused_until:
                return SchedulerOutput()
            self.paused_until = None
        if self.current is None:
            if not self.queue:
                return SchedulerOutput()
            self.current = self.queue.popleft()
        r, stage = self.current, STAGES[self.stage]
        steps, width = None, 1
        if stage == "diffuse":
            n, width = self.chunks[min(self.chunk, len(self.chunks) - 1)]
            steps = (self.done, min(r.steps, self.done + n))
        for node, free in sorted(state.free_gpus.items()):
            if len(free) >= width:
                self.running = True
                return SchedulerOutput((Launch((r.id,), r.model, (stage,), width, node,
                                               tuple(sorted(free)[:width]), steps=steps),))
        return SchedulerOutput()
