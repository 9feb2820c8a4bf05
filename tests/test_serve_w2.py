"""`diffuse-w2` through Ray Serve with the real xfuser executor (deployments/tiny-cpu-w2.yaml).

- start-up validation of real width > 1 deployments, without Ray;
- (slow) an HTTP image request through Serve, diffuse on two gloo ranks in the replica's
  2-GPU placement group (fake GPUs), equals the in-process width-1 pipeline for the same seed.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import yaml

from trident_rs.errors import ConfigError
from trident_rs.executors.xfuser_cpu import xfuser_installed
from trident_rs.serve.config import AppConfig

CONFIG = "deployments/tiny-cpu-w2.yaml"


def _args(**changes) -> dict:
    args = yaml.safe_load(open(CONFIG))["applications"][0]["args"]
    return {**args, **changes}


# --- start-up validation and deployment options (no Ray) ------------------------------------

def test_width2_config_runs_xfuser_only_where_width_is_above_1():
    from trident_rs.serve.stage_deployment import _executor_options, stage_options

    cfg = AppConfig.parse(_args())
    kinds = {d.name: cfg.executor_kind(d) for d in cfg.deployments}
    assert kinds == {"encode-w1": "diffusers", "diffuse-w2": "xfuser", "decode-w1": "diffusers"}
    w2 = cfg.deployment("diffuse-w2")
    opts = stage_options(cfg, w2)
    # the replica holds no GPU: its 2 rank actors take the 2 bundles
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert [b["GPU"] for b in opts["placement_group_bundles"]] == [1, 1]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in stage_options(cfg, cfg.deployment("encode-w1"))["ray_actor_options"]
    assert _executor_options(cfg, "tiny-sd3", w2) == {"width": 2, "gpus_per_rank": 1.0}

    two = AppConfig.parse(_args(models=["tiny-sd3", "tiny-flux"], executor_options={"device": "cuda"}))
    assert _executor_options(two, "tiny-flux", two.deployment("diffuse-w2")) == {"width": 2, "gpus_per_rank": 0.5}
    assert _executor_options(two, "tiny-flux", two.deployment("decode-w1")) == {"device": "cuda"}


def test_missing_xfuser_fails_at_app_build(monkeypatch):
    from trident_rs.serve.app import build_app

    monkeypatch.setattr("trident_rs.executors.xfuser_cpu.xfuser_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"diffuse-w2.*xfuser.*not installed.*\[gpu\]"):
        build_app(_args())
    # emulated executors need neither xfuser nor GPUs at any width
    AppConfig.parse(_args(executor="emulated")).check_multi_rank(False, [0.0])


def test_too_few_gpus_fails_at_startup():
    cfg = AppConfig.parse(_args())
    with pytest.raises(ConfigError, match=r"diffuse-w2 need\(s\) 2 GPUs on one node.*largest Ray node has 1"):
        cfg.check_multi_rank(True, [1.0, 1.0])  # 2 GPUs, but not on one node (STRICT_PACK)
    with pytest.raises(ConfigError, match="has 0.*--num-gpus"):
        cfg.check_multi_rank(True, [])
    cfg.check_multi_rank(True, [2.0])
    cfg.check_multi_rank(True, None)  # Ray not up: only xfuser is checked


def test_family_without_xfuser_pipeline_fails_at_startup():
    cfg = AppConfig.parse(_args(models=["tiny-sd3", "hunyuanvideo"]))
    with pytest.raises(ConfigError, match=r"diffuse-w2: no sequence-parallel .*hunyuanvideo"):
        cfg.check_multi_rank(True, None)


# --- through Serve ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not xfuser_installed(), reason="xfuser is not installed (the 'gpu' extra)")
def test_serve_width2_image_equals_width1():
    pytest.importorskip("ray")
    import httpx
    from PIL import Image
    from ray import serve

    from trident_rs.models.tiny import ensure_tiny_model
    from trident_rs.pipeline_runner import generate
    from trident_rs.request import GenerationParams
    from trident_rs.serve.app import build_app
    from trident_rs.devtools.local import private_serve

    ensure_tiny_model("tiny-sd3")  # built once, before three replicas race for it
    with private_serve(num_gpus=2) as port:
        serve.run(build_app(_args()), name="w2", route_prefix="/")
        deps = serve.status().applications["w2"].deployments
        assert deps["diffuse-w2"].replica_states.get("RUNNING") == 1
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=300,
                       json={"model": "tiny-sd3", "prompt": "a red fox", "height": 64, "width": 64,
                             "seed": 7, "steps": 2})
        assert r.status_code == 200, r.text
        body = r.json()
    timings = body["timings"]  # the stage metadata: diffuse really ran on two ranks
    assert timings["diffuse_deployment"] == "diffuse-w2" and timings["diffuse_width"] == 2
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["b64"]))).convert("RGB"))
    ref = generate(GenerationParams(model="tiny-sd3", prompt="a red fox", height=64, width=64, seed=7,
                                    steps=2).resolved())
    ref = np.asarray(ref).reshape(-1, 64, 64, 3)[0]
    assert img.shape == ref.shape == (64, 64, 3)
    # equal up to rounding: the width-2 diffuse differs from width 1 by ~1e-6 in float (Ulysses
    # over gloo sums in another order; tests/test_sequence_parallel.py checks the floats), which
    # can move a pixel across a uint8 rounding boundary, never further
    diff = np.abs(img.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert img.std() > 0  # a real picture, not a constant
