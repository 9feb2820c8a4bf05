"""ui/app.py against an httpx MockTransport server (no Ray, no browser)."""
import base64
import importlib.util
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from test_cli_status import STATUS

spec = importlib.util.spec_from_file_location("trident_ui_app", Path(__file__).parents[1] / "ui" / "app.py")
ui = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ui)

MODELS = {"object": "list", "data": [
    {"id": "tiny-sd3", "kind": "image", "default_size": [64, 64], "default_steps": 2, "default_frames": 1},
    {"id": "cogvideox", "kind": "video", "default_size": [480, 720], "default_steps": 50, "default_frames": 49},
]}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(buf, format="PNG")
    return buf.getvalue()


def fake_server(log):
    polls = {"n": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        log.append((req.method, req.url.path, req.headers.get("x-request-id"), req.content))
        if req.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if req.url.path == "/v1/status":
            return httpx.Response(200, json=STATUS)
        if req.url.path.startswith("/v1/requests/"):
            polls["n"] += 1
            return httpx.Response(200, json={"state": "running", "stage": "diffuse", "deployment": "diffuse-w2",
                                             "stages_done": ["encode"], "step": 3, "steps": 8, "width": 2})
        if req.url.path == "/v1/generate":
            import time
            time.sleep(0.5)  # long enough for a progress poll
            return httpx.Response(200, json={"id": "x", "format": "png", "b64": base64.b64encode(_png()).decode(),
                                             "timings": {"diffuse_wall_s": 0.1, "diffuse_deployment": "diffuse-w2"}})
        return httpx.Response(404, json={"error": {"message": "nope"}})
    return httpx.MockTransport(handler)


def test_request_body_maps_the_form_to_the_native_api():
    assert ui.request_body("m", "p", "128x64", 3, 9, 5, 2.5, False) == {
        "model": "m", "prompt": "p", "seed": 5, "width": 128, "height": 64, "steps": 3, "slo_ms": 2500.0}
    assert ui.request_body("v", "p", "", None, 9, 0, None, True) == {"model": "v", "prompt": "p", "seed": 0,
                                                                      "num_frames": 9}


def test_generation_reports_stage_progress_then_the_image():
    log = []
    api = ui.Api("http://srv", transport=fake_server(log))
    steps = list(ui.run_generation(api, {"model": "tiny-sd3", "prompt": "x"}, poll_s=0.1))
    assert any("⏳ diffuse" in text and "✅ encode" in text and "step 3/8 at w2" in text for text, _, _ in steps[:-1])
    text, image, video = steps[-1]
    assert text.startswith("✅") and video is None
    assert np.asarray(Image.open(image)).std() > 0
    rids = {rid for m, path, rid, _ in log if path == "/v1/generate"}
    assert len(rids) == 1
    rid = rids.pop()
    assert any(path == f"/v1/requests/{rid}" for _, path, _, _ in log)


def test_plan_figure_and_panel_show_every_deployment_on_its_gpus():
    fig = ui.plan_figure(STATUS)
    ax = fig.axes[0]
    colored = [p for p in ax.patches if p.get_facecolor()[:3] != pytest.approx(
        tuple(int(ui.IDLE[i:i + 2], 16) / 255 for i in (1, 3, 5)))]
    assert len(colored) == 4  # diffuse-w2 (2 GPUs) + encode-w1 + decode-w1
    assert {t.get_text() for t in ax.texts} == {"diffuse-w2", "encode-w1", "decode-w1"}
    panel = ui.queues_html(STATUS)
    for dep in ("diffuse-w2", "encode-w1", "decode-w1"):
        assert dep in panel
    assert "75%" in panel and "mix shift 0.42" in panel
    # each running request as a progress bar of its diffuse steps, with its width and pause
    assert "<progress max='28' value='14'" in panel and "step 14/28 at w2" in panel
    assert "<progress max='28' value='7'" in panel and "step 7/28 at w1 (paused)" in panel
    assert "running: none" in ui.queues_html({**STATUS, "inflight": []})


def test_the_app_builds_from_the_servers_models():
    log = []
    demo = ui.build("http://srv", transport=fake_server(log))
    assert ("GET", "/v1/models", None, b"") in log
    dropdown = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "model")
    assert [c[0] for c in dropdown.choices] == ["tiny-sd3", "cogvideox"]


def test_api_key_is_sent_as_a_bearer_token():
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers.get("authorization"))
        return httpx.Response(200, json=MODELS)

    ui.Api("http://srv", transport=httpx.MockTransport(handler), api_key="s3cret").models()
    ui.Api("http://srv", transport=httpx.MockTransport(handler)).models()
    assert seen == ["Bearer s3cret", None]
