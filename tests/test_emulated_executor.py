"""The emulated executor: sleeps for the predicted time (batch aware) and fakes well-shaped outputs."""
import time

import numpy as np
import pytest

from trident_rs.executors.base import StagePayload, build_executor
from trident_rs.executors.emulated import EmulatedExecutor
from trident_rs.policy.types import Shape
from trident_rs.request import GenerationParams


class FixedCost:
    """Cost model stand-in: 0.05 s per request per step, divided by width."""

    def __init__(self):
        self.calls = []

    def stage_time(self, model, stage, shape, width=1, batch=1, steps=1):
        self.calls.append((model, stage, shape, width, batch, steps))
        return 0.05 * batch * steps / width


def payload(model="sd3", h=256, w=256, frames=None, steps=2, seed=0):
    return StagePayload(GenerationParams(model=model, prompt="p", height=h, width=w, num_frames=frames,
                                         steps=steps, seed=seed).resolved())


def test_sleeps_for_predicted_time_times_scale_and_batch():
    cost = FixedCost()
    ex = build_executor("emulated", "sd3", "diffuse", width=2, time_scale=2.0, cost=cost)
    t0 = time.perf_counter()
    out = ex.run([payload(), payload(seed=1)])
    took = time.perf_counter() - t0
    # 0.05 s × batch 2 × 2 steps / width 2 × scale 2 = 0.2 s
    assert 0.19 <= took < 0.6
    assert cost.calls[-1] == ("sd3", "diffuse", Shape(256, 256, 1), 2, 2, 2)
    assert len(out) == 2 and out[0].meta["diffuse_s"] == pytest.approx(0.2)


def test_stage_outputs_chain_with_the_right_shapes():
    ex = {s: EmulatedExecutor("hunyuanvideo", s, time_scale=0.0, cost=FixedCost()) for s in ("encode", "diffuse", "decode")}
    p = payload("hunyuanvideo", 720, 1280, frames=129)
    for s in ("encode", "diffuse", "decode"):
        (p,) = ex[s].run([p])
        if s == "encode":
            assert p.tensors["prompt_embeds"].dtype == np.float32
        if s == "diffuse":  # (1, 1, latent frames, H/8, W/8): 129 frames -> 33 latent frames
            assert p.tensors["latents"].shape == (1, 1, 33, 90, 160)
    frames = p.tensors["frames"]
    assert frames.shape[0] == 129 and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3


def test_mixed_shapes_in_one_batch_are_refused():
    ex = EmulatedExecutor("sd3", "encode", time_scale=0.0, cost=FixedCost())
    with pytest.raises(ValueError, match="one shape"):
        ex.run([payload(h=256), payload(h=512)])


def test_falls_back_to_the_real_family_then_to_the_estimate():
    class OnlyFamily(FixedCost):
        def stage_time(self, model, *a, **k):
            if model != "sd3":
                raise KeyError(model)
            return 1.5

    assert EmulatedExecutor("tiny-sd3", "decode", cost=OnlyFamily()).predicted_s(Shape(64, 64), 1, 1) == 1.5

    class Nothing(FixedCost):
        def stage_time(self, model, *a, **k):
            raise ValueError("no profile")

    small = EmulatedExecutor("sd3", "diffuse", cost=Nothing()).predicted_s(Shape(256, 256), 4, 1)
    large = EmulatedExecutor("sd3", "diffuse", cost=Nothing()).predicted_s(Shape(2048, 2048), 4, 1)
    assert 0 < small < large


def test_diffuse_runs_a_step_range_and_hands_on_a_chunk_state():
    """Chunks sleep for their share of the steps (+ the boundary cost when resuming) and chain
    through a small numpy chunk state, as the real executors' do (issue 17)."""
    import dataclasses

    from trident_rs.errors import InvalidRequestError
    from trident_rs.models.chunking import LATENTS, RNG, STEP

    cost = FixedCost()
    ex = EmulatedExecutor("sd3", "diffuse", width=1, time_scale=1.0, cost=cost, chunk_boundary_s=0.1)
    p = payload(steps=4)
    p.tensors["prompt_embeds"] = np.ones((1, 8, 16), np.float32)
    t0 = time.perf_counter()
    (first,) = ex.run([dataclasses.replace(p, step_range=(0, 1))])
    took = time.perf_counter() - t0
    assert cost.calls[-1][-1] == 1 and 0.045 <= took < 0.3  # 1 step of 0.05 s, no boundary cost
    assert int(first.tensors[STEP]) == 1 and first.tensors[RNG].dtype == np.uint8
    assert first.tensors[LATENTS].dtype == np.float16 and "latents" not in first.tensors
    assert first.tensors["prompt_embeds"].shape == (1, 8, 16)  # the embeddings go on with the state
    assert all(isinstance(v, np.ndarray) for v in first.tensors.values())
    assert first.meta["diffuse_steps"] == [0, 1]
    t0 = time.perf_counter()
    (last,) = ex.run([dataclasses.replace(first, step_range=(1, 4))])
    took = time.perf_counter() - t0
    assert 0.24 <= took < 0.6  # 3 steps (0.15 s) + the boundary (0.1 s)
    assert set(last.tensors) == {"latents"}  # the last chunk: what decode takes, as one call's
    with pytest.raises(InvalidRequestError, match="step_range"):  # resumes where the state is not
        ex.run([dataclasses.replace(first, step_range=(2, 4))])
    with pytest.raises(InvalidRequestError, match="step_range"):
        ex.run([dataclasses.replace(p, step_range=(0, 5))])
