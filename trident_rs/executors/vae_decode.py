"""Decode of large outputs: tiled on one device, patch-parallel (DistVAE) across k.

`build_executor("xfuser", model, "decode", width=k)`:
- width 1 — `MemoryAwareDecodeExecutor`: the single-device diffusers decode, switched to the
  VAE's tiled decode (`vae.enable_tiling()`) for shapes whose predicted peak memory
  (`CostModel.min_width(model, "decode", shape, gpu_memory_gb)`) does not fit one device. Tiling
  blends overlapping tiles, so its frames differ slightly from the untiled decode; small shapes
  keep the exact untiled path.
- width k > 1 — `PatchParallelDecodeExecutor`: k rank actors in one process group, each VAE
  decoder sharded over the group by DistVAE (installed with xfuser, the `gpu` extra); the
  frames equal the single-device decode.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StageExecutor, StagePayload
from trident_rs.executors.sequence_parallel import ParallelLayout, RankGroupExecutor
from trident_rs.vocab import Shape, Stage

MODES = ("full", "tiled", "patch-parallel")


def device_memory_gb() -> float | None:
    """Memory of this process's GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def needs_tiling(model: str, shape: Shape, gpu_memory_gb: float, cost_model: Any = None) -> bool:
    """Whether the cost model predicts that an untiled decode of `shape` does not fit one device."""
    from trident_rs.policy.cost_model import CostModel, DoesNotFitError

    cm = cost_model or CostModel.default()
    try:
        return cm.min_width(model, "decode", shape, gpu_memory_gb) > 1
    except DoesNotFitError:
        return True


class MemoryAwareDecodeExecutor(StageExecutor):
    """Single-device decode that tiles the shapes the cost model says would not fit.

    Options: those of the diffusers executor, plus `gpu_memory_gb` (default: this GPU's memory,
    else the cost model's hardware) and `cost_model` (default: the shipped one).
    """

    stage: Stage = "decode"

    def __init__(self, model: str, *, gpu_memory_gb: float | None = None, cost_model: Any = None, **options: Any):
        from trident_rs.executors.diffusers_stages import DiffusersStageExecutor
        from trident_rs.policy.cost_model import CostModel

        self.model = model
        self.cost_model = cost_model or CostModel.default()
        self.gpu_memory_gb = gpu_memory_gb or device_memory_gb() or self.cost_model.gpu_memory_gb
        self.inner = DiffusersStageExecutor(model, "decode", **options)
        self.vae = self.inner.pipe.vae

    def mode(self, shape: Shape) -> str:
        return "tiled" if needs_tiling(self.model, shape, self.gpu_memory_gb, self.cost_model) else "full"

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        out: list[StagePayload | None] = [None] * len(batch)
        by_mode: dict[str, list[int]] = {}
        for i, p in enumerate(batch):
            by_mode.setdefault(self.mode(p.params.resolved().shape), []).append(i)
        for mode, indices in by_mode.items():
            if mode == "tiled":
                self.vae.enable_tiling()
            try:
                results = self.inner.run([batch[i] for i in indices])
            finally:
                self.vae.disable_tiling()
            for i, r in zip(indices, results):
                r.meta["decode_mode"] = mode
                out[i] = r
        return out  # type: ignore[return-value]


class PatchParallelDecodeExecutor(RankGroupExecutor):
    """Decode on `width` ranks with the VAE decoder sharded by DistVAE. Options as
    `RankGroupExecutor` (`source`, `dtype`, `gpus_per_rank`, `timeout_s`)."""

    def __init__(self, model: str, width: int, **options: Any):
        if importlib.util.find_spec("distvae") is None:
            raise ConfigError(
                f"decode at width {width} needs DistVAE, which is not installed: "
                "pip install 'trident_rs[gpu]' (xfuser brings it)")
        super().__init__(model, "decode", ParallelLayout(width=width, ulysses=1), **options)

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        out = super().run(batch)
        for p in out:
            p.meta["decode_mode"] = "patch-parallel"
        return out


def make_decode_executor(model: str, width: int = 1, **options: Any) -> StageExecutor:
    if width > 1:
        options = {k: v for k, v in options.items() if k not in ("gpu_memory_gb", "cost_model", "cfg_parallel")}
        return PatchParallelDecodeExecutor(model, width, **options)
    options = {k: v for k, v in options.items()
               if k not in ("cfg_parallel", "gpus_per_rank", "timeout_s", "place_timeout_s")}
    return MemoryAwareDecodeExecutor(model, **options)
