"""Controller: shift detection with hysteresis; transitions that never over-commit a node."""
import pytest
import random

from hypothesis import given, settings, strategies as st

from policy_fakes import FakeCost, make_requests, run_loop, slo_of
from trident_rs.policy.controller import Controller, ControllerConfig, Transition, mix_distance, with_prior
from trident_rs.policy.solver import PlacementSolver
from trident_rs.policy.trident import TridentPolicy
from trident_rs.policy.types import Cluster, PlacementPlan, Request, Shape
from trident_rs.policy.workload import Forecast, RequestClass

COST = FakeCost()
CLASSES = [RequestClass(m, s, 10, slo_of(COST, m, s, 10)) for m in ("img", "vid") for s in COST.shapes(m)]
mixes = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0.01, 1.0), min_size=1)


def norm(m):
    total = sum(m.values())
    return {k: v / total for k, v in m.items()}


@given(mixes, mixes)
def test_mix_distance_is_a_bounded_symmetric_distance(a, b):
    a, b = norm(a), norm(b)
    assert 0.0 <= mix_distance(a, b) <= 1.0 + 1e-9
    assert abs(mix_distance(a, b) - mix_distance(b, a)) < 1e-12
    assert mix_distance(a, a) < 1e-12


def arrivals(ctl, shapes, rate, t0, t1, seed=0):
    rng = random.Random(seed)
    t, i = t0, 0
    while t < t1:
        s = rng.choice(shapes)
        ctl.observe_arrival(Request(f"{t0}-{i}", "img", s, 10, t, t + 100), t)
        t += 1 / rate
        i += 1
    return t1


def test_shift_needs_persistence_and_respects_cooldown():
    cluster = Cluster(2, 8)
    ctl = Controller(PlacementSolver(cluster, COST), ControllerConfig(window_s=30, check_interval_s=5,
                                                                       persist_checks=2, cooldown_s=0))
    small, big = [Shape(256, 256)], [Shape(2048, 2048)]
    now = arrivals(ctl, small, 2.0, 0, 30)
    first = ctl.check(now, None)
    assert first is not None and first.reason == "first window"
    # same mix and rate: no re-plan
    for k in range(1, 4):
        now = arrivals(ctl, small, 2.0, now, now + 5, seed=k)
        assert ctl.check(now, first.target) is None
    # the mix flips: the first check only counts a strike, the second re-plans
    now = arrivals(ctl, big, 2.0, now, now + 30, seed=9)
    assert ctl.check(now, first.target) is None
    now = arrivals(ctl, big, 2.0, now, now + 5, seed=10)
    second = ctl.check(now, first.target)
    assert second is not None and "mix shift" in second.reason
    # cooldown holds further changes back
    ctl.config = ControllerConfig(window_s=30, check_interval_s=5, persist_checks=1, cooldown_s=1000)
    now = arrivals(ctl, small, 6.0, now, now + 30, seed=11)
    assert ctl.check(now, second.target) is None


plans = st.tuples(st.integers(1, 4), st.lists(st.sampled_from(CLASSES), min_size=1, max_size=4, unique=True),
                  st.lists(st.sampled_from(CLASSES), min_size=1, max_size=4, unique=True), st.integers(0, 10**6))


@settings(max_examples=20, deadline=None)
@given(plans)
def test_transitions_never_over_commit_a_node(case):
    nodes, before, after, seed = case
    cluster = Cluster(nodes + 1, 8)
    solver = PlacementSolver(cluster, COST, time_limit_s=0.2)
    try:
        current = solver.solve(Forecast({c: 1.0 for c in before}))
        target = solver.solve(Forecast({c: 1.0 for c in after}), current)
    except Exception:
        return  # a forecast that fits no plan on this cluster (tested in test_solver)
    rng = random.Random(seed)
    busy = {g.id for g in current.groups if rng.random() < 0.5}
    transition = Transition(target, "test")
    for _ in range(50):
        held = {(g.node, i) for g in current.groups for i in g.gpus if g.id in busy}
        free = {n: frozenset(i for i in range(8) if (n, i) not in held) for n in range(cluster.nodes)}
        plan, done = transition.step(current, frozenset(busy), free)
        plan.check(cluster)  # never two groups on one GPU, never over a node
        for g in current.groups:
            if g.id in busy:  # a running group keeps its GPUs until it drains
                assert g in plan.groups
        current = plan
        if done:
            break
        busy = {b for b in busy if rng.random() < 0.6}  # some launches finish
    else:
        raise AssertionError("transition never completed")
    assert {g.id for g in current.groups} == {g.id for g in target.groups}


def test_trident_replans_when_the_mix_shifts_and_serves_everyone():
    cluster = Cluster(2, 8)
    first = make_requests(COST, "img", 80, 1.0, 10, seed=1)
    first = [r for r in first if r.shape == Shape(256, 256)]
    t0 = first[-1].arrival
    late = [Request(f"b{i}", "img", Shape(2048, 2048), 10, t0 + 2 * i, t0 + 2 * i + slo_of(COST, "img", Shape(2048, 2048), 10))
            for i in range(40)]
    policy = TridentPolicy(cluster, COST, controller={"window_s": 30, "check_interval_s": 5, "min_arrivals": 10,
                                                      "cooldown_s": 10})
    res = run_loop(policy, cluster, COST, first + late, check=lambda p: p.check(cluster))
    assert set(res.finished) == {r.id for r in first + late}
    assert res.plans >= 1 and policy.controller.replans >= 2
    assert Shape(2048, 2048) in {c.shape for c in policy.controller.planned_for.rates}  # re-planned for the new mix


def test_transition_gives_freed_gpus_first_to_a_deployment_the_plan_lacks():
    """The target's only encode group sits on a GPU a long drain holds; the free GPUs must go
    to it (relocated) before more diffuse groups, or the model's encode queue starves."""
    from trident_rs.policy.types import PlacementPlan, ReplicaGroup

    def grp(stage, gpu):
        return ReplicaGroup(f"img:{stage}-w1@n0g{gpu}", "img", (stage,), 1, 0, (gpu,))

    current = PlacementPlan(tuple(grp("diffuse", i) for i in range(6)))  # GPUs 6 and 7 idle
    # the packer lists wide and alphabetically early deployments first: diffuse before encode
    target = PlacementPlan(tuple(grp("diffuse", i) for i in range(1, 8)) + (grp("encode", 0),))
    tr = Transition(target, "test", gpus_per_node=8)
    plan, done = tr.step(current, frozenset({"img:diffuse-w1@n0g0"}), {0: frozenset({1, 2, 3, 4, 5, 6, 7})})
    plan.check(Cluster(1, 8))
    assert any(g.stages == ("encode",) for g in plan.groups)
    assert not done  # the busy group still drains


def test_sampling_noise_is_not_a_mix_shift():
    """60 arrivals drawn from a 13-class mix differ from it by ~0.25 in total variation: with
    the noise allowance that is no shift; a real shift still is."""
    from trident_rs.policy.controller import mix_noise

    classes = [RequestClass("img", Shape(64 * (i + 1), 64 * (i + 1)), 10, 50.0) for i in range(13)]
    planned = Forecast({c: 1.0 / 13 for c in classes})  # 1 req/s in all
    rng = random.Random(7)  # a draw that strays 0.3 from the mix (typical: 0.1-0.3)
    sample = [rng.choice(classes) for _ in range(60)]
    observed = Forecast.from_requests([Request(f"r{i}", c.model, c.shape, 10, 0, 50) for i, c in enumerate(sample)], 60)
    d = mix_distance(observed.mix(), planned.mix())
    assert d > 0.25  # the fixed threshold alone would call it a shift
    assert d < 2.0 * mix_noise(planned.mix(), 60)
    ctl = Controller(PlacementSolver(Cluster(2, 8), COST), ControllerConfig(window_s=60, check_interval_s=5))
    ctl.planned_for = planned
    for i, c in enumerate(sample):
        ctl.observe_arrival(Request(f"s{i}", c.model, c.shape, 10, i, i + 50), float(i))
    assert ctl.shift_reason(60.0) == ""
    for i in range(60):
        ctl.observe_arrival(Request(f"t{i}", "img", classes[0].shape, 10, 60 + i, 110 + i), 60.0 + i)
    assert ctl.shift_reason(120.0).startswith("mix shift")


def test_a_prior_plan_is_replaced_after_a_few_arrivals_even_at_a_low_rate():
    """At 0.1 req/s a 60 s window never holds `min_arrivals` (20): the prior, sized for every
    profiled shape, must still give way to what the first few requests show."""
    from trident_rs.policy.workload import Forecast as F

    cluster = Cluster(1, 8)
    ctl = Controller(PlacementSolver(cluster, COST), ControllerConfig(window_s=60, check_interval_s=5))
    prior = F({c: 0.05 for c in CLASSES})
    ctl.planned(prior, PlacementPlan(()), 0.0, provisional=True)
    now = arrivals(ctl, [Shape(256, 256)], 0.1, 0, 39)  # 4 arrivals
    assert ctl.check(now, None) is None
    now = arrivals(ctl, [Shape(256, 256)], 0.1, 40, 51, seed=1)  # 6 in the window
    t = ctl.check(now, None)
    assert t is not None and "replacing the prior" in t.reason
    assert set(ctl.planned_for.rates) == {c for c in ctl.planned_for.rates if c.shape == Shape(256, 256)}
    assert not ctl.provisional
    # from here on the usual rule: a few more arrivals of the same kind change nothing
    now = arrivals(ctl, [Shape(256, 256)], 0.1, now + 5, now + 60, seed=2)
    assert ctl.check(now, t.target) is None


def test_a_replan_keeps_the_priors_classes_until_evidence_outweighs_them():
    img = [c for c in CLASSES if c.model == "img"]
    prior = Forecast({c: 1.0 for c in img})  # every image class equally likely
    seen = img[0]
    observed = Forecast({seen: 0.5})
    few = with_prior(observed, prior, 5, 20.0)
    assert few.total_rate == pytest.approx(0.5)  # the observed rate
    mix = few.mix()
    assert set(mix) == {c.key for c in img}  # unseen classes keep a share
    assert mix[seen.key] == pytest.approx((5 + 20 / len(img)) / 25)
    many = with_prior(observed, prior, 2000, 20.0).mix()
    assert many[seen.key] > 0.99  # evidence outweighs the prior
    assert with_prior(observed, None, 5, 20.0) is observed and with_prior(observed, prior, 5, 0.0) is observed
