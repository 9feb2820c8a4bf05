"""A node lost and back (issue 20), in the policy layer and the simulator: plans never place a
group on a lost node, trident re-plans onto the nodes up at once and back when the node returns,
the simulator re-runs what ran there and loses no request, and the Serve registry gives a lost
node's index to the next new node."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from controller_fakes import published  # noqa: F401 - the fixture
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.packing import Deployment, pack, plan_counts
from trident_rs.policy.trident import TridentPolicy, make_trident
from trident_rs.policy.types import Cluster, ClusterState, PlacementPlan
from trident_rs.serve.registry import ReplicaRegistry
from trident_rs.sim import SimConfig, simulate
from trident_rs.sim.workloads import load_workload

DEPS = [Deployment("img", "encode", 1), Deployment("img", "decode", 1), Deployment("img", "diffuse", 1),
        Deployment("img", "diffuse", 2), Deployment("img", "diffuse", 4), Deployment("vid", "diffuse", 8)]


@pytest.fixture(scope="module")
def cost():
    return CostModel.default()


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 4), st.data(), st.dictionaries(st.sampled_from(DEPS), st.integers(0, 10), min_size=1),
       st.booleans())
def test_pack_places_nothing_on_a_lost_node_and_never_over_commits(nodes, data, counts, keep_current):
    down = frozenset(data.draw(st.sets(st.integers(0, nodes - 1), min_size=1, max_size=nodes - 1)))
    before = Cluster(nodes, 8)
    current = PlacementPlan(tuple(pack(before, counts)[0])) if keep_current else None
    cluster = Cluster(nodes, 8, down=down)
    groups, dropped = pack(cluster, counts, current)
    plan = PlacementPlan(tuple(groups))
    plan.check(cluster)  # no GPU twice, all on real nodes
    assert not [g for g in groups if g.node in down]
    placed = plan_counts(plan)
    assert sum(placed.values()) + dropped == sum(counts.values())
    assert sum(g.width for g in groups) <= cluster.total_gpus == (nodes - len(down)) * 8


def _state(policy: TridentPolicy, now: float, down: frozenset[int]) -> ClusterState:
    busy = {(g.node, i) for g in policy.plan.groups if g.id in policy.dispatcher.busy_groups() for i in g.gpus}
    free = {n: frozenset(i for i in range(8) if (n, i) not in busy) for n in range(3) if n not in down}
    ready = frozenset(g.id for g in policy.plan.groups if g.node not in down)
    return ClusterState(now, free, ready, down)


def test_trident_replans_onto_the_nodes_up_at_once_and_uses_a_node_again_when_it_is_back(cost):
    policy = TridentPolicy(Cluster(3, 8), cost, models=["flux"])
    plan = policy.initial_plan(0.0)
    assert {g.node for g in plan.groups} == {0, 1, 2}
    out = policy.schedule(_state(policy, 1.0, frozenset({1})))
    assert out.new_plan is not None and "node(s) [1] lost" in out.replan_reason
    assert policy.cluster.total_gpus == 16
    assert {g.node for g in policy.plan.groups} == {0, 2}  # nothing was running: moved at once
    assert sum(g.width for g in policy.plan.groups) <= 16
    assert {g.stages[0] for g in policy.plan.groups} == {"encode", "diffuse", "decode"}
    out = policy.schedule(_state(policy, 2.0, frozenset()))
    assert out.new_plan is not None and "node(s) [1] back" in out.replan_reason
    assert 1 in {g.node for g in policy.plan.groups}


@pytest.mark.parametrize("name,options", [("trident", {}), ("trident", {"placement": "groups"}),
                                          ("static-best", None)])
def test_a_node_lost_mid_trace_loses_no_request_and_nothing_starts_there_while_it_is_down(cost, name, options):
    from trident_rs.policy.registry import make_policy

    cluster = Cluster(4, 8)
    reqs = load_workload("flux-paper", rate_scale=2.0, duration=300, cost=cost)
    lost, back = 100.0, 200.0
    policy = make_trident(cluster, cost, **options) if options is not None else make_policy(name, cluster, cost)
    res = simulate(cluster, policy, cost, reqs, SimConfig(node_faults=((lost, 2, back),), noise=0.1))
    assert res.in_flight_at_end == 0 and not res.failed
    assert set(res.finish) == {r.id for r in reqs}  # every request completed
    starts = [(rec.start, rec.node) for recs in res.timeline.values() for rec in recs]
    assert not [t for t, n in starts if n == 2 and lost <= t < back]
    assert [t for t, n in starts if n == 2 and t >= back]  # node 2 was used again
    if options == {"placement": "groups"}:
        assert any("lost" in r for r in res.replan_reasons) and any("back" in r for r in res.replan_reasons)


def test_a_launch_on_the_lost_node_is_rerun_from_its_start(cost):
    """One long request alone on a 2-node cluster, its diffuse on node 0 when node 0 is lost: it
    ends a full diffuse later than without the fault (re-run elsewhere from its start)."""
    from trident_rs.policy.types import Request, Shape

    cluster = Cluster(2, 8)
    req = Request("v", "hunyuanvideo", Shape(544, 960, 33), 30, 0.0, 1e6)
    base = simulate(cluster, make_trident(cluster, cost), cost, [req], SimConfig())
    rec = next(r for r in base.timeline["v"] if r.stages == ("diffuse",))
    lost = (rec.start + rec.end) / 2
    faulted = simulate(cluster, make_trident(cluster, cost), cost, [req],
                       SimConfig(node_faults=((lost, rec.node, lost + 1.0),)))
    again = next(r for r in faulted.timeline["v"] if r.stages == ("diffuse",))
    assert again.end == pytest.approx(rec.end + (lost - rec.start), rel=1e-6)
    assert faulted.finish["v"] > base.finish["v"]


def test_the_registry_gives_a_lost_nodes_index_to_the_next_new_node():
    reg = ReplicaRegistry()
    for i, node in enumerate("abc"):
        reg.register(f"r{i}", "diffuse-w1", node, [str(i)], 0.0)
    reg.bind([("g0", "diffuse-w1", 0), ("g1", "diffuse-w1", 1)])
    assert reg.nodes == {"a": 0, "b": 1, "c": 2}
    assert reg.node_lost("b") == ["r1"]
    assert reg.lost == {1} and "r1" not in reg.replicas and "r1" not in reg.bound.values()
    reg.register("r3", "diffuse-w1", "d", ["0"], 1.0)  # a node added back
    assert reg.nodes["d"] == 1 and not reg.lost
    reg.register("r4", "diffuse-w1", "e", ["0"], 1.0)
    assert reg.nodes["e"] == 3
    assert reg.node_lost("nope") == []


def test_a_node_that_joined_before_the_loss_was_seen_takes_the_lost_place():
    """Ray notices a dead node some seconds late: its replacement may register first (index 3
    of a 3-node plan); when the loss is seen, the replacement moves into the lost index, so no
    plan node stays down while 3 nodes run."""
    reg = ReplicaRegistry(plan_nodes=3)
    for i, node in enumerate("abcd"):
        reg.register(f"r{i}", "diffuse-w1", node, [str(i)], 0.0)
    assert reg.nodes["d"] == 3
    assert reg.node_lost("b") == ["r1"]
    assert reg.nodes == {"a": 0, "c": 2, "d": 1} and reg.lost == {3}
    assert reg.node_of("r3") == 1


def test_the_serve_controller_replans_onto_the_nodes_left_and_back(published):  # noqa: F811
    """The controller's broker, without Ray: replicas on 3 nodes, Ray then reports node b dead,
    the trident policy's next plan (published replica counts) fits the 2 nodes left and the
    policy is told node 1 is down; a new node registering takes its place and the plan grows."""
    import asyncio

    from trident_rs.serve import controller as mod

    cfg = {"models": ["flux"], "executor": "emulated", "time_scale": 0.001,
           "cluster": {"nodes": 3, "gpus_per_node": 8},
           "deployments": [{"stage": "encode", "max_replicas": 8}, {"stage": "decode", "max_replicas": 8},
                           *({"stage": "diffuse", "width": w, "max_replicas": 24 // w} for w in (1, 2, 4, 8))],
           "policy": {"name": "trident", "options": {"placement": "groups"}}}

    def gpus(counts: dict) -> int:
        return sum(n * int(d.rsplit("-w", 1)[1]) for d, n in counts.items())

    async def go():
        ctl = mod.Controller(cfg)
        assert gpus(published) > 16  # the first plan uses the third node
        for i, node in enumerate("abc"):
            await ctl.register(f"r{i}", "encode-w1", node, [str(i)])
        ctl.broker.nodes_alive({"a": 8.0, "c": 8.0, "head": 0.0})
        assert ctl.broker.down == frozenset({1}) and 1 not in ctl.broker.state().free_gpus
        ctl.broker.schedule()
        assert "node(s) [1] lost" in ctl.replans[-1]["reason"]
        assert gpus(published) <= 16
        ctl.broker.nodes_alive({"a": 8.0, "c": 8.0, "head": 0.0, "small": 4.0})  # too small to replace it
        assert ctl.broker.down == frozenset({1})
        ctl.broker.nodes_alive({"a": 8.0, "c": 8.0, "head": 0.0, "d": 8.0})  # a node added back, no replica yet
        assert ctl.broker.down == frozenset() and ctl.broker.registry.nodes["d"] == 1
        ctl.broker.schedule()
        assert "node(s) [1] back" in ctl.replans[-1]["reason"] and gpus(published) > 16
        await ctl.register("r3", "encode-w1", "d", ["0"])  # its first replica: the place it took
        assert ctl.broker.registry.node_of("r3") == 1
        assert (await ctl.status())["cluster"]["down"] == []
    asyncio.run(go())


def test_a_group_of_a_lost_plan_node_bound_to_a_live_replica_elsewhere_stays_ready(published):  # noqa: F811
    """In Serve a group's plan node is a preference: greedy plans both diffuse groups on node 1,
    Ray put one diffuse replica there and one on node 2. Node 1 is lost: the group bound to the
    replica on node 2 still runs work (else no diffuse group would be ready until a node is back;
    found as a hung request in the cluster-fault test)."""
    import asyncio

    from trident_rs.serve import controller as mod

    cfg = {"models": ["sd3"], "executor": "emulated", "time_scale": 0.001,
           "cluster": {"nodes": 3, "gpus_per_node": 2},
           "deployments": [{"stage": s, "width": 1, "replicas": 2, "max_replicas": 2}
                           for s in ("encode", "diffuse", "decode")],
           "policy": {"name": "greedy", "options": {"replan": False}}}

    async def go():
        ctl = mod.Controller(cfg)
        for rid, dep, node in (("e0", "encode-w1", "a"), ("e1", "encode-w1", "a"), ("d0", "diffuse-w1", "b"),
                               ("d1", "diffuse-w1", "c"), ("x0", "decode-w1", "c"), ("x1", "decode-w1", "c")):
            await ctl.register(rid, dep, node, ["0"])
        diffuse = {g.id for g in ctl.plan.groups if g.stages == ("diffuse",)}
        assert {g.node for g in ctl.plan.groups if g.id in diffuse} == {1}
        ctl.broker.nodes_alive({"a": 2.0, "c": 2.0})
        assert ctl.broker.down == frozenset({1})
        ready = ctl.broker.state().ready_groups & diffuse
        assert len(ready) == 1 and ctl.broker.bindings()[next(iter(ready))] == "d1"
    asyncio.run(go())
