"""Issue 19 parts 2-3: LoRA adapters on the stage-split executors, against diffusers itself.

A tiny random LoRA is made here with peft (non-zero random lora_B, so it changes the output) on the
tiny transformer's attention projections, plus (SD3) the first CLIP text encoder's, and saved with
the pipeline class's `save_lora_weights`. A request with it and a scale, run through the three
stage executors, equals the one-call pipeline with the adapter loaded and `set_adapters([name],
[scale])`; a request without adapters equals the base pipeline however many adapters are loaded;
only requests with the same adapters and scales share a batch; the LRU evicts and reloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_exactness import TOL, _monolithic
from trident_rs.executors.diffusers_stages import batch_key
from trident_rs.models.loading import load_pipeline
from trident_rs.models.tiny_lora import make_random_lora
from trident_rs.pipeline_runner import LocalPipeline
from trident_rs.request import GenerationParams, LoraRef

peft = pytest.importorskip("peft", reason="LoRA adapters need peft (pip install 'trident_rs[lora]')")


def _text_encoder_loras() -> bool:
    """transformers loads adapters into its text encoders only with a recent peft (5.x: >= 0.22)."""
    from packaging.version import Version
    from transformers.integrations import peft as tp

    return Version(peft.__version__) >= Version(getattr(tp, "MIN_PEFT_VERSION", "0"))


TEXT_ENCODER_LORAS = _text_encoder_loras()

MODELS = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """name -> directory: three transformer LoRAs, and (SD3) one with a text-encoder part."""
    root = tmp_path_factory.mktemp(model)
    out = {n: make_random_lora(model, root / n, seed) for seed, n in enumerate("abc", 1)}
    if model == "tiny-sd3" and TEXT_ENCODER_LORAS:
        out["te"] = make_random_lora(model, root / "te", 4, text_encoder=True)
    return out


@pytest.fixture(scope="module")
def runner(model, loras):
    return LocalPipeline(model, options={"keep_float": True, "loras": loras, "lora_slots": 2})


def _params(model, lora=(), **kw):
    return GenerationParams(model=model, prompt="a red cube", steps=2, seed=0, lora=lora, **kw).resolved()


_REFERENCES: dict[tuple, np.ndarray] = {}


def _reference(model, loras, lora) -> np.ndarray:
    """The one-call diffusers pipeline with `lora` loaded and set (none: the base pipeline)."""
    key = (model, tuple(lora))
    if key not in _REFERENCES:
        _REFERENCES[key] = _make_reference(model, loras, lora)
    return _REFERENCES[key]


def _make_reference(model, loras, lora) -> np.ndarray:
    pipe = load_pipeline(model)
    for r in lora:
        pipe.load_lora_weights(loras[r.name], adapter_name=r.name)
    if lora:
        pipe.set_adapters([r.name for r in lora], [r.scale for r in lora])
    return _monolithic(pipe, _params(model, lora))


def _split(runner, params) -> list[np.ndarray]:
    return [out.tensors["frames_float"] for out in runner.run(params)]


@pytest.mark.parametrize("lora", [
    (LoraRef(name="a", scale=0.7),),
    (LoraRef(name="a", scale=-1.5), LoraRef(name="b", scale=0.5)),
], ids=["one", "two"])
def test_a_request_with_adapters_equals_the_pipeline_with_them_set(model, loras, runner, lora):
    (split,) = _split(runner, [_params(model, lora)])
    ref = _reference(model, loras, lora)
    base = _reference(model, loras, ())
    assert np.abs(split - base).max() > 1e-3  # the adapter does change the image
    assert np.abs(split - ref).max() <= TOL


@pytest.mark.skipif(not TEXT_ENCODER_LORAS, reason=f"peft {peft.__version__} is older than transformers needs "
                    "to load LoRAs into text encoders (and none newer is in the package registry here)")
def test_text_encoder_adapters_load_on_the_encode_replica(loras, runner, model):
    if "te" not in loras:
        pytest.skip("only the SD3 fixture has a text-encoder LoRA")
    lora = (LoraRef(name="te", scale=0.8),)
    (out,) = runner.run([_params(model, lora)])
    assert np.abs(out.tensors["frames_float"] - _reference(model, loras, lora)).max() <= TOL
    enc = runner.executors["encode"].adapter_stats()
    assert "te" in enc["loaded"] and "a" not in enc["loaded"]  # transformer-only adapters skip encode
    assert set(out.meta["lora_load_s"]) <= {"encode", "diffuse"}
    assert runner.executors["decode"].adapter_stats() is None


def test_requests_without_adapters_equal_the_base_pipeline_and_batches_split_by_adapter(model, loras, runner):
    mixed = [_params(model, (LoraRef(name="a", scale=0.7),)), _params(model), _params(model, (LoraRef(name="a", scale=0.3),)),
             _params(model)]
    outs = runner.run(mixed)
    base = _reference(model, loras, ())
    for i in (1, 3):
        assert np.abs(outs[i].tensors["frames_float"] - base).max() <= TOL
        assert outs[i].meta["batch_sizes"]["diffuse"] == 2  # the two plain requests shared a call
    for i, scale in ((0, 0.7), (2, 0.3)):
        ref = _reference(model, loras, (LoraRef(name="a", scale=scale),))
        assert np.abs(outs[i].tensors["frames_float"] - ref).max() <= TOL
        assert outs[i].meta["batch_sizes"]["diffuse"] == 1  # other scale: its own call
    assert len({batch_key(p) for p in mixed}) == 3


def test_the_lru_evicts_the_least_recent_adapter_and_reloads_it_exactly(model, loras, runner):
    diffuse, encode = runner.executors["diffuse"], runner.executors["encode"]
    one = {n: (LoraRef(name=n, scale=1.0),) for n in "abc"}
    (first,) = _split(runner, [_params(model, one["a"])])
    _split(runner, [_params(model, one["b"])])
    before = diffuse.adapter_stats()
    assert before["loaded"] == ["a", "b"]
    _split(runner, [_params(model, one["c"])])  # 2 slots: evicts a
    stats = diffuse.adapter_stats()
    assert stats["loaded"] == ["b", "c"] and stats["evictions"] == before["evictions"] + 1
    assert stats["unload_s"] > before["unload_s"] and stats["loads"] == before["loads"] + 1
    assert stats["mean_load_s"] > 0 and stats["hits"] >= 0
    (again,) = _split(runner, [_params(model, one["a"])])  # reloaded, evicting b
    assert diffuse.adapter_stats()["loaded"] == ["c", "a"]
    assert np.abs(again - first).max() == 0.0
    assert encode.adapter_stats()["loaded"] == [n for n in encode.adapter_stats()["loaded"] if n == "te"]


def test_a_replica_reports_its_adapters_and_their_load_times(model, loras):
    import asyncio

    from trident_rs.executors.base import StagePayload
    from trident_rs.serve.grant import Grant
    from trident_rs.serve.stage_deployment import StageReplica

    cfg = {"models": [model], "loras": loras, "lora_slots": 2, "limits": {"max_loras": 2}}
    encode, diffuse = StageReplica(cfg, "encode", 1), StageReplica(cfg, "diffuse", 1)

    async def go():
        p = StagePayload(_params(model, (LoraRef(name="b", scale=0.5),)))
        p = await encode.run(p, Grant("r", "encode", "encode-w1", 1, batch_id=1))
        return await diffuse.run(p, Grant("r", "diffuse", "diffuse-w1", 1, batch_id=2))

    out = asyncio.run(go())
    stats = diffuse.adapter_stats()[model]
    assert stats["loaded"] == ["b"] and stats["loads"] == 1 and stats["last_load_s"] > 0
    assert out.meta["lora_load_s"]["diffuse"] == stats["last_load_s"]
