"""The fair yardstick: memory enforced for every policy, EDF static variants, the bound holds,
runtime costs charged, per-request timelines."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_fakes import ListPolicy

from trident_rs.policy import registry
from trident_rs.policy.baselines import StaticPipelinePolicy, StaticStagePolicy
from trident_rs.policy.bound import BoundPolicy
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.types import STAGES, Cluster, ClusterState, Launch, Request, SchedulerOutput, Shape
from trident_rs.sim import SimConfig, simulate, summarize
from trident_rs.sim.runner import run_policy

COST = CostModel.default()
POLICIES = ("static-best", "static-best-fcfs", "dynamic-pipeline", "paper", "trident")


def flux_requests(shapes, n: int, gap: float, slo_scale: float = 4.0, steps: int = 28) -> list[Request]:
    out = []
    for i in range(n):
        s = shapes[i % len(shapes)]
        slo = slo_seconds(COST, "flux", s, steps, slo_scale)
        out.append(Request(f"r{i}", "flux", s, steps, i * gap, i * gap + slo))
    return out


class MemorySpy:
    """The real cost model, recording what memory every launch the engine checked needed."""

    def __init__(self, cost: CostModel):
        self._cost, self.checked = cost, []

    def __getattr__(self, name):
        return getattr(self._cost, name)

    def launch_memory(self, model, stages, shape, width, batch=1, offload=()):
        need = self._cost.launch_memory(model, stages, shape, width, batch, offload)
        self.checked.append(need)
        return need


@pytest.mark.parametrize("name", POLICIES)
def test_memory_is_enforced_for_every_policy_and_no_request_is_lost(name):
    # 40 GB GPUs: a 4096² FLUX image fits a stage-level launch (diffuse 29.6 GB, decode 26.4 GB)
    # but no pipeline-level one (weights 37 GB + 25 GB of decode activations, even with the
    # text encoders offloaded); 1024² images fit everywhere
    cluster = Cluster(1, 8, gpu_memory_gb=40.0)
    reqs = flux_requests([Shape(1024, 1024), Shape(4096, 4096)], 12, 20.0)
    spy = MemorySpy(COST)
    run = run_policy(name, reqs, cluster, spy, SimConfig(), keep_result=True)
    res = run.result if run.result is not None else None
    m = run.metrics
    assert m["completed"] + m["failed"] == len(reqs)  # finished or failed, visibly: none lost
    assert spy.checked  # the engine checked memory for this policy's launches
    refused = [x for x in spy.checked if x > cluster.gpu_memory_gb]
    assert m["memory_refusals"] <= len(refused) or name.startswith("static-best")
    if res is not None:
        big = {r.id for r in reqs if r.shape == Shape(4096, 4096)}
        assert set(res.failed) <= big  # only what does not fit failed
        for rid, why in res.failed.items():
            assert "out of memory" in why
    if name in ("dynamic-pipeline", "static-best-fcfs"):  # pipeline-level: the 4096² images cannot run
        assert m["failed"] == 6
        # half never finished: the tail is infinite, not the latency of the small images alone
        assert m["p95_latency_s"] == math.inf and m["mean_latency_s"] < math.inf
    if name == "trident":  # stage-level: everything fits
        assert m["failed"] == 0 and m["memory_refusals"] == 0
        assert m["p95_latency_s"] < math.inf


class Oversized(ListPolicy):
    """Launches every request's three stages on one GPU, whatever they need."""

    name = "oversized"

    def on_launch_refused(self, launch, now):
        self.refused.append(launch)

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        if self.queue and 0 in state.free_gpus.get(0, ()):
            r = self.queue.pop(0)
            return SchedulerOutput((Launch((r.id,), r.model, STAGES, 1, 0, (0,)),))
        return SchedulerOutput()


def test_engine_refuses_a_launch_that_does_not_fit_and_fails_its_requests():
    reqs = [Request("small", "flux", Shape(512, 512), 28, 0.0, 100.0),
            Request("huge", "flux", Shape(4096, 4096), 28, 1.0, 5000.0)]
    policy = Oversized()
    res = simulate(Cluster(1, 1), policy, COST, reqs, SimConfig())
    assert set(res.finish) == {"small"} and set(res.failed) == {"huge"}
    assert res.memory_refusals == 1 and [l.request_ids for l in policy.refused] == [("huge",)]
    assert "62.4 GB" in res.failed["huge"]
    m = summarize(res)
    assert m.failed == 1 and m.slo_attainment == pytest.approx(0.5)
    # memory unchecked (the engine before the yardstick) runs it
    assert set(simulate(Cluster(1, 1), Oversized(), COST, reqs, SimConfig.ideal()).finish) == {"small", "huge"}


def test_edf_static_variant_serves_in_deadline_order_and_never_idles_with_work_waiting():
    # one width-1 group: requests arrive together with shuffled deadlines
    cluster = Cluster(1, 1)
    shape = Shape(512, 512)
    deadlines = [50.0, 10.0, 40.0, 20.0, 30.0]
    reqs = [Request(f"r{i}", "flux", shape, 28, 0.0, d) for i, d in enumerate(deadlines)]
    edf = simulate(cluster, StaticPipelinePolicy(cluster, COST, width=1, order="edf"), COST, reqs, SimConfig())
    order = sorted(reqs, key=lambda r: edf.finish[r.id])
    assert [r.deadline for r in order] == sorted(deadlines)
    fcfs = simulate(cluster, StaticPipelinePolicy(cluster, COST, width=1, order="fcfs"), COST, reqs, SimConfig())
    assert sorted(reqs, key=lambda r: fcfs.finish[r.id]) == reqs  # arrival order
    # work-conserving: each launch starts when the group frees up (or at arrival), never later
    records = sorted((rec for r in reqs for rec in edf.timeline[r.id]), key=lambda x: x.start)
    assert records[0].start == 0.0
    for prev, nxt in zip(records, records[1:]):
        assert nxt.start == pytest.approx(prev.end)
    # stage-level EDF: each stage queue in deadline order as well
    stage = StaticStagePolicy(Cluster(1, 3), COST, width=1, encode_gpus=1, decode_gpus=1, order="edf")
    res = simulate(Cluster(1, 3), stage, COST, reqs, SimConfig())
    assert [r.deadline for r in sorted(reqs, key=lambda r: res.finish[r.id])] == sorted(deadlines)


def test_runtime_costs_are_charged():
    shape = Shape(1024, 1024)
    reqs = [Request("a", "flux", shape, 28, 0.0, 100.0)]
    cluster = Cluster(1, 8)
    ideal = simulate(cluster, StaticPipelinePolicy(cluster, COST, width=1), COST, reqs, SimConfig.ideal())
    fair = simulate(cluster, StaticPipelinePolicy(cluster, COST, width=1), COST, reqs,
                    SimConfig(hop_overhead_s=0.5, request_overhead_s=2.0))
    assert fair.finish["a"] - ideal.finish["a"] == pytest.approx(0.5 + 2.0)  # one hop, one request
    stage = StaticStagePolicy(cluster, COST, width=1, encode_gpus=1, decode_gpus=1)
    three = simulate(cluster, stage, COST, reqs, SimConfig(hop_overhead_s=0.5, request_overhead_s=0.0,
                                                           intra_node_gbps=1e12))
    ideal3 = simulate(cluster, StaticStagePolicy(cluster, COST, width=1, encode_gpus=1, decode_gpus=1), COST, reqs,
                      SimConfig.ideal(intra_node_gbps=1e12))
    assert three.finish["a"] - ideal3.finish["a"] == pytest.approx(1.5)  # three hops


class Regrouper(ListPolicy):
    """Shared pool: request i runs on GPUs (0, 1) if i is even, (1, 2) if odd; model by request."""

    name = "regrouper"

    def schedule(self, state):
        free = state.free_gpus.get(0, frozenset())
        if self.queue and {0, 1, 2} <= free:
            r = self.queue.pop(0)
            gpus = (0, 1) if int(r.id[1:]) % 2 == 0 else (1, 2)
            return SchedulerOutput((Launch((r.id,), r.model, STAGES, 2, 0, gpus),))
        return SchedulerOutput()


def test_shared_pool_pays_regroup_and_model_load():
    shape = Shape(512, 512)
    reqs = [Request(f"r{i}", m, shape, 28, 100.0 * i, 100.0 * i + 1000) for i, m in
            enumerate(["flux", "flux", "flux", "sd3"])]
    cfg = SimConfig.ideal(regroup_s=3.0, model_load_s=30.0)
    res = simulate(Cluster(1, 3), Regrouper(), COST, reqs, cfg)
    extra = [res.timeline[r.id][0].extra_s for r in reqs]
    # r0 first use (free), r1 regroups (1, 2), r2 regroups back to (0, 1), r3 loads sd3 on GPUs that ran flux
    assert extra == pytest.approx([0.0, 3.0, 3.0, 30.0])


def test_timeline_records_queue_and_run_per_stage():
    cluster = Cluster(1, 8)
    reqs = flux_requests([Shape(512, 512), Shape(2048, 2048)], 20, 0.5)
    run = run_policy("trident", reqs, cluster, COST, SimConfig(), keep_result=True)
    res = run.result
    for r in reqs:
        recs = res.timeline[r.id]
        assert [rec.stages for rec in recs] == [("encode",)] + [("diffuse",)] * (len(recs) - 2) + [("decode",)]
        assert recs[0].ready == r.arrival
        for a, b in zip(recs, recs[1:]):
            assert b.ready == a.end and b.start >= b.ready
        info = res.request_timeline(r.id)
        assert len(info["stages"]) == len(recs) and isinstance(info["demoted"], bool)
        assert [c["steps"] for c in info["stages"][1:-1]][-1][1] == r.steps  # diffuse chunks, to the last step
    assert res.finish[reqs[0].id] == pytest.approx(res.timeline[reqs[0].id][-1].end + SimConfig().request_overhead_s)


@settings(max_examples=6, deadline=None)
@given(nodes=st.integers(1, 2), gap=st.floats(0.3, 6.0), slo_scale=st.sampled_from([1.0, 2.0, 4.0]),
       seed=st.integers(0, 5), n=st.integers(8, 30))
def test_no_policy_beats_the_bound(nodes, gap, slo_scale, seed, n):
    shapes = [Shape(s, s) for s in (256, 512, 1024, 2048)]
    shapes = shapes[seed % 4:] + shapes[: seed % 4]
    cluster = Cluster(nodes, 8)
    reqs = flux_requests(shapes, n, gap, slo_scale)
    bound = BoundPolicy(cluster, COST).evaluate(reqs)
    assert bound.energetic_attainment is not None
    assert bound.attainment <= min(bound.alone_attainment, bound.fluid_attainment) + 1e-12
    for name in POLICIES:
        m = run_policy(name, reqs, cluster, COST, SimConfig(noise=0.0)).metrics
        assert m["slo_attainment"] <= bound.attainment + 1e-9, (name, m["slo_attainment"], bound)


def test_bound_is_tighter_than_the_old_one_on_a_burst():
    # 30 images at once, then one much later: the old fluid bound counts GPU-seconds up to the
    # last deadline, so the burst looks servable; the per-slot LPs see the burst's deadlines
    cluster = Cluster(1, 8)
    burst = flux_requests([Shape(2048, 2048)], 30, 0.0, slo_scale=1.0)
    late = Request("late", "flux", Shape(2048, 2048), 28, 1000.0, 1000.0 + burst[0].slo_s)
    b = BoundPolicy(cluster, COST).evaluate(burst + [late])
    assert b.fluid_attainment == pytest.approx(1.0)
    assert b.time_indexed_attainment < 0.5 and b.energetic_attainment < 0.5
    assert b.attainment == min(b.alone_attainment, b.fluid_attainment, b.energetic_attainment,
                               b.time_indexed_attainment)
    light = flux_requests([Shape(1024, 1024)], 20, 20.0)
    assert BoundPolicy(cluster, COST).evaluate(light).attainment == pytest.approx(1.0)


def test_registry_knows_the_yardstick_names():
    assert {"static-best", "static-best-fcfs", "bound"} <= set(registry.policy_names())


def test_a_refused_launch_does_not_stall_the_queue_behind_it():
    # one width-1 pipeline group; the 4096² image is refused (62 GB), the images queued behind it
    # arrived before and nothing else will happen: they must still run
    cluster = Cluster(1, 1)
    reqs = [Request("huge", "flux", Shape(4096, 4096), 28, 0.0, 1.0)] + [
        Request(f"s{i}", "flux", Shape(256, 256), 28, 0.0, 100.0 + i) for i in range(3)]
    res = simulate(cluster, StaticPipelinePolicy(cluster, COST, width=1, order="edf"), COST,
                   list(reversed(reqs)), SimConfig())
    assert set(res.failed) == {"huge"} and set(res.finish) == {"s0", "s1", "s2"}
