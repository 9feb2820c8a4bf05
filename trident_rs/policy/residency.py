"""Which weights each GPU of a shared pool holds, and what a launch pays to bring in its own.

Policies that use the GPUs as one shared pool (launches without a replica group) pay for the
weights a launch needs that its GPUs do not hold. The simulator charges with this rule and the
pool policies predict with it, so both see the same costs:

- a model the GPU holds no weights of: a full model load (`model_load_s`, the start cost);
- the same model but a stage whose weights are not resident (a GPU that decoded now diffuses):
  the weights copied from host memory (`CostModel.weights_load_s`), as diffusers' offload does;
- a sequence-parallel launch on GPUs that did not last form that group: a regroup (`regroup_s`).

A GPU keeps the weights it has loaded (its model's other stages, other models' stages: the most
recently run first) as long as they fit beside the launch's own peak (`CostModel.launch_memory`);
what does not fit is dropped.
A GPU's first launch is free (the runtime's start loaded its model: the whole pipeline where it
fits, else the launch's stages).
Offloaded stages (`Launch.offload`) stay in host memory and are charged by the runtime.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from trident_rs.vocab import STAGES, Shape

GPU = tuple[int, int]  # (node, index)
# Seconds to form a new sequence-parallel group: a stated guess (Hetu-DiT's switch_parallel_env
# + hotspa_model); `SimConfig(regroup_s=...)` varies it.
DEFAULT_REGROUP_S = 1.0


@dataclass(frozen=True)
class Resident:
    weights: tuple[tuple[str, frozenset[str]], ...]  # (model, stages) held, the last run first
    group: tuple[int, ...] | None  # the GPUs of its last sequence-parallel group (None: never in one)

    @property
    def model(self) -> str:
        """The model the GPU ran last."""
        return self.weights[0][0]

    def stages_of(self, model: str) -> frozenset[str] | None:
        """The stages of `model` whose weights the GPU holds (None: not loaded at all)."""
        for m, stages in self.weights:
            if m == model:
                return stages
        return None


class WeightResidency:
    """Per-GPU resident weights of a shared pool; `load_s` prices a launch, `record` applies it."""

    def __init__(self, cost, gpu_memory_gb: float, model_load_s: float, regroup_s: float) -> None:
        self.cost, self.gpu_memory_gb = cost, gpu_memory_gb
        self.model_load_s, self.regroup_s = model_load_s, regroup_s
        self.gpus: dict[GPU, Resident] = {}
        self._peaks: dict[tuple, float] = {}

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
            stages = held.stages_of(model)
            if stages is None:
                return self.model_load_s
            missing |= need - stages
            regroup = regroup or (len(gpus) > 1 and held.group not in (None, group))
        load = self._weights_load_s(model, tuple(s for s in STAGES if s in missing)) if missing else 0.0
        return load + (self.regroup_s if regroup else 0.0)

    def record(self, model: str, stages: tuple[str, ...], node: int, gpus: tuple[int, ...], shape: Shape,
               offload: tuple[str, ...] = ()) -> None:
        """`gpus` now hold the launch's weights, and keep the other weights they held (their
        model's other stages, other models' stages; the most recently run first) where those
        fit beside the launch."""
        need = frozenset(stages) - frozenset(offload)
        group = tuple(sorted(gpus))
        width = len(gpus)
        for i in gpus:
            held = self.gpus.get((node, i))
            keep = need
            if held is None:
                if self._fit(model, frozenset(STAGES), shape, width):
                    keep = frozenset(STAGES)  # a GPU's first model is loaded whole at the start, where it fits
                weights = ((model, keep),)
            else:
                mine = held.stages_of(model)
                if mine is not None and not mine <= need and self._fit(model, mine | need, shape, width):
                    keep = mine | need
                weights = ((model, keep),)
                room = self.gpu_memory_gb - self._peak(model, keep, shape, width)
                for m, kept in held.weights:
                    size = sum(self._weights_gb(m, s) for s in kept)
                    if m != model and size <= room:
                        weights += ((m, kept),)
                        room -= size
            # a width-1 launch leaves the GPU's last sequence-parallel group as it was
            last = group if width > 1 else (held.group if held is not None else None)
            self.gpus[(node, i)] = Resident(weights, last)

    def holds(self, node: int, gpu: int) -> Resident | None:
        return self.gpus.get((node, gpu))

    def first_free_for(self, model: str, width: int, nodes: Iterable[int], gpus_per_node: int,
                       busy_until: dict[GPU, float], now: float) -> float:
        """Earliest time `width` GPUs of one of `nodes` that hold `model` (or nothing) are free,
        from each GPU's predicted end of its launch (`busy_until`); inf if no node has that many."""
        best = float("inf")
        for n in nodes:
            times = []
            for i in range(gpus_per_node):
                held = self.gpus.get((n, i))
                if held is None or held.stages_of(model) is not None:
                    times.append(max(now, busy_until.get((n, i), now)))
            if len(times) >= width:
                best = min(best, sorted(times)[width - 1])
        return best

    def _fit(self, model: str, stages: frozenset[str], shape: Shape, width: int) -> bool:
        return self._peak(model, stages, shape, width) <= self.gpu_memory_gb + 1e-9

    def _peak(self, model: str, stages: frozenset[str], shape: Shape, width: int) -> float:
        """Peak memory per GPU of running `stages` of `model` with all their weights resident."""
        key = (model, stages, shape, width)
        peak = self._peaks.get(key)
        if peak is None:
            fn = getattr(self.cost, "launch_memory", None)
            ordered = tuple(s for s in STAGES if s in stages)
            peak = self._peaks[key] = 0.0 if fn is None else float(fn(model, ordered, shape, width))
        return peak

    def _weights_gb(self, model: str, stage: str) -> float:
        fn = getattr(self.cost, "weights_gb", None)
        return float(fn(model, stage)) if fn is not None else 0.0

    def _weights_load_s(self, model: str, stages: tuple[str, ...]) -> float:
        fn = getattr(self.cost, "weights_load_s", None)
        return fn(model, stages) if fn is not None else 0.0
