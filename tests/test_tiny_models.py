"""Tiny offline models: cache build/reuse, save/load round trip, stage-only loading, CLI output."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trident_rs.cli import main
from trident_rs.models import tiny
from trident_rs.models.loading import STAGE_COMPONENTS, load_pipeline


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

    for name, tok in (("clip", tiny.build_clip_tokenizer()), ("t5", tiny.build_t5_tokenizer(32))):
        tok.save_pretrained(tmp_path / name)
        again = AutoTokenizer.from_pretrained(tmp_path / name)
        text = "a red cube on the green sphere"
        assert again(text).input_ids == tok(text).input_ids
        assert len(tok(text).input_ids) > 3


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux", "tiny-cogvideox"])
def test_save_load_round_trip_gives_identical_outputs(model):
    built = tiny.build_tiny_pipeline(model)
    built.set_progress_bar_config(disable=True)
    loaded = load_pipeline(model)
    kwargs = dict(prompt="a red cube", height=32 if model != "tiny-cogvideox" else 16, width=32,
                  num_inference_steps=1, output_type="np")
    if model == "tiny-cogvideox":
        kwargs.update(num_frames=1, height=32)
    outs = []
    for pipe in (built, loaded):
        result = pipe(generator=torch.Generator().manual_seed(1), **kwargs)
        outs.append(result.frames if model == "tiny-cogvideox" else result.images)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("stage", ["encode", "diffuse", "decode"])
def test_stage_pipeline_holds_only_its_modules(stage):
    pipe = load_pipeline("tiny-sd3", stage=stage)
    modules = {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    present = {m for m in modules if getattr(pipe, m, None) is not None}
    assert present == modules & set(STAGE_COMPONENTS["sd3"][stage])
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
