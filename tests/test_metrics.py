"""/metrics, /v1/status and /v1/requests/{id} against one small emulated Serve app (one per module).

Requests of known outcome go in (on time, late, rejected); the Prometheus text must count them
exactly, with one stage-latency observation per request per stage deployment.
"""
import json
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
prom_parser = pytest.importorskip("prometheus_client.parser")
from ray import serve  # noqa: E402

from trident_rs.serve.app import build_app
from trident_rs.devtools.local import private_serve  # noqa: E402

ARGS = {
    "models": ["sd3"],
    "executor": "emulated",
    "time_scale": 0.002,
    "reserve_gpus": False,
    "cluster": {"nodes": 1, "gpus_per_node": 4},
    "deployments": [{"stage": s, "width": 1, "replicas": 1} for s in ("encode", "diffuse", "decode")],
    "policy": {"name": "greedy", "tick_s": 0.25, "options": {"replan": False}},
}
ON_TIME, LATE = 3, 1



@pytest.fixture(scope="module")
def served():
    with private_serve() as port:
        serve.run(build_app(ARGS), name="m", route_prefix="/m")
        url = f"http://127.0.0.1:{port}/m"
        ids = []
        for i in range(ON_TIME + LATE):
            rid = f"t-{uuid.uuid4().hex[:8]}"
            slo = {"slo_ms": 0.001} if i == ON_TIME else {"slo_ms": 600_000}  # the last one cannot make it
            r = httpx.post(f"{url}/v1/images/generations", timeout=120, headers={"X-Request-Id": rid},
                           json={"model": "sd3", "prompt": "x", "size": "256x256", "steps": 2, "seed": i, **slo})
            assert r.status_code == 200, r.text
            ids.append(rid)
        for bad in ({"model": "nope", "prompt": "x"}, {"model": "sd3", "prompt": "x", "n": 99}):
            assert httpx.post(f"{url}/v1/images/generations", json=bad, timeout=30).status_code in (404, 422)
        yield url, ids


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in prom_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metrics(url: str, want_rejected: int = 2) -> dict[tuple, float]:
    deadline = time.time() + 20  # rejections are reported fire-and-forget
    while True:
        r = httpx.get(f"{url}/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        s = _samples(r.text)
        if s.get(("trident_requests_total", (("outcome", "rejected"),))) == want_rejected or time.time() > deadline:
            return s
        time.sleep(0.2)


def test_metrics_count_requests_by_outcome_and_stage(served):
    url, _ = served
    s = _metrics(url)
    outcome = {o: s[("trident_requests_total", (("outcome", o),))] for o in ("on_time", "late", "rejected", "failed")}
    assert outcome == {"on_time": ON_TIME, "late": LATE, "rejected": 2, "failed": 0}
    for stage in ("encode", "diffuse", "decode"):
        labels = (("deployment", f"{stage}-w1"), ("stage", stage), ("width", "1"))
        assert s[("trident_stage_latency_seconds_count", labels)] == ON_TIME + LATE
        assert s[("trident_stage_latency_seconds_sum", labels)] > 0
        assert s[("trident_stage_latency_seconds_bucket", tuple(sorted(labels + (("le", "+Inf"),))))] == ON_TIME + LATE
        assert s[("trident_queue_length", (("deployment", f"{stage}-w1"),))] == 0
    assert s[("trident_request_latency_seconds_count", (("model", "sd3"),))] == ON_TIME + LATE
    assert s[("trident_slo_attainment", ())] == pytest.approx(ON_TIME / (ON_TIME + LATE))
    assert s[("trident_inflight_requests", ())] == 0
    assert s[("trident_replans_total", ())] == 0  # replan: false
    assert ("trident_solver_seconds_count", ()) in s


def test_status_has_plan_queues_attainment_and_percentiles(served):
    url, _ = served
    st = httpx.get(f"{url}/v1/status", timeout=30).json()
    assert [n["node"] for n in st["nodes"]] == [0]
    assert {g["deployment"] for n in st["nodes"] for g in n["groups"]} == {"encode-w1", "diffuse-w1", "decode-w1"}
    assert set(st["queues"]) == {"encode-w1", "diffuse-w1", "decode-w1"}
    assert st["inflight"] == [] and st["active_requests"] == 0
    assert st["attainment"]["recent_60s"] == pytest.approx(ON_TIME / (ON_TIME + LATE))
    lat = st["latency_s"]
    assert lat["n"] == ON_TIME + LATE and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert st["stage_latency_s"]["diffuse-w1"]["n"] == ON_TIME + LATE
    assert st["replans"][0]["reason"] == "initial plan"
    assert st["metrics"]["ray_serve_metrics"] is True  # mirrored into ray.serve.metrics too


def test_request_progress_is_polled_by_id(served):
    url, ids = served
    got = httpx.get(f"{url}/v1/requests/{ids[0]}", timeout=30).json()
    assert got["state"] == "done" and got["on_time"] is True
    assert got["stages_done"] == ["encode", "diffuse", "decode"]
    assert httpx.get(f"{url}/v1/requests/{ids[-1]}", timeout=30).json()["on_time"] is False
    assert httpx.get(f"{url}/v1/requests/nope", timeout=30).status_code == 404


def test_progress_streams_as_server_sent_events_through_serve(served):
    url, ids = served
    with httpx.stream("GET", f"{url}/v1/requests/{ids[0]}/events", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert [e["state"] for e in events] == ["done"]  # finished: one event, then the stream ends
    assert httpx.get(f"{url}/v1/requests/nope/events", timeout=30).status_code == 404
