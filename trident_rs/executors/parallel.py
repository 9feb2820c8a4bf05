"""Executor kind "xfuser" (`build_executor("xfuser", model, stage, width=k)`): picks the executor
for a stage and width.

- diffuse at width k > 1: `sequence_parallel.SequenceParallelDiffuseExecutor` (xDiT);
- decode: `vae_decode` (tiled when the shape would not fit one device; patch-parallel at k > 1);
- encode, and diffuse at width 1: the single-device diffusers executor.
"""
from __future__ import annotations

from typing import Any

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StageExecutor
from trident_rs.executors.diffusers_stages import DiffusersStageExecutor
from trident_rs.executors.sequence_parallel import SequenceParallelDiffuseExecutor
from trident_rs.executors.vae_decode import make_decode_executor
from trident_rs.vocab import Stage

# options that only width > 1 (or the decode executor) takes; the width-1 executor drops them
_GROUP_OPTIONS = ("cfg_parallel", "gpus_per_rank", "timeout_s", "place_timeout_s", "gpu_memory_gb")


def make_executor(model: str, stage: Stage, width: int = 1, **options: Any) -> StageExecutor:
    """Sequence-parallel diffuse and patch-parallel decode at width > 1; memory-aware (tiled when
    needed) decode and the single-device diffusers executor at width 1."""
    if stage == "diffuse" and width > 1:
        return SequenceParallelDiffuseExecutor(model, width, **options)
    if stage == "decode":
        return make_decode_executor(model, width, **options)
    if width > 1:
        raise ConfigError(f"{stage} runs at width 1 only, got width {width}")
    return DiffusersStageExecutor(model, stage, **{k: v for k, v in options.items() if k not in _GROUP_OPTIONS})
