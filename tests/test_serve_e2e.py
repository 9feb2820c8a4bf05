"""End to end through Ray Serve: one local Ray (16 fake GPUs) for the module, three apps on it.

- `/tiny`: deployments/tiny-cpu.yaml (real tiny SD3 executors on CPU);
- `/emu`: emulated executors on fake GPUs, with a policy that re-plans as the mix shifts;
- `/jsq`: emulated, four diffuse replicas (no GPUs reserved), for replica routing.
"""
import base64
import concurrent.futures as cf
import io
import time

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from trident_rs.serve.app import build_app
from trident_rs.devtools.local import private_serve  # noqa: E402

EMU_ARGS = {
    "models": ["sd3", "cogvideox"],
    "executor": "emulated",
    "time_scale": 0.01,
    "cluster": {"nodes": 2, "gpus_per_node": 8},
    "deployments": [
        {"stage": "encode", "width": 1, "replicas": 1, "max_replicas": 2},
        {"stage": "diffuse", "width": 1, "replicas": 1, "max_replicas": 3},
        {"stage": "diffuse", "width": 4, "replicas": 1, "max_replicas": 2},
        {"stage": "decode", "width": 1, "replicas": 1, "max_replicas": 2},
    ],
    "policy": {"name": "greedy", "tick_s": 0.25, "options": {"replan_s": 1.0, "window_s": 3.0}},
}

JSQ_ARGS = {
    "models": ["sd3"], "executor": "emulated", "time_scale": 0.25, "reserve_gpus": False,
    "cluster": {"nodes": 1, "gpus_per_node": 8},
    "deployments": [{"stage": "encode", "width": 1, "replicas": 1},
                    {"stage": "diffuse", "width": 1, "replicas": 4},
                    {"stage": "decode", "width": 1, "replicas": 1}],
    "policy": {"name": "greedy", "options": {"replan": False}},
}


@pytest.fixture(scope="module")
def base_url():
    with private_serve(num_gpus=16) as port:
        tiny = yaml.safe_load(open("deployments/tiny-cpu.yaml"))["applications"][0]["args"]
        serve.run(build_app(tiny), name="tiny", route_prefix="/tiny", blocking=False)
        serve.run(build_app(EMU_ARGS), name="emu", route_prefix="/emu", blocking=False)
        serve.run(build_app(JSQ_ARGS), name="jsq", route_prefix="/jsq")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:  # the tiny app loads diffusers in three replicas
            st = serve.status().applications
            if all(a in st and st[a].status == "RUNNING" for a in ("tiny", "emu", "jsq")):
                break
            time.sleep(1)
        yield url


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_http_image_equals_the_in_process_pipeline(base_url):
    from trident_rs.pipeline_runner import generate
    from trident_rs.request import GenerationParams

    r = httpx.post(f"{base_url}/tiny/v1/images/generations", timeout=120,
                   json={"model": "tiny-sd3", "prompt": "a red fox", "size": "64x64", "seed": 7, "steps": 3})
    assert r.status_code == 200, r.text
    img = _png(r.json()["data"][0]["b64_json"])
    ref = generate(GenerationParams(model="tiny-sd3", prompt="a red fox", height=64, width=64, seed=7,
                                    steps=3).resolved())
    ref = np.asarray(ref).reshape(-1, 64, 64, 3)[0]
    assert img.shape == (64, 64, 3)
    assert np.array_equal(img, ref)
    assert img.std() > 0  # a real picture, not a constant


def test_eight_concurrent_requests_all_succeed(base_url):
    def one(seed):
        r = httpx.post(f"{base_url}/tiny/v1/generate", timeout=180,
                       json={"model": "tiny-sd3", "prompt": f"prompt {seed}", "height": 64, "width": 64,
                             "seed": seed, "steps": 2})
        return r.status_code, r.json()

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [s for s, _ in results] == [200] * 8
    images = [_png(body["b64"]) for _, body in results]
    assert len({img.tobytes() for img in images}) == 8  # different seeds, different pictures


def test_openai_client_gets_an_image(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/tiny/v1", api_key="unused", timeout=120)
    out = client.images.generate(model="tiny-sd3", prompt="a boat", size="64x64", n=2,
                                 response_format="b64_json", extra_body={"seed": 3, "steps": 2})
    assert len(out.data) == 2
    assert all(_png(d.b64_json).shape == (64, 64, 3) for d in out.data)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.images.generate(model="no-such-model", prompt="x")


@pytest.mark.parametrize("path, body, status, needle", [
    ("/tiny/v1/images/generations", {"model": "nope", "prompt": "x"}, 404, "unknown model"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "size": "60x64"}, 422, "width"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "size": "big"}, 422, "size"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "steps": 0}, 422, "steps"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "n": "many"}, 422, "n"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "n": 99}, 422, "n"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "response_format": "gif"}, 422,
     "response_format"),
    ("/tiny/v1/images/generations", {"model": "tiny-sd3"}, 422, "prompt"),
    ("/tiny/v1/generate", {"model": "tiny-sd3", "prompt": "x", "bogus": 1}, 422, "bogus"),
    ("/tiny/v1/generate", {"model": "tiny-sd3", "prompt": "x", "seed": -1}, 422, "seed"),
    ("/tiny/v1/generate", {"model": "sd3", "prompt": "x"}, 422, "not served"),
    ("/tiny/v1/videos", {"model": "tiny-sd3", "prompt": "x"}, 422, "makes images"),
    ("/emu/v1/videos", {"model": "cogvideox", "prompt": "x", "num_frames": 10}, 422, "num_frames"),
])
def test_bad_input_gets_a_4xx_with_a_message(base_url, path, body, status, needle):
    r = httpx.post(base_url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_unknown_job_are_4xx(base_url):
    r = httpx.post(f"{base_url}/tiny/v1/images/generations", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/tiny/v1/videos/video_nope", timeout=30)
    assert r.status_code == 404 and "no video job" in r.json()["error"]["message"]
    assert httpx.get(f"{base_url}/tiny/healthz").json()["status"] == "ok"


def test_video_job_is_polled_to_an_mp4(base_url):
    from trident_rs.client import TridentClient

    with TridentClient(f"{base_url}/emu", timeout_s=60) as client:
        assert set(client.models()) == {"sd3", "cogvideox"}
        mp4 = client.video("waves", model="cogvideox", size="256x256", num_frames=17, steps=4, poll_s=0.2)
    assert mp4[4:8] == b"ftyp"


def _running(app: str) -> dict[str, int]:
    deps = serve.status().applications[app].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deps.items() if "-w" in name}


def test_mix_shift_reshapes_replicas_and_loses_no_request(base_url):
    emu = f"{base_url}/emu"
    before = _running("emu")

    def send(size, steps, seed):
        r = httpx.post(f"{emu}/v1/images/generations", timeout=120,
                       json={"model": "sd3", "prompt": "x", "size": size, "steps": steps, "seed": seed})
        return r.status_code

    statuses = []
    with cf.ThreadPoolExecutor(4) as pool:
        statuses += list(pool.map(lambda i: send("256x256", 4, i), range(8)))  # small, cheap mix
        t_shift = time.time()
        futures = [pool.submit(send, "2048x2048", 28, i) for i in range(24)]  # shift: large images
        changed_at = None
        while changed_at is None and time.time() - t_shift < 90:
            replans = httpx.get(f"{emu}/v1/status", timeout=30).json()["replans"]
            later = [r for r in replans if r["wall"] >= t_shift and r["counts"] != replans[0]["counts"]]
            if later:
                changed_at = later[-1]["wall"]
            time.sleep(0.2)
        statuses += [f.result() for f in futures]
    assert changed_at is not None, "the controller never re-planned after the shift"
    deadline = time.time() + 90
    while _running("emu") == before and time.time() < deadline:
        time.sleep(0.5)
    after = _running("emu")
    assert after != before, f"serve status still shows {before}"
    assert statuses == [200] * len(statuses), statuses  # nothing lost while replicas moved


def test_a_short_request_goes_to_the_idle_replica_not_behind_a_long_one(base_url):
    """Three 2048² requests hold three of four diffuse replicas (~9.5 s each): a short 256²
    request must start on the fourth (trident_rs.serve.routing). Serve's default router samples
    two replicas, so each short one would queue behind a long one half of the time."""
    url = f"{base_url}/jsq"

    def send(size):
        return httpx.post(f"{url}/v1/images/generations", timeout=120,
                          json={"model": "sd3", "prompt": "x", "size": size, "steps": 28})

    with cf.ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(send, "2048x2048") for _ in range(3)]
        deadline = time.time() + 30
        while httpx.get(f"{url}/v1/status", timeout=30).json()["queues"].get("diffuse-w1") != 3:
            assert time.time() < deadline, "the long requests never reached diffuse"
            time.sleep(0.1)
        took = []
        for _ in range(5):
            t0 = time.time()
            assert send("256x256").status_code == 200
            took.append(time.time() - t0)
        assert not any(f.done() for f in longs)  # the long ones held their replicas throughout
        assert [f.result().status_code for f in longs] == [200] * 3
    assert max(took) < 3.0, took


# -- issue 18: the OpenAI videos API, response_format url and idempotency, through Serve -----------------
def _openai(url: str):
    import warnings

    openai = pytest.importorskip("openai")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks videos.* deprecated
    return openai, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_client_video_jobs_over_serve(base_url):
    """create / retrieve / list / download_content / delete with the official client; a deleted
    running job is cancelled in the controller (its GPUs freed), not only dropped from the list."""
    emu = f"{base_url}/emu"
    openai, client = _openai(emu)
    v = client.videos.create(model="cogvideox", prompt="waves", seconds="1", size="256x256", extra_body={"steps": 4})
    assert (v.status, v.seconds, v.size, v.model_extra["num_frames"]) == ("queued", "1", "256x256", 17)
    seen = []
    deadline = time.time() + 60
    while (v := client.videos.retrieve(v.id)).status not in ("completed", "failed"):
        seen.append(v.progress)
        assert time.time() < deadline
        time.sleep(0.1)
    assert v.status == "completed" and v.progress == 100 and seen == sorted(seen), (v, seen)
    assert client.videos.download_content(v.id).content[4:8] == b"ftyp"
    thumb = client.videos.download_content(v.id, variant="thumbnail").content
    assert Image.open(io.BytesIO(thumb)).format == "PNG"  # (emulated executors decode to small frames)
    with pytest.raises(openai.ConflictError, match="completed"):
        client.videos.delete(v.id)

    # a long job (~5-15 s of emulated diffuse), deleted while it diffuses
    long = client.videos.create(model="cogvideox", prompt="a long one", seconds="5", extra_body={"steps": 50})
    deadline = time.time() + 30
    while (got := client.videos.retrieve(long.id)).model_extra.get("stage") != "diffuse":
        assert got.status in ("queued", "in_progress") and time.time() < deadline, got
        time.sleep(0.05)
    assert [x.id for x in client.videos.list(limit=2).data] == [long.id, v.id]  # newest first
    gone = client.videos.delete(long.id)
    assert gone.deleted and gone.object == "video.deleted"
    deadline = time.time() + 10
    while httpx.get(f"{emu}/v1/requests/{long.id}", timeout=30).json()["state"] != "cancelled":
        assert time.time() < deadline, "the controller never heard of the cancellation"
        time.sleep(0.1)
    st = httpx.get(f"{emu}/v1/status", timeout=30).json()
    assert st["inflight_launches"] == 0 and long.id not in [r["id"] for r in st["inflight"]]
    assert st["queues"].get("diffuse-w1", 0) == 0 and st["queues"].get("diffuse-w4", 0) == 0
    with pytest.raises(openai.NotFoundError, match="deleted"):
        client.videos.retrieve(long.id)
    assert long.id not in [x.id for x in client.videos.list()]


def test_openai_client_image_url_and_idempotency_over_serve(base_url):
    openai, client = _openai(f"{base_url}/tiny")
    body = {"steps": 2, "seed": 7}
    out = client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", response_format="url",
                                 extra_body=body)
    url = out.data[0].url
    assert url.startswith(f"{base_url}/tiny/v1/files/file_"), url
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    b64 = client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", extra_body=body)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), _png(b64.data[0].b64_json))

    # one generation for a repeated Idempotency-Key, concurrent and later (the controller counts them)
    emu = f"{base_url}/emu"
    before = httpx.get(f"{emu}/v1/status", timeout=30).json()["stats"]["submitted"]
    req = {"model": "sd3", "prompt": "x", "size": "512x512", "steps": 8, "response_format": "url"}

    def send(_):
        return httpx.post(f"{emu}/v1/images/generations", json=req, headers={"Idempotency-Key": "e2e-1"}, timeout=60)

    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(send, range(3)))
    answers.append(send(0))
    assert [a.status_code for a in answers] == [200] * 4 and len({a.text for a in answers}) == 1
    assert httpx.get(f"{emu}/v1/status", timeout=30).json()["stats"]["submitted"] == before + 1


def test_openai_client_streams_partial_images_over_serve(base_url):
    """Issue 18 part 2 over Ray Serve: the diffuse replica's previews reach the client in order,
    then the completed image, equal to the non-streamed one."""
    openai, client = _openai(f"{base_url}/tiny")
    body = {"steps": 4, "seed": 11}
    events = list(client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", stream=True,
                                         partial_images=2, extra_body=body))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(_png(e.b64_json).shape == (64, 64, 3) for e in events)
    plain = client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", extra_body=body)
    assert np.array_equal(_png(events[-1].b64_json), _png(plain.data[0].b64_json))
    only = list(client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", stream=True,
                                       partial_images=0, extra_body=body))
    assert [e.type for e in only] == ["image_generation.completed"]


def test_openai_client_edits_an_image_over_serve(base_url):
    """Issue 18 part 1 over Ray Serve: images.edit with a mask (inpainting; the encode replica
    VAE-encodes the image) gives the local stage split's image."""
    from trident_rs.pipeline_runner import LocalPipeline
    from trident_rs.request import GenerationParams

    openai, client = _openai(f"{base_url}/tiny")
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.full((64, 64, 4), 255, dtype=np.uint8)
    mask[:32, :32, 3] = 0  # OpenAI: transparent = edit
    extra = {"seed": 3, "steps": 3, "strength": 0.7}
    out = client.images.edit(model="tiny-sd3", image=("in.png", _png_bytes(image), "image/png"),
                             mask=("m.png", _png_bytes(mask), "image/png"), prompt="a red cube", extra_body=extra)
    white = np.zeros((1, 64, 64), dtype=np.uint8)
    white[:, :32, :32] = 255  # diffusers: white = repaint
    p = GenerationParams(model="tiny-sd3", prompt="a red cube", height=64, width=64, edit="inpaint", **extra)
    (local,) = LocalPipeline("tiny-sd3").run([p], [{"image": image[None], "mask": white}])
    assert np.array_equal(_png(out.data[0].b64_json), local.tensors["frames"][0])


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
