"""The step-level baselines, TetriServe and GenServe (`policy/tetriserve.py`, `policy/genserve.py`):
the Policy contract under noise, bounded preemptions, host memory, and one behaviour of each."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_fakes import FakeCost, slo_of
from trident_rs.errors import ConfigError
from trident_rs.policy import registry
from trident_rs.policy.genserve import GenServePolicy
from trident_rs.policy.step_level import knapsack
from trident_rs.policy.tetriserve import TetriServePolicy
from trident_rs.policy.types import STAGES, Cluster, Request, Shape
from trident_rs.sim import SimConfig, simulate

COST = FakeCost()
POLICIES = {"tetriserve": TetriServePolicy, "genserve": GenServePolicy}


def workload(n: int, rate: float, seed: int, video_share: float, scale: float) -> list[Request]:
    """Images (8-28 steps) and videos (3-8 steps) of the fake cost model, Poisson arrivals."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        model = "vid" if rng.random() < video_share else "img"
        shape = rng.choice(COST.shapes(model))
        steps = rng.randint(3, 8) if model == "vid" else rng.randint(8, 28)
        out.append(Request(f"r{i}", model, shape, steps, t, t + slo_of(COST, model, shape, steps, scale)))
    return out


def preemptions(res, rid: str) -> int:
    """Diffuse chunks of a request that did not start when its previous chunk ended."""
    return sum(1 for rec in res.timeline[rid]
               if rec.steps is not None and rec.steps[0] > 0 and rec.start > rec.ready + 1e-9)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(POLICIES)), nodes=st.integers(1, 2), gpus=st.sampled_from([2, 4, 8]),
       rate=st.floats(0.05, 2.0), seed=st.integers(0, 10_000), video_share=st.sampled_from([0.0, 0.3, 0.7]),
       scale=st.sampled_from([1.0, 2.0, 8.0]), bound=st.integers(0, 3),
       host_gb=st.sampled_from([0.0, 0.05, 512.0]), step_s=st.sampled_from([0.5, 2.0, 10.0]))
def test_contract_no_loss_and_bounded_preemptions(name, nodes, gpus, rate, seed, video_share, scale, bound,
                                                  host_gb, step_s):
    """The engine raises PolicyViolation on a busy GPU, a stage or chunk out of order, or paused
    state over the host memory budget; here, under noise, every request must also finish and
    no request may be paused at more chunk boundaries than the bound."""
    cluster = Cluster(nodes, gpus)
    reqs = workload(30, rate, seed, video_share, scale)
    length = {"round_s": step_s} if name == "tetriserve" else {"chunk_s": step_s}
    policy = POLICIES[name](cluster, COST, max_preemptions=bound, host_memory_gb=host_gb, **length)
    res = simulate(cluster, policy, COST, reqs, SimConfig(noise=0.3, seed=seed, host_memory_gb=host_gb))
    assert not res.failed
    assert len(res.finish) == len(reqs)
    assert policy.pending() == 0
    for r in reqs:
        recs = res.timeline[r.id]
        firsts = [rec.stages for rec in recs if rec.steps is None or rec.steps[0] == 0]
        assert [s for stages in firsts for s in stages] == list(STAGES)  # later chunks resume diffuse
        chunks = [rec.steps for rec in recs if rec.steps is not None]
        if chunks:  # the chunks tile the steps, in order
            assert chunks[0][0] == 0 and chunks[-1][1] == r.steps
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert preemptions(res, r.id) <= bound
    assert res.peak_paused_gb <= host_gb + 1e-12


def test_genserve_preempts_a_video_for_an_urgent_image():
    # one GPU: a long video with a loose deadline runs in chunks; an image arrives with a
    # deadline it can only meet if the video yields the GPU at its next chunk boundary
    cluster = Cluster(1, 1)
    vid = Request("vid", "vid", Shape(544, 960, 17), 30, 0.0, 1000.0)  # 2.8 s a step: 84 s
    img = Request("img", "img", Shape(1024, 1024), 10, 5.0, 25.0)  # 8.4 s of diffuse
    runs = {}
    for bound in (8, 0):
        policy = GenServePolicy(cluster, COST, max_preemptions=bound)
        runs[bound] = simulate(cluster, policy, COST, [vid, img], SimConfig.ideal())
    pre, pinned = runs[8], runs[0]
    assert pre.finish["img"] <= img.deadline  # the video paused at a boundary
    assert preemptions(pre, "vid") >= 1 and pre.finish["vid"] <= vid.deadline
    assert pinned.finish["img"] > img.deadline  # no preemption allowed: the image waits for the video
    assert preemptions(pinned, "vid") == 0


def test_genserve_batches_images_that_would_miss_one_after_the_other():
    # one GPU, two small same-class images at once: one after the other the second misses;
    # batched (1.3x the time of one, FakeCost) both make it
    cluster = Cluster(1, 1)
    imgs = [Request(f"i{j}", "img", Shape(256, 256), 28, 0.0, 4.5) for j in range(2)]  # 2.8 s each alone
    res = simulate(cluster, GenServePolicy(cluster, COST), COST, imgs, SimConfig.ideal())
    assert all(res.finish[r.id] <= r.deadline for r in imgs)
    assert [rec.batch for rec in res.timeline["i0"] if rec.stages == ("diffuse",)] == [2]


def test_tetriserve_widens_a_request_when_gpus_free_up():
    # four GPUs, a video and three urgent images at once: each gets one GPU (the on-time degree
    # with the fewest GPU-seconds); once the images are done, a round boundary widens the video
    cluster = Cluster(1, 4)
    vid = Request("vid", "vid", Shape(544, 960, 17), 30, 0.0, 200.0)
    imgs = [Request(f"i{j}", "img", Shape(1024, 1024), 10, 0.0, 12.0) for j in range(3)]
    policy = TetriServePolicy(cluster, COST, model_load_s=0, regroup_s=0)  # as the ideal engine charges
    res = simulate(cluster, policy, COST, [vid, *imgs], SimConfig.ideal())
    chunks = [rec for rec in res.timeline["vid"] if rec.stages == ("diffuse",)]
    assert chunks[0].width == 1 and max(rec.width for rec in chunks) == 4
    assert all(res.finish[r.id] <= r.deadline for r in [vid, *imgs])
    i = next(i for i, rec in enumerate(chunks) if rec.width == 4)
    images_done = max(rec.end for j in imgs for rec in res.timeline[j.id] if rec.stages == ("diffuse",))
    assert chunks[i - 1].end >= images_done  # the first boundary after the images freed their GPUs
    assert chunks[i].start == chunks[i - 1].end  # widened there, not paused
    assert all(rec.width == 1 for rec in chunks[:i])


def test_knapsack_maximises_the_value_within_the_gpus():
    # three requests that cannot wait (1 GPU, 1 GPU, 4 GPUs) on 4 GPUs: the two small ones
    items = [[(0, 0.0), (4, 1.0)], [(0, 0.0), (1, 1.0)], [(0, 0.0), (1, 1.0)]]
    assert knapsack(items, 4) == [0, 1, 1]
    # one that can wait (worth 1 either way) leaves its GPUs to one that cannot
    assert knapsack([[(0, 1.0), (2, 1.001)], [(0, 0.0), (2, 1.0)]], 2) == [0, 1]
    assert knapsack([[(0, 0.0), (2, 1.0), (4, 1.1)]], 3) == [1]


def test_options_are_coerced_and_bad_ones_raise():
    cluster = Cluster(1, 8)
    t = registry.make_policy("tetriserve", cluster, COST, round_s="3", max_preemptions="2", seed=0,
                             slo_scale=4.0, models={"img": 1.0})
    assert isinstance(t, TetriServePolicy) and t.round_s == 3.0 and t.max_preemptions == 2
    g = registry.make_policy("genserve", cluster, COST, chunk_s="1.5", host_memory_gb="64", tick_s=1.0)
    assert isinstance(g, GenServePolicy) and g.chunk_s == 1.5 and g.paused.budget == 64e9
    with pytest.raises(ConfigError, match="unknown"):
        registry.make_policy("tetriserve", cluster, COST, chunk_s=2.0)  # genserve's option
    with pytest.raises(ConfigError, match="unknown"):
        registry.make_policy("genserve", cluster, COST, round_s=2.0)
    with pytest.raises(ConfigError, match="round_s"):
        TetriServePolicy(cluster, COST, round_s="soon")
    with pytest.raises(ConfigError, match="round_s > 0"):
        TetriServePolicy(cluster, COST, round_s=0)
    with pytest.raises(ConfigError, match="max_preemptions"):
        GenServePolicy(cluster, COST, max_preemptions=1.5)
    with pytest.raises(ConfigError, match="max_preemptions >= 0"):
        GenServePolicy(cluster, COST, max_preemptions=-1)
    with pytest.raises(ConfigError, match="threshold"):
        GenServePolicy(cluster, COST, threshold=2)
