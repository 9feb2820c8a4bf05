"""PaperPolicy: the published rule — ticks, pruned widths, encode+diffuse then decode, no drops."""

import pytest
from hypothesis import given, settings, strategies as st

from policy_fakes import FakeCost, make_requests, run_loop
from trident_rs.errors import ConfigError
from trident_rs.policy.paper import PaperPolicy, authors_min_width
from trident_rs.policy.types import Cluster, ClusterState, Request, Shape

COST = FakeCost()
workloads = st.tuples(st.sampled_from(["img", "vid"]), st.floats(0.05, 2.0), st.integers(0, 10**6),
                      st.integers(1, 3), st.sampled_from([1.0, 4.0]))


@settings(max_examples=12, deadline=None)
@given(workloads)
def test_every_request_is_served_on_free_gpus_with_pruned_widths(w):
    model, rate, seed, nodes, scale = w
    cluster = Cluster(nodes, 8)
    rate = rate if model == "img" else rate / 20
    reqs = make_requests(COST, model, 30, rate, 10, seed, scale)
    policy = PaperPolicy(cluster, COST)
    assert policy.initial_plan(0.0) is None
    res = run_loop(policy, cluster, COST, reqs)  # asserts free GPUs and stage order
    assert set(res.finished) == {r.id for r in reqs}
    by_id = {r.id: r for r in reqs}
    solves = []
    for t, launch in res.launches:
        r = by_id[launch.request_ids[0]]
        assert len({by_id[i].shape for i in launch.request_ids}) == 1  # batches share a shape
        if launch.stages == ("encode", "diffuse"):
            need = max(COST.min_width(model, "diffuse", r.shape), authors_min_width(r.shape))
            assert launch.width >= need
            assert launch.width == need or COST.efficiency(model, r.shape, launch.width) >= 0.8
            if not solves or solves[-1] != t:
                solves.append(t)
        else:
            assert launch.stages == ("decode",)
    # solves happen at least 0.5 s apart (the authors' cadence), not on fixed ticks
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(solves, solves[1:]))


def test_on_time_start_beats_idle_gpus_and_late_ones_prefer_more_lateness():
    policy = PaperPolicy(Cluster(1, 8), COST)
    big = Shape(2048, 2048)
    t8 = COST.stage_time("img", "diffuse", big, 8, 1, 10)
    policy.add_request(Request("fresh", "img", big, 10, 0.0, 1e4), 0.0)
    out = policy.schedule(ClusterState(0.0, {0: frozenset(range(8))}))
    # the widest width with efficiency >= 0.8 leaves the fewest GPUs idle
    widest = max(w for w in (1, 2, 4, 8) if COST.efficiency("img", big, w) >= 0.8)
    assert [(l.request_ids, l.width) for l in out.launches] == [(("fresh",), widest)]
    # two late requests and room for one: the later-to-deadline one loses
    policy = PaperPolicy(Cluster(1, 1), COST)
    policy.add_request(Request("very-late", "img", big, 10, -100.0, -50.0), 0.0)
    policy.add_request(Request("bit-late", "img", big, 10, -100.0, t8), 0.0)
    out = policy.schedule(ClusterState(0.0, {0: frozenset({0})}))
    assert [l.request_ids for l in out.launches] == [("very-late",)]


def test_deterministic_for_a_seed():
    cluster = Cluster(2, 8)
    reqs = make_requests(COST, "img", 40, 1.0, 10, seed=5)
    a = run_loop(PaperPolicy(cluster, COST), cluster, COST, reqs).launches
    b = run_loop(PaperPolicy(cluster, COST), cluster, COST, reqs).launches
    assert a == b


def test_bad_options_raise():
    with pytest.raises(ConfigError):
        PaperPolicy(Cluster(1, 8), COST, tick_s=0)
    with pytest.raises(ConfigError):
        PaperPolicy(Cluster(1, 8), COST, bogus=True)
    with pytest.raises(ConfigError):  # 720x1280x65 needs 2 GPUs; nodes have 1
        PaperPolicy(Cluster(4, 1), COST).add_request(Request("x", "vid", Shape(720, 1280, 65), 10, 0, 100), 0.0)


def test_authors_minimum_widths_and_same_shape_batching():
    assert authors_min_width(Shape(2048, 2048)) == 2 and authors_min_width(Shape(1024, 1024)) == 1
    assert [authors_min_width(Shape(720, 1280, f)) for f in (17, 33, 65, 129)] == [1, 2, 4, 8]
    policy = PaperPolicy(Cluster(1, 8), COST)
    small = Shape(256, 256)
    for i in range(5):
        policy.add_request(Request(f"s{i}", "img", small, 10, 0.0, 100.0 + i), 0.0)
    size = policy._best_batch(policy.requests["s0"])
    assert size > 1  # the fake cost model batches small images well
    assert [len(j.requests) for j in policy.queue] == [min(size, 5)] + ([5 - size] if size < 5 else [])
    out = policy.schedule(ClusterState(0.0, {0: frozenset(range(8))}))
    assert sorted(i for l in out.launches for i in l.request_ids) == [f"s{i}" for i in range(5)]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 12), st.integers(10, 60))
def test_offering_only_the_exchangeable_top_keeps_the_optimum(seed, free, n):
    """The solver sees per class only the `free` best jobs at each width: the optimum over the
    whole queue is the same (an exchange argument, `PaperPolicy._exchangeable_top`)."""
    import random

    from ortools.sat.python import cp_model

    from trident_rs.policy.paper import Job

    rng = random.Random(seed)
    shapes = [Shape(256, 256), Shape(1024, 1024), Shape(2048, 2048)]
    jobs = [Job([Request(f"j{i}", "img", rng.choice(shapes), 10, 0.0, rng.uniform(1, 200))]) for i in range(n)]
    # as the paper's rule: on time (1000) or late with a reward that grows with lateness, per width
    rewards = {j: {k: (1000 if job.deadline > 50 * k else 100 + int(job.deadline)) + k for k in (1, 2, 4)}
               for j, job in enumerate(jobs)}

    def best(subset):
        m = cp_model.CpModel()
        x = {(j, k): m.new_bool_var("") for j in subset for k in rewards[j]}
        for j in subset:
            m.add_at_most_one(x[j, k] for k in rewards[j])
        m.add(sum(k * v for (j, k), v in x.items()) <= free)
        m.maximize(sum(rewards[j][k] * v for (j, k), v in x.items()))
        s = cp_model.CpSolver()
        s.parameters.num_workers = 1
        assert s.solve(m) == cp_model.OPTIMAL
        return round(s.objective_value)  # the rewards are integers; CP-SAT reports a double (1000.9999999999999)

    keep = PaperPolicy._exchangeable_top(jobs, rewards, free)
    assert best(keep) == best(list(range(n)))
