"""Baseline policies and the bound: plans fit the cluster, runs never over-allocate, the bound bounds."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sim_engine import FakeCost

from trident_rs.policy import registry
from trident_rs.policy.baselines import DynamicPipelinePolicy, StaticPipelinePolicy, StaticStagePolicy, assign_models
from trident_rs.policy.bound import BoundPolicy
from trident_rs.policy.types import Cluster, Request, Shape
from trident_rs.sim import simulate, summarize
from trident_rs.sim.runner import run_policy

COST = FakeCost()
SHAPES = [Shape(256, 256), Shape(512, 512), Shape(1024, 1024), Shape(2048, 2048)]


def workload(n: int, gap: float, seed: int, models=("flux",)) -> list[Request]:
    out = []
    for i in range(n):
        s = SHAPES[(i * 7 + seed) % len(SHAPES)]
        m = models[(i + seed) % len(models)]
        slo = 4 * s.pixels / 1e6 * 10 / 2 + 2
        out.append(Request(f"q{i}", m, s, 10, i * gap, i * gap + slo))
    return out


def test_static_plans_use_each_gpu_at_most_once_and_split_models():
    cluster = Cluster(4, 8)
    for width in (1, 2, 4, 8):
        plan = StaticPipelinePolicy(cluster, COST, width=width).initial_plan(0.0)
        plan.check(cluster)
        assert sum(g.width for g in plan.groups) == cluster.total_gpus
        assert all(g.width == width for g in plan.groups)
    stage = StaticStagePolicy(cluster, COST, width=4, encode_gpus=2, decode_gpus=3,
                              models={"flux": 0.75, "hunyuanvideo": 0.25}).initial_plan(0.0)
    stage.check(cluster)
    by_stage = {s: [g for g in stage.groups if g.stages == (s,)] for s in ("encode", "diffuse", "decode")}
    assert len(by_stage["encode"]) == 2 and len(by_stage["decode"]) == 3
    diffuse_models = [g.model for g in by_stage["diffuse"]]
    assert len(diffuse_models) == 6  # 27 GPUs left: three full nodes of two width-4 groups
    assert abs(diffuse_models.count("flux") - 0.75 * 6) <= 0.5 and "hunyuanvideo" in diffuse_models
    assert assign_models(5, {"a": 0.99, "b": 0.01}).count("b") == 1  # every model gets a replica


@settings(max_examples=12, deadline=None)
@given(nodes=st.integers(1, 3), gpn=st.sampled_from([2, 4, 8]), gap=st.floats(0.05, 2.0),
       seed=st.integers(0, 50), two_models=st.booleans())
def test_baselines_never_over_allocate_and_serve_everyone(nodes, gpn, gap, seed, two_models):
    cluster = Cluster(nodes, gpn)
    models = ("flux", "sd3") if two_models else ("flux",)
    reqs = workload(40, gap, seed, models)
    shares = {m: 1.0 for m in models}
    policies = [DynamicPipelinePolicy(cluster, COST)]
    for make in (lambda: StaticPipelinePolicy(cluster, COST, width=min(2, gpn), models=shares),
                 lambda: StaticStagePolicy(cluster, COST, width=2, encode_gpus=len(models),
                                           decode_gpus=len(models), models=shares)):
        try:
            policies.append(make())
        except ValueError as e:  # too few GPUs for a replica of each stage and model: said so
            assert "cannot serve" in str(e) or "leave no diffuse group" in str(e)
    for p in policies:  # the engine raises PolicyViolation on any busy-GPU or out-of-order launch
        res = simulate(cluster, p, COST, reqs)
        assert len(res.finish) == len(reqs), p.name
        assert res.busy_gpu_seconds <= cluster.total_gpus * res.end_time + 1e-6


def test_dynamic_pipeline_takes_the_smallest_width_that_meets_the_deadline():
    cluster = Cluster(1, 8)
    p = DynamicPipelinePolicy(cluster, COST)
    big = Shape(2048, 2048)  # 4.19 s per step at width 1, 10 steps
    loose = Request("a", "flux", big, 10, 0.0, 100.0)
    tight = Request("b", "flux", big, 10, 0.0, 15.0)
    hopeless = Request("c", "flux", big, 10, 0.0, 1.0)
    assert p.choose_width(loose, 0.0) == 1
    assert p.choose_width(tight, 0.0) == 4
    assert p.choose_width(hopeless, 0.0) == COST.best_width("flux", big)


def test_bound_is_above_every_policy():
    cluster = Cluster(2, 8)
    reqs = workload(300, 0.15, 1)
    bound = BoundPolicy(cluster, COST).evaluate(reqs)
    assert 0 < bound.attainment <= 1
    for name in ("static-best", "dynamic-pipeline", "static-stage"):
        run = run_policy(name, reqs, cluster, COST)
        assert run.metrics["slo_attainment"] <= bound.attainment + 1e-9, name
    # a relaxation that is tight under overload: a 10x rate cannot be served at the same attainment
    crowded = BoundPolicy(cluster, COST).evaluate(workload(3000, 0.015, 1))
    assert crowded.fluid_attainment < bound.fluid_attainment


def test_registry_builds_baselines_and_static_best_picks_the_best_width():
    cluster = Cluster(2, 8)
    assert {"static-pipeline", "static-best", "dynamic-pipeline", "static-stage", "paper", "trident",
            "bound"} <= set(registry.policy_names())
    assert registry.make_policy("static-pipeline", cluster, COST, width=4).width == 4
    reqs = workload(200, 0.2, 2)
    best = run_policy("static-best", reqs, cluster, COST)
    by_variant = best.detail["attainment_by_variant"]
    # every static variant ran: pipeline and stage, FCFS and EDF, at every width that fits
    assert {"static-pipeline-w1", "static-pipeline-w8-edf", "static-stage-w1", "static-stage-w4-edf"} <= set(by_variant)
    assert best.metrics["slo_attainment"] == pytest.approx(max(by_variant.values()))
    w, order = best.detail["width"], best.detail["order"]
    cls = StaticPipelinePolicy if best.detail["variant"].startswith("static-pipeline") else StaticStagePolicy
    single = summarize(simulate(cluster, cls(cluster, COST, width=w, order=order, models={"flux": 1.0}), COST, reqs))
    assert single.slo_attainment == pytest.approx(best.metrics["slo_attainment"])
    fcfs = run_policy("static-best-fcfs", reqs, cluster, COST)
    assert set(fcfs.detail["attainment_by_variant"]) == {f"static-pipeline-w{w}" for w in (1, 2, 4, 8)}
    assert fcfs.metrics["slo_attainment"] <= best.metrics["slo_attainment"] + 1e-12
