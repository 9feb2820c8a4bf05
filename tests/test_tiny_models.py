"""Tiny offline models: cache build/reuse, save/load round trip, stage-only loading, CLI output."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trident_rs.cli import main
from trident_rs.models import tiny, tiny_parts
from trident_rs.models.families import get_family
from trident_rs.models.loading import load_pipeline
from trident_rs.models.spec import get_spec


def test_build_once_then_reuse_cache(tmp_path, monkeypatch):
    calls = []
    real_build = tiny.build_tiny_pipeline
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda name: calls.append(name) or real_build(name))
    threads = [threading.Thread(target=tiny.ensure_tiny_model, args=("tiny-sd3", tmp_path)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["tiny-sd3"]  # concurrent builders: one builds, the others wait and reuse
    path = tiny.ensure_tiny_model("tiny-sd3", tmp_path)
    assert calls == ["tiny-sd3"]
    assert (path / "model_index.json").is_file() and (path / "transformer").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left over


def test_stale_cache_version_is_rebuilt(tmp_path, monkeypatch):
    path = tiny.ensure_tiny_model("tiny-sd3", tmp_path)
    monkeypatch.setattr(tiny, "BUILD_VERSION", tiny.BUILD_VERSION + 1)
    assert not tiny._is_built(path)
    assert tiny._is_built(tiny.ensure_tiny_model("tiny-sd3", tmp_path))


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIDENT_CACHE", str(tmp_path))
    assert tiny.tiny_dir("tiny-flux") == tmp_path / "tiny" / "tiny-flux"


def test_tokenizers_built_in_code_round_trip(tmp_path):
    from transformers import AutoTokenizer

    for name, tok in (("clip", tiny_parts.build_clip_tokenizer()), ("t5", tiny_parts.build_t5_tokenizer(32))):
        tok.save_pretrained(tmp_path / name)
        again = AutoTokenizer.from_pretrained(tmp_path / name)
        text = "a red cube on the green sphere"
        assert again(text).input_ids == tok(text).input_ids
        assert len(tok(text).input_ids) > 3


VIDEO = tuple(m for m in tiny.tiny_models() if get_spec(m).is_video)


@pytest.mark.parametrize("model", tiny.tiny_models())  # every family's tiny model
def test_save_load_round_trip_gives_identical_outputs(model):
    built = tiny.build_tiny_pipeline(model)
    built.set_progress_bar_config(disable=True)
    loaded = load_pipeline(model)
    # Weights come back bit for bit, but memory-mapped from the safetensors file at an offset the
    # file's header sets (tiny-hunyuanvideo's transformer: 40 mod 64), and MKL's sgemm picks its
    # kernel by alignment: ~6e-7 off per transformer call. Fresh (aligned) copies remove that.
    for module in loaded.components.values():
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                param.data = param.data.clone()
    kwargs = dict(prompt="a red cube", height=32, width=32, num_inference_steps=1, output_type="np")
    if model in VIDEO:
        kwargs.update(num_frames=1)
    outs = []
    for pipe in (built, loaded):
        result = pipe(generator=torch.Generator().manual_seed(1), **kwargs)
        outs.append(result.frames if model in VIDEO else result.images)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_llama3_tokenizer_crops_exactly_the_hunyuanvideo_template(tmp_path):
    """The template takes `crop_start` (95) tokens, as with the real Llama 3 tokenizer, so the
    encoder output the pipeline crops starts at the user's prompt."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import AutoTokenizer

    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tok = tiny_parts.build_llama3_tokenizer(template)
    ids = tok(template.format("a red cube")).input_ids
    assert tok.convert_ids_to_tokens(ids[crop:]) == ["a", "Ġred", "Ġcube", "<|eot_id|>"]
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<|begin_of_text|>"]
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(template.format("a dog")).input_ids == tok(
        template.format("a dog")).input_ids


def test_hunyuanvideo_loader_keeps_the_byte_level_tokenizer():
    """The model index names LlamaTokenizerFast (as the real model's does); that class would
    rebuild a Metaspace tokenizer in transformers 5 and lose the newlines and whole words. The
    loader reads tokenizer.json as it is instead."""
    from transformers import LlamaTokenizerFast

    path = tiny.ensure_tiny_model("tiny-hunyuanvideo")
    text = "<|start_header_id|>user<|end_header_id|>\n\na red cube"
    pipe = load_pipeline("tiny-hunyuanvideo", stage="encode")
    assert pipe.tokenizer.tokenize(text)[-5:] == ["<|end_header_id|>", "ĊĊ", "a", "Ġred", "Ġcube"]
    assert pipe.tokenizer.padding_side == "right"  # the transformer's text mask assumes it
    rebuilt = LlamaTokenizerFast.from_pretrained(path / "tokenizer")
    assert rebuilt.tokenize(text) != pipe.tokenizer.tokenize(text)  # the trap this avoids


@pytest.mark.parametrize("stage", ["encode", "diffuse", "decode"])
def test_hunyuanvideo_stage_pipeline_holds_only_its_modules(stage):
    pipe = load_pipeline("tiny-hunyuanvideo", stage=stage)
    modules = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    present = {m for m in modules if getattr(pipe, m, None) is not None}
    assert present == modules & set(get_family("hunyuanvideo").components[stage])
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)


@pytest.mark.parametrize("stage", ["encode", "diffuse", "decode"])
def test_stage_pipeline_holds_only_its_modules(stage):
    pipe = load_pipeline("tiny-sd3", stage=stage)
    modules = {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    present = {m for m in modules if getattr(pipe, m, None) is not None}
    assert present == modules & set(get_family("sd3").components[stage])
    assert pipe.vae_scale_factor == 8  # derived from the VAE config even when vae is None


def test_cli_generate_writes_png(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cube.png"
    assert main(["generate", "--model", "tiny-sd3", "--prompt", "a red cube", "--size", "64x48",
                 "--seed", "0", "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"
    assert "encode" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_generate_writes_video(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "cube.mp4"
    assert main(["generate", "--model", "tiny-cogvideox", "--prompt", "a red cube", "--size", "64x64",
                 "--frames", "9", "--steps", "2", "--out", str(out)]) == 0
    frames = iio.imread(out)
    assert frames.shape == (9, 64, 64, 3)


def test_cli_generate_hunyuanvideo_writes_mp4(tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "cube.mp4"
    assert main(["generate", "--model", "tiny-hunyuanvideo", "--prompt", "a red cube", "--size", "64x48",
                 "--frames", "5", "--steps", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[4:8] == b"ftyp"  # an MP4 container
    assert iio.imread(out).shape == (5, 48, 64, 3)
    assert "decode" in capsys.readouterr().out


@pytest.mark.parametrize("fields, field", [
    ({"num_frames": 8}, "num_frames"),  # HunyuanVideo needs 4k + 1 frames
    ({"num_frames": 37}, "num_frames"),  # over the tiny model's 33
    ({"num_frames": 0}, "num_frames"),
    ({"height": 72}, "height"),
    ({"width": 272}, "width"),
    ({"steps": 0}, "steps"),
    ({"guidance_scale": 31.0}, "guidance_scale"),
])
def test_hunyuanvideo_rejects_bad_requests_before_compute(fields, field):
    """Typed errors from the spec and from the executor, with a pipeline stub that would raise
    if any compute ran."""
    from trident_rs.errors import InvalidRequestError
    from trident_rs.executors.base import StagePayload
    from trident_rs.executors.diffusers_stages import DiffusersStageExecutor
    from trident_rs.request import GenerationParams

    bad = GenerationParams(model="tiny-hunyuanvideo", prompt="x", **fields)
    with pytest.raises(InvalidRequestError) as info:
        bad.resolved()
    assert info.value.field == field
    executor = DiffusersStageExecutor("tiny-hunyuanvideo", "encode", pipeline=object())
    with pytest.raises(InvalidRequestError, match=field):
        executor.run([StagePayload(GenerationParams(model="tiny-hunyuanvideo", prompt="ok")), StagePayload(bad)])


def test_hunyuanvideo_accepts_4k_plus_1_frames_and_needs_embeddings():
    from trident_rs.errors import InvalidRequestError
    from trident_rs.executors.base import StagePayload
    from trident_rs.executors.diffusers_stages import DiffusersStageExecutor
    from trident_rs.request import GenerationParams

    for frames in (1, 5, 9, 33):
        assert GenerationParams(model="tiny-hunyuanvideo", prompt="x", num_frames=frames).resolved().num_frames == frames
    diffuse = DiffusersStageExecutor("tiny-hunyuanvideo", "diffuse", pipeline=object())
    with pytest.raises(InvalidRequestError, match="prompt_embeds"):
        diffuse.run([StagePayload(GenerationParams(model="tiny-hunyuanvideo", prompt="x"))])


def test_media_bytes_round_trip():
    import io

    from PIL import Image

    from trident_rs.media import encode_media

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 16, 32, 3), dtype=np.uint8)
    data, mime = encode_media(image)
    assert mime == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image[0])
    data, mime = encode_media(rng.integers(0, 256, (5, 16, 32, 3), dtype=np.uint8))
    assert mime in ("video/mp4", "image/gif") and len(data) > 100
