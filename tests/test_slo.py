"""The authors' SLO rule: deadline = arrival + 1.1 * round(scale * t_best) + 2 s."""
from __future__ import annotations

import pytest

from trident_rs.errors import InvalidRequestError
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.profile_format import Hardware, Profile, ProfilePoint
from trident_rs.policy.slo import best_diffuse_time, deadline, slo_seconds
from trident_rs.policy.types import Shape


def hand_made() -> CostModel:
    # 1024^2: t1 = 1.0, t2 = 0.55 (eff 0.91), t4 = 0.3 (eff 0.83), t8 = 0.25 (eff 0.5) -> best width 4
    rows = {1: 1.0, 2: 0.55, 4: 0.3, 8: 0.25}
    pts = [ProfilePoint(model="flux", stage="diffuse", height=1024, width=1024, width_gpus=w, latency_s=t)
           for w, t in rows.items()]
    return CostModel([Profile(hardware=Hardware(name="t", memory_gb=48), points=pts)])


def test_rule_on_hand_made_table():
    cm, shape = hand_made(), Shape(1024, 1024)
    assert best_diffuse_time(cm, "flux", shape, 28) == pytest.approx(0.3 * 28)
    # round(4 * 8.4) = 34 -> 1.1 * 34 + 2
    assert slo_seconds(cm, "flux", shape, 28) == pytest.approx(1.1 * 34 + 2)
    assert slo_seconds(cm, "flux", shape, 28, scale=1.0) == pytest.approx(1.1 * 8 + 2)
    assert deadline(cm, "flux", shape, 28, arrival=100.0) == pytest.approx(100.0 + 1.1 * 34 + 2)


def test_rule_grows_with_size_and_scale_on_shipped_table():
    cm = CostModel.default()
    slos = [slo_seconds(cm, "flux", Shape(s, s), 28) for s in (128, 256, 512, 1024, 2048)]
    assert slos == sorted(slos) and slos[0] >= 2.0
    assert slo_seconds(cm, "flux", Shape(1024, 1024), 28, scale=8) > slo_seconds(cm, "flux", Shape(1024, 1024), 28)


def test_bad_arguments():
    cm = hand_made()
    with pytest.raises(InvalidRequestError):
        slo_seconds(cm, "flux", Shape(1024, 1024), 0)
    with pytest.raises(InvalidRequestError):
        slo_seconds(cm, "flux", Shape(1024, 1024), 28, scale=0)
