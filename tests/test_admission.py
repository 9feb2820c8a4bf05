"""Issue 8 without Ray: limits, admission control, API keys, and an in-process HTTP fuzz.

The HTTP tests drive the ingress's real FastAPI app (routes, exception handlers, guard
middleware) with a fake controller and fake stage handles (tests/ingress_fakes.py).
"""
import asyncio
import types

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from ingress_fakes import FUZZ_CONFIG, http_requests, make_ingress, run_http, settle, unpatch
from trident_rs.errors import InvalidRequestError, OverloadedError
from trident_rs.request import GenerationParams
from trident_rs.serve.admission import Admission
from trident_rs.serve.auth import authorized, bearer, load_keys
from trident_rs.serve.config import AppConfig
from trident_rs.serve.limits import check_limits


def _params(**kw):
    return GenerationParams(**{"model": "tiny-sd3", "prompt": "x", "height": 64, "width": 64, **kw}).resolved()


# -- limits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("limits, kw, field", [
    ({"max_steps": 3}, {"steps": 4}, "steps"),
    ({"max_size": 64}, {"height": 128}, "height"),
    ({"max_prompt_chars": 5}, {"prompt": "x" * 6}, "prompt"),
    ({"max_prompt_chars": 5}, {"negative_prompt": "x" * 6}, "negative_prompt"),
])
def test_limits_name_the_field(limits, kw, field):
    lim = AppConfig.parse({"limits": limits}).limits
    with pytest.raises(InvalidRequestError) as e:
        check_limits(lim, _params(**kw))
    assert e.value.field == field
    at_limit = {k: (v[:5] if isinstance(v, str) else min(v, 64 if k == "height" else 3)) for k, v in kw.items()}
    assert check_limits(lim, _params(**at_limit)).model == "tiny-sd3"


def test_frame_limit():
    lim = AppConfig.parse({"models": ["tiny-cogvideox"], "limits": {"max_frames": 9}}).limits
    p = GenerationParams(model="tiny-cogvideox", prompt="x", num_frames=17).resolved()
    with pytest.raises(InvalidRequestError, match="num_frames"):
        check_limits(lim, p)


# -- admission --------------------------------------------------------------------------------------
def test_queue_is_bounded_per_model_and_released():
    adm = Admission(max_queue=3)
    for i in range(3):
        adm.admit(f"r{i}", _params())
    adm.admit("r0", _params())  # already held: idempotent
    with pytest.raises(OverloadedError) as e:
        adm.admit("r3", _params())
    assert e.value.http_status == 429 and e.value.retry_after_s >= 1
    adm.admit("v0", types.SimpleNamespace(model="other", slo_ms=None))  # another model has its own queue
    adm.release("r1")
    adm.release("r1")  # twice is harmless
    adm.admit("r3", _params())
    for r in ("r0", "r2", "r3", "v0"):
        adm.release(r)
    assert adm.held == {} and adm.per_model == {} and adm.work_s == 0.0


def test_admit_many_is_all_or_nothing():
    adm = Admission(max_queue=4)
    adm.admit_many(["a", "b", "c"], _params())
    with pytest.raises(OverloadedError):
        adm.admit_many(["d", "e"], _params())
    assert set(adm.held) == {"a", "b", "c"}


def test_slo_rejection_follows_the_load():
    p = types.SimpleNamespace(model="m", slo_ms=None)
    adm = Admission(max_queue=100, mode="reject", servers=2, estimate=lambda _: 1.0, slo_scale=4.0)
    admitted = 0
    with pytest.raises(OverloadedError, match="SLO"):
        for i in range(100):  # admitted while own 1 s + held work / 2 servers <= SLO 4 s
            adm.admit(f"r{i}", p)
            admitted += 1
    assert admitted == 7  # 6 held: 1 + 6/2 = 4 s still fits; 7 held: 4.5 s does not
    adm.release("r0")
    adm.admit("r-late", p)  # a finished request makes room again
    best = Admission(max_queue=100, mode="best_effort", servers=2, estimate=lambda _: 1.0)
    for i in range(50):
        best.admit(f"r{i}", p)  # best effort only bounds the queue
    tight = types.SimpleNamespace(model="m", slo_ms=500.0)  # own time alone misses a 0.5 s SLO
    with pytest.raises(OverloadedError):
        Admission(10, "reject", 1, lambda _: 1.0).admit("x", tight)


def test_config_builds_admission():
    cfg = AppConfig.parse({"models": ["tiny-sd3"], "limits": {"max_queue_per_model": 5, "admission": "reject"}})
    adm = Admission.from_config(cfg)
    assert (adm.max_queue, adm.mode, adm.servers) == (5, "reject", 1)
    assert adm.estimate(_params()) > 0
    with pytest.raises(Exception):
        AppConfig.parse({"limits": {"admission": "maybe"}})


# -- auth --------------------------------------------------------------------------------------------
def test_auth_rules():
    keys = load_keys(["k1"], env={"TRIDENT_API_KEYS": " k2 ,,"})
    assert keys == ("k1", "k2")
    assert bearer("Bearer abc") == "abc" and bearer("Basic abc") is None and bearer("Bearer ") is None
    assert authorized((), "/v1/models", None)  # no keys: open
    assert authorized(keys, "/healthz", None)
    assert authorized(keys, "/v1/models", "Bearer k2")
    assert not authorized(keys, "/v1/models", None)
    assert not authorized(keys, "/v1/models", "Bearer k3")
    assert not authorized(keys, "/v1/models", "k1")


# -- the HTTP app in-process ---------------------------------------------------------------------------
_run = run_http


def test_http_full_queue_gets_429_with_retry_after_and_recovers():
    gate = asyncio.Event()
    body = {"model": "tiny-sd3", "prompt": "x", "size": "64x64", "steps": 1}

    async def scenario(c, inst):
        gate.__init__()  # bind to this loop
        held = [asyncio.create_task(c.post("/v1/images/generations", json=body)) for _ in range(3)]
        while sum(inst.admission.per_model.values()) < 3:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/images/generations", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        r = await c.post("/v1/images/generations", json={**body, "n": 2})
        assert r.status_code == 429
        gate.set()
        assert [(await t).status_code for t in held] == [200] * 3
        assert inst.admission.per_model == {}
        assert (await c.post("/v1/images/generations", json=body)).status_code == 200

    _run({"models": ["tiny-sd3"], "limits": {"max_queue_per_model": 3}}, scenario, gate=gate)


def test_http_video_job_is_refused_up_front_when_full():
    gate = asyncio.Event()

    async def scenario(c, inst):
        gate.__init__()
        body = {"model": "tiny-cogvideox", "prompt": "x", "num_frames": 9, "steps": 1}
        first = await c.post("/v1/videos", json=body)
        assert first.status_code == 200 and first.json()["status"] == "queued"
        r = await c.post("/v1/videos", json=body)
        assert r.status_code == 429 and "retry-after" in r.headers
        gate.set()
        for _ in range(200):
            if (await c.get(f"/v1/videos/{first.json()['id']}")).json()["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        assert inst.admission.per_model == {}

    _run({"models": ["tiny-cogvideox"], "limits": {"max_queue_per_model": 1}}, scenario, gate=gate)


def test_http_limits_auth_and_bad_bodies(monkeypatch):
    monkeypatch.setenv("TRIDENT_API_KEYS", "envkey")

    async def scenario(c, inst):
        ok = {"Authorization": "Bearer cfgkey"}
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer envkey"})).status_code == 200
        r = await c.post("/v1/generate", headers=ok, json={"model": "tiny-sd3", "prompt": "x", "steps": 9})
        assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
        r = await c.post("/v1/generate", headers=ok, json={"model": "tiny-sd3", "prompt": "x", "height": "tall"})
        assert r.status_code == 422 and "height" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", headers=ok, content=b"{oops")
        assert r.status_code == 422 and r.json()["error"]["param"] == "body"
        r = await c.post("/v1/generate", headers={**ok, "content-type": "application/json"},
                         content=b'{"prompt": "' + b"x" * 3000 + b'"}')
        assert r.status_code == 413
        r = await c.post("/v1/generate", headers=ok, json={"model": "no-such", "prompt": "x"})
        assert r.status_code == 404
        r = await c.post("/v1/generate", headers=ok, json={"model": "tiny-sd3", "prompt": "x", "steps": 2,
                                                         "height": 64, "width": 64})
        assert r.status_code == 200 and r.json()["format"] == "png"

    _run({"models": ["tiny-sd3"], "limits": {"max_steps": 2, "max_body_bytes": 2048, "api_keys": ["cfgkey"]}},
         scenario)


def test_fuzz_http_api_no_5xx():
    app, inst = make_ingress(FUZZ_CONFIG)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz", timeout=30)
    seen = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(http_requests())
    def one(req):
        method, path, headers, body = req
        r = loop.run_until_complete(client.request(method, path, headers=headers, content=body))
        seen.append(r.status_code)
        assert r.status_code < 500, (method, path, body[:200], r.text[:300])

    try:
        one()
        loop.run_until_complete(asyncio.sleep(0.1))
        assert loop.run_until_complete(client.get("/healthz")).status_code == 200
        r = loop.run_until_complete(client.post("/v1/generate", json={"model": "tiny-sd3", "prompt": "y",
                                                                      "height": 64, "width": 64, "steps": 1}))
        assert r.status_code == 200
        assert len(seen) >= 300 and sum(inst.admission.per_model.values()) == 0
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        unpatch()


# -- cancellation --------------------------------------------------------------------------------------
def test_cancel_endpoint_and_disconnect_cancel_the_work_and_free_the_slot():
    from ingress_fakes import _Call

    gate = asyncio.Event()
    body = {"model": "tiny-sd3", "prompt": "x", "size": "64x64", "steps": 1}

    async def scenario(c, inst):
        gate.__init__()
        assert (await c.post("/v1/requests/nothing/cancel")).status_code == 404
        before = _Call.cancelled_total
        held = asyncio.create_task(c.post("/v1/images/generations", json=body, headers={"X-Request-Id": "abc"}))
        while "abc" not in inst.inflight.states or not inst.inflight.states["abc"].waiting:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/requests/abc/cancel")
        assert r.status_code == 200 and r.json()["cancelled"] == ["abc"]
        r = await held
        assert r.status_code == 499 and "cancelled" in r.json()["error"]["message"]
        assert _Call.cancelled_total > before  # the stage responses got .cancel()
        await settle()  # finish is sent, not waited for
        assert ("abc", "cancelled") in inst.controller.finished
        assert inst.admission.per_model == {} and inst.inflight.states == {}
        # a client that goes away: its handler is cancelled, pending work too
        gone = asyncio.create_task(c.post("/v1/images/generations", json=body, headers={"X-Request-Id": "d"}))
        while "d" not in inst.inflight.states or not inst.inflight.states["d"].waiting:
            await asyncio.sleep(0.01)
        mark = _Call.cancelled_total
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert _Call.cancelled_total > mark
        assert inst.admission.per_model == {} and inst.inflight.states == {}
        gate.set()
        assert (await c.post("/v1/images/generations", json=body)).status_code == 200

    _run({"models": ["tiny-sd3"], "limits": {"max_queue_per_model": 2}}, scenario, gate=gate)
