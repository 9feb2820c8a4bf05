"""The one local-generation path: the three stage executors one after another, in process.

Used by `trident generate` (the CLI), the tests and the benchmarks; the served path is `trident_rs.serve`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trident_rs.executors.base import StageExecutor, StagePayload, build_executor
from trident_rs.request import GenerationParams
from trident_rs.vocab import STAGES


@dataclass
class LocalPipeline:
    """Encode, diffuse and decode executors of one model, each loaded on its own."""

    model: str
    kind: str = "diffusers"
    options: dict[str, Any] = field(default_factory=dict)
    executors: dict[str, StageExecutor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage in STAGES:
            if stage not in self.executors:
                self.executors[stage] = build_executor(self.kind, self.model, stage, **self.options)

    def run(self, params: list[GenerationParams], inputs: list[dict[str, np.ndarray]] | None = None
            ) -> list[StagePayload]:
        """All requests through all stages; the decode payloads carry "frames" and timings.
        `inputs`: per request, the encode stage's input tensors (an edit's image and mask)."""
        inputs = inputs or [{} for _ in params]
        batch = [StagePayload(params=p.resolved(), tensors=dict(t)) for p, t in zip(params, inputs)]
        for stage in STAGES:
            batch = self.executors[stage].run(batch)
        return batch


def generate_payload(params: GenerationParams, kind: str = "diffusers", **options: Any) -> StagePayload:
    """One request through freshly built executors; the decode stage's payload."""
    resolved = params.resolved()  # typed errors before loading anything
    return LocalPipeline(resolved.model, kind, options).run([resolved])[0]


def generate(params: GenerationParams, kind: str = "diffusers", **options: Any) -> np.ndarray:
    """uint8 frames (F, H, W, 3) for one request."""
    return generate_payload(params, kind, **options).tensors["frames"]
