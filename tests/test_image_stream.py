"""Issue 18 part 2: `POST /v1/images/generations` with `stream: true` and `partial_images`,
through the official `openai` client against the ingress's FastAPI app in-process
(tests/ingress_fakes.py: fake stages, and real `StageReplica`s on the tiny models)."""
import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from ingress_fakes import run_http
from trident_rs.models.preview import latent_rgb, preview_steps

openai = pytest.importorskip("openai")

PNG = b"\x89PNG\r\n\x1a\n"
CFG = {"models": ["tiny-sd3", "tiny-cogvideox"]}


def run_openai(config, scenario, **kw):
    async def wrap(http, inst):
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        return await scenario(client, http, inst)
    return run_http(config, wrap, **kw)


async def _stream(client, n, **extra):
    stream = await client.images.generate(model="tiny-sd3", prompt="a red boat", stream=True, partial_images=n,
                                          size="64x64", extra_body={"seed": 7, "steps": 4, **extra})
    return [ev async for ev in stream]


def _pixels(b64):
    data = base64.b64decode(b64)
    assert data.startswith(PNG)
    return np.asarray(Image.open(io.BytesIO(data)))


def _check_events(events, n):
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageGenPartialImageEvent"] * n + ["ImageGenCompletedEvent"], kinds
    assert [e.partial_image_index for e in events[:-1]] == list(range(n))
    now = time.time()
    for e in events:
        assert e.size == "64x64" and e.output_format == "png" and e.background == "opaque"
        assert e.quality == "auto" and abs(e.created_at - now) < 60
        _pixels(e.b64_json)
    assert events[-1].type == "image_generation.completed" and events[-1].usage.total_tokens == 0
    return events[-1]


@pytest.mark.parametrize("n", [0, 2, 3])
def test_stream_sends_n_partial_images_then_the_completed_image(n):
    async def go(client, http, inst):
        events = await _stream(client, n)
        plain = await client.images.generate(model="tiny-sd3", prompt="a red boat", size="64x64",
                                             extra_body={"seed": 7, "steps": 4})
        return events, plain, dict(inst.runner.preview_sinks), inst.admission.snapshot()
    events, plain, sinks, adm = run_openai(CFG, go)
    done = _check_events(events, n)
    assert np.array_equal(_pixels(done.b64_json), _pixels(plain.data[0].b64_json))
    assert not sinks  # nothing left behind


def test_stream_is_server_sent_events_in_openais_wire_shape():
    async def go(http, inst):
        r = await http.post("/v1/images/generations", json={"model": "tiny-sd3", "prompt": "x", "stream": True,
                                                            "partial_images": 1, "steps": 2})
        return r.status_code, r.headers["content-type"], r.text
    status, ctype, text = run_http(CFG, go)
    assert status == 200 and ctype.startswith("text/event-stream")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    heads = [b.splitlines()[0] for b in blocks]
    assert heads == ["event: image_generation.partial_image", "event: image_generation.completed"]
    first = json.loads(blocks[0].splitlines()[1].removeprefix("data: "))
    assert set(first) == {"type", "b64_json", "partial_image_index", "created_at", "size", "quality", "background",
                          "output_format"}
    last = json.loads(blocks[1].splitlines()[1].removeprefix("data: "))
    assert set(last) == {"type", "b64_json", "created_at", "size", "quality", "background", "output_format", "usage"}


@pytest.mark.parametrize("extra, field", [
    ({"partial_images": 4}, "partial_images"), ({"partial_images": -1}, "partial_images"),
    ({"partial_images": 1.5}, "partial_images"), ({"partial_images": "2"}, "partial_images"),
    ({"partial_images": True}, "partial_images"), ({"partial_images": [1]}, "partial_images"),
    ({"stream": "yes"}, "stream"), ({"n": 2}, "n"), ({"response_format": "url"}, "response_format"),
    ({"output_format": "webp"}, "output_format"),
])
def test_bad_stream_input_is_a_4xx_naming_the_field(extra, field):
    async def go(http, inst):
        r = await http.post("/v1/images/generations",
                            json={"model": "tiny-sd3", "prompt": "x", "stream": True, "partial_images": 1, **extra})
        return r.status_code, r.json()
    status, body = run_http(CFG, go)
    assert 400 <= status < 500, (status, body)
    assert body["error"]["param"] == field and field in body["error"]["message"]


def test_the_openai_client_sees_bad_partial_images_as_a_bad_request():
    async def go(client, http, inst):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            await _stream(client, 4)
        return e.value.body
    body = run_openai(CFG, go)
    assert body["param"] == "partial_images"


def test_preview_steps_are_evenly_spaced_and_always_n():
    assert preview_steps(0, 28) == []
    assert preview_steps(1, 28) == [14]
    assert preview_steps(3, 28) == [7, 14, 21]
    assert preview_steps(3, 2) == [1, 1, 2] or len(preview_steps(3, 2)) == 3
    assert all(1 <= s <= 2 for s in preview_steps(3, 2))


def test_latent_rgb_upsamples_by_the_vae_factor():
    x = np.random.default_rng(0).standard_normal((16, 8, 8)).astype(np.float32)
    img = latent_rgb(x, 8)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert latent_rgb(x[:4], 2).shape == (16, 16, 3)


def test_real_stages_stream_previews_and_the_same_image_as_without_stream():
    """The tiny SD3 on real stage replicas in-process: previews come from the diffuse loop's
    latents and change nothing: the completed image equals the non-streamed one."""
    async def go(client, http, inst):
        events = await _stream(client, 2)
        plain = await client.images.generate(model="tiny-sd3", prompt="a red boat", size="64x64",
                                             extra_body={"seed": 7, "steps": 4})
        return events, plain
    events, plain = run_openai({"models": ["tiny-sd3"]}, go, real=True)
    done = _check_events(events, 2)
    parts = [_pixels(e.b64_json) for e in events[:-1]]
    assert all(p.shape == (64, 64, 3) for p in parts) and not np.array_equal(parts[0], parts[1])
    assert np.array_equal(_pixels(done.b64_json), _pixels(plain.data[0].b64_json))


def test_a_partial_image_taken_by_a_poll_in_flight_when_the_diffuse_ends_still_reaches_the_client():
    """The replica answers a `previews` poll by taking the images out of its mailbox: a poll
    under way when the diffuse call returns must be let finish, not cancelled (CI lost one so)."""
    async def go(client, http, inst):
        diffuse = inst.stages["diffuse-w1"].handle
        take, run = diffuse.previews.fn, diffuse.run.fn
        taken = asyncio.Event()

        async def slow_answer(rid, grant=None, drop=False):
            got = await take(rid, grant, drop)  # taken on the replica at once ...
            if got and not drop:
                taken.set()
                await asyncio.sleep(0.2)  # ... answered after the diffuse call has returned
            return got

        async def run_until_a_poll_took_images(prev, grant):
            out = await run(prev, grant)
            await taken.wait()
            return out
        diffuse.previews.fn, diffuse.run.fn = slow_answer, run_until_a_poll_took_images
        return await _stream(client, 3)
    events = run_openai(CFG, go)
    _check_events(events, 3)
