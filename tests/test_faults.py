"""Fault tolerance at the ingress, in-process with fake replicas (issue 8, item 4).

A stage replica that dies mid-request is re-run from the previous stage's result, up to the
configured retries, then 503; a controller that is down or restarted does not stop requests
(they are dispatched on the last plan); every request ends in one final state, reported once.
"""
import asyncio

from ray.exceptions import ActorDiedError, RayTaskError

from ingress_fakes import _Method, run_http, settle
from trident_rs.errors import UnknownRequestError
from trident_rs.serve.stage_retry import is_replica_failure

BODY = {"model": "tiny-sd3", "prompt": "x", "height": 64, "width": 64, "steps": 1}
CFG = {"models": ["tiny-sd3"], "faults": {"retry_backoff_s": 0.0}}


def _stage(inst, stage):
    return inst.stages[f"{stage}-w1"]


def test_replica_failure_is_told_apart_from_the_request_failing():
    assert is_replica_failure(ActorDiedError())
    rank_died = RayTaskError("run", "traceback", ActorDiedError())  # a width-k replica's rank actor died
    assert is_replica_failure(rank_died)
    assert not is_replica_failure(RayTaskError("run", "traceback", ValueError("bad latents")))
    assert not is_replica_failure(ValueError("bad latents"))


def test_a_dead_diffuse_replica_is_rerun_from_the_encode_output():
    async def scenario(c, inst):
        _stage(inst, "diffuse").deaths = [ActorDiedError()]
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "r1"})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["retries"] == 1
        assert _stage(inst, "encode").calls == 1  # resumed, not restarted
        assert _stage(inst, "diffuse").calls == 2 and _stage(inst, "decode").calls == 1
        assert inst.controller.retries == [("r1", "diffuse", 1)]
        await settle()  # finish is sent, not waited for
        assert inst.controller.finished == [("r1", "done")]
        assert inst.admission.per_model == {} and inst.inflight.states == {}

    run_http(CFG, scenario)


def test_a_stage_that_keeps_dying_fails_with_503_after_the_retries():
    async def scenario(c, inst):
        _stage(inst, "decode").deaths = [ActorDiedError() for _ in range(3)]
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "r2"})
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert "decode" in msg and "2 time(s)" in msg and int(r.headers["retry-after"]) >= 1
        assert _stage(inst, "decode").calls == 2  # the first try and one retry
        await settle()  # finish is sent, not waited for
        assert inst.controller.finished == [("r2", "failed")]
        assert inst.admission.per_model == {} and inst.inflight.states == {}
        _stage(inst, "decode").deaths = []  # the service still answers
        assert (await c.post("/v1/generate", json=BODY)).status_code == 200

    run_http({**CFG, "faults": {"stage_retries": 1, "retry_backoff_s": 0.0}}, scenario)


def test_an_error_of_the_request_itself_is_not_retried():
    async def scenario(c, inst):
        _stage(inst, "encode").deaths = [RayTaskError("run", "tb", ValueError("prompt made NaNs"))]
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "r3"})
        assert r.status_code == 500 and "NaNs" in r.json()["error"]["message"], r.text
        assert _stage(inst, "encode").calls == 1 and _stage(inst, "diffuse").calls == 0
        await settle()  # finish is sent, not waited for
        assert inst.controller.finished == [("r3", "failed")] and inst.controller.retries == []

    run_http(CFG, scenario)


def test_with_the_controller_down_requests_run_on_the_last_plan_until_it_is_back():
    async def scenario(c, inst):
        ctl = inst.controller
        assert (await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "a"})).status_code == 200
        ctl.fail["submit"] = ActorDiedError()
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "b"})
        assert r.status_code == 200, r.text
        grants = _stage(inst, "diffuse").grants[-1]
        assert grants.deployment == "diffuse-w1" and grants.batch_id is None and grants.local
        assert (await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "c"})).status_code == 200
        assert ctl.submitted == ["a"]  # down: not even tried again before controller_probe_s
        # every end is reported with its real state: a controller that got b's submit late ends it
        # there; one that never saw b or c counts them once, as done on the last plan (issue 20)
        await settle()  # finish is sent, not waited for
        assert ctl.finished == [("a", "done"), ("b", "done"), ("c", "done")]
        st = (await c.get("/v1/status"))
        assert st.status_code == 200 and inst.link.snapshot()["controller_up"] is False
        del ctl.fail["submit"]
        inst.link.down_until = 0.0  # the probe interval passed: the controller is back
        assert (await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "d"})).status_code == 200
        await settle()  # finish is sent, not waited for
        assert ctl.submitted == ["a", "d"] and ctl.finished[-1] == ("d", "done")
        assert inst.link.stats["local_requests"] == 2

    run_http(CFG, scenario)


def test_a_controller_that_dies_or_restarts_mid_request_does_not_lose_it():
    for error in (ActorDiedError(), UnknownRequestError("x")):
        async def scenario(c, inst, error=error):
            real = inst.controller.acquire

            async def acquire(rid, stage, done=None):
                if stage != "encode":
                    raise error
                return await real.remote(rid, stage, done)
            inst.controller.acquire = _Method(acquire, eager=True)
            r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "m"})
            assert r.status_code == 200, r.text
            assert _stage(inst, "encode").grants[-1].batch_id == 0  # the controller's grant
            assert _stage(inst, "decode").grants[-1].batch_id is None  # the last plan's
            # a dead controller puts the link down; a restarted one that forgot a request does not
            assert inst.link.up is isinstance(error, UnknownRequestError)

        run_http(CFG, scenario)


def test_a_partitioned_controller_does_not_hold_requests_waiting_for_a_grant():
    """Issue 20: the controller stops answering (partitioned, not dead). A request waiting for its
    next stage's grant goes on the last plan as soon as another request's submit times out."""
    async def scenario(c, inst):
        ctl = inst.controller
        real = ctl.acquire
        stopped = asyncio.Event()

        async def acquire(rid, stage, done=None):
            if stage != "encode":
                stopped.set()
                await asyncio.sleep(60)  # never answered while the partition lasts
            return await real.remote(rid, stage, done)

        async def hang(*a):
            await asyncio.sleep(60)

        ctl.acquire = _Method(acquire, eager=True)
        first = asyncio.ensure_future(c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "p1"}))
        await asyncio.wait_for(stopped.wait(), 10)
        ctl.submit = _Method(hang, eager=True)
        t0 = asyncio.get_running_loop().time()
        second = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "p2"})
        r1 = await asyncio.wait_for(first, 10)
        assert second.status_code == 200 and r1.status_code == 200, (second.text, r1.text)
        assert asyncio.get_running_loop().time() - t0 < 5  # not the 60 s of the partition
        assert _stage(inst, "diffuse").grants[-1].local and inst.link.stats["local_requests"] == 2
        await settle()
        assert sorted(ctl.finished) == [("p1", "done"), ("p2", "done")]  # each once, with its real state

    run_http({**CFG, "faults": {"controller_timeout_s": 0.2, "retry_backoff_s": 0.0}}, scenario)


def test_a_controller_that_does_not_answer_submit_in_time_is_bypassed():
    async def scenario(c, inst):
        async def hang(*a):
            await asyncio.sleep(30)
        inst.controller.submit = _Method(hang, eager=True)
        r = await c.post("/v1/generate", json=BODY)
        assert r.status_code == 200 and inst.link.stats["local_requests"] == 1

    run_http({**CFG, "faults": {"controller_timeout_s": 0.2}}, scenario)


def test_status_and_progress_are_503_while_the_controller_restarts():
    async def scenario(c, inst):
        for name in ("status", "request_status", "metrics_text"):
            inst.controller.fail[name] = ActorDiedError()
        for path in ("/v1/status", "/v1/requests/x", "/metrics"):
            r = await c.get(path)
            assert r.status_code == 503 and "restarting" in r.json()["error"]["message"], path

    run_http(CFG, scenario)


def test_a_request_past_its_timeout_is_cancelled_with_504():
    gate = asyncio.Event()

    async def scenario(c, inst):
        gate.__init__()  # never set: diffuse waits forever
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "slow"})
        assert r.status_code == 504 and "0.3 s" in r.json()["error"]["message"], r.text
        await settle()  # finish is sent, not waited for
        assert inst.controller.finished == [("slow", "timed_out")]
        assert inst.admission.per_model == {} and inst.inflight.states == {}

    run_http({**CFG, "limits": {"request_timeout_s": 0.3}}, scenario, gate=gate)


def test_the_python_client_stops_polling_a_cancelled_video_job():
    import httpx
    import pytest

    from trident_rs.client import TridentClient, TridentHTTPError

    polls = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json={"id": "video_1", "status": "queued"})
        polls.append(request.url.path)
        return httpx.Response(200, json={"id": "video_1", "status": "cancelled",
                                         "error": {"message": "request 'video_1' was cancelled"}})

    client = TridentClient("http://t")
    client.http = httpx.Client(base_url="http://t", transport=httpx.MockTransport(server))
    with pytest.raises(TridentHTTPError) as e:
        client.video("waves", model="tiny-cogvideox", poll_s=0.0)
    assert e.value.status == 499 and "cancelled" in e.value.message and polls == ["/v1/videos/video_1"]


def test_progress_events_stream_each_change_and_end_with_the_final_state(monkeypatch):
    import json

    from trident_rs.serve import ingress

    monkeypatch.setattr(ingress, "EVENTS_POLL_S", 0.0)
    script = ["queued", "queued", "encoding", "queued", "diffusing", "diffusing", "decoding", "done", "done"]

    async def scenario(c, inst):
        states = iter(script)

        async def status(rid):
            return {"id": rid, "state": next(states), "stage": None, "retries": 0}
        inst.controller.request_status = _Method(status, eager=True)
        r = await c.get("/v1/requests/r9/events")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = [json.loads(x[6:])["state"] for x in r.text.splitlines() if x.startswith("data: ")]
        assert got == ["queued", "encoding", "queued", "diffusing", "decoding", "done"]

    run_http(CFG, scenario)


def test_a_call_that_reached_another_replica_is_granted_again_not_run_there():
    from trident_rs.serve.grant import Grant, WrongReplicaError

    async def scenario(c, inst):
        regrants = []
        real = inst.controller.regrant

        async def regrant(grant, here=None):
            regrants.append((grant.stage, here))
            return await real.remote(grant, here)
        inst.controller.regrant = _Method(regrant, eager=True)
        wrong = WrongReplicaError(Grant("w", "diffuse", "diffuse-w1", 1, 0, replica_id="gone"), "other")
        _stage(inst, "diffuse").deaths = [RayTaskError("run", "tb", wrong).as_instanceof_cause()]
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "w"})
        assert r.status_code == 200, r.text
        assert regrants == [("diffuse", "other")] and r.json()["timings"]["retries"] == 0
        assert _stage(inst, "diffuse").calls == 2 and inst.link.stats["regrants"] == 1
        await settle()
        assert inst.controller.done == [("w", "encode"), ("w", "diffuse"), ("w", "decode")]

    run_http(CFG, scenario)


def test_latents_lost_with_their_node_are_rederived_from_the_embeddings():
    """Issue 20: decode cannot read the latents (their node died after diffuse finished): the
    ingress re-runs diffuse from the embeddings it kept, on the last plan, then decode again."""
    from ray.exceptions import ObjectLostError

    async def scenario(c, inst):
        _stage(inst, "decode").deaths = [ObjectLostError("ab" * 14, "owner", "call site")]
        probed = []

        async def probe(ref):
            probed.append(ref)
            return len(probed) > 1  # the latents are gone, the embeddings are still there

        inst.runner.probe_input = probe
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "lost1"})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["rederived_stages"] == 1 and r.json()["timings"]["retries"] == 0
        assert [_stage(inst, s).calls for s in ("encode", "diffuse", "decode")] == [1, 2, 2]
        assert len(probed) == 2
        assert inst.runner.rederive_stats == {"lost_objects": 1, "requests": 1, "stages": 1}
        await settle()
        assert inst.controller.finished == [("lost1", "done")] and inst.controller.retries == []
        assert inst.admission.per_model == {} and inst.inflight.states == {}

    run_http(CFG, scenario)


def test_embeddings_lost_before_diffuse_read_them_are_rederived_from_the_request():
    from ray.exceptions import OwnerDiedError

    async def scenario(c, inst):
        _stage(inst, "diffuse").deaths = [RayTaskError("run", "tb", OwnerDiedError("ab" * 14, "owner", "site"))]

        async def probe(ref):
            return False  # the embeddings went with the node

        inst.runner.probe_input = probe
        r = await c.post("/v1/generate", json=BODY, headers={"X-Request-Id": "lost2"})
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["rederived_stages"] == 1
        assert [_stage(inst, s).calls for s in ("encode", "diffuse", "decode")] == [2, 2, 1]
        await settle()
        assert inst.controller.finished == [("lost2", "done")]

    run_http(CFG, scenario)
