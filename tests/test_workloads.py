"""Workloads: published traces, CSV files, the Azure arrivals with drawn shapes, synthetic arrivals."""
from __future__ import annotations

import numpy as np
import pytest
from test_sim_engine import FakeCost

from trident_rs.errors import ConfigError
from trident_rs.sim.workloads import FLUX_SHAPES, HUNYUAN_SHAPES, load_workload

COST = FakeCost()


def test_flux_paper_trace_parses_with_paper_rate_and_mix():
    reqs = load_workload("flux-paper", cost=COST)
    assert len(reqs) == 2700
    assert reqs[-1].arrival == pytest.approx(1799.3, abs=1.0)  # 1.5 req/s for 30 minutes
    assert {r.shape for r in reqs} == set(FLUX_SHAPES)
    assert all(r.model == "flux" and r.steps == 28 and r.deadline > r.arrival for r in reqs)
    # bigger images get longer SLOs (the rule scales the predicted diffuse time)
    slo = {r.shape: r.slo_s for r in reqs}
    assert slo[FLUX_SHAPES[-1]] > slo[FLUX_SHAPES[0]]


def test_rate_scale_duration_steps_and_slo_scale():
    base = load_workload("hunyuanvideo-paper", cost=COST)
    fast = load_workload("hunyuanvideo-paper", cost=COST, rate_scale=2.0, duration=100.0, steps=10, slo_scale=8.0)
    assert {r.shape for r in base} == set(HUNYUAN_SHAPES)
    assert len(fast) == 200 and max(r.arrival for r in fast) < 100.0
    assert fast[10].arrival == pytest.approx(base[10].arrival / 2)
    assert all(r.steps == 10 for r in fast)
    loose = load_workload("hunyuanvideo-paper", cost=COST, steps=10, slo_scale=8.0)
    tight = load_workload("hunyuanvideo-paper", cost=COST, steps=10, slo_scale=2.0)
    assert all(a.slo_s > b.slo_s for a, b in zip(loose, tight))


def test_any_csv_with_a_model(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("arrival_s,height,width,num_frames,num_inference_steps\n0,512,512,1,20\n2.5,1024,1024,1,20\n")
    reqs = load_workload(str(path), model="sd3", cost=COST)
    assert [(r.model, r.shape.height, r.arrival) for r in reqs] == [("sd3", 512, 0.0), ("sd3", 1024, 2.5)]
    with pytest.raises(ConfigError, match="model"):
        load_workload(str(path), cost=COST)
    with pytest.raises(ConfigError, match="unknown workload"):
        load_workload("no-such-workload", cost=COST)


def test_azure_arrivals_are_real_deterministic_and_rescaled():
    a = load_workload("azure-flux", cost=COST, seed=3)
    b = load_workload("azure-flux", cost=COST, seed=3)
    c = load_workload("azure-flux", cost=COST, seed=4)
    assert [(r.arrival, r.shape) for r in a] == [(r.arrival, r.shape) for r in b]
    assert [r.shape for r in a] != [r.shape for r in c]
    assert len(a) == 19366
    assert len(a) / a[-1].arrival == pytest.approx(1.5, rel=0.01)
    gaps = np.diff([r.arrival for r in a])
    assert gaps.std() / gaps.mean() > 1.05  # real traffic is burstier than Poisson (CV 1)
    counts = {s: sum(r.shape == s for r in a) for s in FLUX_SHAPES}
    assert min(counts.values()) > 0.15 * len(a)  # uniform mix
    mixed = load_workload("azure-mixed", cost=COST)
    assert {r.model for r in mixed} == {"flux", "hunyuanvideo"}


def test_poisson_and_gamma_burstiness():
    p = np.diff([r.arrival for r in load_workload("poisson-flux", cost=COST, seed=1)])
    g = np.diff([r.arrival for r in load_workload("gamma-flux", cost=COST, seed=1)])
    assert 1 / p.mean() == pytest.approx(1.5, rel=0.1) and 1 / g.mean() == pytest.approx(1.5, rel=0.3)
    assert p.std() / p.mean() == pytest.approx(1.0, abs=0.1)
    assert g.std() / g.mean() > 2.5


def test_shifting_mix_moves_from_small_to_large():
    reqs = load_workload("shift-flux", cost=COST)
    half = len(reqs) // 2
    assert max(r.shape.pixels for r in reqs[:half]) <= 512 * 512
    assert min(r.shape.pixels for r in reqs[half:]) >= 1024 * 1024


def test_one_trace_reader_serves_policy_forecasts_and_simulator_requests():
    from trident_rs.policy.traces import find_trace, read_named_trace
    from trident_rs.policy.workload import forecast_from_trace

    rows = read_named_trace("flux-paper")
    reqs = load_workload("flux-paper", cost=COST)
    assert [(r.arrival, r.shape, r.steps) for r in rows] == [(r.arrival, r.shape, r.steps) for r in reqs]
    forecast = forecast_from_trace(rows, COST)
    assert forecast.models == ("flux",) and {c.shape for c in forecast.rates} == set(FLUX_SHAPES)
    assert forecast.total_rate == pytest.approx(1.5, rel=0.01)
    slo = {c.shape: c.slo_s for c in forecast.rates}
    assert all(r.slo_s == pytest.approx(slo[r.shape]) for r in reqs)  # the same SLO rule
    assert find_trace("hunyuanvideo-paper")[1] == "hunyuanvideo"
    with pytest.raises(ConfigError, match="unknown workload"):
        find_trace("no-such-trace")


def test_trace_reader_rejects_bad_files(tmp_path):
    from trident_rs.policy.traces import read_trace

    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,height,width\n0,512,512\n")
    with pytest.raises(ConfigError, match="missing columns"):
        read_trace(bad, "flux")
    bad.write_text("arrival_s,height,width,num_frames,num_inference_steps\n0,x,512,1,20\n")
    with pytest.raises(ConfigError, match="bad.csv:2"):
        read_trace(bad, "flux")
