"""`benchmarks/suite.py --merge`: a policy rerun after a change replaces that policy's figures
in an earlier run's JSON, and nothing else."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import suite  # noqa: E402


def _point(name: str, trident: float, other: float, timelines: dict | None = None) -> dict:
    pt = {"name": name, "policies": {"trident": {"slo_attainment": trident}, "paper": {"slo_attainment": other}}}
    if timelines is not None:
        pt["trident_missed_timelines"] = timelines
    return pt


def test_merge_replaces_only_the_rerun_policies_and_keeps_the_format(tmp_path):
    path = tmp_path / "suite.json"
    suite.write_doc(path, {"quick": True, "points": [_point("a", 0.5, 0.7, {"r1": {}}), _point("b", 0.6, 0.8)]})
    rerun = [{"name": "a", "policies": {"trident": {"slo_attainment": 0.9}}, "trident_missed_timelines": {}}]
    suite.merge_into(path, rerun, "trident rerun")
    doc = json.loads(path.read_text())
    a, b = doc["points"]
    assert a["policies"] == {"trident": {"slo_attainment": 0.9}, "paper": {"slo_attainment": 0.7}}
    assert a["trident_missed_timelines"] == {}
    assert b == _point("b", 0.6, 0.8)
    assert doc["note"] == "trident rerun" and doc["quick"] is True
    assert path.read_text() == json.dumps(doc, indent=1)  # the format the suite writes


def test_merge_refuses_points_the_earlier_run_lacks(tmp_path):
    path = tmp_path / "suite.json"
    suite.write_doc(path, {"points": [_point("a", 0.5, 0.7)]})
    before = path.read_text()
    with pytest.raises(SystemExit, match="no point"):
        suite.merge_into(path, [{"name": "zz", "policies": {}}], "x")
    assert path.read_text() == before


def test_a_rerun_merged_into_the_default_output_path_keeps_the_other_policies(tmp_path):
    # `--policies trident --merge benchmarks/results/suite.json` with the default `--out`: the
    # run alone must not overwrite the earlier run it merges into (it once did, leaving trident only)
    path = tmp_path / "suite.json"
    suite.write_doc(path, {"points": [_point("a", 0.5, 0.7)]})
    run = {"points": [{"name": "a", "policies": {"trident": {"slo_attainment": 0.9}}}]}
    shown, where = suite.save_run(run, path, path, "trident rerun")
    assert where == path and json.loads(path.read_text()) == shown
    assert shown["points"][0]["policies"] == {"trident": {"slo_attainment": 0.9}, "paper": {"slo_attainment": 0.7}}
    other = tmp_path / "alone.json"  # to another file: the run alone there, the merge in place
    suite.save_run(run, other, path, "again")
    assert json.loads(other.read_text()) == run and json.loads(path.read_text())["note"] == "again"
