"""Exact through Serve (issue 17): a tiny model whose diffuse runs w1 -> w2 (xfuser ranks over
gloo, in the width-2 replica's 2-fake-GPU placement group) -> w1 as three chunk grants gives the
one-call diffusers pipeline's float image within 1e-5. The chunk path is fixed by the
`chunk-script` policy; the state between chunks goes through the object store as the ingress's refs.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from trident_rs.devtools.local import private_serve  # noqa: E402
from trident_rs.executors.xfuser_cpu import xfuser_installed  # noqa: E402
from trident_rs.serve.app import build_app  # noqa: E402

EXACT = {
    "models": ["tiny-sd3"], "executor": "diffusers", "executor_options": {"keep_float": True},
    "cluster": {"nodes": 1, "gpus_per_node": 2},
    "deployments": [{"stage": "encode", "width": 1, "replicas": 1}, {"stage": "diffuse", "width": 1, "replicas": 1},
                    {"stage": "diffuse", "width": 2, "replicas": 1}, {"stage": "decode", "width": 1, "replicas": 1}],
    "policy": {"name": "chunk-script", "options": {"chunks": [[1, 1], [2, 2], [1, 1]]}},
}


@pytest.mark.skipif(not xfuser_installed(), reason="xfuser is not installed (the 'gpu' extra)")
def test_chunks_changing_width_through_serve_equal_the_one_call_pipeline():
    import torch

    from trident_rs.models.loading import load_pipeline
    from trident_rs.models.tiny import ensure_tiny_model
    from trident_rs.request import GenerationParams

    ensure_tiny_model("tiny-sd3")
    params = GenerationParams(model="tiny-sd3", prompt="a red fox", height=64, width=64, seed=7, steps=4).resolved()
    with private_serve(num_gpus=2, log_to_driver=False):
        handle = serve.run(build_app(EXACT), name="exact", route_prefix="/")
        out = handle.generate.remote(params, "x").result(timeout_s=600)
    assert out.meta["diffuse_chunks"] == [[0, 1, "diffuse-w1"], [1, 3, "diffuse-w2"], [3, 4, "diffuse-w1"]]
    pipe = load_pipeline("tiny-sd3")
    ref = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt or None, height=64, width=64,
               num_inference_steps=4, guidance_scale=params.guidance_scale,
               generator=torch.Generator().manual_seed(7), output_type="np").images
    got = out.tensors["frames_float"]
    assert got.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(got - ref).max() <= 1e-5
