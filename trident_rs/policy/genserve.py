"""`GenServePolicy`: a step-level baseline after GenServe.

Paper: "GenServe: Efficient Co-Serving of Heterogeneous Diffusion Model Workloads", arXiv
2604.04335 (2026). Built from its public abstract and summaries (the search found no code):
text-to-image and text-to-video requests co-served on shared GPUs; diffusion is preemptible
at denoising-step boundaries; up to +44% SLO attainment over the strongest baseline.

Taken from the paper:
- **Video preemption at step boundaries**: a video's diffuse runs in step chunks; at a chunk
  boundary it may be paused in favour of SLO-critical requests (images) when no GPU is free,
  the videos with the most slack (those still predicted to meet their deadline after the
  pause) going first. Images are not preempted.
- **Elastic sequence parallelism**: each chunk of a video, and each image, gets its own
  degree; a resumed video may run at another degree on other GPUs.
- **Dynamic batching** of images.
- **SLO-aware scheduler by dynamic programming** that allocates the GPUs jointly across all
  concurrent requests, recomputed at every event (arrival, chunk boundary, launch done).

Chosen here, where the public text does not say (or where our runtime differs):
- **Chunk length** `chunk_s` (default 2 s): a video's chunk runs the steps that fit in it at
  its degree (at least one). Images run their whole diffuse in one launch.
- **The DP**: a multiple-choice knapsack over the free GPUs. Each candidate (up to
  `scan_limit`, earliest deadline first, plus the videos standing at a boundary) may wait or
  run at any on-time degree that fits a node. Running on time is worth 1 (plus a small bonus,
  larger for earlier deadlines, so equal counts go earliest-deadline-first, and a smaller
  one for the share of its remaining time the degree saves: spare GPUs go where they shorten
  latency most); waiting is worth 1 if the request still meets its deadline starting one
  chunk (`chunk_s`) later at its widest efficient degree (parallel efficiency >=
  `threshold`), else 0. So a video at a boundary is paused exactly when the GPUs are short and
  its slack covers the pause. A request late at every degree is worth a tiny amount (it uses
  what on-time work leaves); one that has waited past its deadline plus its SLO is worth 0.5:
  it runs before on-time requests that can wait, never instead of one that cannot. Videos at
  a boundary with the most slack are the ones the knapsack leaves waiting, as the paper's
  preemption picks them.
- **Batching**: an image the DP runs takes along same-class images (same model, shape, steps,
  at most `batch_max_pixels`) the DP left waiting, up to the batch size with the best
  throughput (`max_batch`), while every member stays on time and the batch fits in memory.
- **Placement** (shared with TetriServe): a video continues on its own GPUs where it can (no
  transfer, no regroup); GPUs are priced with the runtime's `WeightResidency` rule, a degree
  change is predicted to cost `regroup_s`, and a launch that would load its model onto another
  model's GPUs waits for its own unless it stays on time with the load or they would take
  longer to free. Candidates are scanned `scan_limit` at a time, as in TetriServe.
- **Encode and decode** run as their own launches first, earliest deadline first, at the
  narrowest width that fits memory and keeps the request on time (shared with TetriServe).
- **Bounds**: after `max_preemptions` pauses (default 8), or when its state would not fit in
  `host_memory_gb` (default 512, the engine's budget; the paper keeps a paused video's
  latents on its GPU), a video continues on its own GPUs at its boundary.

Options (strings are coerced; unknown ones raise ConfigError): chunk_s, max_batch,
batch_max_pixels, threshold, scan_limit, max_preemptions, host_memory_gb, regroup_s,
model_load_s, overhead_s, and the options every runtime passes (slo_scale, seed, tick_s,
forecast, workload, models: accepted and unused).
"""
from __future__ import annotations

from trident_rs.policy.batching import best_batch_size
from trident_rs.policy.step_level import (
    COMMON_OPTIONS, EPS_GPU, EPS_RUN, EPS_SPEED, Plan, StepLevelPolicy, _Req, knapsack, parse_options,
)
from trident_rs.policy.types import Cluster, Launch


class GenServePolicy(StepLevelPolicy):
    """Step-boundary video preemption, elastic degrees and an SLO-aware knapsack (GenServe,
    arXiv 2604.04335); see the module docstring."""

    name = "genserve"

    def __init__(self, cluster: Cluster, cost, **options: object) -> None:
        spec = {**COMMON_OPTIONS,
                "chunk_s": (float, 2.0, lambda v: v > 0, "chunk_s > 0"),
                "max_batch": (int, 8, lambda v: v >= 1, "max_batch >= 1"),
                "batch_max_pixels": (int, 512 * 512, lambda v: v >= 0, "batch_max_pixels >= 0")}
        opts = parse_options("genserve", options, spec)
        super().__init__(cluster, cost, opts)
        self.chunk_s, self.max_batch, self.batch_max_pixels = opts["chunk_s"], opts["max_batch"], opts["batch_max_pixels"]
        self._batch_cache: dict[tuple, int] = {}

    @staticmethod
    def _video(r: _Req) -> bool:
        return r.request.shape.frames > 1

    def _chunk_steps(self, plan: Plan, now: float) -> int:
        r = plan.req
        if not self._video(r):
            return r.left
        step = self._time(r.request.model, "diffuse", r.request.shape, plan.width)
        return max(1, int(self.chunk_s / step))

    def _candidates(self, now: float, first: bool = True) -> list[_Req]:
        out = super()._candidates(now)
        if not first:
            return out
        seen = {r.request.id for r in out}
        for rid in self.boundary:  # videos at a boundary: continue or pause, always decided
            r = self.reqs[rid]
            if rid not in seen and not r.running:
                out.append(r)
                seen.add(rid)
        return out

    def _pack_once(self, now: float, free: dict[int, set[int]], launches: list[Launch], cands: list[_Req]) -> None:
        cands.sort(key=lambda r: r.request.deadline + (r.request.slo_s if r.late else 0.0))
        block = max(len(g) for g in free.values())
        items, info = [], []
        n = len(cands)
        for rank, r in enumerate(cands):
            times = self._times(r, now, free, self.chunk_s if self._video(r) else 0.0)
            widths = [k for k in times if k <= block]
            options, on_time = self._values(r, rank, n, now, times, widths, self.chunk_s)
            if on_time:
                slowest = times[min(on_time)]
                for k in on_time:
                    options.append((k, 1.0 + EPS_RUN * (2.0 - rank / n)
                                    + EPS_SPEED * (1.0 - times[k] / slowest) - EPS_GPU * k))
            items.append(options)
            info.append((r, on_time, times))
        capacity = min(sum(len(g) for g in free.values()), sum(max(w for w, _ in o) for o in items))
        picks = knapsack(items, capacity)
        chosen, waiting = [], []
        for i, ((r, on_time, times), j) in enumerate(zip(info, picks)):
            if j == 0:
                waiting.append(r)
                continue
            k = items[i][j][0]
            chosen.append((r, k, bool(on_time), sorted(on_time, key=lambda w: (abs(w - k), w)), times))
        plans, _ = self._place_plans(chosen, free, now)
        for p in plans:
            if p.on_time and not self._video(p.req) and p.req.done == 0:
                self._batch(p, waiting, now)
            launches.append(self._emit(p, now))

    def _batch(self, p: Plan, waiting: list[_Req], now: float) -> None:
        """Same-class images the DP left waiting join `p` while all stay on time."""
        req = p.req.request
        if req.shape.pixels > self.batch_max_pixels:
            return
        size = self._best_batch(req, p.width)
        mem = getattr(self.cost, "launch_memory", None)
        while size > 1 and mem is not None and mem(req.model, ("diffuse",), req.shape, p.width, size) \
                > self.cluster.gpu_memory_gb:
            size //= 2
        mates = sorted((q for q in waiting if q.done == 0 and not q.running and
                        (q.request.model, q.request.shape, q.request.steps) == (req.model, req.shape, req.steps)),
                       key=lambda q: q.request.deadline)
        for b in range(min(size, 1 + len(mates)), 1, -1):  # the largest batch that keeps its members on time
            run = self._time(req.model, "diffuse", req.shape, p.width, b) * req.steps
            end = now + p.load + run + self.overhead_s + self._after(req, 1)
            ok = [q for q in mates if q.request.deadline >= end]
            if req.deadline >= end and len(ok) >= b - 1:
                p.companions = ok[:b - 1]
                for q in p.companions:
                    waiting.remove(q)
                return

    def _best_batch(self, req, width: int) -> int:
        key = (req.model, req.shape, req.steps, width)
        b = self._batch_cache.get(key)
        if b is None:
            b = self._batch_cache[key] = best_batch_size(
                lambda size: self._time(req.model, "diffuse", req.shape, width, size), self.max_batch)
        return b
