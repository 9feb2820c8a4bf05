"""A hand-made cost model and a tiny event loop, shared by the policy tests.

The fake has the real CostModel's API; its numbers are a small table in the spirit of the
FLUX/HunyuanVideo profiles, so property tests can reason about them.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from trident_rs.errors import ProfileError
from trident_rs.policy.interface import Policy
from trident_rs.policy.types import Cluster, ClusterState, Launch, Request, Shape

WIDTHS = (1, 2, 4, 8)
# per-step diffuse time at width 1 and the speed-up at widths 2, 4, 8
_DIFFUSE = {
    ("img", Shape(256, 256)): (0.10, (1.0, 1.05, 1.1, 1.15)),
    ("img", Shape(1024, 1024)): (0.84, (1.0, 1.6, 2.6, 3.7)),
    ("img", Shape(2048, 2048)): (4.6, (1.0, 1.65, 3.2, 3.6)),
    ("vid", Shape(544, 960, 17)): (2.8, (1.0, 1.5, 2.7, 4.0)),
    ("vid", Shape(720, 1280, 65)): (37.5, (1.0, 1.8, 3.5, 6.5)),
}
# shapes that need this many GPUs (memory)
_MIN_DIFFUSE_WIDTH = {("vid", Shape(720, 1280, 65)): 2}
_MIN_DECODE_WIDTH = {("vid", Shape(720, 1280, 65)): 2}


@dataclass(frozen=True)
class StageCost:
    latency_s: float
    memory_gb: float


class FakeCost:
    """Cost model API over the table above. Models: 'img' (images), 'vid' (video)."""

    def shapes(self, model: str) -> list[Shape]:
        return [s for (m, s) in _DIFFUSE if m == model]

    def widths(self, model: str, stage: str) -> tuple[int, ...]:
        if stage == "diffuse" or (stage == "decode" and model == "vid"):
            return WIDTHS
        return (1,)

    def predict(self, model: str, stage: str, shape: Shape, width: int = 1, batch: int = 1) -> StageCost:
        if (model, shape) not in _DIFFUSE:
            raise ProfileError(f"no profile for {model} {shape.key}")
        if width not in self.widths(model, stage):
            raise ProfileError(f"{model} {stage} has no width {width}")
        t1, speedup = _DIFFUSE[(model, shape)]
        if stage == "diffuse":
            lat = t1 / speedup[WIDTHS.index(width)]
        elif stage == "encode":
            lat = 0.05
        else:
            lat = (0.02 + shape.pixels / 4e6) / (width ** 0.9)
        # batching: small shapes batch almost for free up to 4
        lat *= 1 + (batch - 1) * (0.3 if shape.pixels <= 256 * 256 else 1.0)
        mem = 20 + shape.pixels / 1e6 / width
        return StageCost(lat, mem)

    def stage_time(self, model: str, stage: str, shape: Shape, width: int = 1, batch: int = 1,
                   steps: int = 1) -> float:
        c = self.predict(model, stage, shape, width, batch).latency_s
        return c * steps if stage == "diffuse" else c

    def efficiency(self, model: str, shape: Shape, width: int) -> float:
        t1 = self.predict(model, "diffuse", shape, 1).latency_s
        return t1 / self.predict(model, "diffuse", shape, width).latency_s / width

    def best_width(self, model: str, shape: Shape, threshold: float = 0.8, widths=WIDTHS) -> int:
        ok = [w for w in widths if self.efficiency(model, shape, w) >= threshold]
        return max(ok, default=1)

    def min_width(self, model: str, stage: str, shape: Shape, gpu_memory_gb: float = 48.0) -> int:
        table = _MIN_DIFFUSE_WIDTH if stage == "diffuse" else _MIN_DECODE_WIDTH if stage == "decode" else {}
        return table.get((model, shape), 1)


def slo_of(cost: FakeCost, model: str, shape: Shape, steps: int, scale: float = 4.0) -> float:
    t_best = cost.stage_time(model, "diffuse", shape, width=cost.best_width(model, shape), steps=steps)
    return 1.1 * round(scale * t_best) + 2.0


def make_requests(cost: FakeCost, model: str, n: int, rate: float, steps: int, seed: int,
                  scale: float = 4.0) -> list[Request]:
    import random

    rng = random.Random(seed)
    shapes = cost.shapes(model)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        shape = rng.choice(shapes)
        out.append(Request(f"r{i}", model, shape, steps, t, t + slo_of(cost, model, shape, steps, scale)))
    return out


@dataclass
class LoopResult:
    finished: dict[str, float]  # request id -> time its last stage finished
    launches: list[tuple[float, Launch]]
    plans: int


def run_loop(policy, cluster: Cluster, cost: FakeCost, requests: list[Request],
             horizon_s: float = 1e6, check=None) -> LoopResult:
    """Drive `policy` in virtual time: launches take the cost model's time, then complete.

    Asserts the interface contract: launches only use free GPUs (and free plan groups), a
    request's stages run in order, each exactly once. `check(plan)` runs on every plan.
    """
    plan = policy.initial_plan(0.0)
    if plan is not None and check:
        check(plan)
    free = {n: set(range(cluster.gpus_per_node)) for n in range(cluster.nodes)}
    busy_groups: set[str] = set()
    done_stages: dict[str, list[str]] = {r.id: [] for r in requests}
    by_id = {r.id: r for r in requests}
    events: list[tuple[float, int, str, object]] = []
    seq = 0
    for r in requests:
        heapq.heappush(events, (r.arrival, seq, "arrive", r)); seq += 1
    finished: dict[str, float] = {}
    launches: list[tuple[float, Launch]] = []
    plans = 0
    now = 0.0
    wake = policy.next_wakeup(0.0)
    while events or policy.pending():
        if events and (wake is None or events[0][0] <= wake):
            now, _, kind, item = heapq.heappop(events)
            if kind == "arrive":
                policy.add_request(item, now)
            else:
                launch = item
                for g in launch.gpus:
                    free[launch.node].add(g)
                busy_groups.discard(launch.group_id)
                for rid in launch.request_ids:
                    done_stages[rid].extend(launch.stages)
                    if done_stages[rid][-1] == "decode":
                        finished[rid] = now
                policy.on_launch_done(launch, now)
        elif wake is not None:
            now = max(now, wake)
        else:
            raise AssertionError(f"policy has {policy.pending()} pending requests and nothing will happen")
        if now > horizon_s:
            raise AssertionError("horizon passed: requests starved")
        groups = frozenset(g.id for g in plan.groups) - busy_groups if plan is not None else frozenset()
        state = ClusterState(now, {n: frozenset(s) for n, s in free.items()}, groups)
        out = policy.schedule(state)
        if out.new_plan is not None:
            plan = out.new_plan
            plans += 1
            if check:
                check(plan)
            # a new plan never puts a group on GPUs busy with a launch
            for g in plan.groups:
                assert g.id in busy_groups or set(g.gpus) <= free[g.node], g
        for launch in out.launches:
            assert set(launch.gpus) <= free[launch.node], f"launch on busy GPUs: {launch}"
            assert len(launch.gpus) == launch.width
            if plan is not None and launch.group_id:
                assert launch.group_id not in busy_groups, f"launch on busy group {launch.group_id}"
                g = plan.group(launch.group_id)
                assert (g.node, g.gpus, g.width) == (launch.node, launch.gpus, launch.width)
                busy_groups.add(launch.group_id)
            for g in launch.gpus:
                free[launch.node].discard(g)
            for rid in launch.request_ids:
                r = by_id[rid]
                expected = ("encode", "diffuse", "decode")[len(done_stages[rid]):][: len(launch.stages)]
                assert tuple(launch.stages) == expected, (rid, launch.stages, done_stages[rid])
            shape = by_id[launch.request_ids[0]].shape
            steps = by_id[launch.request_ids[0]].steps
            dur = sum(cost.stage_time(launch.model, s, shape,
                                      launch.width if launch.width in cost.widths(launch.model, s) else 1,
                                      len(launch.request_ids), steps)
                      for s in launch.stages)
            launches.append((now, launch))
            heapq.heappush(events, (now + dur, seq, "done", launch)); seq += 1
        wake = policy.next_wakeup(now)
        if wake is not None and wake <= now:
            wake = None if events else now + 1e-3
    return LoopResult(finished, launches, plans)


class ListPolicy(Policy):
    """A shared-pool test policy: a list of arrived requests; subclasses decide the launches."""

    def __init__(self):
        self.queue: list[Request] = []
        self.refused: list[Launch] = []

    def initial_plan(self, now):
        return None

    def add_request(self, request, now):
        self.queue.append(request)

    def on_launch_done(self, launch, now):
        pass
