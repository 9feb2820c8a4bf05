"""The one executor interface, and the factory that picks an implementation by kind."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trident_rs.errors import ConfigError
from trident_rs.request import GenerationParams
from trident_rs.vocab import Stage


@dataclass
class StagePayload:
    """What travels between stages: the (resolved) request plus the previous stage's tensors.

    encode: tensors = {} in, prompt embeddings out
    diffuse: embeddings in, {"latents": ...} out
    decode: latents in, {"frames": uint8 array (F, H, W, 3)} out

    Diffuse may run a range of steps: `step_range=(a, b)` runs steps [a, b) of `params.steps`
    (None: all). A chunk that stops before the last step returns the embeddings plus the chunk
    state at b ("chunk/..." tensors, see `trident_rs.models.chunking`); give that payload
    `step_range=(b, c)` to go on. The chunk ending at the last step returns {"latents": ...}.
    """

    params: GenerationParams
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # timings, stage that produced it, ...
    step_range: tuple[int, int] | None = None  # diffuse only


class StageExecutor(ABC):
    """Runs one stage of one model. Same-shape payloads may be batched in one call."""

    stage: Stage
    model: str

    @abstractmethod
    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        """Run the stage on a batch; returns one payload per input, in order."""


# kind -> module that defines `make_executor(model, stage, **options) -> StageExecutor`
EXECUTOR_KINDS = {
    "diffusers": "trident_rs.executors.diffusers_stages",
    "emulated": "trident_rs.executors.emulated",
    # width 1 as "diffusers"; diffuse (and decode) at width > 1 on k ranks with xDiT (the gpu extra)
    "xfuser": "trident_rs.executors.parallel",
}


def build_executor(kind: str, model: str, stage: Stage, **options: Any) -> StageExecutor:
    if kind not in EXECUTOR_KINDS:
        raise ConfigError(f"unknown executor kind {kind!r}; choose from {sorted(EXECUTOR_KINDS)}")
    module = importlib.import_module(EXECUTOR_KINDS[kind])
    return module.make_executor(model, stage, **options)
