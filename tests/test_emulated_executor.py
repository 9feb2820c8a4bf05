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
