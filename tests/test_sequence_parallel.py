"""Width-2 diffuse with xfuser's sequence / CFG parallelism equals width 1.

The ranks run as Ray actors on fake GPUs inside a width-2 placement group, exactly as a Serve
replica of `diffuse-w2` starts them, with gloo between them (CPU; see xfuser_cpu.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StagePayload, build_executor
from trident_rs.executors.sequence_parallel import ParallelLayout
from trident_rs.executors.xfuser_cpu import xfuser_installed
from trident_rs.request import GenerationParams

needs_xfuser = pytest.mark.skipif(
    not xfuser_installed(), reason="xfuser is not installed (the 'gpu' extra: pip install '.[gpu]')")

TOLERANCE = 1e-5


# --- layout and start-up validation (no processes) -----------------------------------------

@pytest.mark.parametrize(
    "family, width, heads, cfg_parallel, expected",
    [
        ("sd3", 2, 4, None, (2, 1, 1)),    # CFG parallel where the family batches CFG
        ("sd3", 2, 4, False, (1, 2, 1)),   # ... unless switched off: Ulysses 2
        ("sd3", 8, 24, None, (2, 4, 1)),
        ("flux", 4, 24, None, (1, 4, 1)),  # FLUX is guidance-distilled: no CFG batch
        ("flux", 8, 12, None, (1, 4, 2)),  # heads 12 do not split 8 ways: Ulysses 4 x ring 2
        ("sd3", 3, 24, None, (1, 3, 1)),   # odd width: no CFG split
    ],
)
def test_layout_choice(family, width, heads, cfg_parallel, expected):
    layout = ParallelLayout.choose(family, width, heads, cfg_parallel)
    assert (layout.cfg, layout.ulysses, layout.ring) == expected
    assert layout.cfg * layout.ulysses * layout.ring == width


def test_layout_rejects_unsupported():
    with pytest.raises(ConfigError, match="hunyuanvideo"):
        ParallelLayout.choose("hunyuanvideo", 2, 24)
    with pytest.raises(ConfigError, match="CFG"):
        ParallelLayout.choose("flux", 2, 24, cfg_parallel=True)


def test_missing_xfuser_fails_at_startup(monkeypatch):
    monkeypatch.setattr("trident_rs.executors.xfuser_cpu.xfuser_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"needs xfuser.*gpu"):
        build_executor("xfuser", "tiny-sd3", "diffuse", width=2)


def test_unknown_option_fails_at_startup():
    with pytest.raises(ConfigError, match="unknown xfuser executor options"):
        build_executor("xfuser", "tiny-sd3", "diffuse", width=2, ulysses=2)


# --- real ranks on a local Ray cluster with fake GPUs ----------------------------------------

@pytest.fixture(scope="module")
def ray_two_fake_gpus():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _payloads(model: str, guidances: list[float]) -> list[StagePayload]:
    params = [GenerationParams(model=model, prompt=f"a red cube {i}", steps=3, seed=10 + i, guidance_scale=g)
              for i, g in enumerate(guidances)]
    return build_executor("diffusers", model, "encode").run([StagePayload(p) for p in params])


def _width2_replica(ray, model: str, **options):
    """A stand-in for a Serve replica of diffuse-w2: an actor in bundle 0 of a 2-GPU
    STRICT_PACK placement group that builds the executor (and so starts its ranks)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self):
            self.executor = build_executor("xfuser", model, "diffuse", width=2, **options)

        def layout(self):
            return self.executor.layout, self.executor.rank_info

        def run(self, batch):
            return self.executor.run(batch)

        def run_wrong_model(self, batch):
            """A request the ranks reject alike: the error reaches the caller, the group stays up."""
            other = "tiny-flux" if model == "tiny-sd3" else "tiny-sd3"
            wrong = [StagePayload(p.params.model_copy(update={"model": other}), p.tensors) for p in batch]
            try:
                self.executor.run(wrong)
            except Exception as e:
                self.executor.check_health()
                return str(e)
            return "no error"

        def close(self):
            self.executor.close()

    pg = placement_group([{"GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    replica = Replica.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
    return replica, lambda: (ray.get(replica.close.remote()), ray.kill(replica), remove_placement_group(pg))


@needs_xfuser
@pytest.mark.slow
@pytest.mark.parametrize(
    "model, options, guidances, layout",
    [
        ("tiny-sd3", {}, [7.0, 7.0], (2, 1)),                          # CFG parallel
        ("tiny-sd3", {"cfg_parallel": False}, [7.0, 1.0], (1, 2)),     # Ulysses; guidance 1 = CFG off
        ("tiny-flux", {}, [3.5], (1, 2)),                               # Ulysses
    ],
    ids=["sd3-cfg2", "sd3-ulysses2", "flux-ulysses2"],
)
def test_width2_matches_width1(ray_two_fake_gpus, model, options, guidances, layout):
    ray = ray_two_fake_gpus
    encoded = _payloads(model, guidances)
    expected = build_executor("diffusers", model, "diffuse").run(encoded)
    replica, close = _width2_replica(ray, model, **options)
    try:
        got_layout, ranks = ray.get(replica.layout.remote(), timeout=300)
        assert (got_layout.cfg, got_layout.ulysses) == layout
        assert len({r["pid"] for r in ranks}) == 2 and {r["backend"] for r in ranks} == {"gloo"}
        got = ray.get(replica.run.remote(encoded), timeout=300)
        assert "sent to a" in ray.get(replica.run_wrong_model.remote(encoded), timeout=300)
    finally:
        close()
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert have.params == want.params
        a, b = want.tensors["latents"], have.tensors["latents"]
        assert a.shape == b.shape and b.dtype == np.float32
        assert np.abs(a - b).max() <= TOLERANCE
        assert have.meta["diffuse_width"] == 2
    # different seeds must give different latents (the comparison above is not vacuous)
    if len(got) > 1:
        assert np.abs(got[0].tensors["latents"] - got[1].tensors["latents"]).max() > 1e-3


@needs_xfuser
@pytest.mark.slow
def test_width_beyond_devices_fails_at_startup(ray_two_fake_gpus):
    with pytest.raises(ConfigError, match="width 4 needs 4 GPUs.*has 2"):
        build_executor("xfuser", "tiny-sd3", "diffuse", width=4)


# --- decode: tiled on one device when the cost model says so, patch-parallel at width 2 -----

def _latents(model: str, sizes: list[int]) -> list[StagePayload]:
    rng = np.random.default_rng(0)
    return [StagePayload(GenerationParams(model=model, prompt="x", height=s, width=s, steps=2),
                         tensors={"latents": rng.standard_normal((1, 16, s // 8, s // 8), dtype=np.float32)})
            for s in sizes]


def test_decode_tiles_only_shapes_predicted_not_to_fit():
    from trident_rs.executors.vae_decode import MemoryAwareDecodeExecutor
    from trident_rs.policy.cost_model import CostModel
    from trident_rs.policy.types import Shape

    cm = CostModel.default()
    small, large = Shape(64, 64), Shape(128, 128)
    limit = (cm.predict("tiny-sd3", "decode", small).memory_gb + cm.predict("tiny-sd3", "decode", large).memory_gb) / 2
    executor = build_executor("xfuser", "tiny-sd3", "decode", gpu_memory_gb=limit)
    assert isinstance(executor, MemoryAwareDecodeExecutor)
    batch = _latents("tiny-sd3", [64, 128])
    got = executor.run(batch)
    untiled = build_executor("diffusers", "tiny-sd3", "decode").run(batch)
    assert [p.meta["decode_mode"] for p in got] == ["full", "tiled"]
    assert np.array_equal(got[0].tensors["frames"], untiled[0].tensors["frames"])
    assert got[1].tensors["frames"].shape == untiled[1].tensors["frames"].shape == (1, 128, 128, 3)
    # the tiled path really ran (overlapping tiles are blended), and tiling is off again afterwards
    assert not np.array_equal(got[1].tensors["frames"], untiled[1].tensors["frames"])
    assert not executor.vae.use_tiling


@needs_xfuser
@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_fake_gpus")
def test_patch_parallel_decode_matches_width1():
    batch = _latents("tiny-sd3", [128])
    expected = build_executor("diffusers", "tiny-sd3", "decode").run(batch)
    executor = build_executor("xfuser", "tiny-sd3", "decode", width=2)
    try:
        assert {r["backend"] for r in executor.rank_info} == {"gloo"}
        got = executor.run(batch)
    finally:
        executor.close()
    assert got[0].meta["decode_mode"] == "patch-parallel"
    # uint8 frames: at most one rounding step apart where the float frames differ by ~1e-6
    a, b = expected[0].tensors["frames"].astype(int), got[0].tensors["frames"].astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


@needs_xfuser
@pytest.mark.slow
def test_replica_holding_bundle0_gpu_fails_at_startup(ray_two_fake_gpus):
    """A width-2 replica that holds bundle 0's GPU itself leaves rank 0 none: a clear error, no hang."""
    ray = ray_two_fake_gpus
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=1)
    class GreedyReplica:
        def try_build(self):
            try:
                build_executor("xfuser", "tiny-sd3", "diffuse", width=2)
            except ConfigError as e:
                return str(e)
            return "no error"

    pg = placement_group([{"GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    replica = GreedyReplica.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
    try:
        message = ray.get(replica.try_build.remote(), timeout=120)
    finally:
        ray.kill(replica)
        remove_placement_group(pg)
    assert "num_gpus=0" in message and "free per bundle: [0.0, 1" in message


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_loadable_profile(tmp_path):
    """benchmarks/gpu_check.py (run on a lent GPU machine) on its CPU path: tiny models."""
    import importlib.util
    import json
    from pathlib import Path

    from trident_rs.policy.cost_model import CostModel
    from trident_rs.policy.types import Shape

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--dry-run", "--models", "sd3", "--steps", "2", "--out", str(tmp_path)]) == 0
    cm = CostModel.from_files(tmp_path / "profile_gpu.json")
    assert cm.predict("tiny-sd3", "diffuse", Shape(64, 64)).latency_s > 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    split = report["models"]["tiny-sd3"]["split_vs_monolithic"]
    assert split["max_abs_diff"] <= max(split["one_call_repeat_diff"], 1e-6)
