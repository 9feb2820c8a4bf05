"""`StagePoolPolicy`: stage-level dispatch on one shared GPU pool.

Each stage of a request (encode, diffuse, decode) is its own launch, placed when it is ready
on whichever free GPUs of a node suit it, at its own width. What this buys over running the
whole pipeline on one set of GPUs (`DynamicPipelinePolicy`):
- decode and encode never hold a wide diffuse group: the diffuse GPUs are free the moment
  diffuse ends, and decode takes only the width its memory and deadline need;
- a launch needs one stage's memory, not the pipeline's: no encoder offload, narrower widths;
- decode of a long video can run wider than its diffuse, where memory needs it.

Decisions, each from the cost model:
- **Order**: earliest deadline first. A request that cannot meet its deadline at any width
  is *late*: in each pass it goes after every scanned on-time task (late tasks oldest first), so
  under sustained overload it waits until a pass leaves GPUs after the on-time work (one order
  for both, late keyed by deadline + SLO, was tried: it cut P95 and cost attainment; RESULTS.md).
  Its queue key becomes deadline + SLO, which decides only whether the scan (`scan_limit`)
  reaches it.
- **Slack from measured error**: predictions are multiplied by `exp(mean + z * std)` of the
  log of observed / predicted launch times (z for `confidence`), learned online. A request
  is late only where even the median (`exp(mean)`) misses at every width (`late_at_median`):
  one on time at the median but not with the slack keeps its chance, at the widths that make it.
- **Width**: a task's on-time widths are those whose predicted finish (this stage, then the
  later stages at their narrowest widths, with slack) meets its deadline; where no width does,
  those that meet it with the later stages at their fastest (`narrow_rest`: a diffuse planned
  on a fast decode left no time for the width-2 decode a long video's memory needs, and the
  decode then queued as late work). The free GPUs go first to every scanned
  on-time task's narrowest on-time width (the scan is the `scan_limit` most urgent ready
  tasks: a deep scan stops widening while queued work would use the GPUs); what is left widens
  tasks up to their widest on-time width where an extra GPU saves the most seconds (`spare`:
  long stages, the tail, first; spare GPUs shorten latency, scarce ones are spent on the fewest
  GPU-seconds). An edit's diffuse runs at width 1 (`Request.widest`). A late diffuse waits for its widest width with parallel efficiency >=
  `threshold`; a late encode or decode (seconds) runs at any width with room, widest efficient first. A width with no room now falls back to narrower on-time widths.
- **Widths** (`widths`: stage -> widths, default all the cost model has): a runtime that
  deploys only some widths (Serve's `diffuse-w1`, `diffuse-w2`, ...) restricts each stage to them.
- **Placement**: the GPUs to use are those that cost least to start on (`WeightResidency`:
  the request's own previous GPUs, a past sequence-parallel group of that width, GPUs holding
  the model and stage), then the node with the fewest free GPUs.
- **Models on the pool**: each model may hold a share of the GPUs in proportion to its recent
  demand (predicted GPU-seconds of arrivals, decayed over `share_window_s`). A model under its
  share may load itself onto another model's GPUs (the start cost), most-over-share model
  first, and only where waiting for its own GPUs (their first free moment plus the work
  queued ahead on them) would finish later or miss the deadline.
- **Batching**: same-shape small images (<= `batch_max_pixels`) share a launch, up to the size
  with the best throughput, while each stays on time.
- **Step elasticity** (`elastic`): diffuse runs in chunks of steps (`Launch.steps`), each as
  long as makes the boundary's cost (`boundary_s`) at most `chunk_overhead` of it. At every
  boundary the request is decided again like any ready task, with its remaining steps: it
  goes on where it ran (free of cost), moves to another width where that pays for the
  regroup, or yields its GPUs to more urgent work and pauses (its state in host memory). It
  widens onto GPUs that must load its model only where the load plus its remaining steps there
  finish sooner than going on (`widen_loads`); a paused request waits for GPUs holding its model.
  Starvation is bounded: after `max_preemptions` pauses a request runs its remaining steps in
  one launch, and one paused for `max_pause_s` goes first and is reserved the next GPUs, loading
  its model there if they hold another, whatever its share (its last launch, which keeps its
  width to the end, at the fastest width with room then).
  Paused state never exceeds `host_memory_gb`: a request whose pause would overflow it goes on.
  A chunk does not strand GPUs (`fill`): where it would leave GPUs of its node that no undecided
  task fits while on-time work waits for more (a whole node), it runs on them, if they hold its
  model and one chunk there is at most `fill_delay` of the tightest recent SLO (an arrival may
  have to wait for it).
  `chunk_edits=False` runs image edits' diffuse in one launch (the real executors cannot resume
  an edit's shortened schedule yet; the Serve controller sets it for them).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, replace
from statistics import NormalDist

from trident_rs.errors import ConfigError
from trident_rs.policy.interface import Policy
from trident_rs.policy.launch_error import LaunchError
from trident_rs.policy.model_shares import ModelShares
from trident_rs.policy.paused_state import PausedState
from trident_rs.policy.payload_size import CHUNK_BOUNDARY_S, SERVE_HOP_OVERHEAD_S
from trident_rs.policy.residency import DEFAULT_REGROUP_S, WeightResidency
from trident_rs.policy.stage_costs import StageCosts
from trident_rs.policy.types import STAGES, Cluster, ClusterState, Launch, Request, SchedulerOutput, Shape
from trident_rs.policy.width_share import SPARE_RULES, WidthChoice, share_out

_INF = float("inf")
# options the runtimes give every trident placement; the pool has no use for them
_SHARED_OPTIONS = frozenset({"slo_scale", "seed", "tick_s", "forecast", "workload"})


@dataclass
class _Flight:
    """A request between arrival and its last launch."""

    request: Request
    stage: int = 0  # index of the next stage to launch
    late: bool = False
    node: int = -1  # where its last stage ran
    gpus: tuple[int, ...] = ()
    done: int = 0  # diffuse steps done (chunks)
    pauses: int = 0  # chunk boundaries at which it yielded its GPUs
    urgent: bool = False  # paused past the bound: goes first
    # `_choose`'s cache: (key = (stage, steps left, width going on at), its class lookup as
    # `_choose` adjusts it, the WidthChoices made for that lookup); replaced when the key changes
    memo: tuple | None = None

    @property
    def steps_left(self) -> int:
        return self.request.steps - self.done


class StagePoolPolicy(Policy):
    name = "trident"

    def __init__(self, cluster: Cluster, cost, threshold: float = 0.8, confidence: float = 0.9,
                 scan_limit: int = 256, max_batch: int = 8, batch_max_pixels: int = 1024 * 1024,
                 model_load_s: float = 20.0, regroup_s: float = DEFAULT_REGROUP_S, models=None, share_window_s: float = 120.0,
                 elastic: bool = True, chunk_overhead: float = 0.02, boundary_s: float = SERVE_HOP_OVERHEAD_S + CHUNK_BOUNDARY_S,
                 max_preemptions: int = 4, max_pause_s: float = 60.0, host_memory_gb: float = 512.0,
                 spare: str = "gain", widths: dict | None = None, chunk_edits: bool = True,
                 widen_loads: bool = True, narrow_rest: bool = True, late_at_median: bool = True,
                 fill: bool = True, fill_delay: float = 0.1, **ignored: object) -> None:
        unknown = sorted(set(ignored) - _SHARED_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown trident (pool) option(s) {unknown}")
        try:  # options may come as strings (YAML, the suite's `trident:key=value` ablations)
            threshold, confidence, share_window_s = float(threshold), float(confidence), float(share_window_s)
            scan_limit, max_batch, batch_max_pixels = int(scan_limit), int(max_batch), int(batch_max_pixels)
            model_load_s, regroup_s = float(model_load_s), float(regroup_s)
            elastic = _flag(elastic, ("1", "true", "yes", "on"))
            chunk_overhead, boundary_s = float(chunk_overhead), float(boundary_s)
            max_preemptions, max_pause_s, host_memory_gb = int(max_preemptions), float(max_pause_s), float(host_memory_gb)
            fill_delay = float(fill_delay)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"trident (pool): bad option value ({e})") from None
        if not 0.5 <= confidence < 1 or not 0 < threshold <= 1 or scan_limit < 1 or max_batch < 1:
            raise ConfigError("trident (pool): need 0.5 <= confidence < 1, 0 < threshold <= 1, "
                              "scan_limit >= 1, max_batch >= 1")
        if spare not in SPARE_RULES:
            raise ConfigError(f"trident (pool): spare must be 'gain' or 'deadline', got {spare!r}")
        self.spare = spare
        self.narrow_rest, self.widen_loads = _flag(narrow_rest), _flag(widen_loads)
        self.chunk_edits = _flag(chunk_edits)
        self.late_at_median = _flag(late_at_median)
        self.fill, self.fill_delay = _flag(fill), fill_delay
        # (arrival, SLO seconds) of the requests arrived within `share_window_s` of the latest,
        # only those no later arrival's SLO undercuts: the first is the tightest
        self._slos: deque[tuple[float, float]] = deque()
        try:  # the widths each stage may run at (a runtime that deploys only some): None, all
            self.widths = None if widths is None else {s: frozenset(int(w) for w in ws) for s, ws in widths.items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"trident (pool): widths must map stage -> [width, ...], got {widths!r}") from None
        if not 0 < chunk_overhead <= 1 or boundary_s < 0 or max_preemptions < 0 or max_pause_s <= 0 \
                or host_memory_gb < 0 or fill_delay < 0:
            raise ConfigError("trident (pool): need 0 < chunk_overhead <= 1, boundary_s >= 0, max_preemptions >= 0, "
                              "max_pause_s > 0, host_memory_gb >= 0, fill_delay >= 0")
        self.cluster, self.cost = cluster, cost
        self.threshold, self.scan_limit = threshold, scan_limit
        self.elastic, self.chunk_overhead, self.boundary_s = elastic, chunk_overhead, boundary_s
        self.max_preemptions, self.max_pause_s = max_preemptions, max_pause_s
        self.regroup_s = regroup_s
        self._boundary: set[str] = set()  # requests whose chunk ended at this instant
        self._launched: set[str] = set()  # requests launched at this instant
        self._when: dict[int, list[tuple[float, int]]] = {}  # node -> its GPUs by when free, this pass
        self.paused = PausedState(host_memory_gb * 1e9)  # requests paused at a boundary, since when
        self.max_batch, self.batch_max_pixels = max_batch, batch_max_pixels
        self.z = NormalDist().inv_cdf(confidence)
        self.model_load_s = model_load_s
        self.residency = WeightResidency(cost, cluster.gpu_memory_gb, model_load_s, regroup_s)
        self.flights: dict[str, _Flight] = {}
        self.ready: list[tuple[float, int, str]] = []  # (key, seq, request id) of stages ready to launch
        self.seq = 0
        self.busy_until: dict[tuple[int, int], float] = {}  # GPU -> predicted end of its launch
        self.started: dict[tuple, tuple[float, float]] = {}  # launch key -> (start, predicted seconds)
        self.error = LaunchError()
        self.costs = StageCosts(cost, cluster, self.widths, max_batch)
        self._classes: dict[tuple, tuple] = {}
        # each model's share of the pool: its decayed predicted GPU-seconds of arrivals, the
        # prior (`models`: model -> share, from past traffic or equal) only breaking ties
        prior = dict(models) if isinstance(models, dict) else dict.fromkeys(models or (), 1.0)
        if share_window_s <= 0:
            raise ConfigError(f"trident (pool): share_window_s must be > 0, got {share_window_s}")
        self.window_s = share_window_s
        self.shares = ModelShares(share_window_s, prior)

    # ---- Policy interface ------------------------------------------------------------------
    def initial_plan(self, now: float):
        return None  # one shared pool

    def add_request(self, request: Request, now: float) -> None:
        self.flights[request.id] = _Flight(request)
        while self._slos and self._slos[-1][1] >= request.slo_s:  # the window's minimum first
            self._slos.pop()
        self._slos.append((now, request.slo_s))
        while self._slos[0][0] < now - self.window_s:
            self._slos.popleft()
        self._push(request.id)
        r = request
        work = 0.0  # GPU-seconds of all its stages, each at its cheapest width
        for i in range(len(STAGES)):
            ws, time, _, _, _ = self._class(r.model, i, r.shape, r.steps, r.widest(STAGES[i]))
            work += min(w * time[w] for w in ws)
        self.shares.add(r.model, work, now)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        start, predicted = self.started.pop(_key(launch))
        if predicted > 0:
            self.error.add((now - start) / predicted)
        for rid in launch.request_ids:
            f = self.flights[rid]
            f.node, f.gpus = launch.node, launch.gpus
            if not launch.finishes_stage(f.request.steps):  # a chunk: decided again at the boundary
                f.done = launch.steps[1]
                self._boundary.add(rid)
                self._push(rid)
                continue
            f.done = 0
            f.stage += len(launch.stages)
            if f.stage == len(STAGES):
                del self.flights[rid]
            else:
                self._push(rid)

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        self.started.pop(_key(launch), None)
        for rid in launch.request_ids:
            self.flights.pop(rid, None)
            self.paused.release(rid)

    def next_wakeup(self, now: float) -> float | None:
        """When the longest-paused request reaches the pause bound (it goes first then)."""
        due = [since + self.max_pause_s for rid, since in self.paused.since.items() if not self.flights[rid].urgent]
        return min(due) if due else None

    def pending(self) -> int:
        return len(self.flights)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        out = self._schedule(state)
        self._pause_the_unresumed(state.now)
        return out

    def _schedule(self, state: ClusterState) -> SchedulerOutput:
        now = state.now
        if state.down != self.cluster.down:  # nodes lost or back: reserve and share only the nodes up
            self.cluster = replace(self.cluster, down=state.down)
        free = {n: set(g) for n, g in state.free_gpus.items() if g}
        self._mark_urgent(now)
        if not self.ready or not free:
            return SchedulerOutput()
        slack, median = self.error.factor(self.z), self.error.factor(0.0)
        self._when = {}  # sorted again as `_reserve` needs a node, until a launch there
        self.shares.decay(now)
        self._budget = self._budgets()
        scanned = [heapq.heappop(self.ready) for _ in range(min(self.scan_limit, len(self.ready)))]
        choices = {rid: self._choose(self.flights[rid], now, slack, free, median) for _, _, rid in scanned}
        order = [it for it in scanned if choices[it[2]].on_time] + sorted(
            (it for it in scanned if not choices[it[2]].on_time), key=lambda it: self.flights[it[2]].request.arrival)
        target = self._share_out(order, choices, sum(len(g) for g in free.values()))
        launches, kept, taken = self._go_on_where_paused_state_would_overflow(scanned, choices, free, now), [], set()
        taken.update(rid for launch in launches for rid in launch.request_ids)
        self._ahead: dict[str, float] = {}  # GPU-seconds of tasks this pass left waiting, per model
        blocked = _INF  # narrowest width an on-time task found no room for: later ones stay narrower
        hold = None  # (node, GPUs, when): the first on-time task without room waits for these
        for item in order:
            rid = item[2]
            if rid in taken:
                continue
            f, c = self.flights[rid], choices[rid]
            if not c.on_time and not f.late and not f.urgent:
                f.late = True
                item = (f.request.deadline + f.request.slo_s, item[1], rid)
            if not free:  # nothing left to place on: the rest wait
                kept.append(item)
                continue
            t = target.get(rid, c.widths[0])
            widths = () if min(c.widths) >= blocked and not f.urgent else \
                (t,) + tuple(sorted((w for w in c.widths if w < t), reverse=True)) + tuple(sorted(w for w in c.widths if w > t))
            spot = None
            for w in widths:
                room = free if hold is None else _backfill(free, hold, now + slack * c.time[w])
                if (w >= blocked and not f.urgent) or not any(len(g) >= w for g in room.values()):
                    continue
                spot = self._place(f, w, room, now, slack * (c.time[w] + c.rest), self._stay_s(f, c, slack))
                if spot is not None:
                    break
            if spot is None:
                if c.on_time:
                    blocked = min(blocked, min(c.widths))
                    if hold is None:
                        hold = self._reserve(c.narrowest, free, now)
                        if hold is not None and not f.urgent and \
                                hold[2] + slack * (c.time[c.narrowest] + c.rest) > f.request.deadline:
                            hold = None  # it would be late anyway: no reason to hold GPUs for it
                kept.append(item)
                taken.add(rid)  # decided (to wait): no batch takes it along
                m = f.request.model
                self._ahead[m] = self._ahead.get(m, 0.0) + c.narrowest * c.time[c.narrowest]
                continue
            if self.fill and c.on_time:
                w, spot = self._fill(f, c, w, spot, free, scanned, choices, taken, launches, now, slack)
            node, gpus, load = spot
            batch = [rid] + self._companions(f, c, w, scanned, choices, taken, now, slack, load)
            taken.update(batch)
            launches.append(self._launch(batch, f, w, node, gpus, now, load))
            free[node] -= set(gpus)
            if not free[node]:
                del free[node]
        for item in kept:
            heapq.heappush(self.ready, item)
        return SchedulerOutput(tuple(launches))

    # ---- decisions -------------------------------------------------------------------------
    def _choose(self, f: _Flight, now: float, slack: float, free: dict[int, set[int]],
                median: float | None = None) -> WidthChoice:
        r = f.request
        key = (f.stage, f.steps_left, len(f.gpus) if f.done else 0)
        if f.memo is not None and f.memo[0] == key:  # decided again every pass: the lookup is kept
            ws, time, rest, narrow, efficient = f.memo[1]
            made = f.memo[2]
        else:
            ws, time, rest, narrow, efficient = self._class(r.model, f.stage, r.shape, f.steps_left,
                                                            r.widest(STAGES[f.stage]))
            if f.done:  # mid-diffuse: going on at its width is free, another width regroups, and it
                # widens only where that is faster even so
                cur = len(f.gpus)
                time = {w: t + (0.0 if w == cur else self.regroup_s) for w, t in time.items()}
                ws = tuple(w for w in ws if w <= cur or time[w] < time.get(cur, _INF))
            made = {}  # the choices made for this lookup, by (widths, seconds after, on time)
            f.memo = (key, (ws, time, rest, narrow, efficient), made)
        if f.urgent:  # paused past the bound: any width, as soon as possible; but its last launch
            # (it may not pause again, and keeps that width to its last step) at the fastest width
            # with room now, not the narrowest
            if self.elastic and f.done and f.pauses >= self.max_preemptions:
                room = [w for w in ws if any(len(g) >= w for g in free.values())]
                if room:
                    return WidthChoice((min(room, key=lambda w: (time[w], w)),), time, rest, True)
            return WidthChoice(ws, time, rest, True)
        # on time, tried in this order: with the slack, leaving room for the later stages at their
        # narrowest width (what they get when GPUs are scarce: a long video's decode at the width
        # its memory needs; `narrow_rest`); with the slack, the later stages at their fastest; at
        # the median, still more likely on time than not (`late_at_median`: late work yields to all
        # on-time work and waits for its efficient width)
        tries = [(slack, narrow)] * self.narrow_rest + [(slack, rest)] \
            + [(self.error.factor(0.0) if median is None else median, rest)] * self.late_at_median
        for factor, after in tries:
            on_time = tuple(w for w in ws if now + factor * (time[w] + after) <= r.deadline)
            if on_time:  # which of them: `_share_out`, from the free GPUs
                return _made(made, on_time, time, after, True)
        # late: its widest efficient width (the earliest finish without wasting GPUs), and it
        # waits for that rather than run for much longer on fewer; mid-diffuse, it goes on at
        # its own width where the wider one has no room
        if STAGES[f.stage] != "diffuse":  # a short stage: any width with room, widest efficient first
            return _made(made, tuple(sorted(efficient, reverse=True)) + tuple(w for w in ws if w not in efficient),
                         time, rest, False)
        late = (max(efficient),) if not f.done or len(f.gpus) == max(efficient) else (max(efficient), len(f.gpus))
        return _made(made, late, time, rest, False)

    def _reserve(self, w: int, free: dict[int, set[int]], now: float) -> tuple[int, frozenset[int], float] | None:
        """The `w` GPUs of one node predicted to be free soonest, and when (EASY backfilling's
        reservation for the first task that finds no room)."""
        best = None
        for n in self.cluster.up:
            when = self._when.get(n)
            if when is None:  # kept for the pass until a launch on the node
                idle = free.get(n, set())
                when = self._when[n] = sorted((now if i in idle else max(self.busy_until.get((n, i), now), now), i)
                                              for i in range(self.cluster.gpus_per_node))
            if w <= len(when) and (best is None or when[w - 1][0] < best[2]):
                best = (n, frozenset(i for _, i in when[:w]), when[w - 1][0])
        return best

    def _share_out(self, order, choices: dict[str, WidthChoice], gpus: int) -> dict[str, int]:
        """Each on-time task's width now (`width_share.share_out`, the scanned order kept)."""
        return share_out([(it[2], choices[it[2]]) for it in order if choices[it[2]].on_time], gpus, self.spare)

    def _budgets(self) -> tuple[dict[str, int], dict[str, int]]:
        """(GPUs each model may hold: its share of recent demand, GPUs each holds now)."""
        return self.shares.budgets(self.cluster.total_gpus, self.residency)

    def _fill(self, f: _Flight, c: WidthChoice, w: int, spot, free, scanned, choices, taken, launches,
              now: float, slack: float) -> tuple[int, tuple[int, tuple[int, ...], float]]:
        """(width, spot) of an on-time diffuse chunk about to leave GPUs of its node that no
        undecided task's narrowest width fits, while on-time work waits for more than that: it
        runs on them, at its fastest on-time width there, rather than strand them (`fill`; a
        request narrowed at its boundary for new work leaves 7 GPUs a width-8 task cannot take).
        Only onto GPUs holding its model, and only where one chunk there (it holds them that
        long) is at most `fill_delay` of the tightest SLO of the requests that arrived within
        `share_window_s` of the latest: an arrival of any class may have to wait for it."""
        node = spot[0]
        left, rid = len(free[node]) - w, f.request.id
        if left <= 0 or STAGES[f.stage] != "diffuse" or not self.elastic or f.pauses >= self.max_preemptions \
                or any(min(choices[x].widths) <= left for _, _, x in scanned if x != rid and x not in taken):
            return w, spot
        placed = {x for launch in launches for x in launch.request_ids}
        if not any(choices[x].on_time and min(choices[x].widths) > left for _, _, x in scanned
                   if x != rid and x not in placed):
            return w, spot
        r, tightest = f.request, self._slos[0][1]
        for v in sorted((v for v in c.widths if w < v <= len(free[node]) and c.time[v] < c.time[w]), reverse=True):
            chunk = self.costs.time(r.model, "diffuse", r.shape, v, self._chunk_steps(r.model, r.shape, v, 1))
            if chunk > self.fill_delay * tightest:
                continue
            wide = self._place(f, v, {node: free[node]}, now, slack * (c.time[v] + c.rest), self._stay_s(f, c, slack))
            if wide is not None and wide[2] < self.model_load_s:
                return v, wide
        return w, spot

    def _stay_s(self, f: _Flight, c: WidthChoice, slack: float) -> float:
        """Predicted seconds to finish going on where it runs (a diffuse at its chunk boundary);
        0 where it cannot go on there (a model load never pays then)."""
        cur = len(f.gpus)
        if not self.widen_loads or not f.done or f.request.id not in self._boundary or cur not in c.time:
            return 0.0
        return slack * (c.time[cur] + c.rest)

    def _place(self, f: _Flight, w: int, free: dict[int, set[int]], now: float,
               work_s: float, stay_s: float = 0.0) -> tuple[int, tuple[int, ...], float] | None:
        """(node, GPUs, load seconds) for a width-`w` launch of `f`'s next stage, or None to wait."""
        r, stage = f.request, STAGES[f.stage]
        best = None
        for n, g in free.items():
            if len(g) < w:
                continue
            for gpus in self._candidates(f, n, g, w):
                load = self.residency.load_s(r.model, (stage,), n, gpus)
                score = (load, n != f.node, len(g), n)
                if best is None or score < best[0]:
                    best = (score, n, gpus, load)
        if best is None:
            return None
        _, n, gpus, load = best
        if load >= self.model_load_s and f.done and not f.urgent and load + work_s >= stay_s:
            return None  # a paused diffuse waits for GPUs holding its model rather than load it
        if load >= self.model_load_s and not f.urgent:  # another model's GPUs: only within our share,
            # and only if waiting for our own GPUs (their first free moment, then the work queued
            # ahead of us shared over them) finishes later or misses; always where ours can never
            # hold `w`. A request paused past the bound loads wherever it has room: its own
            # model's GPUs go on to other requests' next chunks, and the bound would not hold
            own = self.residency.first_free_for(r.model, w, self.cluster.up, self.cluster.gpus_per_node,
                                                self.busy_until, now)
            if own < _INF:
                budget, count = self._budget
                if count.get(r.model, 0) >= budget.get(r.model, 0):
                    return None
                wait = own + self._ahead.get(r.model, 0.0) / max(count.get(r.model, 0), 1)
                if wait > now and (wait + work_s <= r.deadline or wait < now + load):
                    return None
        return n, gpus, load

    def _candidates(self, f: _Flight, n: int, free: set[int], w: int) -> list[tuple[int, ...]]:
        """GPU sets of node `n` worth pricing: the request's previous GPUs, past groups of width
        `w` holding the model, and the free GPUs ranked by what they hold."""
        model, stage = f.request.model, STAGES[f.stage]
        out = []
        if f.node == n and set(f.gpus) <= free and len(f.gpus) >= w:
            out.append(tuple(sorted(f.gpus[:w])))
        if w > 1:
            for i in free:
                held = self.residency.holds(n, i)
                if held is not None and held.stages_of(model) is not None and held.group is not None \
                        and len(held.group) == w and set(held.group) <= free:
                    out.append(held.group)
                    break

        def rank(i: int) -> tuple:
            held = self.residency.holds(n, i)
            if held is None:
                return (1, i)
            mine = held.stages_of(model)
            if mine is not None:
                return (0 if stage in mine else 1, i)
            budget, count = self._budget
            return (2, budget.get(held.model, 0) - count.get(held.model, 0), i)  # most over its share first

        out.append(tuple(sorted(sorted(free, key=rank)[:w])))
        return out

    def _companions(self, f: _Flight, c: WidthChoice, w: int, scanned, choices, taken, now: float,
                    slack: float, load: float) -> list[str]:
        """Other on-time requests of the same class to run in the same launch."""
        r, stage = f.request, STAGES[f.stage]
        if not c.on_time or r.shape.pixels > self.batch_max_pixels or stage == "decode":
            return []
        size = self.costs.best_batch(r.model, stage, r.shape, w, f.steps_left)
        mem = getattr(self.cost, "launch_memory", None)
        while size > 1 and mem is not None and mem(r.model, (stage,), r.shape, w, size) > self.cluster.gpu_memory_gb:
            size //= 2
        if size <= 1:
            return []
        t = load + slack * (self.costs.time(r.model, stage, r.shape, w, f.steps_left, size) + c.rest)
        if now + t > r.deadline:
            return []
        out = []
        for _, _, rid in scanned:
            if len(out) + 1 >= size:
                break
            g = self.flights[rid]
            if rid in taken or rid == r.id or not choices[rid].on_time or g.stage != f.stage:
                continue
            q = g.request
            if (q.model, q.shape, q.steps, q.encode_image, g.done, g.pauses < self.max_preemptions) == \
                    (r.model, r.shape, r.steps, r.encode_image, f.done, f.pauses < self.max_preemptions) \
                    and now + t <= q.deadline:
                out.append(rid)
        return out

    def _launch(self, batch: list[str], f: _Flight, w: int, node: int, gpus: tuple[int, ...], now: float,
                load: float) -> Launch:
        r, stage = f.request, STAGES[f.stage]
        steps, n = None, f.steps_left
        if stage == "diffuse" and self.elastic and (self.chunk_edits or not r.encode_image):
            if f.pauses < self.max_preemptions:
                n = min(n, self._chunk_steps(r.model, r.shape, w, len(batch)))
            steps = (f.done, f.done + n)
        for rid in batch:
            self._launched.add(rid)
            if self.paused.release(rid):
                self.flights[rid].urgent = False
        launch = Launch(tuple(batch), r.model, (stage,), w, node, gpus, steps=steps)
        predicted = load + self.costs.time(r.model, stage, r.shape, w, n, len(batch))
        self.residency.record(r.model, (stage,), node, gpus, r.shape)
        self._when.pop(node, None)
        self.started[_key(launch)] = (now, predicted)
        for i in gpus:
            self.busy_until[(node, i)] = now + predicted
        return launch

    # ---- step elasticity -------------------------------------------------------------------
    def _chunk_steps(self, model: str, shape: Shape, w: int, batch: int) -> int:
        """Steps per chunk: the fewest whose time makes the boundary at most `chunk_overhead` of it."""
        per_step = self.costs.time(model, "diffuse", shape, w, 1, batch)
        return max(1, math.ceil(self.boundary_s / (self.chunk_overhead * per_step)))

    def _pause_the_unresumed(self, now: float) -> None:
        """Chunks that ended now and did not go on yielded their GPUs: they are paused."""
        for rid in self._boundary:
            f = self.flights.get(rid)
            if f is not None and rid not in self._launched and rid not in self.paused:
                self.paused.pause(f.request, now)
                f.pauses += 1
        self._boundary.clear()
        self._launched.clear()

    def _mark_urgent(self, now: float) -> None:
        """Paused past `max_pause_s`: first in the queue from now on."""
        for rid, since in self.paused.since.items():
            f = self.flights[rid]
            if not f.urgent and now - since >= self.max_pause_s - 1e-9:
                f.urgent = True
                self.ready = [it for it in self.ready if it[2] != rid]
                heapq.heapify(self.ready)
                self._push(rid)

    def _go_on_where_paused_state_would_overflow(self, scanned, choices, free, now: float) -> list[Launch]:
        """A request at a boundary whose pause would overflow host memory goes on where it ran."""
        out = []
        budget = self.paused.room
        for _, _, rid in scanned:
            f = self.flights[rid]
            if rid not in self._boundary:
                continue
            need = PausedState.size(f.request)
            if need <= budget:
                budget -= need
                continue
            node, gpus = f.node, f.gpus
            if not set(gpus) <= free.get(node, set()):
                continue  # cannot happen: its GPUs were freed at this instant
            out.append(self._launch([rid], f, len(gpus), node, gpus, now, 0.0))
            free[node] -= set(gpus)
            if not free[node]:
                del free[node]
        return out

    # ---- cost-model lookups (cached) -------------------------------------------------------
    def _class(self, model: str, stage_index: int, shape: Shape, steps: int, top: int | None = None):
        """(feasible widths, stage seconds per width, seconds of the stages after it each at its
        fastest and each at its narrowest width, widths with parallel efficiency >= threshold) of
        a stage of a request class; `top`: its widest width (`Request.widest`), None if any."""
        k = (model, stage_index, shape, steps, top)
        out = self._classes.get(k)
        if out is None:
            stage = STAGES[stage_index]
            ws = self.costs.feasible(model, stage, shape)
            if top is not None:
                ws = tuple(w for w in ws if w <= top) or ws[:1]
            time = {w: self.costs.time(model, stage, shape, w, steps) for w in ws}
            later = [(s, self.costs.feasible(model, s, shape)) for s in STAGES[stage_index + 1:]]
            rest = sum(min(self.costs.time(model, s, shape, w, steps) for w in fw) for s, fw in later)
            narrow = sum(self.costs.time(model, s, shape, fw[0], steps) for s, fw in later)
            w0 = ws[0]
            efficient = [w for w in ws if time[w0] * w0 / (time[w] * w) >= self.threshold]
            out = self._classes[k] = (ws, time, rest, narrow, efficient)
        return out

    def _push(self, rid: str) -> None:
        f = self.flights[rid]
        r = f.request
        self.seq += 1
        key = -_INF if f.urgent else r.deadline + (r.slo_s if f.late else 0.0)
        heapq.heappush(self.ready, (key, self.seq, rid))


def _flag(value: object, true: tuple[str, ...] = ("1", "true")) -> bool:
    """An on/off option as YAML or the suite's `trident:key=value` ablations give it."""
    return value if isinstance(value, bool) else str(value).lower() in true


def _made(made: dict, widths: tuple[int, ...], time: dict[int, float], after: float, on_time: bool) -> WidthChoice:
    """The `WidthChoice` of these values, made once per flight lookup (`_Flight.memo`)."""
    k = (widths, after, on_time)
    c = made.get(k)
    if c is None:
        c = made[k] = WidthChoice(widths, time, after, on_time)
    return c


def _backfill(free: dict[int, set[int]], hold: tuple[int, frozenset[int], float], end: float) -> dict[int, set[int]]:
    """The free GPUs a launch ending at `end` may use: all, if it ends before the reservation
    starts; else all but the reserved ones."""
    node, gpus, when = hold
    if end <= when or node not in free:
        return free
    out = dict(free)
    out[node] = free[node] - gpus
    if not out[node]:
        del out[node]
    return out


def _key(launch: Launch) -> tuple:
    return (launch.request_ids, launch.stages, launch.node, launch.gpus)
