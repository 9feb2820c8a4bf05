"""Discrete-event simulation, in virtual time, of a GPU cluster driven by any `Policy`.

The loop is a heap of timed events (launch done, replica group ready, policy wakeup) merged
with the sorted arrival list. After the events of one instant are applied the policy's
`schedule()` is called once; every `Launch` it returns is validated against the live cluster
state (free GPUs, stage order, group readiness) and turned into a completion event.
"""
from __future__ import annotations

import heapq
import math
import time

from trident_rs.errors import TridentError
from trident_rs.policy.interface import Policy
from trident_rs.policy.payload_size import TEXT_EMBEDDING_BYTES, chunk_state_bytes, latent_bytes
from trident_rs.policy.paused_state import PausedState
from trident_rs.policy.types import STAGES, Cluster, ClusterState, Launch, PlacementPlan, ReplicaGroup, Request
from trident_rs.sim.config import SimConfig
from trident_rs.sim.launch_cost import LaunchCost
from trident_rs.sim.records import SimResult, StageRecord

__all__ = ["PolicyViolation", "SimConfig", "SimResult", "Simulator", "StageRecord", "simulate"]

_DONE, _READY, _WAKE, _NODE = 0, 1, 2, 3
_GPU = tuple[int, int]  # (node, gpu index)


class PolicyViolation(TridentError, RuntimeError):
    """A policy returned a decision that breaks the Policy contract."""



class Simulator:
    """Run `policy` over `requests` on `cluster`; `cost` provides stage times (see CostModel)."""

    def __init__(self, cluster: Cluster, policy: Policy, cost, requests: list[Request],
                 config: SimConfig | None = None) -> None:
        self.cluster, self.policy, self.cost = cluster, policy, cost
        self.config = config or SimConfig()
        self.requests = sorted(requests, key=lambda r: r.arrival)
        self.by_id = {r.id: r for r in self.requests}
        if len(self.by_id) != len(self.requests):
            raise ValueError("request ids must be unique")
        n, g = cluster.nodes, cluster.gpus_per_node
        self.free: list[set[int]] = [set(range(g)) for _ in range(n)]
        self.free_view: dict[int, frozenset[int]] = {i: frozenset(range(g)) for i in range(n)}
        self.dirty: set[int] = set()
        # per request: index of the next stage to launch, in-flight flag, where its last stage ran
        self.next_stage: dict[str, int] = {}
        self.in_flight: set[str] = set()
        self.where: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.finish: dict[str, float] = {}
        # plan state
        self.groups: dict[str, ReplicaGroup] = {}
        self.owner: dict[_GPU, str] = {}  # GPU -> ready group of the current plan
        self.ready: set[str] = set()
        self.idle: set[str] = set()
        self.starting: dict[str, set[_GPU]] = {}  # group -> GPUs still busy (draining)
        self.starting_group: dict[str, ReplicaGroup] = {}
        self.claim: dict[_GPU, str] = {}  # busy GPU -> starting group that takes it when freed
        self.held: dict[_GPU, str] = {}  # GPU acquired by a starting group
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.wakeup_at: float | None = None
        self.busy_gpu_seconds = 0.0
        self.launches = self.plan_changes = self.schedule_calls = 0
        self.decision_time = 0.0
        self.replan_reasons: list[str] = []
        self.now = 0.0
        self.failed: dict[str, str] = {}
        self.memory_refusals = 0
        self._refused_this_call = False
        self.timeline: dict[str, list[StageRecord]] = {}
        self.ready_at: dict[str, float] = {}  # request -> when its next launch could start
        self.charges = LaunchCost(cost, cluster, self.config)
        self.running: dict[int, tuple[Launch, float, float, float]] = {}  # id(launch) in flight -> (launch, start, extra s, end)
        # diffuse chunks: steps done per request; requests whose chunk just ended (paused unless
        # the policy resumes them at once); paused requests and the host memory they hold
        self.steps_done: dict[str, int] = {}
        self.at_boundary: list[str] = []
        self.paused = PausedState(self.config.host_memory_gb * 1e9)
        # node faults: nodes down, the plan's groups waiting there for the node, launches whose
        # GPUs went with their node (re-run elsewhere: when they end, and that they free nothing)
        self.down: set[int] = set()
        self.plan_groups: dict[str, ReplicaGroup] = {}
        self.lost_groups: dict[int, dict[str, ReplicaGroup]] = {}
        self.rerun_end: dict[int, float] = {}
        self.orphaned: set[int] = set()
        for t_lost, node, t_back in self.config.node_faults:
            if not 0 <= node < cluster.nodes or not 0 <= t_lost < t_back:
                raise ValueError(f"node fault {(t_lost, node, t_back)}: needs a node of 0..{cluster.nodes - 1} "
                                 f"and 0 <= lost < back")

    # ---- event plumbing -------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _fail(self, message: str) -> None:
        raise PolicyViolation(f"policy {self.policy.name!r} at t={self.now:.3f}s: {message}")

    # ---- GPU bookkeeping ------------------------------------------------------------------
    def _take(self, node: int, gpus: tuple[int, ...]) -> None:
        free = self.free[node]
        for gpu in gpus:
            free.discard(gpu)
            gid = self.owner.get((node, gpu))
            if gid is not None:
                self.idle.discard(gid)
        self.dirty.add(node)

    def _release(self, node: int, gpus: tuple[int, ...]) -> None:
        touched: set[str] = set()
        for gpu in gpus:
            key = (node, gpu)
            gid = self.claim.pop(key, None)
            if gid is not None:  # a starting group was waiting for this GPU
                self.held[key] = gid
                waiting = self.starting[gid]
                waiting.discard(key)
                if not waiting:
                    self._push(self.now + self.config.start_cost_s, _READY, gid)
                continue
            self.free[node].add(gpu)
            owner = self.owner.get(key)
            if owner is not None:
                touched.add(owner)
        for gid in touched:
            g = self.groups[gid]
            if gid in self.ready and all(x in self.free[g.node] for x in g.gpus):
                self.idle.add(gid)
        self.dirty.add(node)

    def _state(self) -> ClusterState:
        if self.dirty:
            self.free_view = dict(self.free_view)
            for node in self.dirty:
                self.free_view[node] = frozenset(self.free[node])
            self.dirty.clear()
        return ClusterState(now=self.now, free_gpus=self.free_view, ready_groups=frozenset(self.idle),
                            down=frozenset(self.down))

    # ---- plans ----------------------------------------------------------------------------
    def _apply_plan(self, plan: PlacementPlan, initial: bool) -> None:
        try:
            plan.check(self.cluster)
        except ValueError as e:
            self._fail(f"invalid plan: {e}")
        new = {g.id: g for g in plan.groups}
        self.plan_groups = new
        for gid, g in list(self.groups.items()) + list(self.starting_group.items()):
            if new.get(gid) != g:
                self._remove_group(gid)
        for gid, g in new.items():
            if gid in self.groups or gid in self.starting:
                continue
            if g.node in self.down:  # starts when its node is back
                self.lost_groups.setdefault(g.node, {})[gid] = g
                continue
            self._add_group(g, initial)

    def _remove_group(self, gid: str) -> None:
        self.charges.adapters.forget(gid)
        g = self.groups.pop(gid, None)
        if g is not None:  # ready group: its GPUs drain (in-flight work finishes), then are free
            for gpu in g.gpus:
                self.owner.pop((g.node, gpu), None)
            self.ready.discard(gid)
            self.idle.discard(gid)
            return
        self.starting.pop(gid, None)  # starting group: give back what it held or claimed
        self.starting_group.pop(gid, None)
        for table in (self.claim, self.held):
            for key in [k for k, v in table.items() if v == gid]:
                del table[key]
                if table is self.held:
                    self.free[key[0]].add(key[1])
                    self.dirty.add(key[0])

    def _add_group(self, g: ReplicaGroup, initial: bool) -> None:
        """Initial groups (or any, with no start cost) are ready at once if their GPUs are free."""
        if initial and all(x in self.free[g.node] for x in g.gpus) and not any(
                (g.node, x) in self.claim or (g.node, x) in self.held for x in g.gpus):
            self._make_ready(g)
            return
        waiting: set[_GPU] = set()
        for gpu in g.gpus:
            key = (g.node, gpu)
            if key in self.held or key in self.claim:
                self._fail(f"plan group {g.id} uses GPU {key} of another starting group")
            if gpu in self.free[g.node]:
                self.free[g.node].discard(gpu)
                self.held[key] = g.id
            else:
                self.claim[key] = g.id
                waiting.add(key)
            self.owner.pop(key, None)
        self.dirty.add(g.node)
        self.starting[g.id] = waiting
        self.starting_group[g.id] = g
        if not waiting:
            self._push(self.now + self.config.start_cost_s, _READY, g.id)

    def _make_ready(self, g: ReplicaGroup) -> None:
        self.groups[g.id] = g
        self.ready.add(g.id)
        for gpu in g.gpus:
            self.owner[(g.node, gpu)] = g.id
        if all(x in self.free[g.node] for x in g.gpus):
            self.idle.add(g.id)

    def _group_ready(self, gid: str) -> None:
        if gid not in self.starting or self.starting[gid]:
            return  # removed meanwhile, or stale
        del self.starting[gid]
        g = self.starting_group.pop(gid)
        for gpu in g.gpus:
            self.held.pop((g.node, gpu), None)
            self.free[g.node].add(gpu)
        self.dirty.add(g.node)
        self._make_ready(g)

    # ---- launches -------------------------------------------------------------------------
    def _transfer_time(self, req: Request, launch: Launch) -> float:
        """Moving what the launch needs from where the request's last launch left it: nothing
        on the same GPUs; a paused request's chunk state comes back from host memory."""
        s = req.shape
        if req.id in self.paused:
            return self.paused.bytes[req.id] / (self.config.intra_node_gbps * 1e9)
        prev = self.where.get(req.id)
        if prev is None:
            return 0.0
        node, gpus = prev
        if node == launch.node and not set(gpus).isdisjoint(launch.gpus):
            return 0.0
        if self.steps_done.get(req.id) and STAGES[self.next_stage[req.id]] == "diffuse":
            size = chunk_state_bytes(req.model, s)
        elif STAGES[self.next_stage[req.id] - 1] == "encode":
            size = TEXT_EMBEDDING_BYTES
        else:
            size = latent_bytes(req.model, s.height, s.width, s.frames)
        gbps = self.config.intra_node_gbps if node == launch.node else self.config.inter_node_gbps
        return size / (gbps * 1e9)

    def _steps_of(self, launch: Launch) -> int:
        """Denoising steps the launch runs (checked: a chunk starts where each request stands)."""
        if launch.steps is None:
            return max(self.by_id[r].steps - self.steps_done.get(r, 0) for r in launch.request_ids)
        a, b = launch.steps
        if launch.stages != ("diffuse",):
            self._fail(f"a step range needs a diffuse-only launch, got {launch.stages}")
        for rid in launch.request_ids:
            if self.steps_done.get(rid, 0) != a or not a < b <= self.by_id[rid].steps:
                self._fail(f"chunk {launch.steps} of request {rid}, which has done "
                           f"{self.steps_done.get(rid, 0)} of {self.by_id[rid].steps} steps")
        return b - a

    def _launch(self, launch: Launch) -> None:
        if not launch.request_ids:
            self._fail("launch with no requests")
        node, gpus = launch.node, launch.gpus
        if not 0 <= node < self.cluster.nodes or len(gpus) != launch.width or len(set(gpus)) != len(gpus):
            self._fail(f"launch on node {node} GPUs {gpus} does not match width {launch.width}")
        free = self.free[node]
        for gpu in gpus:
            if gpu not in free:
                self._fail(f"launch uses GPU {node}:{gpu}, which is not free")
        if launch.group_id:
            g = self.groups.get(launch.group_id)
            if g is None or launch.group_id not in self.idle:
                self._fail(f"launch on group {launch.group_id!r}, which is not a ready, idle group")
            if g.node != node or tuple(sorted(g.gpus)) != tuple(sorted(gpus)) or g.model != launch.model \
                    or not set(launch.stages) <= set(g.stages):
                self._fail(f"launch does not match group {g.id} ({g.deployment} on node {g.node})")
        first = None
        for rid in launch.request_ids:
            req = self.by_id.get(rid)
            if req is None or rid not in self.next_stage:
                self._fail(f"launch names request {rid!r}, which has not arrived")
            if rid in self.in_flight:
                self._fail(f"request {rid} is already running")
            if rid in self.failed:
                self._fail(f"request {rid} failed earlier ({self.failed[rid]})")
            i = self.next_stage[rid]
            if tuple(launch.stages) != STAGES[i:i + len(launch.stages)] or not launch.stages:
                self._fail(f"request {rid} next needs {STAGES[i:]}, launch runs {launch.stages}")
            if req.model != launch.model:
                self._fail(f"request {rid} is {req.model}, launch is {launch.model}")
            if first is None:
                first = req
            elif req.shape != first.shape:
                self._fail(f"batch mixes shapes {first.shape.key} and {req.shape.key}")
        if not set(launch.offload) <= set(launch.stages):
            self._fail(f"launch offloads {launch.offload}, which it does not run")
        batch = len(launch.request_ids)
        if self.config.enforce_memory and self._refuse_for_memory(launch, first, batch):
            return
        steps = self._steps_of(launch)
        reqs = [self.by_id[r] for r in launch.request_ids]
        compute = self.charges.compute_s(launch, reqs, steps)
        transfer = max(self._transfer_time(r, launch) for r in reqs)
        extra = transfer + self.config.hop_overhead_s + self.charges.weights_s(launch, first.shape)
        extra += self.charges.adapters_s(launch, reqs)
        if launch.steps is not None and launch.steps[0] > 0:
            extra += self.config.chunk_boundary_s
        for rid in launch.request_ids:
            self.paused.release(rid)
        if launch.offload:
            extra += self.cost.offload_s(launch.model, launch.offload)
        duration = compute + extra
        for rid in launch.request_ids:
            self.in_flight.add(rid)
        self._take(node, gpus)
        self.busy_gpu_seconds += duration * launch.width
        self.launches += 1
        self.running[id(launch)] = (launch, self.now, extra, self.now + duration)
        self._push(self.now + duration, _DONE, launch)

    def _refuse_for_memory(self, launch: Launch, first: Request, batch: int) -> bool:
        """Refuse (and fail its requests) a launch whose predicted peak per GPU exceeds memory."""
        fn = getattr(self.cost, "launch_memory", None)
        if fn is None:  # a cost model without memory predictions: nothing to enforce
            return False
        need = fn(launch.model, launch.stages, first.shape, launch.width, batch, launch.offload)
        if need <= self.cluster.gpu_memory_gb + 1e-9:
            return False
        why = (f"out of memory: {'+'.join(launch.stages)} of {first.shape.key} on {launch.width} GPU(s) "
               f"needs {need:.1f} GB per GPU of {self.cluster.gpu_memory_gb:g}")
        self.memory_refusals += 1
        for rid in launch.request_ids:
            self.failed[rid] = why
            self.paused.release(rid)
        self.policy.on_launch_refused(launch, self.now)
        return True

    def _launch_done(self, launch: Launch) -> None:
        n = len(launch.stages)
        _, start, extra, _ = self.running.pop(id(launch))
        for rid in launch.request_ids:
            self.in_flight.discard(rid)
            self.timeline.setdefault(rid, []).append(StageRecord(
                launch.stages, self.ready_at.get(rid, start), start, self.now, launch.width, launch.node,
                len(launch.request_ids), extra, launch.steps))
            self.ready_at[rid] = self.now
            self.where[rid] = (launch.node, launch.gpus)
            if not launch.finishes_stage(self.by_id[rid].steps):
                self.steps_done[rid] = launch.steps[1]
                self.at_boundary.append(rid)
                continue
            self.steps_done.pop(rid, None)
            i = self.next_stage[rid] + n
            self.next_stage[rid] = i
            if i == len(STAGES):
                self.finish[rid] = self.now + self.config.request_overhead_s
                del self.where[rid]
        if id(launch) in self.orphaned:  # its GPUs went with its node
            self.orphaned.discard(id(launch))
        else:
            self._release(launch.node, launch.gpus)
        self.policy.on_launch_done(launch, self.now)

    # ---- node faults ----------------------------------------------------------------------
    def _node_lost(self, node: int) -> None:
        self.down.add(node)
        self.dirty.add(node)
        lost = self.lost_groups.setdefault(node, {})
        for gid, g in list(self.groups.items()) + list(self.starting_group.items()):
            if g.node == node:
                self._remove_group(gid)
                lost[gid] = g
        self.free[node].clear()  # after the groups: removing a starting one gives back what it held
        self.charges.node_lost(node)
        for lid, (launch, start, _, end) in self.running.items():
            if launch.node == node and lid not in self.orphaned:  # re-run from its start, elsewhere
                self.orphaned.add(lid)
                self.rerun_end[lid] = self.now + (end - start)

    def _node_back(self, node: int) -> None:
        self.down.discard(node)
        self.free[node] = set(range(self.cluster.gpus_per_node))
        self.dirty.add(node)
        for gid, g in self.lost_groups.pop(node, {}).items():
            if self.plan_groups.get(gid) == g:  # still in the plan: its replica starts again
                self._add_group(g, initial=False)

    # ---- main loop ------------------------------------------------------------------------
    def _schedule(self) -> bool:
        refusals_before = self.memory_refusals
        state = self._state()
        t0 = time.perf_counter()
        out = self.policy.schedule(state)
        self.decision_time += time.perf_counter() - t0
        self.schedule_calls += 1
        if out.new_plan is not None:  # the plan takes effect first; its new groups start now
            self.plan_changes += 1
            self.replan_reasons.append(out.replan_reason)
            self._apply_plan(out.new_plan, initial=self.config.start_cost_s <= 0)
        for launch in out.launches:
            self._launch(launch)
        self._refused_this_call = self.memory_refusals > refusals_before
        wake = self.policy.next_wakeup(self.now)
        if wake is not None and wake > self.now and (self.wakeup_at is None or wake < self.wakeup_at):
            self.wakeup_at = wake
            self._push(wake, _WAKE, wake)
        return bool(out.launches) or out.new_plan is not None

    def _pause_the_unresumed(self) -> None:
        """Chunks that ended now and were not resumed at once: their state goes to host memory."""
        for rid in self.at_boundary:
            if rid in self.in_flight or rid in self.failed:
                continue
            self.paused.pause(self.by_id[rid], self.now)
        self.at_boundary.clear()
        if self.paused.room < 0:
            self._fail(f"paused requests hold {self.paused.total / 1e9:.1f} GB of host memory, "
                       f"over the {self.config.host_memory_gb:g} GB budget")

    def run(self, progress=None) -> SimResult:
        """Simulate to the end (or `config.until`); `progress(n_arrived)` is called as requests arrive."""
        wall0 = time.perf_counter()
        plan = self.policy.initial_plan(0.0)
        if plan is not None:
            self._apply_plan(plan, initial=True)
        for t_lost, node, t_back in self.config.node_faults:
            self._push(t_lost, _NODE, (node, False))
            if t_back < math.inf:
                self._push(t_back, _NODE, (node, True))
        arrivals, i, n = self.requests, 0, len(self.requests)
        until = math.inf if self.config.until is None else self.config.until
        idle_wakeups = 0
        while True:
            t_event = self.events[0][0] if self.events else math.inf
            t_arrival = arrivals[i].arrival if i < n else math.inf
            t = min(t_event, t_arrival)
            if t == math.inf or t > until:
                break
            self.now = t
            only_wakeup = True
            while i < n and arrivals[i].arrival == t:
                req = arrivals[i]
                self.next_stage[req.id] = 0
                self.ready_at[req.id] = t
                self.policy.add_request(req, t)
                i += 1
                only_wakeup = False
                if progress is not None:
                    progress(i)
            while self.events and self.events[0][0] == t:
                _, _, kind, payload = heapq.heappop(self.events)
                if kind == _DONE:
                    lid = id(payload)
                    if lid in self.rerun_end:  # lost with its node: it ends when its re-run does
                        self._push(self.rerun_end.pop(lid), _DONE, payload)
                        continue
                    self._launch_done(payload)
                    only_wakeup = False
                elif kind == _NODE:
                    node, back = payload
                    self._node_back(node) if back else self._node_lost(node)
                    only_wakeup = False
                elif kind == _READY:
                    self._group_ready(payload)
                    only_wakeup = False
                elif payload == self.wakeup_at:
                    self.wakeup_at = None
            acted = self._schedule()
            while self._refused_this_call:
                # a refused launch left its GPUs free with no event to call the policy again: ask
                # now, or the rest of its queue waits for an unrelated event (each refusal fails a
                # request for good, so this ends)
                acted = self._schedule() or acted
            self._pause_the_unresumed()
            if only_wakeup and not acted and not self.in_flight and i == n and not self.starting:
                idle_wakeups += 1
                if idle_wakeups >= self.config.max_idle_wakeups:
                    break
            else:
                idle_wakeups = 0
        arrived = len(self.next_stage)
        unfinished = arrived - len(self.finish) - len(self.failed)
        if self.config.until is None and unfinished and not self.in_flight:
            self._fail(f"{unfinished} requests never completed and nothing is running (dropped or starved)")
        assert len(self.finish) + len(self.failed) + unfinished == arrived
        return SimResult(
            policy=self.policy.name, cluster=self.cluster, requests=self.requests[:arrived],
            finish=self.finish, busy_gpu_seconds=self.busy_gpu_seconds, end_time=self.now,
            launches=self.launches, plan_changes=self.plan_changes, schedule_calls=self.schedule_calls,
            decision_time_s=self.decision_time, wall_time_s=time.perf_counter() - wall0,
            in_flight_at_end=unfinished, replan_reasons=self.replan_reasons, failed=dict(self.failed),
            memory_refusals=self.memory_refusals, timeline=self.timeline,
            demoted=frozenset(getattr(self.policy, "demoted", ()) or ()),
            peak_paused_gb=self.paused.peak / 1e9,
            adapter_hits=self.charges.adapters.hits, adapter_loads=self.charges.adapters.loads,
        )


def simulate(cluster: Cluster, policy: Policy, cost, requests: list[Request],
             config: SimConfig | None = None, progress=None) -> SimResult:
    """Convenience wrapper: build a `Simulator` and run it."""
    return Simulator(cluster, policy, cost, requests, config).run(progress)
