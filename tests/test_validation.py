"""Bad input is rejected with a typed error before any compute (no pipeline is ever loaded)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from trident_rs.cli import main
from trident_rs.errors import InvalidRequestError, TridentError, UnknownModelError
from trident_rs.executors.base import StagePayload
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams


@pytest.fixture(autouse=True)
def no_pipeline_loading(monkeypatch):
    """Fail loudly if validation ever reaches pipeline loading (i.e. compute)."""
    import trident_rs.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before validation rejected the request")

    monkeypatch.setattr(loading, "load_pipeline", forbidden)


def _resolve(**fields):
    return GenerationParams(**{"model": "tiny-sd3", "prompt": "a red cube", **fields}).resolved()


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="no-such-model"):
        _resolve(model="no-such-model")


@pytest.mark.parametrize("field, value, message", [
    ("height", 72, "multiple of 16"),
    ("width", 8, "multiple of 16"),
    ("height", 0, "multiple of 16"),
    ("width", 1040, "exceeds the maximum 1024"),
    ("steps", 0, "outside 1..100"),
    ("steps", -3, "outside 1..100"),
    ("steps", 101, "outside 1..100"),
    ("num_frames", 9, "makes images"),
    ("guidance_scale", -1.0, "outside"),
    ("guidance_scale", 31.0, "outside"),
])
def test_image_model_rejects(field, value, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        _resolve(**{field: value})
    assert info.value.field == field
    assert info.value.http_status == 422


@pytest.mark.parametrize("frames", [2, 8, 10, 57, 0])
def test_video_model_rejects_frame_counts_it_cannot_take(frames):
    spec = get_spec("tiny-cogvideox")
    with pytest.raises(InvalidRequestError, match="num_frames"):
        _resolve(model="tiny-cogvideox", num_frames=frames)
    assert not spec.valid_frames(frames)


def test_video_model_accepts_valid_frame_counts():
    for frames in (1, 9, 17, 49):
        assert _resolve(model="tiny-cogvideox", num_frames=frames).num_frames == frames


def test_configurable_maximum_size():
    assert _resolve(height=1024, width=1024).height == 1024
    with pytest.raises(InvalidRequestError, match="exceeds the maximum 256"):
        _resolve(model="tiny-cogvideox", height=272)


@pytest.mark.parametrize("prompt", [123, None, ["a", "b"], {"text": "x"}])
def test_non_string_prompt(prompt):
    with pytest.raises((ValidationError, InvalidRequestError)):
        GenerationParams(model="tiny-sd3", prompt=prompt).resolved()
    with pytest.raises(InvalidRequestError, match="prompt"):
        get_spec("tiny-sd3").validate(height=64, width=64, prompt=prompt)


def test_pydantic_schema_forbids_extra_fields_and_bad_types():
    with pytest.raises(ValidationError, match="extra"):
        GenerationParams(model="tiny-sd3", prompt="x", temperature=0.7)
    with pytest.raises(ValidationError):
        GenerationParams(model="tiny-sd3", prompt="x", seed=-1)
    with pytest.raises(ValidationError):
        GenerationParams(model="tiny-sd3", prompt="x", height="tall")


def test_defaults_fill_from_the_model_spec():
    p = _resolve()
    spec = get_spec("tiny-sd3")
    assert (p.height, p.width) == spec.default_size
    assert (p.steps, p.guidance_scale, p.num_frames) == (spec.default_steps, spec.default_guidance, 1)


def test_executor_rejects_bad_payload_before_compute():
    """The executor validates every payload of a batch before running any (the pipeline stub
    given here would raise if it were used)."""
    from trident_rs.executors.diffusers_stages import DiffusersStageExecutor

    executor = DiffusersStageExecutor("tiny-sd3", "encode", pipeline=object())
    good = StagePayload(GenerationParams(model="tiny-sd3", prompt="ok"))
    bad = StagePayload(GenerationParams(model="tiny-sd3", prompt="ok", steps=0))
    with pytest.raises(InvalidRequestError, match="steps"):
        executor.run([good, bad])
    wrong_model = StagePayload(GenerationParams(model="tiny-flux", prompt="ok"))
    with pytest.raises(InvalidRequestError, match="model"):
        executor.run([wrong_model])


def test_executor_rejects_unknown_stage_and_model():
    from trident_rs.executors.base import build_executor

    with pytest.raises(TridentError, match="stage"):
        build_executor("diffusers", "tiny-sd3", "upscale", pipeline=object())
    with pytest.raises(UnknownModelError):
        build_executor("diffusers", "no-such-model", "encode", pipeline=object())


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--prompt", "x"], "unknown model"),
    (["--prompt", "x", "--size", "60x64"], "width: 60"),
    (["--prompt", "x", "--size", "big"], "size"),
    (["--prompt", "x", "--steps", "0"], "steps"),
    (["--prompt", "x", "--frames", "9"], "num_frames"),
    (["--model", "tiny-cogvideox", "--prompt", "x", "--frames", "10"], "num_frames"),
    (["--prompt", "x", "--guidance", "99"], "guidance_scale"),
    (["--prompt", "x", "--out", "out.mp4"], "png"),
])
def test_cli_generate_bad_args_exit_2(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_height_limit_can_differ_from_width_limit():
    """CogVideoX1.5's rotary tables cap height at 768 but width at 1360: a tall request is
    rejected up front instead of crashing inside diffusers."""
    spec = get_spec("cogvideox")
    spec.validate(height=768, width=1360, frames=81)
    with pytest.raises(InvalidRequestError, match="height: 1360 exceeds the maximum 768"):
        spec.validate(height=1360, width=768, frames=81)
