"""Emulated stage executor: sleeps for the cost model's predicted time and returns fake tensors.

It lets the real Ray Serve runtime (deployments, routing, batching, re-shaping) run on a laptop
with fake GPUs (`ray start --head --num-gpus=16`). Outputs have the right *kind* of shape so the
stages chain and the media encoders work, but are tiny: latents in float16 with one channel,
frames as a 16×16 gray picture per output frame. `payload_kb` (executor option) pads the
encode and diffuse outputs with that many KiB, so that they go to the object store of the node
that made them (Ray inlines objects under 100 KiB into their owner) as real latents do: the
node-loss tests and benchmarks need outputs that can be lost with their node.

Diffuse honours `StagePayload.step_range=(a, b)` as the real executors do
(`trident_rs.models.chunking`): it sleeps for the predicted time of `b - a` steps, plus
`chunk_boundary_s` (× `time_scale`) when it resumes a request (a > 0: restoring the latents and
solver state, as the simulator charges it), checks that the payload's chunk state is at step `a`,
and returns, for a chunk that ends before the last step, the input tensors plus a small chunk
state (`chunk/step`, `chunk/latents`, `chunk/rng_state`, `chunk/scheduler_class`, all numpy); the
chunk that ends at the last step returns `{"latents": ...}` like a one-call diffuse.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from trident_rs.errors import InvalidRequestError
from trident_rs.executors.base import StageExecutor, StagePayload
from trident_rs.models.chunking import CHUNK, LATENTS, RNG, SCHEDULER_CLASS, STEP, check_step_range
from trident_rs.models.spec import get_spec
from trident_rs.policy.adapters import ADAPTER_LOAD_S, AdapterResidency
from trident_rs.policy.payload_size import CHUNK_BOUNDARY_S
from trident_rs.policy.stage_estimate import default_cost_model, predict_stage_s
from trident_rs.vocab import Shape, Stage

FRAME_SIDE = 16
GRAY = 128
EMULATED_SCHEDULER = "EmulatedScheduler"
RNG_BYTES = 16  # a stand-in for the generator state (the real one is torch's, ~5 KB)


class EmulatedExecutor(StageExecutor):
    """Runs no model: sleeps for `cost.stage_time(...) × time_scale` and fakes the outputs.
    With `lora_slots`, a diffuse executor keeps an LRU of that many LoRA adapters (names only)
    and sleeps `adapter_load_s × time_scale` more per adapter a batch needs and it lacks; the
    payload's meta counts them (`diffuse_adapter_loads`, `diffuse_adapter_hits`)."""

    def __init__(self, model: str, stage: Stage, width: int = 1, time_scale: float = 1.0, cost: Any = None,
                 lora_slots: int | None = None, adapter_load_s: float = ADAPTER_LOAD_S,
                 chunk_boundary_s: float = CHUNK_BOUNDARY_S, payload_kb: int = 0):
        self.model = model
        self.chunk_boundary_s = float(chunk_boundary_s)
        self.payload_kb = int(payload_kb)
        self.stage = stage
        self.width = width
        self.time_scale = time_scale
        self.spec = get_spec(model)
        self.cost = cost if cost is not None else default_cost_model()
        self.adapters = AdapterResidency(lora_slots, adapter_load_s) if lora_slots and stage == "diffuse" else None

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
        ranges = [self._range(p, steps or 1) for p in batch]
        if len(set(ranges)) != 1:
            raise InvalidRequestError("step_range", f"a batch must run one step range, got {sorted(set(ranges))}")
        a, b = ranges[0]
        seconds = self.predicted_s(shape, b - a, len(batch)) * self.time_scale
        if a > 0:  # resumes a request: its state is restored
            seconds += self.chunk_boundary_s * self.time_scale
        extra: dict[str, Any] = {}
        if self.adapters is not None:
            names = sorted({r.name for p in batch for r in p.params.lora})
            loads = self.adapters.use("self", names)
            seconds += loads * self.adapters.load_s * self.time_scale
            extra = {f"{self.stage}_adapter_loads": loads, f"{self.stage}_adapter_hits": len(names) - loads}
        time.sleep(max(0.0, seconds))
        out = []
        for p in batch:
            tensors = self._outputs(shape)
            if self.stage == "diffuse" and b < (steps or 1):  # a chunk short of the last step
                tensors = self._chunk_state(p, tensors["latents"], b)
            meta = {**p.meta, f"{self.stage}_s": seconds, **extra}
            if self.stage == "diffuse" and p.step_range is not None:
                meta["diffuse_steps"] = [a, b]
            out.append(StagePayload(p.params, tensors, meta))
        return out

    def _range(self, p: StagePayload, steps: int) -> tuple[int, int]:
        """Steps [a, b) this call runs for `p` (all but diffuse: the whole stage)."""
        if self.stage != "diffuse":
            return 0, steps
        return check_step_range(p.tensors, p.step_range, steps)

    @staticmethod
    def _chunk_state(p: StagePayload, latents: np.ndarray, b: int) -> dict[str, np.ndarray]:
        """The input tensors (embeddings) plus the state at step `b`, all numpy, as the real
        executors return it (`trident_rs.models.chunking`), only smaller."""
        kept = {k: v for k, v in p.tensors.items() if not k.startswith(CHUNK)}
        return {**kept, STEP: np.asarray(b, np.int64), LATENTS: latents,
                RNG: np.zeros(RNG_BYTES, np.uint8), SCHEDULER_CLASS: np.asarray(EMULATED_SCHEDULER)}

    def _outputs(self, shape: Shape) -> dict[str, np.ndarray]:
        out = self._fake_outputs(shape)
        if self.payload_kb > 0 and self.stage != "decode":
            out["pad"] = np.ones(self.payload_kb * 1024, np.uint8)
        return out

    def _fake_outputs(self, shape: Shape) -> dict[str, np.ndarray]:
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
    model: str, stage: Stage, width: int = 1, time_scale: float = 1.0, cost: Any = None,
    lora_slots: int | None = None, adapter_load_s: float = ADAPTER_LOAD_S,
    chunk_boundary_s: float = CHUNK_BOUNDARY_S, payload_kb: int = 0, **_: Any
) -> EmulatedExecutor:
    return EmulatedExecutor(model, stage, width=width, time_scale=time_scale, cost=cost,
                            lora_slots=lora_slots, adapter_load_s=adapter_load_s, chunk_boundary_s=chunk_boundary_s,
                            payload_kb=payload_kb)
