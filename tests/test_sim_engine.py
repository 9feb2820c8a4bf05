"""The simulator: accounting, contract enforcement, determinism, plan changes, metrics."""
from __future__ import annotations

import pytest
from policy_fakes import ListPolicy

from trident_rs.policy.baselines import DynamicPipelinePolicy, StaticPipelinePolicy, StaticStagePolicy
from trident_rs.policy.types import (
    STAGES, Cluster, ClusterState, Launch, PlacementPlan, ReplicaGroup, Request, SchedulerOutput, Shape,
)
from trident_rs.sim import PolicyViolation, SimConfig, simulate, summarize


class FakeCost:
    """encode 0.1 s, decode 0.2 s, diffuse (pixels / 1e6) s per step at width 1, 90% efficient per doubling."""

    def stage_time(self, model, stage, shape, width=1, batch=1, steps=1):
        if stage == "encode":
            return 0.1 * batch
        if stage == "decode":
            return 0.2 * batch
        return shape.pixels / 1e6 * batch * steps / (width * 0.9 ** (width.bit_length() - 1))

    def best_width(self, model, shape, threshold=0.8, widths=(1, 2, 4, 8)):
        return 2 if shape.pixels >= 512 * 512 else 1

    def min_width(self, model, stage, shape, gpu_memory_gb):
        return 1


def requests(n: int, gap: float = 0.3, slo: float = 20.0) -> list[Request]:
    shapes = [Shape(256, 256), Shape(512, 512), Shape(1024, 1024)]
    return [Request(f"r{i}", "flux", shapes[i % 3], 10, i * gap, i * gap + slo) for i in range(n)]


@pytest.mark.parametrize("make", [
    lambda c, k: StaticPipelinePolicy(c, k, width=2),
    lambda c, k: StaticStagePolicy(c, k, width=2, encode_gpus=1, decode_gpus=1),
    lambda c, k: DynamicPipelinePolicy(c, k),
])
def test_every_request_completes_or_is_in_flight(make):
    cluster, cost, reqs = Cluster(2, 4), FakeCost(), requests(120)
    full = simulate(cluster, make(cluster, cost), cost, reqs)
    assert set(full.finish) == {r.id for r in reqs}
    for r in reqs:  # a request cannot finish before its own work could
        assert full.finish[r.id] - r.arrival >= 0.3 + r.shape.pixels / 1e6 * 10 / 8 - 1e-9
    cut = simulate(cluster, make(cluster, cost), cost, reqs, SimConfig(until=15.0))
    arrived = [r for r in reqs if r.arrival <= 15.0]
    assert len(cut.requests) == len(arrived)
    assert len(cut.finish) + cut.in_flight_at_end == len(arrived)
    assert cut.in_flight_at_end > 0


class GreedyOnGpuZero(ListPolicy):
    """Deliberately broken: always launches on GPU 0 of node 0, busy or not."""

    name = "broken-greedy"

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        out = tuple(Launch((r.id,), r.model, STAGES, 1, 0, (0,)) for r in self.queue)
        self.queue.clear()
        return SchedulerOutput(out)


def test_engine_rejects_launch_on_busy_gpu_and_names_policy():
    cost = FakeCost()
    with pytest.raises(PolicyViolation, match="broken-greedy.*not free"):
        simulate(Cluster(1, 2), GreedyOnGpuZero(), cost, requests(3, gap=0.0))


class DecodeFirst(GreedyOnGpuZero):
    name = "decode-first"

    def schedule(self, state):
        out = tuple(Launch((r.id,), r.model, ("decode",), 1, 0, (0,)) for r in self.queue)
        self.queue.clear()
        return SchedulerOutput(out)


class NeverLaunches(GreedyOnGpuZero):
    name = "lazy"

    def schedule(self, state):
        return SchedulerOutput()


def test_engine_rejects_stages_out_of_order_and_dropped_requests():
    with pytest.raises(PolicyViolation, match="decode-first.*next needs"):
        simulate(Cluster(1, 2), DecodeFirst(), FakeCost(), requests(1))
    with pytest.raises(PolicyViolation, match="lazy.*never completed"):
        simulate(Cluster(1, 2), NeverLaunches(), FakeCost(), requests(2))


def test_same_seed_same_result_and_noise_changes_it():
    cluster, cost, reqs = Cluster(2, 4), FakeCost(), requests(80)
    runs = [simulate(cluster, DynamicPipelinePolicy(cluster, cost), cost, reqs, SimConfig(noise=0.3, seed=s))
            for s in (7, 7, 8)]
    assert runs[0].finish == runs[1].finish
    assert runs[0].finish != runs[2].finish


def test_metrics_on_hand_computed_scenario():
    # one GPU; each request: encode 0.1 + diffuse 1.0 + decode 0.2 = 1.3 s, FCFS.
    shape = Shape(1000, 1000)
    reqs = [Request("a", "flux", shape, 1, 0.0, 2.0), Request("b", "flux", shape, 1, 0.5, 2.0),
            Request("c", "flux", shape, 1, 10.0, 10.5)]
    cluster, cost = Cluster(1, 1), FakeCost()
    m = summarize(simulate(cluster, StaticPipelinePolicy(cluster, cost, width=1), cost, reqs, SimConfig.ideal()))
    # finishes: a 1.3 (met), b 2.6 (latency 2.1, missed), c 11.3 (latency 1.3, missed)
    assert m.slo_attainment == pytest.approx(1 / 3)
    assert m.mean_latency_s == pytest.approx((1.3 + 2.1 + 1.3) / 3)
    assert m.p50_latency_s == pytest.approx(1.3)
    assert m.makespan_s == pytest.approx(11.3)
    assert m.gpu_utilisation == pytest.approx(3.9 / 11.3)
    assert m.goodput_rps == pytest.approx(1 / 11.3)
    assert m.completed == m.requests == 3


class AddsAGroupLater(ListPolicy):
    """Starts with no plan; on the first arrival asks for one width-2 group and uses it when ready."""

    name = "adds-group"

    def __init__(self):
        super().__init__()
        self.planned = False
        self.group = ReplicaGroup("g0", "flux", STAGES, 2, 0, (0, 1))
        self.ready_seen_at: float | None = None

    def schedule(self, state):
        if not self.planned:
            self.planned = True
            return SchedulerOutput(new_plan=PlacementPlan((self.group,)), replan_reason="first request")
        if "g0" in state.ready_groups and self.queue:
            self.ready_seen_at = state.now if self.ready_seen_at is None else self.ready_seen_at
            r = self.queue.pop(0)
            return SchedulerOutput((Launch((r.id,), "flux", STAGES, 2, 0, (0, 1), "g0"),))
        return SchedulerOutput()


def test_new_group_is_ready_only_after_start_cost():
    policy = AddsAGroupLater()
    res = simulate(Cluster(1, 2), policy, FakeCost(), requests(2, gap=1.0), SimConfig(start_cost_s=5.0))
    assert policy.ready_seen_at == pytest.approx(5.0)
    assert res.plan_changes == 1
    assert min(res.finish.values()) > 5.0


def test_transfer_between_nodes_adds_time():
    shape = Shape(1024, 1024)
    reqs = [Request("a", "flux", shape, 1, 0.0, 100.0)]
    cluster, cost = Cluster(3, 1), FakeCost()
    compute = 0.1 + 1024 * 1024 / 1e6 + 0.2
    same = simulate(cluster, StaticPipelinePolicy(cluster, cost, width=1), cost, reqs,
                    SimConfig.ideal(inter_node_gbps=0.001))
    assert same.finish["a"] == pytest.approx(compute)
    # stage-level on 3 one-GPU nodes: encode, diffuse and decode each on another node (two hops)
    policy = StaticStagePolicy(cluster, cost, width=1, encode_gpus=1, decode_gpus=1)
    hops = simulate(cluster, policy, cost, reqs, SimConfig.ideal(inter_node_gbps=0.001))
    embeddings, latent = 512 * 4096 * 2, 128 * 128 * 16 * 2
    assert hops.finish["a"] == pytest.approx(compute + (embeddings + latent) / 1e6)


class Scripted(GreedyOnGpuZero):
    """Runs a fixed list of launches one after another, each no earlier than its start time."""

    name = "scripted"

    def __init__(self, script: list[tuple[float, Launch]]):
        super().__init__()
        self.script, self.busy = list(script), False

    def on_launch_done(self, launch, now):
        self.busy = False

    def schedule(self, state):
        if self.busy or not self.script or self.script[0][0] > state.now:
            return SchedulerOutput()
        self.busy = True
        return SchedulerOutput((self.script.pop(0)[1],))

    def next_wakeup(self, now):
        return self.script[0][0] if self.script and not self.busy else None


def _chunked(rid: str, ranges, pause_at: float = 0.0, gpus=((0,), (1,))):
    script = [(0.0, Launch((rid,), "img", ("encode",), 1, 0, (0,)))]
    for i, steps in enumerate(ranges):
        g = gpus[i % len(gpus)]
        script.append((pause_at if i == 1 else 0.0, Launch((rid,), "img", ("diffuse",), len(g), 0, g, steps=steps)))
    script.append((0.0, Launch((rid,), "img", ("decode",), 1, 0, (0,))))
    return script


def test_diffuse_chunks_cost_their_steps_plus_boundary_and_moves():
    from trident_rs.policy.payload_size import chunk_state_bytes

    shape = Shape(1024, 1024)
    reqs = [Request("a", "img", shape, 4, 0.0, 100.0)]
    cluster, cost = Cluster(1, 2), FakeCost()
    config = SimConfig.ideal(chunk_boundary_s=0.5, intra_node_gbps=0.001)
    whole = simulate(cluster, Scripted(_chunked("a", [None])), cost, reqs, config)
    chunked = simulate(cluster, Scripted(_chunked("a", [(0, 1), (1, 4)], gpus=((0,),))), cost, reqs, config)
    # same GPUs, resumed at once: one boundary, nothing moved
    assert chunked.finish["a"] == pytest.approx(whole.finish["a"] + 0.5)
    assert [r.steps for r in chunked.timeline["a"]] == [None, (0, 1), (1, 4), None]
    assert chunked.peak_paused_gb == 0
    # paused until t=10, resumed on the other GPU: the state comes back from host memory
    paused = simulate(cluster, Scripted(_chunked("a", [(0, 2), (2, 4)], pause_at=10.0)), cost, reqs, config)
    state_s = chunk_state_bytes("img", shape) / 1e6
    diffuse2 = cost.stage_time("img", "diffuse", shape, 1, steps=2)
    decode = cost.stage_time("img", "decode", shape)
    latent_s = 128 * 128 * 16 * 2 / 1e6  # decode on the first GPU again
    assert paused.finish["a"] == pytest.approx(10.0 + 0.5 + state_s + diffuse2 + latent_s + decode)
    assert paused.peak_paused_gb == pytest.approx(chunk_state_bytes("img", shape) / 1e9)
    assert paused.timeline["a"][2].queued_s == pytest.approx(10.0 - paused.timeline["a"][1].end)


def test_engine_rejects_bad_chunks_and_paused_state_over_budget():
    reqs = [Request("a", "img", Shape(1024, 1024), 4, 0.0, 100.0)]
    cluster, cost = Cluster(1, 2), FakeCost()
    with pytest.raises(PolicyViolation, match="chunk \\(1, 3\\) of request a, which has done 0"):
        simulate(cluster, Scripted(_chunked("a", [(1, 3)])), cost, reqs)
    with pytest.raises(PolicyViolation, match="chunk \\(2, 5\\)"):
        simulate(cluster, Scripted(_chunked("a", [(0, 2), (2, 5)])), cost, reqs)
    bad = [(0.0, Launch(("a",), "img", ("encode", "diffuse"), 1, 0, (0,), steps=(0, 2)))]
    with pytest.raises(PolicyViolation, match="diffuse-only"):
        simulate(cluster, Scripted(bad), cost, reqs)
    with pytest.raises(PolicyViolation, match="over the 0.0001 GB budget"):
        simulate(cluster, Scripted(_chunked("a", [(0, 2), (2, 4)], pause_at=10.0)), cost, reqs,
                 SimConfig(host_memory_gb=1e-4))


def test_the_chunks_of_one_diffuse_share_its_noise():
    # splitting a diffuse into chunks must not average its noise away: every chunk of a
    # request runs at the same time factor as the others (per step)
    shape = Shape(1024, 1024)
    reqs = [Request("a", "img", shape, 4, 0.0, 100.0)]
    cluster, cost = Cluster(1, 2), FakeCost()
    config = SimConfig.ideal(noise=0.5, seed=3, chunk_boundary_s=0.0)
    res = simulate(cluster, Scripted(_chunked("a", [(0, 1), (1, 2), (2, 4)], gpus=((0,),))), cost, reqs, config)
    per_step = [(rec.run_s - rec.extra_s) / (rec.steps[1] - rec.steps[0]) for rec in res.timeline["a"][1:-1]]
    assert per_step == pytest.approx([per_step[0]] * 3)
    assert per_step[0] != pytest.approx(cost.stage_time("img", "diffuse", shape, 1, steps=1))


def test_noise_is_common_to_every_policy():
    # the same request's stage runs at the same noise factor whatever the policy decides
    # (width, chunks, order, other requests around it): policies differ by decisions, not luck
    shape = Shape(1024, 1024)
    reqs = [Request(r, "img", shape, 4, 0.0, 100.0) for r in ("a", "b")]
    cluster, cost = Cluster(1, 2), FakeCost()
    config = SimConfig.ideal(noise=0.5, seed=3, chunk_boundary_s=0.0)

    def factors(res):
        return {rid: [(rec.run_s - rec.extra_s) / cost.stage_time("img", rec.stages[0], shape, rec.width,
                                                                    steps=(rec.steps[1] - rec.steps[0]) if rec.steps else 4)
                      for rec in res.timeline[rid]] for rid in ("a", "b")}

    one = simulate(cluster, Scripted(_chunked("a", [(0, 4)], gpus=((0,),)) + _chunked("b", [(0, 4)], gpus=((1,),))),
                   cost, reqs, config)
    other = simulate(cluster, Scripted(_chunked("b", [(0, 1), (1, 4)], gpus=((0,),)) + _chunked("a", [(0, 4)], gpus=((0, 1),))),
                     cost, reqs, config)
    f1, f2 = factors(one), factors(other)
    for rid in ("a", "b"):
        assert f1[rid][0] == pytest.approx(f2[rid][0])  # encode
        assert f1[rid][1] == pytest.approx(f2[rid][-2])  # diffuse (its last chunk)
        assert f1[rid][-1] == pytest.approx(f2[rid][-1])  # decode
    assert f1["a"][1] != pytest.approx(f1["b"][1])  # different requests, different draws
    seed4 = simulate(cluster, Scripted(_chunked("a", [(0, 4)], gpus=((0,),)) + _chunked("b", [(0, 4)], gpus=((1,),))),
                     cost, reqs, SimConfig.ideal(noise=0.5, seed=4, chunk_boundary_s=0.0))
    assert factors(seed4)["a"][1] != pytest.approx(f1["a"][1])  # the seed draws them
