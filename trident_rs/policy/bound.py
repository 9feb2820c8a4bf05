"""Upper bounds on SLO attainment that no policy can exceed, on a given request list.

Three bounds; `BoundPolicy.evaluate` reports each and their minimum:

- **alone**: a request counts only if it could meet its deadline alone on the cluster, with
  every stage at its fastest width that fits in memory.
- **fluid** (the old, loose bound): GPU-seconds demanded, each on-time request at its
  cheapest on-time width, against the cluster's GPU-seconds from the first arrival to the last
  deadline.
- **energetic** (an LP relaxation, tighter): time is cut at K points; for every interval
  I = [T1, T2] between two of them, the work that on-time requests *must* do inside I fits in
  the GPUs x |I|. A stage of a request with window [r, d] (earliest start, latest end if the
  request is to be on time) and duration p on w GPUs must run, without preemption, for at
  least `max(0, min(p, T2 - T1, r + p - T1, T2 - d + p))` seconds inside I (its "mandatory
  part", pushing it as far left or right as its window allows). Variables y[j, w] in [0, 1]
  (request j on time with diffuse at width w, only widths where it could be alone) and
  z[j] = sum_w y[j, w] <= 1; maximise sum z / n.

Why no policy exceeds the energetic bound. Take any schedule any policy runs (stage-level or
pipeline-level, batched or not, on any widths). Set z[j] = 1 for its on-time requests, with
y[j, w] = 1 at the width its diffuse ran. Each on-time stage ran inside its window, so each
interval I contains at least its mandatory part. Its GPU-seconds there are at least the bound's
count: the bound charges a stage's *least* GPU-seconds per request (the cheapest width and
batch size, amortised: `w * t(w, b) / b`) spread evenly over its *shortest* run (batch 1, the
fastest width), which places the least of it inside I (the mandatory fraction of a longer run
of the same work is larger). Encode and decode are charged at their cheapest width, as on a
stage-level cluster; pipeline-level launches hold more GPUs for them, never fewer. GPUs busy
inside I are at most nodes x GPUs per node x |I|, so the schedule is a feasible point of the
LP and its attainment is at most the LP optimum. Runtime costs the engine adds (transfers,
overheads, start, regroup, offload) only lengthen runs. What it does not cover: stage-time
noise (a run drawn faster than predicted can beat it; the test runs noise-free) and times the
cost model under-predicts.

- **time-indexed** (an LP relaxation of start times): x[j, w, k] = request j's diffuse starts
  at width w within time slot k (only slots from which it can still be on time); each request
  starts at most once; every slot's GPU-seconds hold, for every start, the least overlap any
  start within its slot could have with that slot, at the request's least GPU-seconds per
  second. The same argument as below makes any real schedule a feasible point (round each
  start down to its slot). Non-preemption enters through the overlaps.

Both LPs grow with the requests (x K^2 intervals, x slots): `max_requests` and
`max_slot_vars` bound where they are computed (above, they are reported as None and the
minimum of the others stands).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trident_rs.policy.types import Cluster, Request

WIDTHS = (1, 2, 4, 8)
BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class BoundResult:
    """Upper bounds on SLO attainment (the `attainment` field is their minimum)."""

    alone_attainment: float  # every request alone on the cluster at its fastest widths
    fluid_attainment: float  # capacity relaxation over the whole run
    energetic_attainment: float | None  # per-interval LP relaxation (None: instance too large)
    time_indexed_attainment: float | None  # start-slot LP relaxation (None: instance too large)
    attainment: float
    alone_latencies: tuple[float, ...]


@dataclass(frozen=True)
class _Class:
    """What the bound knows about one request class (model, shape, steps, SLO)."""

    t_enc: float  # fastest encode
    e_enc: float  # least encode GPU-seconds per request
    t_dec: float
    e_dec: float
    diffuse: tuple[tuple[int, float, float], ...]  # (width, fastest time, least GPU-seconds per request)


class BoundPolicy:
    """Analytic upper bound; evaluated, not simulated (`evaluate(requests)`)."""

    name = "bound"

    def __init__(self, cluster: Cluster, cost, grid_points: int = 36, max_requests: int = 800,
                 energetic: bool = True, slots: int = 160, max_slot_vars: int = 60_000, **_: object) -> None:
        self.cluster, self.cost = cluster, cost
        self.grid_points, self.max_requests, self.energetic = grid_points, max_requests, energetic
        self.slots, self.max_slot_vars = slots, max_slot_vars
        self._cache: dict[tuple, _Class] = {}

    # ---- per class -----------------------------------------------------------------------
    def _least(self, model, stage, shape, width, steps) -> tuple[float, float]:
        """(time at batch 1, least GPU-seconds per request over batch sizes) at `width`."""
        t1 = self.cost.stage_time(model, stage, shape, width=width, batch=1, steps=steps)
        per = t1
        for b in BATCHES[1:]:
            try:
                per = min(per, self.cost.stage_time(model, stage, shape, width=width, batch=b, steps=steps) / b)
            except Exception:  # noqa: BLE001 - no batch data: batch 1 only
                break
        return t1, width * per

    def _widths(self, model, stage, shape) -> list[int]:
        widths_fn = getattr(self.cost, "widths", None)
        ws = list(widths_fn(model, stage)) if widths_fn else list(WIDTHS if stage == "diffuse" else (1,))
        need = 1
        min_width = getattr(self.cost, "min_width", None)
        if min_width is not None:
            try:
                need = int(min_width(model, stage, shape, self.cluster.gpu_memory_gb))
            except Exception:  # noqa: BLE001 - fits no width: the class can never be served
                return []
        return [w for w in ws if need <= w <= self.cluster.gpus_per_node]

    def _class(self, r: Request) -> _Class | None:
        key = (r.model, r.shape, r.steps)
        if key not in self._cache:
            stages = {}
            for stage in ("encode", "decode"):
                ws = self._widths(r.model, stage, r.shape)
                if not ws:
                    self._cache[key] = None
                    return None
                opts = [self._least(r.model, stage, r.shape, w, 1) for w in ws]
                stages[stage] = (min(t for t, _ in opts), min(e for _, e in opts))
            diffuse = tuple((w, *self._least(r.model, "diffuse", r.shape, w, r.steps))
                            for w in self._widths(r.model, "diffuse", r.shape))
            self._cache[key] = _Class(*stages["encode"], *stages["decode"], diffuse) if diffuse else None
        return self._cache[key]

    # ---- bounds --------------------------------------------------------------------------
    def evaluate(self, requests: list[Request]) -> BoundResult:
        if not requests:
            return BoundResult(math.nan, math.nan, None, None, math.nan, ())
        n = len(requests)
        classes = [self._class(r) for r in requests]
        lat, demands = [], []
        for r, c in zip(requests, classes):
            if c is None:
                lat.append(math.inf)
                continue
            fixed = c.t_enc + c.t_dec
            lat.append(fixed + min(t for _, t, _ in c.diffuse))
            on_time = [e for _, t, e in c.diffuse if fixed + t <= r.slo_s + 1e-9]
            if on_time:
                demands.append(c.e_enc + c.e_dec + min(on_time))
        window = max(r.deadline for r in requests) - min(r.arrival for r in requests)
        capacity = self.cluster.total_gpus * window
        admitted, used = 0, 0.0
        for d in sorted(demands):  # most requests fit when the cheapest go first
            if used + d > capacity:
                break
            used += d
            admitted += 1
        alone, fluid = len(demands) / n, admitted / n
        energetic = indexed = None
        if self.energetic and n <= self.max_requests and demands:
            energetic = self._energetic(requests, classes)
            indexed = self._time_indexed(requests, classes)
        best = min(x for x in (alone, fluid, energetic, indexed) if x is not None)
        return BoundResult(alone, fluid, energetic, indexed, best, tuple(lat))

    def _time_indexed(self, requests: list[Request], classes: list[_Class | None]) -> float | None:
        """Start-slot LP: x[j, w, k] = request j's diffuse starts at width w within slot k. A slot's
        GPU-seconds hold, for every start, the least overlap any start time within its slot
        could have with it (overlap is concave in the start, so an end of the range); each
        request starts at most once. None if it has more than `max_slot_vars` variables."""
        from ortools.linear_solver import pywraplp

        items = []  # (j, width, window start, window end, duration, GPU-seconds per second)
        for j, (r, c) in enumerate(zip(requests, classes)):
            if c is None:
                continue
            for w, t, e in c.diffuse:
                if c.t_enc + t + c.t_dec <= r.slo_s + 1e-9:
                    items.append((j, w, r.arrival + c.t_enc, r.deadline - c.t_dec, t, e / t))
        if not items:
            return 0.0
        t0 = min(x[2] for x in items)
        horizon = max(x[3] for x in items) - t0
        delta = max(horizon / self.slots, 1e-6)
        nslots = int(math.ceil(horizon / delta)) + 1
        edges = t0 + delta * np.arange(nslots + 1)
        solver = pywraplp.Solver.CreateSolver("GLOP")
        per_slot: list[list] = [[] for _ in range(nslots)]
        per_job: dict[int, list] = {}
        n_vars = 0
        for j, w, r, d, p, density in items:
            k0 = int((r - t0) // delta)
            k1 = int(min((d - p - t0) // delta, nslots - 1))
            for k in range(k0, k1 + 1):
                s_lo, s_hi = max(edges[k], r), min(edges[k + 1], d - p)
                if s_hi < s_lo:
                    continue
                m0, m1 = int((s_lo - t0) // delta), min(int((s_hi + p - t0) // delta), nslots - 1)
                lo, hi = edges[m0:m1 + 1], edges[m0 + 1:m1 + 2]
                ov = np.minimum(np.maximum(0.0, np.minimum(hi, s_lo + p) - np.maximum(lo, s_lo)),
                                np.maximum(0.0, np.minimum(hi, s_hi + p) - np.maximum(lo, s_hi)))
                x = solver.NumVar(0.0, 1.0, "")
                n_vars += 1
                if n_vars > self.max_slot_vars:
                    return None
                per_job.setdefault(j, []).append(x)
                for m in np.flatnonzero(ov > 1e-12):
                    per_slot[m0 + m].append(ov[m] * density * x)
        cap = self.cluster.total_gpus * delta
        for terms in per_slot:
            if terms:
                solver.Add(solver.Sum(terms) <= cap)
        for xs in per_job.values():
            solver.Add(solver.Sum(xs) <= 1.0)
        solver.Maximize(solver.Sum([x for xs in per_job.values() for x in xs]))
        if solver.Solve() != pywraplp.Solver.OPTIMAL:
            return None
        return min(1.0, solver.Objective().Value() / len(requests))

    def _energetic(self, requests: list[Request], classes: list[_Class | None]) -> float:
        from ortools.linear_solver import pywraplp

        # candidates: (request index, width, window start, window end, duration, GPU-seconds)
        rows = []
        fixed_parts = []  # (request index, start, end, duration, GPU-seconds) of encode and decode
        for j, (r, c) in enumerate(zip(requests, classes)):
            if c is None:
                continue
            p_min = min(t for _, t, _ in c.diffuse)
            ok = [(w, t, e) for w, t, e in c.diffuse if c.t_enc + t + c.t_dec <= r.slo_s + 1e-9]
            if not ok:
                continue
            for w, t, e in ok:
                rows.append((j, w, r.arrival + c.t_enc, r.deadline - c.t_dec, t, e))
            fixed_parts.append((j, r.arrival, r.deadline - c.t_dec - p_min, c.t_enc, c.e_enc))
            fixed_parts.append((j, r.arrival + c.t_enc + p_min, r.deadline, c.t_dec, c.e_dec))
        if not rows:
            return 0.0
        arr = np.asarray([x[1:] for x in rows], dtype=float)  # width, r, d, p, e
        fix = np.asarray([x[1:] for x in fixed_parts], dtype=float)  # r, d, p, e
        row_j = np.asarray([x[0] for x in rows])
        fix_j = np.asarray([x[0] for x in fixed_parts])
        points = np.unique(np.quantile(np.concatenate([arr[:, 1], arr[:, 2]]),
                                       np.linspace(0, 1, self.grid_points)))
        solver = pywraplp.Solver.CreateSolver("GLOP")
        y = [solver.NumVar(0.0, 1.0, "") for _ in rows]
        js = sorted(set(row_j.tolist()))
        z = {j: solver.NumVar(0.0, 1.0, "") for j in js}
        for j in js:  # z_j = sum_w y_jw
            solver.Add(sum(y[i] for i in np.flatnonzero(row_j == j)) == z[j])
        G, nodes = self.cluster.gpus_per_node, self.cluster.nodes
        limits = {v: nodes * (G // v) * v for v in sorted({int(w) for w in arr[:, 0]})}
        for a in range(len(points)):
            for b in range(a + 1, len(points)):
                t1, t2 = points[a], points[b]
                span = t2 - t1
                m = _mandatory(arr[:, 3], arr[:, 1], arr[:, 2], t1, t2) * arr[:, 4] / arr[:, 3]
                mf = _mandatory(fix[:, 2], fix[:, 0], fix[:, 1], t1, t2) * fix[:, 3] / np.maximum(fix[:, 2], 1e-12)
                for v, limit in limits.items():
                    idx = np.flatnonzero((m > 1e-12) & (arr[:, 0] >= v))
                    terms = [m[i] * y[i] for i in idx]
                    if v == min(limits):
                        fidx = np.flatnonzero(mf > 1e-12)
                        terms += [mf[i] * z[fix_j[i]] for i in fidx]
                    elif limit >= nodes * G:
                        continue  # the same limit as all GPUs, and a subset of its terms
                    if terms:
                        solver.Add(solver.Sum(terms) <= limit * span)
        solver.Maximize(solver.Sum(list(z.values())))
        status = solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            return len(js) / len(requests)  # cannot happen for a feasible LP (z = 0 is feasible)
        return min(1.0, solver.Objective().Value() / len(requests))


def _mandatory(p, r, d, t1: float, t2: float):
    """Seconds of a run of length p inside [t1, t2] however it is placed in its window [r, d]."""
    return np.maximum(0.0, np.minimum.reduce([p, np.full_like(p, t2 - t1), r + p - t1, t2 - d + p]))


__all__ = ["BoundPolicy", "BoundResult"]
