"""Which weights each GPU of a shared pool holds, and what a launch pays to bring in its own.

Policies that use the GPUs as one shared pool (launches without a replica group) pay for the
weights a launch needs that its GPUs do not hold. The simulator charges with this rule and the
pool policies predict with it, so both see the same costs:

- another model on a GPU: a full model load (`model_load_s`, the start cost);
- the same model but a stage whose weights are not resident (a GPU that decoded now diffuses):
  the weights copied from host memory (`CostModel.weights_load_s`), as diffusers' offload does;
- a sequence-parallel launch on GPUs that did not last form that group: a regroup (`regroup_s`).

A GPU keeps the weights of every stage of its model it has run, as long as they fit together
with the launch's activations (`CostModel.launch_memory`); otherwise only the launch's stages.
A GPU's first launch is free (the runtime's start loaded its model: the whole pipeline where it
fits, else the launch's stages).
Offloaded stages (`Launch.offload`) stay in host memory and are charged by the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

from trident_rs.vocab import STAGES, Shape

GPU = tuple[int, int]  # (node, index)


@dataclass(frozen=True)
class Resident:
    model: str
    stages: frozenset[str]
    group: tuple[int, ...] | None  # the GPUs of its last sequence-parallel group (None: never in one)


class WeightResidency:
    """Per-GPU resident weights of a shared pool; `load_s` prices a launch, `record` applies it."""

    def __init__(self, cost, gpu_memory_gb: float, model_load_s: float, regroup_s: float) -> None:
        self.cost, self.gpu_memory_gb = cost, gpu_memory_gb
        self.model_load_s, self.regroup_s = model_load_s, regroup_s
        self.gpus: dict[GPU, Resident] = {}
        self._fits: dict[tuple, bool] = {}

    def load_s(self, model: str, stages: tuple[str, ...], node: int, gpus: tuple[int, ...],
               offload: tuple[str, ...] = ()) -> float:
        """Seconds a pool launch of `stages` of `model` on `gpus` spends loading weights or regrouping."""
        need = set(stages) - set(offload)
        group = tuple(sorted(gpus))
        missing: set[str] = set()
        regroup = False
        for i in gpus:
            held = self.gpus.get((node, i))
            if held is None:
                continue
            if held.model != model:
                return self.model_load_s
            missing |= need - held.stages
            regroup = regroup or (len(gpus) > 1 and held.group not in (None, group))
        load = self._weights_load_s(model, tuple(s for s in STAGES if s in missing)) if missing else 0.0
        return load + (self.regroup_s if regroup else 0.0)

    def record(self, model: str, stages: tuple[str, ...], node: int, gpus: tuple[int, ...], shape: Shape,
               offload: tuple[str, ...] = ()) -> None:
        """`gpus` now hold the launch's weights (and keep their model's others where they fit)."""
        need = frozenset(stages) - frozenset(offload)
        group = tuple(sorted(gpus))
        for i in gpus:
            held = self.gpus.get((node, i))
            keep = need
            if held is None and self._fit(model, frozenset(STAGES), shape, len(gpus)):
                keep = frozenset(STAGES)  # a GPU's first model is loaded whole at the start, where it fits
            elif held is not None and held.model == model and not held.stages <= need:
                union = held.stages | need
                if self._fit(model, union, shape, len(gpus)):
                    keep = union
            # a width-1 launch leaves the GPU's last sequence-parallel group as it was
            last = group if len(gpus) > 1 else (held.group if held is not None else None)
            self.gpus[(node, i)] = Resident(model, keep, last)

    def holds(self, node: int, gpu: int) -> Resident | None:
        return self.gpus.get((node, gpu))

    def _fit(self, model: str, stages: frozenset[str], shape: Shape, width: int) -> bool:
        key = (model, stages, shape, width)
        hit = self._fits.get(key)
        if hit is None:
            fn = getattr(self.cost, "launch_memory", None)
            ordered = tuple(s for s in STAGES if s in stages)
            hit = fn is None or fn(model, ordered, shape, width) <= self.gpu_memory_gb + 1e-9
            self._fits[key] = hit
        return hit

    def _weights_load_s(self, model: str, stages: tuple[str, ...]) -> float:
        fn = getattr(self.cost, "weights_load_s", None)
        return fn(model, stages) if fn is not None else 0.0
