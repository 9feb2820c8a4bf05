"""The profiler measures tiny-sd3 on this machine into a profile the CostModel loads."""
from __future__ import annotations

import pytest

from trident_rs.errors import InvalidRequestError, ProfileError, UnknownModelError
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.profile_format import load_profile
from trident_rs.policy.types import STAGES, Shape


def test_cli_profiles_tiny_sd3_into_a_loadable_file(tmp_path, capsys):
    from trident_rs.cli import main

    out = tmp_path / "prof.json"
    rc = main(["profile", "--model", "tiny-sd3", "--sizes", "64x64", "--steps", "2", "--warmup", "1",
               "--repeats", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    profile = load_profile(out)
    assert {p.stage for p in profile.points} == set(STAGES)
    assert all(p.kind == "measured" and p.model == "tiny-sd3" and p.shape == Shape(64, 64) for p in profile.points)
    assert all(p.latency_s > 0 and p.memory_gb is not None and p.memory_gb > 0 for p in profile.points)
    cm = CostModel.from_files(out)
    for p in profile.points:
        assert cm.predict("tiny-sd3", p.stage, Shape(64, 64)).latency_s == p.latency_s
    # a size it did not profile is predicted from the fitted curve: positive and not smaller
    assert cm.predict("tiny-sd3", "diffuse", Shape(128, 128)).latency_s >= cm.predict(
        "tiny-sd3", "diffuse", Shape(64, 64)).latency_s
    assert "diffuse" in capsys.readouterr().out


def test_bad_profile_requests_fail_before_any_compute():
    from trident_rs.cli.profile import parse_sizes
    from trident_rs.profiler import ProfileSpec, profile_model

    with pytest.raises(InvalidRequestError, match="sizes"):
        parse_sizes("64by64")
    with pytest.raises(InvalidRequestError, match="height"):
        profile_model(ProfileSpec("tiny-sd3", [Shape(60, 64)]), progress=False)
    with pytest.raises(UnknownModelError):
        profile_model(ProfileSpec("nope", [Shape(64, 64)]), progress=False)
    with pytest.raises(ProfileError, match="repeats"):
        profile_model(ProfileSpec("tiny-sd3", [Shape(64, 64)], repeats=0), progress=False)
    assert parse_sizes("64x64, 128x96,720x1280x33") == [Shape(64, 64), Shape(128, 96), Shape(720, 1280, 33)]
