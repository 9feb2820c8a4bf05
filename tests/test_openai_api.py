"""Issue 18 parts 3-5 without Ray: the OpenAI videos API, `response_format: url` and idempotency,
driven by the official `openai` client (AsyncOpenAI over httpx's ASGI transport) and plain HTTP
against the ingress's real FastAPI app, with a fake controller and fake stages
(tests/ingress_fakes.py). tests/test_serve_e2e.py runs the same client against Ray Serve."""
import asyncio
import io
import json
import re
import time
import warnings

import pytest
from PIL import Image

from ingress_fakes import _Call, _Method, run_http, settle
from trident_rs.errors import ConflictError, InvalidRequestError, NotFoundError
from trident_rs.request import GenerationParams
from trident_rs.serve.idempotency import IdempotencyCache
from trident_rs.serve.videos import VideoJob, estimate_progress, frames_for_seconds

openai = pytest.importorskip("openai")
warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks videos.* deprecated

PNG = b"\x89PNG\r\n\x1a\n"
VIDEO = {"model": "tiny-cogvideox", "prompt": "waves", "num_frames": 9, "steps": 2}


def _cfg(tmp_path, **extra):
    return {"models": ["tiny-sd3", "tiny-cogvideox"], "files": {"url": str(tmp_path / "files")}, **extra}


def run_openai(config, scenario, **kw):
    """`scenario(client, http, ingress)` with an AsyncOpenAI client on the in-process app."""
    async def wrap(http, inst):
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        return await scenario(client, http, inst)
    return run_http(config, wrap, **kw)


async def _until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- seconds -> frames ---------------------------------------------------------------------------
@pytest.mark.parametrize("model, seconds, frames", [
    ("cogvideox", "4", 65), ("cogvideox", 5, 81), ("cogvideox", "8", 129), ("wan", "4", 65), ("wan", 5, 81),
    ("hunyuanvideo", "4", 97), ("hunyuanvideo", 5.3, 129), ("tiny-cogvideox", "2", 33), ("tiny-cogvideox", "1", 17),
    ("tiny-wan", 0.25, 5),
])
def test_seconds_map_to_a_frame_count_the_model_takes(model, seconds, frames):
    from trident_rs.models.spec import get_spec

    assert frames_for_seconds(model, seconds) == frames
    assert get_spec(model).valid_frames(frames)


@pytest.mark.parametrize("model, seconds, needle", [
    ("cogvideox", "0", "not a positive number"), ("cogvideox", "-4", "not a positive number"),
    ("cogvideox", "four", "not a positive number"), ("cogvideox", "nan", "not a positive number"),
    ("cogvideox", True, "not a positive number"), ("cogvideox", [4], "not a positive number"),
    ("cogvideox", "12", "at most 161 frames (10 s)"), ("tiny-cogvideox", "4", "at most 49 frames (3 s)"),
    ("cogvideox", "0.2", "too short"), ("sd3", "4", "makes images"),
])
def test_bad_seconds_name_the_field(model, seconds, needle):
    with pytest.raises(InvalidRequestError, match=re.escape(needle)) as e:
        frames_for_seconds(model, seconds)
    assert e.value.field == "seconds"


# -- progress ------------------------------------------------------------------------------------------
def test_progress_counts_stages_and_whole_denoising_steps():
    params = GenerationParams(model="tiny-cogvideox", prompt="x", num_frames=9, steps=10).resolved()
    times = {"encode": 1.0, "diffuse": 8.0, "decode": 1.0}
    stage_s = lambda p, stage, width=1: times[stage] / width  # noqa: E731
    job = VideoJob("video_x", params.model, "x", params)
    assert estimate_progress(job, stage_s) == 0 and job.live_status == "queued"
    job.track.update(stage="encode", t=100.0, width=1)
    assert estimate_progress(job, stage_s, now=100.5) == 5 and job.live_status == "in_progress"
    assert estimate_progress(job, stage_s, now=200.0) == 9  # an overdue stage stops at 90% of itself
    job.track["done"].append(("encode", 1))
    job.track.update(stage="diffuse", t=200.0, width=2)  # 4 s at width 2: 0.4 s a step
    job.progress = 0
    assert estimate_progress(job, stage_s, now=201.0) == int(100 * (1 + 0.2 * 4) / 6)  # 2 whole steps
    assert estimate_progress(job, stage_s, now=300.0) == int(100 * (1 + 0.9 * 4) / 6)  # never the last step
    job.track["done"].append(("diffuse", 2))
    job.track.update(stage="decode", t=300.0, width=1)
    assert estimate_progress(job, stage_s, now=300.0) == int(100 * 5 / 6)
    job.progress = 95
    assert estimate_progress(job, stage_s, now=300.0) == 95  # never goes back
    job.status = "completed"
    assert estimate_progress(job, stage_s) == 100


# -- videos, with the official client ------------------------------------------------------------------
def test_openai_client_creates_polls_lists_downloads_and_deletes_videos(tmp_path):
    gate = asyncio.Event()

    async def scenario(client, http, inst):
        gate.__init__()  # bind to this loop
        # create: multipart, as the client sends it; seconds -> frames at 16 fps
        v = await client.videos.create(model="tiny-cogvideox", prompt="waves", seconds="1", size="64x64",
                                       extra_body={"steps": 2, "seed": 5})
        assert (v.object, v.status, v.model, v.size, v.seconds, v.progress) == (
            "video", "queued", "tiny-cogvideox", "64x64", "1", 0)
        assert v.model_extra["num_frames"] == 17 and v.model_extra["fps"] == 16 and v.id.startswith("video_")
        await _until(lambda: inst.stages["diffuse-w1"].calls == 1)  # held at the gate in diffuse
        got = await client.videos.retrieve(v.id)
        assert got.status == "in_progress" and 0 <= got.progress < 100 and got.model_extra["stage"] == "diffuse"
        with pytest.raises(openai.ConflictError, match="in_progress"):  # no content before it completes
            await client.videos.download_content(v.id)
        gate.set()
        await _until(lambda: inst.videos.jobs[v.id].status == "completed")
        done = await client.videos.retrieve(v.id)
        assert done.progress == 100 and done.completed_at >= done.created_at and done.error is None
        assert done.expires_at and done.expires_at > done.completed_at
        mp4 = await client.videos.download_content(v.id)
        assert mp4.content[4:8] == b"ftyp" and mp4.response.headers["content-type"] == "video/mp4"
        thumb = await client.videos.download_content(v.id, variant="thumbnail")
        assert thumb.content.startswith(PNG) and Image.open(io.BytesIO(thumb.content)).size == (16, 16)

        # list: newest first by default, pages of `limit` with has_more / after
        more = [await client.videos.create(model="tiny-cogvideox", prompt=f"p{i}", extra_body={"steps": 1})
                for i in range(3)]
        await _until(lambda: all(j.finished for j in inst.videos.jobs.values()))
        ids = [v.id] + [m.id for m in more]
        page = await client.videos.list(limit=2)
        assert [x.id for x in page.data] == ids[::-1][:2] and page.has_more
        assert [x.id async for x in client.videos.list(limit=2)] == ids[::-1]  # auto-pagination via last_id
        asc = await client.videos.list(order="asc", after=ids[0], limit=10)
        assert [x.id for x in asc.data] == ids[1:] and not asc.has_more

        # delete a finished job: 409 naming why; an unknown one: 404
        with pytest.raises(openai.ConflictError, match="completed: DELETE cancels a queued or in-progress"):
            await client.videos.delete(v.id)
        with pytest.raises(openai.NotFoundError, match="no video job"):
            await client.videos.delete("video_nope")
        with pytest.raises(openai.NotFoundError):
            await client.videos.retrieve("video_nope")

        # delete a running job: its stage call is cancelled, the controller frees what it holds
        gate.clear()
        run = await client.videos.create(model="tiny-cogvideox", prompt="long", extra_body={"steps": 1})
        await _until(lambda: inst.stages["diffuse-w1"].calls == 5)
        cancelled_before = _Call.cancelled_total
        gone = await client.videos.delete(run.id)
        assert (gone.id, gone.object, gone.deleted) == (run.id, "video.deleted", True)
        await settle()
        assert (run.id, "cancelled") in inst.controller.finished
        assert _Call.cancelled_total > cancelled_before  # the diffuse call was cancelled on its replica
        assert inst.stages["decode-w1"].calls == 4  # it never reached decode
        assert inst.admission.per_model == {} and run.id not in inst.inflight.states
        with pytest.raises(openai.NotFoundError, match="deleted"):
            await client.videos.retrieve(run.id)
        assert run.id not in [x.id for x in (await client.videos.list(limit=100)).data]
        gate.set()

    run_openai(_cfg(tmp_path), scenario, gate=gate)


def test_a_queued_job_is_deleted_before_its_first_stage(tmp_path):
    async def scenario(c, inst):
        held = asyncio.Event()
        real = inst.controller.submit.fn

        entered = []

        async def slow_submit(*args):  # the controller has not launched its first stage yet
            entered.append(args[0])
            await held.wait()
            return await real(*args)
        inst.controller.submit = _Method(slow_submit, eager=True)
        job = (await c.post("/v1/videos", json=VIDEO)).json()
        await _until(lambda: entered == [job["id"]])
        assert (await c.get(f"/v1/videos/{job['id']}")).json()["status"] == "queued"
        r = await c.delete(f"/v1/videos/{job['id']}")
        assert r.status_code == 200 and r.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
        await settle()
        assert (job["id"], "cancelled") in inst.controller.finished
        assert inst.admission.per_model == {} and inst.stages["encode-w1"].calls == 0
        assert (await c.get(f"/v1/videos/{job['id']}")).status_code == 404
        held.set()

    run_http(_cfg(tmp_path), scenario)


def test_cancel_endpoint_fails_the_job_with_code_cancelled(tmp_path):
    gate = asyncio.Event()

    async def scenario(c, inst):
        gate.__init__()
        job = (await c.post("/v1/videos", json=VIDEO)).json()
        await _until(lambda: inst.stages["diffuse-w1"].calls == 1)
        assert (await c.post(f"/v1/requests/{job['id']}/cancel")).status_code == 200
        await _until(lambda: inst.videos.jobs[job["id"]].finished)
        got = (await c.get(f"/v1/videos/{job['id']}")).json()
        assert got["status"] == "failed" and got["error"]["code"] == "cancelled"
        r = await c.get(f"/v1/videos/{job['id']}/content")
        assert r.status_code == 409 and "failed" in r.json()["error"]["message"]
        gate.set()

    run_http(_cfg(tmp_path), scenario, gate=gate)


def test_wait_answers_with_the_mp4_or_its_url(tmp_path):
    async def scenario(c, inst):
        r = await c.post("/v1/videos", json={**VIDEO, "wait": True})
        assert r.status_code == 200, r.text
        body = r.json()
        import base64

        assert body["status"] == "completed" and base64.b64decode(body["b64_json"])[4:8] == b"ftyp"
        assert body["num_frames"] == 9 and "url" not in body
        r = await c.post("/v1/videos", json={**VIDEO, "wait": True, "response_format": "url"})
        body = r.json()
        assert "b64_json" not in body and body["url"].startswith("http://t/v1/files/file_")
        got = await c.get(body["url"])
        assert got.status_code == 200 and got.content[4:8] == b"ftyp"
        assert (await c.get(f"/v1/videos/{body['id']}")).json()["url"] == body["url"]  # the object keeps it
        assert len((await c.get("/v1/videos")).json()["data"]) == 2  # waited jobs are listed too

    run_http(_cfg(tmp_path), scenario)


@pytest.mark.parametrize("method, path, body, status, field", [
    ("GET", "/v1/videos/video_nope", None, 404, "video_id"),
    ("GET", "/v1/videos/video_nope/content", None, 404, "video_id"),
    ("DELETE", "/v1/videos/video_nope", None, 404, "video_id"),
    ("GET", "/v1/videos?limit=0", None, 422, "limit"),
    ("GET", "/v1/videos?limit=101", None, 422, "limit"),
    ("GET", "/v1/videos?limit=many", None, 422, "limit"),
    ("GET", "/v1/videos?order=up", None, 422, "order"),
    ("GET", "/v1/videos?after=video_nope", None, 404, "after"),
    ("POST", "/v1/videos", {**VIDEO, "num_frames": None, "seconds": "9"}, 422, "seconds"),
    ("POST", "/v1/videos", {**VIDEO, "num_frames": None, "seconds": "soon"}, 422, "seconds"),
    ("POST", "/v1/videos", {**VIDEO, "seconds": "1"}, 422, "seconds"),  # and num_frames
    ("POST", "/v1/videos", {**VIDEO, "response_format": "gif"}, 422, "response_format"),
    ("POST", "/v1/videos", {**VIDEO, "response_format": "b64_json"}, 422, "response_format"),  # needs wait
    ("POST", "/v1/videos", {**VIDEO, "input_reference": {"image_url": "x"}}, 422, "input_reference"),
    ("POST", "/v1/videos", {**VIDEO, "model": "tiny-sd3"}, 422, "model"),
    ("POST", "/v1/videos", {"model": "tiny-cogvideox"}, 422, "prompt"),
    ("POST", "/v1/videos", [1, 2], 422, "body"),
    ("POST", "/v1/images/generations", {"model": "tiny-sd3", "prompt": "x", "response_format": "gif"}, 422,
     "response_format"),
    ("GET", "/v1/files/file_0123456789abcdef0123456789abcdef/content", None, 404, "file_id"),
    ("GET", "/v1/files/file_../content", None, 404, "file_id"),
    ("GET", "/v1/files/nope", None, 404, "file_id"),
])
def test_bad_input_gets_a_4xx_naming_the_field(tmp_path, method, path, body, status, field):
    async def scenario(c, inst):
        r = await c.request(method, path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == field and err["message"], err

    run_http(_cfg(tmp_path), scenario)


def test_multipart_bodies_are_checked_like_json(tmp_path):
    async def scenario(c, inst):
        r = await c.post("/v1/videos", data={"prompt": "x", "model": "tiny-cogvideox", "steps": "lots"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
        r = await c.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", PNG, "image/png")})
        assert r.status_code == 422 and r.json()["error"]["param"] == "input_reference"
        r = await c.post("/v1/videos", content=b"--zz\r\ngarbage", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 422
        r = await c.post("/v1/videos", data={"prompt": "x", "seconds": "1", "steps": "1"})  # default model
        assert r.status_code == 200 and r.json()["model"] == "tiny-cogvideox" and r.json()["num_frames"] == 17

    run_http(_cfg(tmp_path), scenario)


# -- response_format: url ------------------------------------------------------------------------------
def test_openai_client_gets_image_urls_that_serve_the_png_and_expire(tmp_path):
    cfg = _cfg(tmp_path, files={"url": f"file://{tmp_path / 'store'}", "expires_after_s": 0.5},
               limits={"api_keys": ["sekret"]})

    async def scenario(client, http, inst):
        client.api_key = "sekret"
        out = await client.images.generate(model="tiny-sd3", prompt="a boat", n=2, response_format="url",
                                           extra_body={"steps": 1})
        urls = [d.url for d in out.data]
        assert len(set(urls)) == 2 and all(u.startswith("http://t/v1/files/file_") for u in urls)
        assert all(d.b64_json is None for d in out.data)
        for u in urls:  # no API key needed: the random id is the credential
            r = await http.get(u)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(PNG)
        file_id = urls[0].split("/")[-2]
        assert (await http.get(f"/v1/files/{file_id}")).status_code == 401  # metadata needs the key
        meta = (await http.get(f"/v1/files/{file_id}", headers={"Authorization": "Bearer sekret"})).json()
        assert meta["bytes"] > 0 and meta["expires_at"] >= meta["created_at"] and meta["mime_type"] == "image/png"
        assert len(list((tmp_path / "store").iterdir())) == 4  # two files, each with its metadata
        await asyncio.sleep(0.6)
        r = await http.get(urls[0])
        assert r.status_code == 410 and "expired" in r.json()["error"]["message"]
        assert (await http.get(urls[0])).status_code == 404  # removed with the 410
        assert not any(file_id in p.name for p in (tmp_path / "store").iterdir())

    run_openai(cfg, scenario)


def test_an_unusable_store_fails_at_start_with_a_config_error(tmp_path):
    from trident_rs.errors import ConfigError

    with pytest.raises(ConfigError, match="files.url"):
        run_http(_cfg(tmp_path, files={"url": "nosuchprotocol://bucket/x"}), lambda c, i: None)


# -- idempotency -----------------------------------------------------------------------------------------
def test_a_repeated_idempotency_key_never_starts_a_second_generation(tmp_path):
    gate = asyncio.Event()
    body = {"model": "tiny-sd3", "prompt": "x", "size": "64x64", "steps": 1, "response_format": "url"}

    async def scenario(c, inst):
        gate.__init__()
        key = {"Idempotency-Key": "k1"}
        first = asyncio.create_task(c.post("/v1/images/generations", json=body, headers=key))
        await _until(lambda: len(inst.controller.submitted) == 1)
        second = asyncio.create_task(c.post("/v1/images/generations", json=body, headers=key))  # joins the first
        await asyncio.sleep(0.05)
        gate.set()
        a, b = await first, await second
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        c3 = await c.post("/v1/images/generations", json=body, headers=key)  # after: the same result
        assert c3.json() == a.json()
        assert len(inst.controller.submitted) == 1 and inst.stages["diffuse-w1"].calls == 1
        r = await c.post("/v1/images/generations", json={**body, "prompt": "y"}, headers=key)
        assert r.status_code == 409 and r.json()["error"]["param"] == "Idempotency-Key"
        assert (await c.post("/v1/images/generations", json=body)).status_code == 200  # no key: a new one
        assert len(inst.controller.submitted) == 2

        # X-Request-Id works the same, on the native endpoint too
        native = {"model": "tiny-sd3", "prompt": "x", "height": 64, "width": 64, "steps": 1}
        rs = [await c.post("/v1/generate", json=native, headers={"X-Request-Id": "r7"}) for _ in range(2)]
        assert rs[0].json() == rs[1].json() and len(inst.controller.submitted) == 3

        # videos: the same job
        jobs = [(await c.post("/v1/videos", json=VIDEO, headers={"Idempotency-Key": "v1"})).json()
                for _ in range(2)]
        assert jobs[0]["id"] == jobs[1]["id"]
        await _until(lambda: inst.videos.jobs[jobs[0]["id"]].finished)
        again = (await c.post("/v1/videos", json=VIDEO, headers={"Idempotency-Key": "v1"})).json()
        assert again["id"] == jobs[0]["id"] and again["status"] == "completed"
        assert len(inst.controller.submitted) == 4 and len(inst.videos) == 1
        r = await c.post("/v1/videos", json=VIDEO, headers={"Idempotency-Key": "x" * 300})
        assert r.status_code == 422 and r.json()["error"]["param"] == "Idempotency-Key"
        st = (await c.get("/v1/status")).json()["ingress"]["idempotency"]
        assert st["runs"] == 3 and st["joined"] == 1 and st["replays"] >= 3 and st["conflicts"] == 1

    run_http(_cfg(tmp_path), scenario, gate=gate)


def test_a_key_whose_run_failed_or_whose_job_was_deleted_runs_again(tmp_path):
    gate = asyncio.Event()

    async def scenario(c, inst):
        gate.__init__()
        gate.set()
        key = {"Idempotency-Key": "again"}
        native = {"model": "tiny-sd3", "prompt": "x", "height": 64, "width": 64, "steps": 1}
        inst.stages["decode-w1"].deaths = [ValueError("bad latents")]  # the request's own error
        assert (await c.post("/v1/generate", json=native, headers=key)).status_code == 500
        assert (await c.post("/v1/generate", json=native, headers=key)).status_code == 200  # ran again
        assert len(inst.controller.submitted) == 2
        gate.clear()  # the video job is held in diffuse
        first = (await c.post("/v1/videos", json=VIDEO, headers=key)).json()
        await _until(lambda: inst.stages["diffuse-w1"].calls == 3)
        assert (await c.delete(f"/v1/videos/{first['id']}")).status_code == 200
        second = (await c.post("/v1/videos", json=VIDEO, headers=key)).json()
        assert second["id"] != first["id"]
        gate.set()

    run_http(_cfg(tmp_path), scenario, gate=gate)


def test_idempotency_cache_bounds_and_ttl():
    async def go():
        now = [0.0]
        cache = IdempotencyCache(ttl_s=10, max_keys=2, max_bytes=100, clock=lambda: now[0])
        runs = []

        async def make(v):
            runs.append(v)
            return v

        for k in ("a", "b", "c"):
            assert await cache.run("/x", ("K", k), "fp", lambda k=k: make(k)) == k
        assert list(cache.entries) == [("/x", "b"), ("/x", "c")]  # least recent dropped
        assert await cache.run("/x", ("K", "b"), "fp", lambda: make("again")) == "b"
        with pytest.raises(ConflictError):
            await cache.run("/x", ("K", "b"), "other", lambda: make("z"))
        now[0] = 11
        assert await cache.run("/x", ("K", "b"), "fp", lambda: make("fresh")) == "fresh"  # expired
        await cache.run("/x", ("K", "big"), "fp", lambda: make("y" * 200))  # over max_bytes: not kept
        assert ("/x", "big") not in cache.entries and cache.bytes <= 100
        assert await cache.run("/y", None, "fp", lambda: make("nokey")) == "nokey"
        assert runs == ["a", "b", "c", "fresh", "y" * 200, "nokey"]
    asyncio.run(go())


def test_video_jobs_keep_running_ones_and_refuse_more_when_all_run(tmp_path):
    gate = asyncio.Event()

    async def scenario(c, inst):
        gate.__init__()
        a = (await c.post("/v1/videos", json=VIDEO)).json()
        b = await c.post("/v1/videos", json=VIDEO)
        assert b.status_code == 429 and "max_video_jobs" in b.json()["error"]["message"]
        gate.set()
        await _until(lambda: inst.videos.jobs[a["id"]].finished)
        c2 = (await c.post("/v1/videos", json=VIDEO)).json()
        assert list(inst.videos.jobs) == [c2["id"]]  # the finished one made room
        assert (await c.get(f"/v1/videos/{a['id']}")).status_code == 404

    run_http(_cfg(tmp_path, limits={"max_video_jobs": 1}), scenario, gate=gate)


def test_not_found_errors_are_typed():
    assert NotFoundError("video_id", "x").http_status == 404 and ConflictError(None, "x").http_status == 409
    assert json.dumps(str(NotFoundError("video_id", "no video job 'a'"))) == '"no video job \'a\'"'


def test_video_content_expires_with_its_files(tmp_path):
    async def scenario(c, inst):
        job = (await c.post("/v1/videos", json=VIDEO)).json()
        await _until(lambda: inst.videos.jobs[job["id"]].finished)
        assert (await c.get(f"/v1/videos/{job['id']}/content")).status_code == 200
        inst.videos.jobs[job["id"]].expires_at = int(time.time()) - 1
        r = await c.get(f"/v1/videos/{job['id']}/content?variant=thumbnail")
        assert r.status_code == 410 and r.json()["error"]["param"] == "video_id"

    run_http(_cfg(tmp_path), scenario)
