"""TridentPolicy end to end in the simulator: replica start cost, no starvation after re-plans,
and the dispatcher's rules for late and wide requests."""
import pytest

from policy_fakes import FakeCost, slo_of
from trident_rs.policy.controller import Transition, with_backlog
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.dispatcher import Dispatcher
from trident_rs.policy.trident import TridentPolicy
from trident_rs.policy.types import Cluster, ClusterState, PlacementPlan, ReplicaGroup, Request, Shape
from trident_rs.policy.workload import Forecast, RequestClass
from trident_rs.sim import SimConfig, simulate
from trident_rs.sim.workloads import load_workload

FAKE = FakeCost()


@pytest.fixture(scope="module")
def cost():
    return CostModel.default()


def _all_done(res, reqs):
    assert res.in_flight_at_end == 0
    assert set(res.finish) == {r.id for r in reqs}
    for r in reqs:
        assert res.finish[r.id] >= r.arrival


@pytest.mark.parametrize("start_cost", [5.0, 20.0])
def test_runs_in_the_simulator_with_a_replica_start_cost(cost, start_cost):
    """With start cost > 0, new groups are only starting when the plan that adds them is
    returned; the engine rejects any launch on them (PolicyViolation) until they are ready."""
    cluster = Cluster(2, 8)
    reqs = load_workload("flux-paper", rate_scale=1.0, duration=120, cost=cost)
    assert len(reqs) > 20
    res = simulate(cluster, TridentPolicy(cluster, cost), cost, reqs, SimConfig(start_cost_s=start_cost))
    _all_done(res, reqs)
    assert res.plan_changes >= 1  # it did re-plan, under the start cost


def test_shifting_mix_with_start_cost_completes_everything(cost):
    """Azure arrivals over a FLUX + HunyuanVideo mix: many re-plans; every request completes
    (the engine raises if work is left queued with nothing running)."""
    cluster = Cluster(16, 8)
    reqs = load_workload("azure-mixed", rate_scale=1.2, duration=600, cost=cost)
    res = simulate(cluster, TridentPolicy(cluster, cost), cost, reqs, SimConfig(start_cost_s=5.0))
    _all_done(res, reqs)


def test_no_launch_on_a_new_group_that_reuses_a_ready_id():
    """A re-plan may replace an idle group by one with the same id (model, stage, width, node,
    first GPU) but other GPUs; the new one is only starting, so nothing may launch on it."""
    cluster = Cluster(1, 8)
    policy = TridentPolicy(cluster, FAKE, replan=False)
    shape = Shape(1024, 1024)
    old = ReplicaGroup("img:diffuse-w2@n0g4", "img", ("diffuse",), 2, 0, (4, 5))
    new = ReplicaGroup("img:diffuse-w2@n0g4", "img", ("diffuse",), 2, 0, (4, 6))
    policy.plan = PlacementPlan((old,))
    policy.transition = Transition(PlacementPlan((new,)), "test")
    r = Request("r0", "img", shape, 10, 0.0, 1000.0)
    policy.dispatcher.add(r, "diffuse")
    state = ClusterState(0.0, {0: frozenset(range(8))}, frozenset({old.id}))
    out = policy.schedule(state)
    assert out.new_plan is not None and new in out.new_plan.groups
    assert out.launches == ()
    # once the runtime reports it ready, the request runs there
    out = policy.schedule(ClusterState(1.0, {0: frozenset(range(8))}, frozenset({new.id})))
    assert [launch.gpus for launch in out.launches] == [(4, 6)]


def test_waits_for_a_busy_wide_group_the_runtime_does_not_report_ready():
    """The runtime reports only idle groups as ready; the policy still shows the dispatcher the
    groups running its launches, so a request that only a busy wide group still serves on time
    waits for it (before: the dispatcher saw only the idle narrow group, judged the request
    late and ran it there, 46 s on one GPU past its deadline)."""
    cluster = Cluster(2, 8)
    policy = TridentPolicy(cluster, FAKE, replan=False)
    shape = Shape(2048, 2048)
    narrow = ReplicaGroup("img:diffuse-w1@n0g0", "img", ("diffuse",), 1, 0, (0,))
    wide = ReplicaGroup("img:diffuse-w8@n1g0", "img", ("diffuse",), 8, 1, tuple(range(8)))
    decode = ReplicaGroup("img:decode-w1@n0g1", "img", ("decode",), 1, 0, (1,))
    policy.plan = PlacementPlan((narrow, wide, decode))
    all_free = {0: frozenset(range(8)), 1: frozenset(range(8))}
    policy.dispatcher.add(Request("b", "img", shape, 20, 0.0, 1e6), "diffuse")
    [first] = policy.schedule(ClusterState(0.0, all_free, frozenset({wide.id, decode.id}))).launches
    assert first.group_id == wide.id  # busy until 20 steps at width 8: 25.6 s
    t1, t8 = (FAKE.stage_time("img", "diffuse", shape, w, steps=10) for w in (1, 8))
    r = Request("r", "img", shape, 10, 0.0, 60.0)  # its SLO fits width 1 (46 s), but it waited
    policy.dispatcher.add(r, "diffuse")
    now = 20.0
    assert now + t1 > r.deadline and 25.6 + t8 < r.deadline
    state = ClusterState(now, {0: frozenset(range(8)), 1: frozenset()}, frozenset({narrow.id, decode.id}))
    assert policy.schedule(state).launches == ()
    policy.on_launch_done(first, 25.6)
    out = policy.schedule(ClusterState(25.6, all_free, frozenset({narrow.id, wide.id, decode.id})))
    assert {(launch.request_ids, launch.group_id) for launch in out.launches} == {(("r",), wide.id),
                                                                                   (("b",), decode.id)}


def test_replan_keeps_groups_for_classes_with_pending_work():
    """The window forecast lacks a class whose requests still wait (e.g. for decode); the
    re-plan's forecast adds it, so the plan keeps a group that fits it."""
    big = Shape(720, 1280, 65)  # decode needs 2 GPUs
    small = Shape(544, 960, 17)
    window = Forecast({RequestClass("vid", small, 10, slo_of(FAKE, "vid", small, 10)): 0.5})
    waiting = [Request(f"w{i}", "vid", big, 10, 0.0, 500.0) for i in range(3)]
    f = with_backlog(window, waiting, 60.0)
    assert {c.shape for c in f.rates} == {small, big}
    cluster = Cluster(2, 8)
    policy = TridentPolicy(cluster, FAKE)
    plan = policy.solver.solve(f)
    assert any(g.stages == ("decode",) and g.width >= 2 for g in plan.groups)
    assert with_backlog(window, [], 60.0).rates == window.rates


def test_request_waits_for_a_fitting_width_only_while_none_is_dispatchable():
    """The plan's only dispatchable diffuse group is narrow (the wide one is starting or
    draining) and the request needs a wide one to make its deadline: it waits, until its
    deadline, rather than run several times slower; past its deadline it is never starved."""
    shape = Shape(720, 1280, 65)
    d = Dispatcher(FAKE)
    narrow = ReplicaGroup("vid:diffuse-w2@n0g0", "vid", ("diffuse",), 2, 0, (0, 1))
    t_wide = FAKE.stage_time("vid", "diffuse", shape, 8, steps=10)
    r = Request("r0", "vid", shape, 10, 0.0, 1.2 * t_wide)
    d.add(r, "diffuse")
    free = {0: frozenset({0, 1})}
    assert d.dispatch(0.0, [narrow], free) == []
    out = d.dispatch(r.deadline + 1, [narrow], free)
    assert [launch.request_ids for launch in out] == [("r0",)]


def test_late_request_runs_at_once_when_waiting_cannot_help():
    """A wide group exists but stays busy longer than the narrow run takes: no waiting."""
    shape = Shape(720, 1280, 65)
    d = Dispatcher(FAKE)
    narrow = ReplicaGroup("vid:diffuse-w2@n0g0", "vid", ("diffuse",), 2, 0, (0, 1))
    wide = ReplicaGroup("vid:diffuse-w8@n1g0", "vid", ("diffuse",), 8, 1, tuple(range(8)))
    t_wide = FAKE.stage_time("vid", "diffuse", shape, 8, steps=10)
    d.add(Request("b", "vid", shape, 100, 0.0, 1e6), "diffuse")  # holds the wide group long
    assert d.dispatch(0.0, [wide], {1: frozenset(range(8))})
    r = Request("r0", "vid", shape, 10, 0.0, 1.2 * t_wide)
    d.add(r, "diffuse")
    out = d.dispatch(0.0, [narrow, wide], {0: frozenset({0, 1}), 1: frozenset()})
    assert [(launch.request_ids, launch.width) for launch in out] == [(("r0",), 2)]


def test_overload_keeps_capacity_for_every_class_at_its_efficient_width():
    """Far over capacity, the on-time optimum serves only cheap classes at width 1; the fair
    share keeps diffuse groups at each class's efficient width, so late work is not run for
    hours on one GPU."""
    from trident_rs.policy.solver import PlacementSolver

    cluster = Cluster(8, 8)
    cheap, big = Shape(256, 256), Shape(720, 1280, 65)
    f = Forecast({RequestClass("img", cheap, 28, slo_of(FAKE, "img", cheap, 28)): 40.0,  # ~1.7x capacity
                  RequestClass("vid", big, 10, slo_of(FAKE, "vid", big, 10)): 0.1})
    fair = PlacementSolver(cluster, FAKE).solve(f)
    eff = PlacementSolver(cluster, FAKE).class_costs(f)[1].efficient_width()
    assert eff > 2
    assert fair.stats["fair_share"] > 0
    assert any(g.model == "vid" and g.stages == ("diffuse",) and g.width == eff for g in fair.groups)
    fair.check(cluster)
    # the on-time optimum alone would not keep a group that wide
    plain = PlacementSolver(cluster, FAKE, fair_share=False).solve(f)
    assert not any(g.model == "vid" and g.stages == ("diffuse",) and g.width == eff for g in plain.groups)
    assert plain.stats["goodput_rps"] >= fair.stats["goodput_rps"]


def test_models_option_plans_before_the_first_arrival(cost):
    """With `models`, the first plan (for the cost model's profiled shapes) is ready at t = 0,
    so the first small requests meet their seconds-long SLOs although any group a re-plan
    adds takes 20 s to start; without it nothing runs before the first plan's groups start."""
    cluster = Cluster(2, 8)
    shape = Shape(256, 256)
    slo = 15.0
    reqs = [Request(f"r{i}", "flux", shape, 28, 0.5 * i, 0.5 * i + slo) for i in range(10)]
    config = SimConfig(start_cost_s=20.0)
    with_prior = TridentPolicy(cluster, cost, models={"flux": 1.0})
    plan = with_prior.initial_plan(0.0)
    served = {g.stages[0] for g in plan.groups if g.model == "flux"}
    assert served == {"encode", "diffuse", "decode"}
    res = simulate(cluster, TridentPolicy(cluster, cost, models=["flux"]), cost, reqs, config)
    _all_done(res, reqs)
    assert all(res.finish[r.id] <= r.deadline for r in reqs)
    cold = simulate(cluster, TridentPolicy(cluster, cost), cost, reqs, config)
    assert all(cold.finish[r.id] > r.deadline for r in reqs[:5])


def test_prior_forecast_covers_profiled_shapes_and_fills_the_cluster(cost):
    from trident_rs.policy.solver import PlacementSolver
    from trident_rs.policy.workload import prior_forecast

    cluster = Cluster(16, 8)
    f = prior_forecast(cost, {"flux": 3.0, "hunyuanvideo": 1.0}, cluster.total_gpus, 8, cluster.gpu_memory_gb)
    assert {c.shape for c in f.rates if c.model == "flux"} == set(cost.shapes("flux"))
    assert {c.steps for c in f.rates if c.model == "hunyuanvideo"} == {50}
    plan = PlacementSolver(cluster, cost, time_limit_s=0.3).solve(f)
    plan.check(cluster)
    assert sum(g.width for g in plan.groups) == cluster.total_gpus
