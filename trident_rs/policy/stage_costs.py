"""`StageCosts`: the cost model's answers a dispatcher asks at every decision, cached per class
of stage. Which widths a stage may run at (memory, the node, the widths a runtime deployed), how
long it takes at a width and batch, and the batch size with the best throughput. The shared
pool (`stage_pool`) and the step-level baselines (`step_level`) ask the same questions thousands
of times per second of simulated time; the cost model's answer never changes within a run."""
from __future__ import annotations

from trident_rs.policy.baselines import feasible_widths
from trident_rs.policy.batching import best_batch_size
from trident_rs.policy.types import Cluster, Shape


class StageCosts:
    def __init__(self, cost, cluster: Cluster, widths: dict[str, frozenset[int]] | None = None,
                 max_batch: int = 1) -> None:
        """`widths`: stage -> the widths a runtime deployed (None: all the cost model has)."""
        self.cost, self.cluster, self.widths, self.max_batch = cost, cluster, widths, max_batch
        self._feasible: dict[tuple, tuple[int, ...]] = {}
        self._time: dict[tuple, float] = {}
        self._batch: dict[tuple, int] = {}

    def feasible(self, model: str, stage: str, shape: Shape) -> tuple[int, ...]:
        """Widths `stage` runs at, that fit in memory, within a node (the widest if none fits),
        among the deployed ones (none of those fits: the widest deployed)."""
        k = (model, stage, shape)
        out = self._feasible.get(k)
        if out is None:
            out = feasible_widths(self.cost, self.cluster, model, stage, shape)
            allowed = self.widths.get(stage) if self.widths is not None else None
            if allowed:
                out = tuple(w for w in out if w in allowed) or (max(allowed),)
            self._feasible[k] = out
        return out

    def time(self, model: str, stage: str, shape: Shape, width: int, steps: int = 1, batch: int = 1) -> float:
        """Seconds of `stage` at `width` and `batch`; a diffuse of `steps` steps."""
        k = (model, stage, shape, width, steps, batch)
        t = self._time.get(k)
        if t is None:
            t = self._time[k] = float(self.cost.stage_time(model, stage, shape, width, batch,
                                                           steps if stage == "diffuse" else 1))
        return t

    def best_batch(self, model: str, stage: str, shape: Shape, width: int, steps: int) -> int:
        """The batch size (<= `max_batch`) with the best throughput."""
        k = (model, stage, shape, width, steps)
        b = self._batch.get(k)
        if b is None:
            b = self._batch[k] = best_batch_size(lambda size: self.time(model, stage, shape, width, steps, size),
                                                 self.max_batch)
        return b


__all__ = ["StageCosts"]
