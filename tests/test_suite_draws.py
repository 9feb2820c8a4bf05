"""`benchmarks/suite.py --draw K`: fresh workloads on the suite's axes, for checking a policy on
points it was never judged on; draw 0 stays the suite every recorded figure comes from."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import suite  # noqa: E402


def test_draw_zero_is_the_recorded_suite():
    recorded = json.loads((ROOT / "benchmarks/results/suite.json").read_text())["points"]
    assert [p["name"] for p in recorded] == [p.name for p in suite.suite_points(False)]
    assert [p["check"] for p in recorded] == [p.check for p in suite.suite_points(False)]


@pytest.mark.parametrize("quick", [True, False])
def test_a_fresh_draw_differs_covers_every_axis_value_and_is_all_checking_points(quick):
    own, fresh = suite.suite_points(quick), suite.suite_points(quick, draw=1)
    assert len(fresh) == len(own) and all(p.check for p in fresh)
    assert not {p.name for p in fresh} & {p.name for p in suite.suite_points(quick, draw=2)}
    combos = lambda pts: [(p.family, p.arrivals, p.load, p.slo_scale, p.gpus) for p in pts]  # noqa: E731
    assert combos(fresh) != combos(own)
    assert not {p.seed for p in fresh} & {p.seed for p in own}  # other arrivals, shapes and noise
    for axis, values in (("family", suite.FAMILIES), ("arrivals", suite.ARRIVALS), ("load", suite.LOADS),
                         ("slo_scale", suite.SLO_SCALES)):
        assert {getattr(p, axis) for p in fresh} == set(values)
    first = fresh[0]
    assert suite.requests_for(first, suite.CostModel.default())  # the point runs as any other


def test_a_negative_draw_is_refused():
    with pytest.raises(ValueError, match="draw"):
        suite.suite_points(True, draw=-1)
