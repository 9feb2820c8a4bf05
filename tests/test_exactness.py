"""Split execution (encode, diffuse, decode, each in its own executor) equals the monolithic
diffusers pipeline for the same prompt and seed, and a batch of N equals N single runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trident_rs.models.loading import load_pipeline
from trident_rs.models.spec import get_spec
from trident_rs.models.tiny import tiny_models
from trident_rs.pipeline_runner import LocalPipeline
from trident_rs.request import GenerationParams

TOL = 1e-5
# Batching changes float32 rounding, not results: MKL's sgemm picks kernels by the row count, so
# a (6, 256) @ W product differs from its (2, 256) slice by ~2e-5 (measured; exactly 0 under
# MKL_CBWR=COMPATIBLE). Through 2 denoising steps and a random VAE that is up to ~1.2e-5 in pixels.
BATCH_TOL = 5e-5
STEPS = 2
# Every family's tiny model -> extra request fields (videos: 9 frames).
MODELS = {m: ({"num_frames": 9} if get_spec(m).is_video else {}) for m in tiny_models()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return request.param


_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def pipelines(model):
    """(split runner with three freshly built stage executors, monolithic pipeline)."""
    if model not in _CACHE:
        _CACHE[model] = (LocalPipeline(model, options={"keep_float": True}), load_pipeline(model))
    return _CACHE[model]


def _params(model: str, **kw) -> GenerationParams:
    fields = {"prompt": "a red cube", "steps": STEPS, "seed": 0, **MODELS[model], **kw}
    return GenerationParams(model=model, **fields).resolved()


def _monolithic(pipe, p: GenerationParams) -> np.ndarray:
    """The one-call diffusers pipeline's float output, (F, H, W, 3)."""
    kwargs = dict(prompt=p.prompt, negative_prompt=p.negative_prompt or None, height=p.height, width=p.width,
                  num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
                  generator=torch.Generator().manual_seed(p.seed), output_type="np")
    if p.num_frames > 1:
        return pipe(num_frames=p.num_frames, **kwargs).frames[0]
    return pipe(**kwargs).images  # (1, H, W, 3)


def _float_frames(runner: LocalPipeline, params: list[GenerationParams]) -> list[np.ndarray]:
    return [out.tensors["frames_float"] for out in runner.run(params)]


@pytest.mark.parametrize("variant", [
    {},
    {"negative_prompt": "a blue cat", "seed": 3},
    {"guidance_scale": 1.0},  # guidance <= 1 turns CFG off (FLUX, HunyuanVideo: embedded guidance 1)
])
def test_split_equals_monolithic(model, pipelines, variant):
    runner, pipe = pipelines
    p = _params(model, **variant)
    (split,) = _float_frames(runner, [p])
    reference = _monolithic(pipe, p)
    assert split.shape == reference.shape == (p.num_frames, p.height, p.width, 3)
    assert np.abs(split - reference).max() <= TOL


def test_uint8_frames_round_the_float_output(model, pipelines):
    runner, _ = pipelines
    (out,) = runner.run([_params(model)])
    frames = out.tensors["frames"]
    assert frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, (out.tensors["frames_float"] * 255).round().astype(np.uint8))
    assert set(out.meta["timings_s"]) == {"encode", "diffuse", "decode"}


def test_batch_equals_singles(model, pipelines):
    runner, _ = pipelines
    params = [_params(model, seed=s, prompt=pr) for s, pr in [(0, "a red cube"), (7, "a blue cat"), (7, "a dog")]]
    batched = runner.run(params)
    assert all(out.meta["batch_sizes"] == {"encode": 3, "diffuse": 3, "decode": 3} for out in batched)
    for p, out in zip(params, batched):
        (single,) = _float_frames(runner, [p])
        assert np.abs(out.tensors["frames_float"] - single).max() <= BATCH_TOL
    # Requests differ: the batch did not just repeat one result.
    a, b, c = (out.tensors["frames_float"] for out in batched)
    assert np.abs(a - b).max() > 1e-3 and np.abs(b - c).max() > 1e-3


def test_mixed_shapes_in_one_call_are_grouped(model, pipelines):
    runner, _ = pipelines
    small, large = _params(model), _params(model, height=80, width=96)
    outs = runner.run([small, large])
    assert outs[0].tensors["frames"].shape[1:3] == (64, 64)
    assert outs[1].tensors["frames"].shape[1:3] == (80, 96)
    assert outs[0].meta["batch_sizes"]["diffuse"] == 1
