"""Issue 19 part 1: LoRA adapters in requests, through the official `openai` client and plain
HTTP against the ingress's real FastAPI app (fake controller and stages, tests/ingress_fakes.py):
declared adapters are listed and reach the stages; unknown ones get 404 naming them; a scale out
of range or too many adapters get 422 naming the field."""
import warnings

import pytest
from pydantic import ValidationError

from ingress_fakes import run_http
from trident_rs.errors import ConfigError, InvalidRequestError
from trident_rs.request import GenerationParams, LoraRef
from trident_rs.serve.config import AppConfig

openai = pytest.importorskip("openai")
warnings.filterwarnings("ignore", category=DeprecationWarning)

LORAS = {"pixel": "/adapters/pixel", "ink": "someone/ink-lora", "film": "/adapters/film"}
CFG = {"models": ["tiny-sd3", "tiny-cogvideox"], "loras": LORAS, "limits": {"max_loras": 2}}


def run_openai(scenario):
    async def wrap(http, inst):
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        return await scenario(client, http, inst)
    return run_http(CFG, wrap)



def test_openai_client_lists_adapters_and_sends_them_to_every_stage():
    async def scenario(client, http, inst):
        models = {m.id: m for m in (await client.models.list()).data}
        assert {"pixel", "ink", "film"} <= set(models) and "tiny-sd3" in models
        assert models["ink"].model_extra["kind"] == "lora" and models["ink"].model_extra["source"] == "someone/ink-lora"
        out = await client.images.generate(model="tiny-sd3", prompt="a boat", extra_body={
            "steps": 1, "lora": [{"name": "pixel", "scale": 0.8}, {"name": "ink", "scale": -1.5}]})
        assert len(out.data) == 1 and out.data[0].b64_json
        r = await http.post("/v1/generate", json={"model": "tiny-sd3", "prompt": "x", "steps": 1,
                                                  "lora": [{"name": "film"}]})
        assert r.status_code == 200, r.text
        assert r.json()["params"]["lora"] == [{"name": "film", "scale": 1.0}]
        r = await http.post("/v1/videos", json={"model": "tiny-cogvideox", "prompt": "w", "num_frames": 9,
                                                "steps": 1, "wait": True, "lora": [{"name": "ink", "scale": 2}]})
        assert r.status_code == 200, r.text
        return inst

    inst = run_openai(scenario)
    runs = inst.stages["diffuse-w1"].runs
    assert [p.lora for p in runs] == [
        (LoraRef(name="pixel", scale=0.8), LoraRef(name="ink", scale=-1.5)),
        (LoraRef(name="film", scale=1.0),), (LoraRef(name="ink", scale=2.0),)]
    assert [p.lora for p in inst.stages["encode-w1"].runs] == [p.lora for p in runs]


@pytest.mark.parametrize("lora, status, field, needle", [
    ([{"name": "nope", "scale": 1}], 404, "lora", "'nope'"),
    ([{"name": "pixel", "scale": 4.5}], 422, "lora.0.scale", "[-4, 4]"),
    ([{"name": "pixel", "scale": -7}], 422, "lora.0.scale", "[-4, 4]"),
    ([{"name": "pixel"}, {"name": "ink"}, {"name": "film"}], 422, "lora", "maximum 2"),
    ([{"name": "pixel"}, {"name": "pixel", "scale": 0.5}], 422, "lora", "more than once"),
    ([{"name": "pixel", "rank": 4}], 422, "lora.0.rank", ""),
    ([{"scale": 1}], 422, "lora.0.name", ""),
])
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/generate", "/v1/videos"])
def test_bad_adapters_get_404_or_422_naming_them(path, lora, status, field, needle):
    model = "tiny-cogvideox" if path == "/v1/videos" else "tiny-sd3"
    body = {"model": model, "prompt": "x", "steps": 1, "lora": lora}

    async def scenario(http, inst):
        r = await http.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == field and needle in err["message"], err
        assert not inst.stages["encode-w1"].runs  # refused before any stage ran

    run_http(CFG, scenario)


def test_openai_client_raises_typed_errors_for_bad_adapters():
    async def scenario(client, http, inst):
        with pytest.raises(openai.NotFoundError, match="unknown LoRA adapter 'nope'"):
            await client.images.generate(model="tiny-sd3", prompt="x", extra_body={"lora": [{"name": "nope"}]})
        with pytest.raises(openai.UnprocessableEntityError, match=r"outside \[-4, 4\]"):
            await client.images.generate(model="tiny-sd3", prompt="x",
                                         extra_body={"lora": [{"name": "ink", "scale": 9}]})

    run_openai(scenario)


def test_adapters_are_typed_and_checked_in_python_too():
    p = GenerationParams(model="tiny-sd3", prompt="x", lora=[{"name": "a", "scale": 0.5}])
    assert p.lora == (LoraRef(name="a", scale=0.5),) and p.adapters == ("a",)
    with pytest.raises(ValidationError, match=r"outside \[-4, 4\]"):
        LoraRef(name="a", scale=float("nan"))
    with pytest.raises(InvalidRequestError, match="more than once"):
        GenerationParams(model="tiny-sd3", prompt="x", lora=[{"name": "a"}, {"name": "a"}]).resolved()
    with pytest.raises(ConfigError, match="max_loras"):
        AppConfig.parse({"lora_slots": 2, "limits": {"max_loras": 3}})
    assert AppConfig.parse({}).loras == {}
