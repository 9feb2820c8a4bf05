"""Emulated stage executor: sleeps for the cost model's predicted time and returns fake tensors.

It lets the real Ray Serve runtime (deployments, routing, batching, re-shaping) run on a laptop
with fake GPUs (`ray start --head --num-gpus=16`). Outputs have the right *kind* of shape so the
stages chain and the media encoders work, but are tiny: latents in float16 with one channel,
frames as a 16×16 gray picture per output frame.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from trident_rs.errors import TridentError
from trident_rs.executors.base import StageExecutor, StagePayload
from trident_rs.models.spec import get_spec
from trident_rs.policy.types import Shape, Stage

FRAME_SIDE = 16
GRAY = 128


def _default_cost() -> Any:
    """The shared cost model when it is available (trident_rs.policy.cost_model), else None."""
    try:
        from trident_rs.policy.cost_model import CostModel

        return CostModel.default()
    except (ImportError, TridentError):  # no cost model or no shipped profile
        return None


def fallback_stage_time(model: str, stage: Stage, shape: Shape, width: int, batch: int, steps: int) -> float:
    """A rough analytic stand-in used only when no cost model is installed (seconds)."""
    spec = get_spec(model)
    tokens = spec.tokens(shape.height, shape.width, shape.frames)
    if stage == "encode":
        return 0.02 * batch
    if stage == "decode":
        return 2e-7 * shape.pixels * batch
    per_step = (2e-5 * tokens + 4e-10 * tokens**2) * batch
    return steps * per_step / (width ** 0.85)


def predict_stage_s(cost: Any, model: str, stage: Stage, shape: Shape, width: int = 1,
                    batch: int = 1, steps: int = 1) -> float:
    """`cost.stage_time` for the model (or the real family it stands in for), else the fallback."""
    if cost is not None:
        spec = get_spec(model)
        for name in dict.fromkeys((model, spec.profile_model or spec.family)):
            try:
                return float(cost.stage_time(name, stage, shape, width=width, batch=batch, steps=steps))
            except (KeyError, ValueError):  # ProfileError is a ValueError
                continue
    return fallback_stage_time(model, stage, shape, width, batch, steps)


class EmulatedExecutor(StageExecutor):
    """Runs no model: sleeps for `cost.stage_time(...) × time_scale` and fakes the outputs."""

    def __init__(self, model: str, stage: Stage, width: int = 1, time_scale: float = 1.0, cost: Any = None):
        self.model = model
        self.stage = stage
        self.width = width
        self.time_scale = time_scale
        self.spec = get_spec(model)
        self.cost = cost if cost is not None else _default_cost()

    def predicted_s(self, shape: Shape, steps: int, batch: int) -> float:
        """Predicted wall time of one call on a batch of `batch` requests of `shape`."""
        return predict_stage_s(self.cost, self.model, self.stage, shape, self.width, batch, steps)

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        if not batch:
            return []
        shapes = {(p.params.shape, p.params.steps) for p in batch}
        if len(shapes) != 1:
            raise ValueError(f"a batch must share one shape and step count, got {sorted(map(str, shapes))}")
        shape, steps = shapes.pop()
        seconds = self.predicted_s(shape, steps or 1, len(batch)) * self.time_scale
        time.sleep(max(0.0, seconds))
        return [
            StagePayload(p.params, self._outputs(shape), {**p.meta, f"{self.stage}_s": seconds})
            for p in batch
        ]

    def _outputs(self, shape: Shape) -> dict[str, np.ndarray]:
        spec = self.spec
        if self.stage == "encode":
            return {"prompt_embeds": np.zeros((1, 8, 16), np.float32)}
        if self.stage == "diffuse":
            lat_frames = 1 if shape.frames <= 1 else (shape.frames - 1) // spec.temporal_compression + 1
            h = math.ceil(shape.height / spec.vae_scale)
            w = math.ceil(shape.width / spec.vae_scale)
            return {"latents": np.zeros((1, 1, lat_frames, h, w), np.float16)}
        return {"frames": np.full((shape.frames, FRAME_SIDE, FRAME_SIDE, 3), GRAY, np.uint8)}


def make_executor(
    model: str, stage: Stage, width: int = 1, time_scale: float = 1.0, cost: Any = None, **_: Any
) -> EmulatedExecutor:
    return EmulatedExecutor(model, stage, width=width, time_scale=time_scale, cost=cost)
