"""Image edits (`POST /v1/images/edits`): the stage split equals diffusers' img2img and inpaint
pipelines; params, cost model and the endpoint (official client, bad input) below."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trident_rs.models.loading import load_pipeline
from trident_rs.pipeline_runner import LocalPipeline
from trident_rs.request import GenerationParams

TOL = 1e-5
EDIT_MODELS = ("tiny-sd3", "tiny-flux")
REFERENCE = {
    ("tiny-sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("tiny-sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
    ("tiny-flux", "img2img"): "FluxImg2ImgPipeline",
    ("tiny-flux", "inpaint"): "FluxInpaintPipeline",
}
_CACHE: dict[str, tuple] = {}


def _pipelines(model: str) -> tuple[LocalPipeline, object]:
    if model not in _CACHE:
        _CACHE[model] = (LocalPipeline(model, options={"keep_float": True}), load_pipeline(model))
    return _CACHE[model]


def _image(seed: int = 1, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)


def _mask(size: int = 64) -> np.ndarray:
    """diffusers' convention: 255 = repaint (the upper left quarter)."""
    m = np.zeros((1, size, size), dtype=np.uint8)
    m[:, : size // 2, : size // 2] = 255
    return m


def _reference(model: str, kind: str, p: GenerationParams, image: np.ndarray, mask: np.ndarray | None):
    import diffusers
    from PIL import Image

    full = _pipelines(model)[1]
    pipe = getattr(diffusers, REFERENCE[model, kind]).from_pipe(full)
    pipe.set_progress_bar_config(disable=True)
    extra = {"mask_image": Image.fromarray(mask[0])} if mask is not None else {}
    return pipe(prompt=p.prompt, image=Image.fromarray(image[0]), strength=p.strength, height=p.height,
                width=p.width, num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
                generator=torch.Generator().manual_seed(p.seed), output_type="np", **extra).images


@pytest.mark.parametrize("model", EDIT_MODELS)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_split_edit_equals_diffusers_edit_pipeline(model, kind):
    """3 steps at strength 0.6 run the schedule's last 2 (diffusers' count), from the noised image."""
    runner, _ = _pipelines(model)
    p = GenerationParams(model=model, prompt="a red cube", steps=3, seed=5, edit=kind, strength=0.6).resolved()
    assert p.denoise_steps == 2
    image = _image()
    mask = _mask() if kind == "inpaint" else None
    inputs = {"image": image, **({"mask": mask} if mask is not None else {})}
    (out,) = runner.run([p], [inputs])
    split = out.tensors["frames_float"]
    reference = _reference(model, kind, p, image, mask)
    diff = float(np.abs(split - reference).max())
    print(f"{model} {kind}: max abs diff {diff:.3g}")
    assert split.shape == reference.shape == (1, 64, 64, 3)
    assert diff <= TOL


# ---- params, batching, cost model, simulator ---------------------------------------------------------
def test_strength_is_checked_and_sets_the_steps_run():
    from trident_rs.errors import InvalidRequestError

    p = GenerationParams(model="tiny-sd3", prompt="x", steps=4, edit="img2img").resolved()
    assert p.strength == 0.6 and p.denoise_steps == 3  # diffusers' default; 4 - int(4 - 2.4)
    assert GenerationParams(model="tiny-sd3", prompt="x", steps=4).resolved().denoise_steps == 4
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidRequestError) as e:
            GenerationParams(model="tiny-sd3", prompt="x", edit="inpaint", strength=bad).resolved()
        assert e.value.field == "strength"
    with pytest.raises(InvalidRequestError) as e:  # so small that no step is kept (4 - 4e-17 == 4.0)
        GenerationParams(model="tiny-sd3", prompt="x", steps=4, edit="img2img", strength=1e-17).resolved()
    assert e.value.field == "strength"
    with pytest.raises(InvalidRequestError) as e:
        GenerationParams(model="tiny-sd3", prompt="x", strength=0.5).resolved()
    assert e.value.field == "strength"


def test_only_same_kind_and_strength_share_a_call():
    from trident_rs.executors.diffusers_stages import batch_key

    def key(**kw):
        return batch_key(GenerationParams(model="tiny-sd3", prompt="x", **kw).resolved())

    keys = {key(), key(edit="img2img"), key(edit="inpaint"), key(edit="img2img", strength=0.8)}
    assert len(keys) == 4
    assert key(edit="img2img", seed=3) == key(edit="img2img")


def test_cost_model_counts_the_vae_encode_and_weights_of_edits():
    from trident_rs.policy.cost_model import EDIT_VAE_GB, VAE_ENCODE_SHARE, CostModel
    from trident_rs.vocab import Shape

    cost, shape = CostModel.default(), Shape(1024, 1024)
    plain = cost.stage_time("sd3", "encode", shape)
    decode = cost.stage_time("sd3", "decode", shape)
    assert cost.stage_time("sd3", "encode", shape, encode_image=True) == pytest.approx(
        plain + VAE_ENCODE_SHARE * decode)
    assert cost.stage_time("sd3", "diffuse", shape, steps=3, encode_image=True) == cost.stage_time(
        "sd3", "diffuse", shape, steps=3)
    # encode replicas of edit families hold the VAE too; a family without edits does not
    series = cost._series[("sd3", "encode", 1, 1)]
    measured = min(p.memory_gb for p in series.exact.values() if p.memory_gb)
    assert cost.weights_gb("sd3", "encode") == pytest.approx(measured + EDIT_VAE_GB)
    from trident_rs.policy.cost_model import _makes_edits

    assert _makes_edits("flux") and _makes_edits("tiny-sd3") and not _makes_edits("cogvideox")


def test_simulated_edit_takes_its_vae_encode_longer():
    from trident_rs.policy.baselines import StaticPipelinePolicy
    from trident_rs.policy.cost_model import VAE_ENCODE_SHARE, CostModel
    from trident_rs.policy.types import Cluster, Request
    from trident_rs.sim import SimConfig, simulate, summarize
    from trident_rs.vocab import Shape

    cost, shape, cluster = CostModel.default(), Shape(1024, 1024), Cluster(1, 1, gpu_memory_gb=80.0)

    def makespan(edit: bool) -> float:
        reqs = [Request("a", "sd3", shape, 3, 0.0, 100.0, encode_image=edit)]
        policy = StaticPipelinePolicy(cluster, cost, width=1, models={"sd3": 1.0})
        return summarize(simulate(cluster, policy, cost, reqs, SimConfig.ideal())).makespan_s

    extra = VAE_ENCODE_SHARE * cost.stage_time("sd3", "decode", shape)
    assert makespan(True) - makespan(False) == pytest.approx(extra, rel=1e-6)


# ---- the endpoint: official client, bad input ----------------------------------------------------------
openai = pytest.importorskip("openai")


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _openai_mask(size: int = 64) -> np.ndarray:
    """OpenAI's convention, RGBA: transparent (alpha 0) = edit, the same quarter as `_mask`."""
    rgba = np.full((size, size, 4), 255, dtype=np.uint8)
    rgba[: size // 2, : size // 2, 3] = 0
    return rgba


def _pixels(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _run_openai(config, scenario, **kw):
    from ingress_fakes import run_http

    async def wrap(http, inst):
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        return await scenario(client, http, inst)
    return run_http(config, wrap, **kw)


@pytest.mark.slow
def test_openai_client_edits_on_real_stages_equal_the_local_split():
    """images.edit (img2img on tiny-flux, inpainting on tiny-sd3, streamed with partial images) on
    real stage replicas in-process gives the local stage split's image: the OpenAI mask's
    transparent quarter is diffusers' white quarter."""
    image = _image(2)[0]
    extra = {"seed": 4, "steps": 3, "strength": 0.7}

    async def go(client, http, inst):
        flux = await client.images.edit(model="tiny-flux", image=("in.png", _png(image), "image/png"),
                                        prompt="a red cube", extra_body=extra)
        stream = await client.images.edit(model="tiny-sd3", image=("in.png", _png(image), "image/png"),
                                          mask=("mask.png", _png(_openai_mask()), "image/png"),
                                          prompt="a red cube", stream=True, partial_images=2, extra_body=extra)
        events = [ev async for ev in stream]
        assert inst.admission.per_model == {}
        return flux, events

    flux, events = _run_openai({"models": ["tiny-sd3", "tiny-flux"]}, go, real=True)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    for model, got, inputs in (("tiny-flux", flux.data[0].b64_json, {"image": image[None]}),
                               ("tiny-sd3", events[-1].b64_json, {"image": image[None], "mask": _mask()})):
        edit = "inpaint" if "mask" in inputs else "img2img"
        p = GenerationParams(model=model, prompt="a red cube", height=64, width=64, edit=edit, **extra)
        (local,) = LocalPipeline(model).run([p], [inputs])
        assert np.array_equal(_pixels(got), local.tensors["frames"][0]), model


def _post_edit(http, files, **fields):
    data = {"model": "tiny-sd3", "prompt": "a boat", **{k: str(v) for k, v in fields.items()}}
    return http.post("/v1/images/edits", data=data, files=files)


GOOD = _png(_image(3, 32)[0])


@pytest.mark.parametrize("files, fields, status, field", [
    ({"image": ("x.png", b"not an image at all", "image/png")}, {}, 422, "image"),
    ({}, {}, 422, "image"),
    ({"image": ("x.png", GOOD, "image/png"), "mask": ("m.png", _png(_openai_mask(16)), "image/png")}, {}, 422, "mask"),
    ({"image": ("x.png", GOOD, "image/png"), "mask": ("m.png", _png(_image(1, 32)[0]), "image/png")}, {}, 422, "mask"),
    ({"image": ("x.png", GOOD, "image/png")}, {"strength": 0}, 422, "strength"),
    ({"image": ("x.png", GOOD, "image/png")}, {"strength": 1.5}, 422, "strength"),
    ({"image": ("x.png", GOOD, "image/png")}, {"strength": "lots"}, 422, "strength"),
    ({"image": ("x.png", GOOD, "image/png")}, {"stream": "true", "partial_images": 4}, 422, "partial_images"),
    ({"image": ("x.png", GOOD, "image/png")}, {"model": "tiny-cogvideox"}, 422, "model"),
    ({"image": ("x.png", GOOD, "image/png")}, {"model": "no-such-model"}, 404, "model"),
    ({"image": ("x.png", GOOD, "image/png")}, {"size": "big"}, 422, "size"),
    ({"image": ("x.png", GOOD, "image/png")}, {"bogus": 1}, 422, "bogus"),
])
def test_bad_edit_input_is_a_4xx_naming_the_field_and_starts_nothing(files, fields, status, field):
    async def go(http, inst):
        r = await _post_edit(http, files, **fields)
        return r, inst
    r, inst = __import__("ingress_fakes").run_http({"models": ["tiny-sd3", "tiny-cogvideox"]}, go)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == field or (status == 404 and field in error["message"]), error
    assert inst.admission.per_model == {}
    assert all(s.calls == 0 for s in inst.stages.values())


def test_openai_client_sees_a_bad_mask_as_a_bad_request_and_gets_urls(tmp_path):
    async def go(client, http, inst):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await client.images.edit(model="tiny-sd3", image=("in.png", GOOD, "image/png"),
                                     mask=("m.png", _png(_openai_mask(16)), "image/png"), prompt="x")
        assert "mask" in str(e.value)
        out = await client.images.edit(model="tiny-sd3", image=("in.png", GOOD, "image/png"), prompt="x", n=2,
                                       response_format="url")
        pngs = [(await http.get(d.url.replace("http://t", ""))).content for d in out.data]
        return pngs, inst
    pngs, inst = _run_openai({"models": ["tiny-sd3"], "files": {"url": str(tmp_path / "files")}}, go)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert inst.admission.per_model == {}


# -- placement: an edit's diffuse never goes wider than 1 ------------------------------------------
@pytest.mark.parametrize("placement", ["pool", "groups"])
def test_the_policy_runs_an_edits_diffuse_at_width_1_only(placement):
    """Wide groups are free and the SLOs tight, so generations of the same shape go wide; the
    edits among them never do (a width-k replica refuses them: no xfuser edit pipelines)."""
    from trident_rs.policy.cost_model import CostModel
    from trident_rs.policy.slo import slo_seconds
    from trident_rs.policy.trident import make_trident
    from trident_rs.policy.types import Cluster, Request, Shape
    from trident_rs.sim import SimConfig, simulate

    cost, cluster, shape = CostModel.default(), Cluster(1, 8), Shape(2048, 2048)
    slo = slo_seconds(cost, "flux", shape, 28, 1.5)
    reqs = [Request(f"r{i}", "flux", shape, 28, 20.0 * i, 20.0 * i + slo, encode_image=i % 2 == 1) for i in range(8)]
    policy = make_trident(cluster, cost, placement=placement, models={"flux": 1.0})
    res = simulate(cluster, policy, cost, reqs, SimConfig.ideal())
    assert len(res.finish) == len(reqs) and not res.failed
    widths = {r.id: {rec.width for rec in res.timeline[r.id] if rec.stages == ("diffuse",)} for r in reqs}
    assert all(widths[r.id] == {1} for r in reqs if r.encode_image), widths
    assert any(max(widths[r.id]) > 1 for r in reqs if not r.encode_image), widths
