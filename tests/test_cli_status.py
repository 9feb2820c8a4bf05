"""`trident status` renders /v1/status (served here by an httpx MockTransport, no Ray)."""
import argparse
import json

import httpx
import pytest

from trident_rs.cli import status as cli_status

STATUS = {
    "policy": "greedy", "time_s": 12.5, "cluster": {"nodes": 2, "gpus_per_node": 4},
    "counts": {"encode-w1": 1, "diffuse-w2": 1, "decode-w1": 1},
    "plan": [],
    "nodes": [
        {"node": 0, "gpus": 4, "groups": [{"id": "g0", "deployment": "diffuse-w2", "stages": ["diffuse"],
                                          "width": 2, "model": "sd3", "gpus": [0, 1]}]},
        {"node": 1, "gpus": 4, "groups": [{"id": "g1", "deployment": "encode-w1", "stages": ["encode"],
                                          "width": 1, "model": "sd3", "gpus": [2]},
                                         {"id": "g2", "deployment": "decode-w1", "stages": ["decode"],
                                          "width": 1, "model": "sd3", "gpus": [3]}]},
    ],
    "queues": {"encode-w1": 0, "diffuse-w2": 3, "decode-w1": 1},
    "waiting": {"encode": 0, "diffuse": 2, "decode": 0},
    "active_requests": 1,
    "inflight": [{"id": "req-abc", "model": "sd3", "shape": "1x256x256", "state": "running",
                  "stage": "diffuse", "stages_done": ["encode"], "step": 14, "steps": 28, "width": 2,
                  "paused": False, "deployment": "diffuse-w2"},
                 {"id": "req-def", "model": "sd3", "shape": "1x256x256", "state": "queued",
                  "stage": "diffuse", "stages_done": ["encode"], "step": 7, "steps": 28, "width": 1,
                  "paused": True}],
    "stats": {"submitted": 9, "completed": 8, "failed": 0, "on_time": 6, "rejected": 1},
    "attainment": {"recent_60s": 0.75, "finished": 8, "overall": 0.75},
    "latency_s": {"n": 8, "p50": 0.41, "p90": 1.3, "p99": 2.0, "mean": 0.6},
    "stage_latency_s": {"diffuse-w2": {"n": 8, "p50": 0.2, "p90": 0.5, "p99": 0.6, "mean": 0.3}},
    "replans": [{"t": 0.0, "reason": "initial plan", "counts": {"diffuse-w2": 1}},
                {"t": 9.5, "reason": "mix shift 0.42", "counts": {"diffuse-w2": 2}}],
}


def _transport(seen):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/status":
            return httpx.Response(200, json=STATUS)
        return httpx.Response(404, json={"error": {"message": "no"}})
    return httpx.MockTransport(handler)


def _args(**kw):
    return argparse.Namespace(**{"url": "http://srv:8000", "watch": 0.0, "json": False, "timeout_s": 5.0, **kw})


def test_status_prints_plan_queues_attainment_and_replans(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    seen = []
    assert cli_status.run(_args(), transport=_transport(seen)) == 0
    out = capsys.readouterr().out
    assert seen == ["/v1/status"]
    assert "75%" in out and "mix shift 0.42" in out and "req-abc" in out
    for dep in ("diffuse-w2", "encode-w1", "decode-w1"):
        assert dep in out
    assert out.count("idle") == 4  # node 0 GPUs 2-3, node 1 GPUs 0-1
    grid_row = next(line for line in out.splitlines() if "encode-w1" in line and "idle" in line)
    assert grid_row.index("idle") < grid_row.index("encode-w1") < grid_row.index("decode-w1")
    assert "200 ms" in out and "1.30 s" in out  # diffuse-w2 p50, end-to-end p90
    # running requests: diffuse step i of n as a bar, the width, paused at a chunk boundary
    row = next(line for line in out.splitlines() if "req-abc" in line)
    assert "█████░░░░░ 14/28" in row and "w2" in row and "paused" not in row
    row = next(line for line in out.splitlines() if "req-def" in line)
    assert "7/28 paused" in row and "w1" in row


def test_status_json_passes_the_answer_through(capsys):
    assert cli_status.run(_args(json=True), transport=_transport([])) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_unreachable_server_is_a_typed_error():
    def down(request):
        raise httpx.ConnectError("refused")
    with pytest.raises(cli_status.StatusError, match="cannot reach"):
        cli_status.fetch("http://srv:8000", transport=httpx.MockTransport(down))
    with pytest.raises(cli_status.StatusError, match="HTTP 404"):
        cli_status.fetch("http://srv:8000", transport=httpx.MockTransport(lambda r: httpx.Response(404)))


def test_trident_status_is_a_registered_command():
    from trident_rs.cli import COMMANDS
    assert COMMANDS["status"][0] == "trident_rs.cli.status"
