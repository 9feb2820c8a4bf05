"""Serve on a local 2-node Ray cluster (two raylets, fake GPUs; issue 21): every stage replica
registers with its Ray node, grants name those replicas, a width-4 group lands inside one node,
and requests keep succeeding while the controller rolls out a re-shape."""
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from trident_rs.devtools.cluster import local_cluster, placement_groups_by_node  # noqa: E402
from trident_rs.serve.app import build_app  # noqa: E402

pytestmark = pytest.mark.slow
ARGS = {
    "models": ["sd3"], "executor": "emulated", "time_scale": 0.01,
    "cluster": {"nodes": 2, "gpus_per_node": 4},
    "deployments": [{"stage": "encode"}, {"stage": "diffuse", "width": 1},
                    {"stage": "diffuse", "width": 4, "replicas": 0, "max_replicas": 1}, {"stage": "decode"}],
    "policy": {"name": "greedy", "options": {"replan": False}},
}
BODY = {"model": "sd3", "prompt": "x", "size": "256x256", "steps": 4}


def _running(app: str) -> dict[str, int]:
    deps = serve.status().applications[app].deployments
    return {n: d.replica_states.get("RUNNING", 0) for n, d in deps.items() if "-w" in n}


def test_two_nodes_registry_grants_and_a_wide_group_inside_one_node():
    with local_cluster(nodes=2, gpus_per_node=4) as port:
        serve.run(build_app(ARGS), name="multi", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:  # every replica registered (FIRST_REGISTER_S after it started)
            reps = httpx.get(f"{url}/v1/status", timeout=30).json()["replicas"]["replicas"]
            if len(reps) == 3:
                break
            time.sleep(0.5)
        assert {r["deployment"] for r in reps} == {"encode-w1", "diffuse-w1", "decode-w1"}
        assert all(r["node_id"] and r["gpu_ids"] for r in reps)
        for i in range(3):
            r = httpx.post(f"{url}/v1/generate", json={"model": "sd3", "prompt": "x", "height": 256,
                                                       "width": 256, "steps": 4},
                           headers={"X-Request-Id": f"m{i}"}, timeout=60)
            assert r.status_code == 200, r.text
        prog = httpx.get(f"{url}/v1/requests/m2", timeout=30).json()
        assert prog["state"] == "done"
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        assert {g["replica"] for g in status["plan"]} == {r["replica_id"] for r in reps}  # groups bound
        controller = serve.get_deployment_handle("Controller", "multi")
        controller.reshape.remote({"encode-w1": 1, "diffuse-w1": 1, "diffuse-w4": 1, "decode-w1": 1}).result()
        codes = []
        deadline = time.time() + 90
        while _running("multi").get("diffuse-w4") != 1 and time.time() < deadline:
            codes.append(httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=60).status_code)
        assert _running("multi")["diffuse-w4"] == 1
        assert codes.count(200) == len(codes)  # nothing lost during the re-shape
        pgs = placement_groups_by_node()
        assert any(p["bundles"] == 4 for p in pgs)
        assert all(len(p["nodes"]) == 1 for p in pgs)  # a width-k group never spans nodes
        deadline = time.time() + 30
        while time.time() < deadline:
            nodes = {r["node_id"] for r in httpx.get(f"{url}/v1/status", timeout=30).json()["replicas"]["replicas"]}
            if len(nodes) == 2:
                break
            time.sleep(0.5)
        assert len(nodes) == 2  # the wide group had to go to the other node
