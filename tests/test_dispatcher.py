"""Dispatcher: deadline-aware width choice, EDF, batching, never a busy group, nobody starved."""
import pytest
from hypothesis import given, settings, strategies as st

from policy_fakes import FakeCost, make_requests, run_loop
from trident_rs.errors import ConfigError
from trident_rs.policy.dispatcher import Dispatcher
from trident_rs.policy.trident import TridentPolicy
from trident_rs.policy.types import Cluster, ReplicaGroup, Request, Shape
from trident_rs.policy.workload import Forecast

COST = FakeCost()
BIG = Shape(2048, 2048)
SMALL = Shape(256, 256)


def group(stage, width, node=0, first=0, model="img"):
    return ReplicaGroup(f"{model}:{stage}-w{width}@n{node}g{first}", model, (stage,), width, node,
                        tuple(range(first, first + width)))


def free_all(nodes=2):
    return {n: frozenset(range(8)) for n in range(nodes)}


def req(i, shape, deadline, arrival=0.0, steps=28, model="img"):
    return Request(f"r{i}", model, shape, steps, arrival, deadline)


def test_smallest_width_that_meets_the_deadline():
    d = Dispatcher(COST)
    groups = [group("diffuse", 1, 0, 0), group("diffuse", 2, 0, 2), group("diffuse", 8, 1, 0), group("decode", 1, 0, 1)]
    t = {w: COST.stage_time("img", "diffuse", BIG, w, 1, 28) for w in (1, 2, 8)}
    dec = COST.stage_time("img", "decode", BIG)
    roomy = req(0, BIG, t[1] + dec + 1)
    tight = req(1, BIG, t[8] + dec + 1)  # only width 8 makes it
    d.add(roomy, "diffuse")
    d.add(tight, "diffuse")
    launches = {l.request_ids[0]: l.width for l in d.dispatch(0.0, groups, free_all())}
    assert launches == {"r1": 8, "r0": 1}


def test_edf_among_on_time_tasks_and_late_ones_after_their_grace():
    """On-time tasks by deadline; a late task's key is deadline + its SLO (best-effort tier)."""
    d = Dispatcher(COST, max_batch=1)
    g = group("diffuse", 1)
    d.add(req(0, SMALL, 1000.0), "diffuse")
    d.add(req(1, SMALL, 500.0), "diffuse")
    d.add(req(2, SMALL, 1.0, arrival=-1001.0), "diffuse")  # late: key 1.0 + 1002 > 1000
    d.add(req(3, SMALL, 1.0, arrival=-10.0), "diffuse")  # late: key 1.0 + 11, before r1 and r0
    order = []
    for step in range(4):
        [launch] = d.dispatch(float(step), [g], free_all())
        order.append(launch.request_ids[0])
        d.on_done(launch)
    assert order == ["r3", "r1", "r0", "r2"]


def test_waits_for_a_busy_wide_group_that_would_make_the_deadline():
    d = Dispatcher(COST)
    wide, narrow = group("diffuse", 8, 1, 0), group("diffuse", 1, 0, 0)
    t8 = COST.stage_time("img", "diffuse", BIG, 8, 1, 28)
    d.add(req(0, BIG, 10 * t8), "diffuse")
    [l] = d.dispatch(0.0, [wide], free_all())  # occupy the wide group
    assert l.width == 8
    d.add(req(1, BIG, 1.0 + 2 * t8 + 1), "diffuse")  # width 1 is too slow; width 8 frees at t8
    assert d.dispatch(1.0, [wide, narrow], free_all()) == []


def test_same_shape_small_requests_are_batched_up_to_best_batch():
    d = Dispatcher(COST, max_batch=4)
    for i in range(6):
        d.add(req(i, SMALL, 1000.0 + i), "diffuse")
    launches = d.dispatch(0.0, [group("diffuse", 1), group("diffuse", 1, 0, 1)], free_all())
    sizes = sorted(len(l.request_ids) for l in launches)
    assert sizes == [2, 4]
    assert len({rid for l in launches for rid in l.request_ids}) == 6


def test_never_starts_on_a_group_it_made_busy_or_on_busy_gpus():
    d = Dispatcher(COST)
    g = group("diffuse", 2)
    for i in range(3):
        d.add(req(i, BIG, 1e4), "diffuse")
    assert len(d.dispatch(0.0, [g], free_all())) == 1
    assert d.dispatch(0.1, [g], free_all()) == []  # busy until its launch completes
    assert d.dispatch(0.2, [group("diffuse", 2, 1)], {0: frozenset(), 1: frozenset({0})}) == []  # GPU 1 not free


def test_bad_options_raise():
    with pytest.raises(ConfigError):
        Dispatcher(COST, mode="magic")
    with pytest.raises(ConfigError):
        Dispatcher(COST, late_width="slowest")
    with pytest.raises(ConfigError):
        TridentPolicy(Cluster(2, 8), COST, no_such_option=1)


workloads = st.tuples(st.sampled_from(["img", "vid"]), st.floats(0.02, 2.0), st.integers(0, 10**6),
                      st.sampled_from([1.0, 2.0, 4.0]), st.integers(2, 3))


@settings(max_examples=15, deadline=None)
@given(workloads)
def test_every_request_finishes_with_no_busy_group_reused(w):
    model, rate, seed, scale, nodes = w
    cluster = Cluster(nodes, 8)
    rate = rate if model == "img" else rate / 20
    reqs = make_requests(COST, model, 40, rate, 10, seed, scale)
    policy = TridentPolicy(cluster, COST, forecast=Forecast.from_requests(reqs, reqs[-1].arrival))
    res = run_loop(policy, cluster, COST, reqs, check=lambda p: p.check(cluster))  # asserts the contract
    assert set(res.finished) == {r.id for r in reqs}
    assert policy.pending() == 0


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 10**6))
def test_decisions_are_deterministic_for_a_seed(seed):
    cluster = Cluster(2, 8)
    reqs = make_requests(COST, "img", 60, 1.0, 10, seed)
    runs = [run_loop(TridentPolicy(cluster, COST), cluster, COST, reqs) for _ in range(2)]
    assert [(t, l) for t, l in runs[0].launches] == [(t, l) for t, l in runs[1].launches]


def test_exact_mode_serves_everyone_too():
    cluster = Cluster(2, 8)
    reqs = make_requests(COST, "img", 30, 0.5, 10, seed=3)
    res = run_loop(TridentPolicy(cluster, COST, mode="exact"), cluster, COST, reqs)
    assert set(res.finished) == {r.id for r in reqs}
