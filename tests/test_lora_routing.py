"""Issue 19 parts 3-4 in the policy layer and the simulator: the adapter LRU per replica group,
adapter-aware group choice, batching only same adapter sets, and adapter loads in virtual time."""
import dataclasses

import pytest

from policy_fakes import FakeCost
from trident_rs.policy.adapters import AdapterResidency
from trident_rs.policy.dispatcher import Dispatcher
from trident_rs.policy.types import ReplicaGroup, Request, Shape
from trident_rs.sim.lora_workload import with_adapters

COST = FakeCost()
SMALL = Shape(256, 256)


def _group(i, stage="diffuse"):
    return ReplicaGroup(f"img:{stage}-w1@n0g{i}", "img", (stage,), 1, 0, (i,))


def _req(i, adapters=(), scales=None, deadline=1e4):
    return Request(f"r{i}", "img", SMALL, 28, 0.0, deadline, adapters=tuple(adapters),
                   adapter_scales=tuple(scales if scales is not None else [1.0] * len(adapters)))


FREE = {0: frozenset(range(8))}


def test_residency_is_an_lru_per_group_that_counts_hits_and_loads():
    r = AdapterResidency(slots=2, load_s=0.5)
    assert r.use("g", ("a",)) == 1 and r.use("g", ("b",)) == 1 and r.use("g", ("a",)) == 0
    assert r.use("g", ("c",)) == 1  # evicts b, the least recently used
    assert r.holds("g") == ["a", "c"] and r.load_time("g", ("b", "a")) == 0.5
    assert r.use("g", ("b", "c")) == 1 and r.holds("g") == ["b", "c"]  # c, in the request, is kept
    assert (r.hits, r.loads) == (2, 4) and r.hit_rate() == pytest.approx(2 / 6)
    r.forget("g")
    assert r.holds("g") == [] and r.best(["x", "g"], ("a",)) == "x"
    with pytest.raises(ValueError):
        AdapterResidency(slots=0)


@pytest.mark.parametrize("routing, expected", [(True, "img:diffuse-w1@n0g1"), (False, "img:diffuse-w1@n0g0")])
def test_a_diffuse_task_goes_to_the_free_group_holding_its_adapter(routing, expected):
    d = Dispatcher(COST, max_batch=1, adapter_routing=routing, adapter_load_s=3.0)
    groups = [_group(0), _group(1)]
    d.adapters.use(groups[1].id, ("x",))  # an earlier launch left adapter x on group 1
    d.add(_req(0, ("x",)), "diffuse")
    (launch,) = d.dispatch(0.0, groups, FREE)
    assert launch.group_id == expected
    t = COST.stage_time("img", "diffuse", SMALL, 1, 1, 28)
    # the predicted end charges the load to a group without the adapter
    assert d.running[expected].expected_end == pytest.approx(t + (0.0 if routing else 3.0))


def test_plain_tasks_keep_the_lowest_id_group_with_routing_on():
    d = Dispatcher(COST, max_batch=1)
    groups = [_group(0), _group(1)]
    d.adapters.use(groups[0].id, ("x",))
    d.add(_req(0), "diffuse")
    (launch,) = d.dispatch(0.0, groups, FREE)
    assert launch.group_id == groups[0].id and d.adapters.loads == 1  # nothing new loaded


def test_only_requests_with_the_same_adapters_and_scales_share_a_launch():
    d = Dispatcher(COST, max_batch=8)
    reqs = [_req(0, ("x",)), _req(1, ("x",), [0.5]), _req(2), _req(3, ("x",)), _req(4), _req(5, ("y",))]
    for r in reqs:
        d.add(r, "diffuse")
    launches = d.dispatch(0.0, [_group(i) for i in range(6)], FREE)
    assert sorted(sorted(l.request_ids) for l in launches) == [["r0", "r3"], ["r1"], ["r2", "r4"], ["r5"]]


def test_workload_adapters_are_zipf_popular_and_leave_some_requests_plain():
    reqs = with_adapters([_req(i) for i in range(2000)], n=50, share=0.75, zipf_s=1.0, seed=3)
    named = [r.adapters[0] for r in reqs if r.adapters]
    assert 0.7 < len(named) / 2000 < 0.8
    assert named.count("lora-00") > 3 * named.count("lora-09") > 0
    assert reqs == with_adapters([_req(i) for i in range(2000)], n=50, share=0.75, zipf_s=1.0, seed=3)


def _sim(requests, routing, load_s=1.0, slots=4):
    from trident_rs.policy.stage_estimate import default_cost_model
    from trident_rs.policy.types import Cluster
    from trident_rs.sim import SimConfig
    from trident_rs.sim.runner import run_policy

    cost = default_cost_model()
    config = SimConfig(adapter_load_s=load_s, lora_slots=slots)
    return run_policy("trident", requests, Cluster(1, 8), cost, config, keep_result=True, placement="groups",
                      adapter_routing=routing, adapter_load_s=load_s, lora_slots=slots)


def test_the_simulator_charges_loads_and_adapter_routing_hits_more_often():
    from trident_rs.sim.workloads import load_workload

    base = load_workload("shift-flux", rate_scale=0.5, duration=600.0, seed=1)
    reqs = with_adapters(base, n=50, share=0.8, zipf_s=1.0, seed=1)
    aware, blind = _sim(reqs, True).result, _sim(reqs, False).result
    for res in (aware, blind):
        assert res.adapter_loads > 0 and len(res.finish) == len(reqs)
    rate = lambda res: res.adapter_hits / (res.adapter_hits + res.adapter_loads)  # noqa: E731
    assert rate(aware) > rate(blind) + 0.05
    # a load shows in the diffuse launch's extra time; none without adapters
    plain = _sim(base, True).result
    assert plain.adapter_loads == 0 and plain.adapter_hits == 0
    r0 = next(r for r in reqs if r.adapters)
    first = [s for s in aware.timeline[r0.id] if s.stages == ("diffuse",)][0]
    assert first.extra_s >= 1.0  # the first launch of an adapter loads it


def test_the_emulated_diffuse_sleeps_for_the_adapters_it_lacks():
    """Emulated Serve charges adapter loads as the simulator does: an LRU of `lora_slots` per
    diffuse executor, `adapter_load_s x time_scale` per adapter missing, counted in the meta."""
    from trident_rs.executors.base import StagePayload
    from trident_rs.executors.emulated import EmulatedExecutor
    from trident_rs.request import GenerationParams, LoraRef

    ex = EmulatedExecutor("sd3", "diffuse", time_scale=1e-6, lora_slots=1, adapter_load_s=1e4)

    def run(*names):
        p = GenerationParams(model="sd3", prompt="x", height=256, width=256, steps=2,
                             lora=tuple(LoraRef(name=n, scale=1.0) for n in names)).resolved()
        (out,) = ex.run([StagePayload(p)])
        return out.meta["diffuse_adapter_loads"], out.meta["diffuse_adapter_hits"], out.meta["diffuse_s"]

    loads, hits, s = run("a")
    assert (loads, hits) == (1, 0) and s >= 1e-2  # one load of 1e4 s x 1e-6
    assert run("a")[:2] == (0, 1)
    assert run("b")[:2] == (1, 0) and run("a")[:2] == (1, 0)  # one slot: b evicted a
    assert run()[:2] == (0, 0)
