"""Faults and security through real Ray Serve (private local Ray, 8 fake GPUs, emulated stages).

A stage replica killed mid-request: the request still succeeds, re-run from the previous
stage's output. The controller killed mid-traffic: no request is lost, and it comes back.
API keys (401) and the bounded queue (429) as a real client sees them.
"""
import concurrent.futures as cf
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from trident_rs.serve.app import build_app  # noqa: E402
from trident_rs.devtools.chaos import kill_replica, replica_actors  # noqa: E402
from trident_rs.devtools.local import private_serve  # noqa: E402

APP = "faults"
KEY = {"Authorization": "Bearer s3cret"}
ARGS = {
    "models": ["sd3"],
    "executor": "emulated",
    "time_scale": 1.0,  # sd3 512x512, 28 steps: encode 0.1 s, diffuse 1.7 s, decode 0.06 s
    "cluster": {"nodes": 1, "gpus_per_node": 8},
    "deployments": [{"stage": "encode", "width": 1, "replicas": 1},
                    {"stage": "diffuse", "width": 1, "replicas": 1},
                    {"stage": "decode", "width": 1, "replicas": 1}],
    "policy": {"name": "greedy", "options": {"replan": False}},
    "limits": {"api_keys": ["s3cret"], "max_queue_per_model": 6},
    "faults": {"stage_retries": 4, "retry_backoff_s": 0.25, "controller_timeout_s": 3.0, "controller_probe_s": 2.0},
}
BODY = {"model": "sd3", "prompt": "faults", "height": 512, "width": 512, "steps": 28}


@pytest.fixture(scope="module")
def url():
    with private_serve(num_gpus=8, log_to_driver=False) as port:
        serve.run(build_app(ARGS), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"


def _generate(url: str, rid: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=BODY, headers={**KEY, "X-Request-Id": rid}, timeout=120)


def _wait_state(url: str, rid: str, state: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        r = httpx.get(f"{url}/v1/requests/{rid}", headers=KEY, timeout=10)
        if r.status_code == 200 and r.json()["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached {state}")


def test_api_keys_under_serve(url):
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=KEY, timeout=30).status_code == 200
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # probes stay open


def test_a_full_queue_answers_429_with_retry_after_under_serve(url):
    with cf.ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda i: _generate(url, f"q{i}"), range(12)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) == {200, 429} and codes.count(200) >= 6, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in rs if r.status_code == 429)


def test_a_diffuse_replica_killed_mid_request_is_retried_and_nothing_is_lost(url):
    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_generate, url, "k1")
        _wait_state(url, "k1", "diffusing")
        time.sleep(0.3)
        assert kill_replica(APP, "diffuse-w1") is not None
        second = pool.submit(_generate, url, "k2")  # arrives while the replacement starts
        r1, r2 = first.result(), second.result()
    assert r1.status_code == 200, r1.text
    assert r2.status_code == 200, r2.text
    assert r1.json()["timings"]["retries"] >= 1
    prog = httpx.get(f"{url}/v1/requests/k1", headers=KEY, timeout=10).json()
    assert prog["state"] == "done" and prog["retries"] >= 1
    assert len(replica_actors(APP, "diffuse-w1")) == 1  # Serve replaced it


def test_a_killed_controller_loses_no_request_and_comes_back(url):
    with cf.ThreadPoolExecutor(4) as pool:
        before = [pool.submit(_generate, url, f"c{i}") for i in range(2)]
        _wait_state(url, "c0", "diffusing")
        assert kill_replica(APP, "Controller") is not None
        during = [pool.submit(_generate, url, f"d{i}") for i in range(2)]
        results = [f.result() for f in before + during]
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    deadline = time.time() + 60  # Serve restarts the controller; the ingress goes back to it
    while time.time() < deadline:
        st = httpx.get(f"{url}/v1/status", headers=KEY, timeout=30)
        if st.status_code == 200 and st.json()["ingress"]["controller_link"]["controller_up"]:
            break
        time.sleep(0.5)
    assert st.status_code == 200, st.text
    r = _generate(url, "after")
    assert r.status_code == 200
    prog = httpx.get(f"{url}/v1/requests/after", headers=KEY, timeout=10).json()
    assert prog["state"] == "done"  # the restarted controller dispatched it
