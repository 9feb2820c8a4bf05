"""CostModel: exact at profiled points, monotone in size, efficiency/best/min width, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trident_rs.errors import InvalidRequestError, ProfileError, UnknownModelError
from trident_rs.policy.cost_model import CostModel, DoesNotFitError, StageCost
from trident_rs.policy.profile_format import Hardware, Profile, ProfilePoint, load_profile
from trident_rs.policy.types import Shape

HW = Hardware(name="test-gpu", memory_gb=48.0)


def table(rows: dict[tuple[int, int], float], model: str = "flux", memory: dict | None = None) -> CostModel:
    """A hand-made diffuse table: {(size, width): per-step seconds}, square images."""
    pts = [ProfilePoint(model=model, stage="diffuse", height=s, width=s, width_gpus=w, latency_s=t,
                        memory_gb=(memory or {}).get((s, w)))
           for (s, w), t in rows.items()]
    return CostModel([Profile(hardware=HW, points=pts)])


@pytest.fixture(scope="module")
def cm() -> CostModel:
    return CostModel.default()


def test_default_is_exact_at_every_shipped_point(cm):
    profile = load_profile(CostModel.default_path())
    for p in profile.points:
        cost = cm.predict(p.model, p.stage, p.shape, p.width_gpus, p.batch)
        assert cost.latency_s == p.latency_s
        assert cost.memory_gb == p.memory_gb


SHARED_TABLE = Path(__file__).resolve().parents[2] / "shared" / "profiles" / "diffuse_per_step_l20.json"


@pytest.mark.skipif(not SHARED_TABLE.exists(), reason="shared profile table not present")
def test_shipped_table_matches_the_published_measurements(cm):
    published = json.loads(SHARED_TABLE.read_text())["per_step_seconds"]
    for model, rows in published.items():
        for key, by_width in rows.items():
            for w, seconds in by_width.items():
                assert cm.predict(model, "diffuse", Shape.parse(key), int(w)).latency_s == seconds


def test_default_is_cached_and_fast(cm):
    assert CostModel.default() is cm
    shape = Shape(1024, 1024)
    cm.predict("flux", "diffuse", shape, 4)
    import time
    t0 = time.perf_counter()
    for _ in range(10_000):
        cm.predict("flux", "diffuse", shape, 4)
    assert (time.perf_counter() - t0) / 10_000 < 50e-6


def test_registry_name_maps_to_profile_family(cm):
    shape = Shape(512, 512)
    assert cm.predict("tiny-sd3", "diffuse", shape, 1) == cm.predict("sd3", "diffuse", shape, 1)
    assert cm.widths("tiny-sd3", "diffuse") == (1, 2)  # the spec's widths, not the table's
    assert cm.widths("flux", "diffuse") == (1, 2, 4, 8)


sizes = st.integers(min_value=8, max_value=256).map(lambda k: 16 * k)  # 128..4096, multiples of 16


@settings(max_examples=60, deadline=None)
@given(h1=sizes, w1=sizes, dh=st.integers(0, 64), dw=st.integers(0, 64), width=st.sampled_from([1, 2, 4, 8]),
       stage=st.sampled_from(["encode", "diffuse", "decode"]))
def test_monotone_in_image_size(cm, h1, w1, dh, dw, width, stage):
    h2, w2 = min(h1 + 16 * dh, 4096), min(w1 + 16 * dw, 4096)
    if stage != "diffuse":
        width = 1
    small = cm.predict("flux", stage, Shape(h1, w1), width)
    large = cm.predict("flux", stage, Shape(h2, w2), width)
    assert small.latency_s <= large.latency_s * (1 + 1e-12)
    assert small.memory_gb <= large.memory_gb * (1 + 1e-12)
    assert small.latency_s > 0 and math.isfinite(large.latency_s)


@settings(max_examples=40, deadline=None)
@given(frames=st.sampled_from([1, 5, 17, 33, 49, 65, 97, 129]), more=st.integers(0, 8), width=st.sampled_from([1, 2, 4, 8]))
def test_monotone_in_frames(cm, frames, more, width):
    f2 = min(frames + 4 * more, 129)
    a = cm.predict("hunyuanvideo", "diffuse", Shape(720, 1280, frames), width).latency_s
    b = cm.predict("hunyuanvideo", "diffuse", Shape(720, 1280, f2), width).latency_s
    assert a <= b * (1 + 1e-12)


def test_interpolates_between_points_within_neighbours():
    cm = table({(256, 1): 0.1, (1024, 1): 1.0, (2048, 1): 4.0})
    t = cm.predict("flux", "diffuse", Shape(512, 512)).latency_s
    assert 0.1 < t < 1.0
    above = cm.predict("flux", "diffuse", Shape(4096, 4096)).latency_s
    assert above > 4.0


def test_size_missing_at_one_width_follows_the_speedup_of_the_nearest_width():
    # FLUX-like: per-step time doubles from 128² to 256² (small-size costs that scale with the
    # image), so no fixed-cost curve fitted on 256²..1024² predicts 128² (it said ~0.08 s, +45%).
    # Width 2 measured 128²; the width-1 / width-2 speedup at 256² (0.987) carries it over.
    w1 = {256: 0.1086, 512: 0.2217, 1024: 0.8403}
    w2 = {128: 0.0550, 256: 0.1100, 512: 0.1949, 1024: 0.5376}
    w8 = {128: 0.0463, 256: 0.0926, 512: 0.1212}  # farther than w2 from w1: not used for it
    cm = table({**{(s, 1): t for s, t in w1.items()}, **{(s, 2): t for s, t in w2.items()},
                **{(s, 8): t for s, t in w8.items()}})
    tiny = Shape(128, 128)
    assert cm.predict("flux", "diffuse", tiny, 1).latency_s == pytest.approx(0.0550 * 0.1086 / 0.1100)
    # width 8 has no 1024²: width 2 (nearest that has it) x the w8/w2 speedup at 512²
    assert cm.predict("flux", "diffuse", Shape(1024, 1024), 8).latency_s == pytest.approx(0.5376 * 0.1212 / 0.1949)
    for width, rows in ((1, w1), (2, w2), (8, w8)):  # measured points exact, curve monotone
        for size, t in rows.items():
            assert cm.predict("flux", "diffuse", Shape(size, size), width).latency_s == t
        times = [cm.predict("flux", "diffuse", Shape(s, s), width).latency_s for s in range(64, 2064, 16)]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(times, times[1:]))
    assert cm.efficiency("flux", tiny, 2) == pytest.approx(0.1086 / 0.1100 / 2)
    # a size no width measured still comes from the width's own curve, below its smallest point
    assert cm.predict("flux", "diffuse", Shape(64, 64), 1).latency_s < cm.predict("flux", "diffuse", tiny, 1).latency_s


def test_efficiency_and_best_width_on_hand_made_table():
    cm = table({(1024, 1): 8.0, (1024, 2): 4.2, (1024, 4): 2.4, (1024, 8): 2.0,
                (256, 1): 1.0, (256, 2): 0.9, (256, 4): 0.9, (256, 8): 0.9})
    big, small = Shape(1024, 1024), Shape(256, 256)
    assert cm.efficiency("flux", big, 2) == pytest.approx(8.0 / 4.2 / 2)
    assert cm.efficiency("flux", big, 4) == pytest.approx(8.0 / 2.4 / 4)  # 0.833
    assert cm.efficiency("flux", big, 8) == pytest.approx(0.5)
    assert cm.best_width("flux", big) == 4
    assert cm.best_width("flux", big, threshold=0.9) == 2
    assert cm.best_width("flux", big, threshold=0.4) == 8
    assert cm.best_width("flux", big, widths=(1, 2)) == 2
    assert cm.best_width("flux", small) == 1


def test_best_width_on_shipped_table(cm):
    assert cm.best_width("flux", Shape(4096, 4096)) == 8  # scales ~7x on 8 GPUs
    assert cm.best_width("flux", Shape(256, 256)) == 1  # does not scale
    assert cm.best_width("hunyuanvideo", Shape(720, 1280, 129)) == 8


def test_min_width_on_hand_made_memory():
    mem = {(1024, 1): 60.0, (1024, 2): 35.0, (1024, 4): 20.0, (256, 1): 10.0, (256, 2): 9.0, (256, 4): 8.0}
    cm = table({k: 1.0 / k[1] for k in mem}, memory=mem)
    assert cm.min_width("flux", "diffuse", Shape(1024, 1024), 48.0) == 2
    assert cm.min_width("flux", "diffuse", Shape(1024, 1024), 24.0) == 4
    assert cm.min_width("flux", "diffuse", Shape(256, 256), 48.0) == 1
    with pytest.raises(DoesNotFitError, match="fits no width"):
        cm.min_width("flux", "diffuse", Shape(1024, 1024), 16.0)


def test_long_video_decode_needs_more_than_one_l20(cm):
    assert cm.min_width("hunyuanvideo", "decode", Shape(720, 1280, 129), 48.0) > 1
    assert cm.min_width("hunyuanvideo", "decode", Shape(720, 1280, 1), 48.0) == 1


def test_batching_costs_less_than_b_times_at_small_sizes_and_about_b_at_large(cm):
    small, large = Shape(128, 128), Shape(2048, 2048)
    one_s, four_s = (cm.predict("sd3", "diffuse", small, 1, b).latency_s for b in (1, 4))
    one_l, four_l = (cm.predict("flux", "diffuse", large, 1, b).latency_s for b in (1, 4))
    assert one_s < four_s < 2 * one_s
    assert 3.5 * one_l < four_l <= 4 * one_l
    enc1, enc4 = (cm.predict("flux", "encode", large, 1, b).latency_s for b in (1, 4))
    assert enc4 == pytest.approx(4 * enc1)


def test_stage_time_multiplies_steps_for_diffuse_only(cm):
    s = Shape(1024, 1024)
    assert cm.stage_time("flux", "diffuse", s, steps=28) == pytest.approx(28 * cm.predict("flux", "diffuse", s).latency_s)
    assert cm.stage_time("flux", "decode", s, steps=28) == cm.predict("flux", "decode", s).latency_s


def test_later_profile_overrides_earlier_point():
    a = Profile(hardware=HW, points=[ProfilePoint(model="flux", stage="encode", height=64, width=64, latency_s=1.0)])
    b = Profile(hardware=HW, points=[ProfilePoint(model="flux", stage="encode", height=64, width=64, latency_s=0.5)])
    assert CostModel([a, b]).predict("flux", "encode", Shape(64, 64)) == StageCost(0.5, 0.0)


def test_errors(cm, tmp_path):
    with pytest.raises(UnknownModelError):
        cm.predict("no-such-model", "diffuse", Shape(512, 512))
    with pytest.raises(InvalidRequestError, match="stage"):
        cm.predict("flux", "denoise", Shape(512, 512))
    with pytest.raises(InvalidRequestError, match="height"):
        cm.predict("flux", "diffuse", Shape(500, 512))  # not a multiple of 16
    with pytest.raises(InvalidRequestError, match="num_frames"):
        cm.predict("hunyuanvideo", "diffuse", Shape(720, 1280, 2))
    with pytest.raises(InvalidRequestError, match="width"):
        cm.predict("flux", "diffuse", Shape(512, 512), width=0)
    with pytest.raises(ProfileError, match="width 3"):
        cm.predict("flux", "diffuse", Shape(512, 512), width=3)
    only_diffuse = table({(256, 1): 0.1})
    with pytest.raises(ProfileError, match="decode"):
        only_diffuse.predict("flux", "decode", Shape(256, 256))
    with pytest.raises(ProfileError, match="no profile data"):
        only_diffuse.predict("sd3", "diffuse", Shape(256, 256))


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"version": 1}', "hardware"),
    ('{"version": 99, "hardware": {"name": "x", "memory_gb": 1}}', "version 99"),
    ('{"version": 1, "hardware": {"name": "x", "memory_gb": 1}, "points": '
     '[{"model": "flux", "stage": "diffuse", "height": 64, "width": 64, "latency_s": -1}]}', "latency_s"),
    ('{"version": 1, "hardware": {"name": "x", "memory_gb": 1}, "points": '
     '[{"model": "flux", "stage": "render", "height": 64, "width": 64, "latency_s": 1}]}', "stage"),
])
def test_malformed_profile_gives_profile_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=match):
        CostModel.from_files(path)


def test_duplicate_and_missing_files_give_profile_error(tmp_path):
    point = {"model": "flux", "stage": "encode", "height": 64, "width": 64, "latency_s": 1}
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"version": 1, "hardware": {"name": "x", "memory_gb": 1}, "points": [point, point]}))
    with pytest.raises(ProfileError, match="duplicate"):
        CostModel.from_files(path)
    with pytest.raises(ProfileError, match="cannot read"):
        CostModel.from_files(tmp_path / "missing.json")
    with pytest.raises(ProfileError):
        CostModel([])


def test_scaled_copy_scales_latency_not_memory_or_efficiency():
    cost = CostModel.default()
    shape = Shape(1024, 1024)
    fast = cost.scaled(0.05)
    for stage in ("encode", "diffuse", "decode"):
        a, b = cost.predict("flux", stage, shape), fast.predict("flux", stage, shape)
        assert b.latency_s == pytest.approx(0.05 * a.latency_s)
        assert b.memory_gb == a.memory_gb
    assert fast.efficiency("flux", shape, 4) == pytest.approx(cost.efficiency("flux", shape, 4))
    assert fast.best_width("flux", shape) == cost.best_width("flux", shape)
    assert cost.predict("flux", "diffuse", shape).latency_s == CostModel.default().predict("flux", "diffuse", shape).latency_s
    with pytest.raises(InvalidRequestError):
        cost.scaled(0)
