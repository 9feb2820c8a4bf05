"""trident's shared-pool placement (`StagePoolPolicy`) and the weight-residency rule it shares
with the simulator."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trident_rs.errors import ConfigError
from trident_rs.policy import registry
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.residency import WeightResidency
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.launch_error import LaunchError
from trident_rs.policy.stage_pool import StagePoolPolicy
from trident_rs.policy.trident import TridentPolicy
from trident_rs.policy.types import STAGES, Cluster, Request, Shape
from trident_rs.sim import SimConfig, simulate

COST = CostModel.default()
SHAPES = {"flux": [Shape(512, 512), Shape(1024, 1024), Shape(2048, 2048)],
          "sd3": [Shape(512, 512), Shape(1024, 1024)],
          "cogvideox": [Shape(768, 432, 17), Shape(768, 1360, 49)]}


def workload(n: int, gap: float, seed: int, models, slo_scale: float = 4.0) -> list[Request]:
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        m = rng.choice(models)
        s = rng.choice(SHAPES[m])
        steps = 50 if m == "cogvideox" else 28
        t += rng.expovariate(1.0 / gap)
        out.append(Request(f"r{i}", m, s, steps, t, t + slo_seconds(COST, m, s, steps, slo_scale)))
    return out


@settings(max_examples=25, deadline=None)
@given(nodes=st.integers(1, 2), gap=st.floats(0.05, 3.0), seed=st.integers(0, 1000),
       models=st.sampled_from([("flux",), ("flux", "sd3"), ("sd3", "cogvideox")]),
       slo_scale=st.sampled_from([1.0, 2.0, 8.0]), noise=st.sampled_from([0.0, 0.3]))
def test_pool_never_over_allocates_and_loses_no_request(nodes, gap, seed, models, slo_scale, noise):
    """The engine raises PolicyViolation on a launch on a busy GPU, a stage out of order, a batch
    of mixed shapes or a request launched twice; here every request must also finish (the
    shapes all fit 48 GB GPUs at some width of each stage), under overload and noise alike."""
    cluster = Cluster(nodes, 8)
    reqs = workload(60, gap, seed, models, slo_scale)
    policy = StagePoolPolicy(cluster, COST, models=dict.fromkeys(models, 1.0))
    res = simulate(cluster, policy, COST, reqs, SimConfig(noise=noise, seed=seed))
    assert not res.failed
    assert len(res.finish) == len(reqs)
    assert policy.pending() == 0 and not policy.ready
    assert res.busy_gpu_seconds <= cluster.total_gpus * res.end_time + 1e-6
    for r in reqs:  # each stage exactly once, in order, as its own launch; diffuse in chunks
        recs = res.timeline[r.id]
        assert [rec.stages for rec in recs] == [("encode",)] + [("diffuse",)] * (len(recs) - 2) + [("decode",)]
        chunks = [rec.steps for rec in recs[1:-1]]
        assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]] and chunks[-1][1] == r.steps


def test_decode_does_not_hold_the_diffuse_gpus():
    # one 2048² FLUX image on an idle node with a tight SLO: diffuse goes wide, decode (whose
    # efficiency is poor) takes fewer GPUs, and the rest are free for others meanwhile
    cluster = Cluster(1, 8)
    s = Shape(2048, 2048)
    r = Request("r0", "flux", s, 28, 0.0, slo_seconds(COST, "flux", s, 28, 1.5))
    res = simulate(cluster, StagePoolPolicy(cluster, COST), COST, [r], SimConfig.ideal())
    enc, *chunks, dec = res.timeline["r0"]
    assert enc.width == 1 and all(dif.width >= 2 and dec.width < dif.width for dif in chunks)
    # the start loaded the whole pipeline on the GPUs: no weights to copy; chunks go on in place
    assert all(dif.extra_s < 0.1 for dif in chunks)
    assert res.finish["r0"] <= r.deadline


def test_a_late_request_is_not_starved_by_new_arrivals():
    # one GPU, a long request that is already late at arrival, then a stream of short on-time
    # ones: the late request runs once new arrivals' deadlines pass its deadline + SLO
    cluster = Cluster(1, 1)
    big, small = Shape(2048, 2048), Shape(512, 512)
    late = Request("late", "flux", big, 28, 0.0, 1.0)  # cannot make it: late at once
    slo = slo_seconds(COST, "flux", small, 28, 4.0)
    stream = [Request(f"s{i}", "flux", small, 28, 0.5 + 2.0 * i, 0.5 + 2.0 * i + slo) for i in range(200)]
    res = simulate(cluster, StagePoolPolicy(cluster, COST), COST, [late, *stream], SimConfig.ideal())
    start = res.timeline["late"][0].start
    overtaken = [r for r in stream if res.timeline[r.id][0].start < start]
    assert all(r.deadline <= late.deadline + late.slo_s + 1e-9 for r in overtaken)
    assert len(res.finish) == len(stream) + 1


def test_model_loads_are_avoided_while_the_model_has_its_own_gpus():
    # two models on one node at a steady mix: once each holds GPUs, a stage loads a model onto
    # a GPU of the other only to move GPUs between the models' shares, not on every launch
    cluster = Cluster(1, 8)
    reqs = workload(80, 3.0, 3, ("flux", "sd3"), 8.0)
    res = simulate(cluster, StagePoolPolicy(cluster, COST, models={"flux": 1, "sd3": 1}), COST, reqs,
                   SimConfig(start_cost_s=20.0))
    assert len(res.finish) == len(reqs)
    loads = [(r.id, i) for r in reqs for i, rec in enumerate(res.timeline[r.id]) if rec.extra_s >= 20.0]
    at_start = [(rid, i) for rid, i in loads if not res.timeline[rid][i].steps or res.timeline[rid][i].steps[0] == 0]
    assert len(at_start) <= 8  # of 240 launches
    for rid, i in set(loads) - set(at_start):  # mid-diffuse, a load only ever widens (where it pays)
        assert res.timeline[rid][i].width > res.timeline[rid][i - 1].width


def test_residency_prices_model_loads_weight_copies_and_regroups():
    s = Shape(1024, 1024)
    res = WeightResidency(COST, 48.0, model_load_s=20.0, regroup_s=1.0)
    assert res.load_s("flux", ("diffuse",), 0, (0, 1)) == 0.0  # never used: the start loaded it
    res.record("flux", ("diffuse",), 0, (0, 1), s)
    assert res.holds(0, 0).stages_of("flux") == set(STAGES)  # the first model is loaded whole where it fits
    assert res.load_s("flux", ("diffuse",), 0, (0, 1)) == 0.0
    res.record("flux", ("diffuse",), 0, (0, 1), Shape(4096, 4096))  # no room for the others now
    assert res.load_s("flux", ("diffuse",), 0, (1, 0)) == 0.0  # same group, other order
    assert res.load_s("flux", ("decode",), 0, (0,)) == pytest.approx(COST.weights_load_s("flux", ("decode",)))
    assert res.load_s("sd3", ("encode",), 0, (1,)) == 20.0
    res.record("flux", ("decode",), 0, (0,), s)  # width 1 keeps GPU 0 in its group of 2
    assert res.holds(0, 0).stages_of("flux") == {"diffuse", "decode"}  # both fit 48 GB: both kept
    assert res.load_s("flux", ("diffuse",), 0, (0, 1)) == 0.0
    res.record("flux", ("diffuse",), 0, (0, 2), s)
    assert res.load_s("flux", ("diffuse",), 0, (0, 1)) == 1.0  # GPU 0 regrouped with 2 since
    # weights that do not fit with the launch's activations are dropped
    tight = WeightResidency(COST, 30.0, model_load_s=20.0, regroup_s=1.0)
    tight.record("flux", ("diffuse",), 0, (0,), s)
    tight.record("flux", ("decode",), 0, (0,), Shape(4096, 4096))
    assert tight.holds(0, 0).stages_of("flux") == {"decode"}


def test_two_models_share_a_gpu_where_their_weights_fit():
    # SD3's DiT (5 GB) and CogVideoX's (12 GB) fit one 48 GB GPU together: after running both,
    # going back to SD3 costs nothing; FLUX's pipeline (37 GB of weights) pushes them out
    s, v = Shape(1024, 1024), Shape(768, 432, 17)
    res = WeightResidency(COST, 48.0, model_load_s=20.0, regroup_s=1.0)
    res.record("sd3", ("diffuse",), 0, (0,), s)
    assert res.load_s("cogvideox", ("diffuse",), 0, (0,)) == 20.0
    res.record("cogvideox", ("diffuse",), 0, (0,), v)
    assert res.holds(0, 0).model == "cogvideox" and res.holds(0, 0).stages_of("sd3") is not None
    assert res.load_s("sd3", ("diffuse",), 0, (0,)) == 0.0
    res.record("flux", STAGES, 0, (0,), s)
    assert res.holds(0, 0).stages_of("sd3") is None and res.holds(0, 0).stages_of("cogvideox") is None
    assert res.load_s("sd3", ("diffuse",), 0, (0,)) == 20.0


def test_slack_comes_from_the_measured_error():
    e = LaunchError()
    assert e.factor(1.28) == 1.0  # too few samples: no slack
    for ratio in [1.0, 1.2, 0.8, 1.1, 0.9] * 4:
        e.add(ratio)
    assert 1.1 < e.factor(1.28) < 1.3
    exact = LaunchError()
    for _ in range(20):
        exact.add(1.0)
    assert exact.factor(1.28) == pytest.approx(1.0)


def test_trident_placements_and_bad_options():
    cluster = Cluster(1, 8)
    assert isinstance(registry.make_policy("trident", cluster, COST), StagePoolPolicy)
    assert isinstance(registry.make_policy("trident", cluster, COST, placement="groups", models=["flux"]),
                      TridentPolicy)
    with pytest.raises(ConfigError, match="placement"):
        registry.make_policy("trident", cluster, COST, placement="ring")
    with pytest.raises(ConfigError, match="unknown"):
        registry.make_policy("trident", cluster, COST, late_width="best")
    with pytest.raises(ConfigError, match="confidence"):
        StagePoolPolicy(cluster, COST, confidence=1.5)


def _pauses(res, rid: str) -> list[float]:
    """How long each resumed diffuse chunk of a request waited after its previous chunk."""
    return [end - start for start, end in _pause_spans(res, rid)]


def _pause_spans(res, rid: str) -> list[tuple[float, float]]:
    """(paused at, resumed at) of each resumed diffuse chunk of a request that waited."""
    recs = [rec for rec in res.timeline[rid] if rec.steps and rec.steps[0] > 0]
    return [(rec.ready, rec.start) for rec in recs if rec.queued_s > 1e-9]


@settings(max_examples=20, deadline=None)
@given(gap=st.floats(0.05, 1.0), seed=st.integers(0, 1000), max_preemptions=st.integers(0, 3),
       max_pause_s=st.sampled_from([5.0, 30.0]), models=st.sampled_from([("flux",), ("sd3", "cogvideox")]))
# free GPUs all holding another model while the request's own model's GPUs go to other requests'
# next chunks: it must load its model rather than wait past the bound
@example(gap=0.3359375, seed=987, max_preemptions=3, max_pause_s=5.0, models=("sd3", "cogvideox"))
def test_preemption_is_bounded(gap, seed, max_preemptions, max_pause_s, models):
    """Under overload no request yields its GPUs at more than `max_preemptions` chunk
    boundaries, and none stays paused much past `max_pause_s`: once over it, the request goes
    first, after the requests that went over it earlier and still wait (first come, first
    served among them), and is reserved the next GPUs: it waits at most for the launch running
    then and for the launches of those ahead of it."""
    cluster = Cluster(1, 8)
    reqs = workload(60, gap, seed, models, 2.0)
    policy = StagePoolPolicy(cluster, COST, models=dict.fromkeys(models, 1.0), max_preemptions=max_preemptions,
                             max_pause_s=max_pause_s)
    res = simulate(cluster, policy, COST, reqs, SimConfig(noise=0.3, seed=seed))
    assert len(res.finish) == len(reqs)
    longest = max(rec.run_s for r in reqs for rec in res.timeline[r.id])
    spans = {r.id: _pause_spans(res, r.id) for r in reqs}
    over = [(start + max_pause_s, end) for s in spans.values() for start, end in s]  # (went over the bound, resumed)
    for r in reqs:
        assert len(spans[r.id]) <= max_preemptions
        for start, end in spans[r.id]:
            due = start + max_pause_s
            if end <= due + 1e-9:
                continue
            ahead = sum(1 for d, e in over if d < due - 1e-9 and e > due + 1e-9)  # over earlier, still waiting
            assert end - due <= (ahead + 1) * longest + 1e-6, (r.id, start, end, ahead, longest)


def test_a_chunked_request_yields_its_gpus_to_an_urgent_one_and_resumes():
    # one GPU: a lax 2048² FLUX image starts alone; a tight 512² image arrives meanwhile. At the
    # next chunk boundary the big one pauses, the small one runs and meets its deadline, then
    # the big one resumes where it stopped (and meets its own); without chunks the small one misses
    cluster = Cluster(1, 1)
    big, small = Shape(2048, 2048), Shape(512, 512)
    t_small = sum(COST.stage_time("flux", s, small, 1, 1, 28) for s in STAGES)
    reqs = [Request("big", "flux", big, 28, 0.0, 10_000.0), Request("small", "flux", small, 28, 5.0, 5.0 + 2 * t_small)]
    for elastic in (True, False):
        res = simulate(cluster, StagePoolPolicy(cluster, COST, elastic=elastic), COST, reqs, SimConfig.ideal())
        made = {r.id: res.finish[r.id] <= r.deadline for r in reqs}
        assert made == {"big": True, "small": elastic}
    assert len(_pauses(res, "big")) == 0
    res = simulate(cluster, StagePoolPolicy(cluster, COST), COST, reqs, SimConfig.ideal())
    assert len(_pauses(res, "big")) == 1


def test_spare_gpus_go_where_they_save_the_most_seconds():
    # 5 free GPUs, two on-time tasks at width 1 each: the 3 spare GPUs widen the long task (180 s
    # saved by its first extra GPU) rather than the short one that is first in deadline order (4 s)
    from trident_rs.policy.width_share import WidthChoice

    short = WidthChoice((1, 2, 4), {1: 10.0, 2: 6.0, 4: 4.0}, 0.0, True)
    long = WidthChoice((1, 2, 4), {1: 400.0, 2: 220.0, 4: 130.0}, 0.0, True)
    order, choices = [(1.0, 0, "short"), (2.0, 1, "long")], {"short": short, "long": long}
    assert StagePoolPolicy(Cluster(1, 8), COST)._share_out(order, choices, 5) == {"short": 1, "long": 4}
    assert StagePoolPolicy(Cluster(1, 8), COST, spare="deadline")._share_out(order, choices, 5) == {"short": 4, "long": 1}
    assert StagePoolPolicy(Cluster(1, 8), COST)._share_out(order, choices, 2) == {"short": 1, "long": 1}
    with pytest.raises(ConfigError, match="spare"):
        StagePoolPolicy(Cluster(1, 8), COST, spare="fifo")


def test_a_last_launch_after_the_preemption_bound_takes_the_fastest_width_with_room():
    # a request paused `max_preemptions` times runs its remaining steps in one launch: at the
    # width it starts with, to its last step. Resumed past the pause bound ("as soon as
    # possible"), that width is the fastest with room now, not the narrowest (a 2048² FLUX image
    # locked at width 1 for the rest of its steps was the tail's worst case)
    from trident_rs.policy.stage_pool import _Flight

    policy = StagePoolPolicy(Cluster(2, 8), COST, max_preemptions=2)
    r = Request("big", "flux", Shape(2048, 2048), 28, 0.0, 10.0)
    f = _Flight(r, stage=STAGES.index("diffuse"), node=0, gpus=(0,), done=4, pauses=2, urgent=True)
    fastest = policy._choose(f, 100.0, 1.0, {0: set(range(8)), 1: {0}})
    assert fastest.widths == (8,)
    assert policy._choose(f, 100.0, 1.0, {0: {1, 2}, 1: {0}}).widths == (2,)
    f.pauses = 1  # it may still pause: any width, as before (the free GPUs decide)
    assert len(policy._choose(f, 100.0, 1.0, {0: set(range(8))}).widths) > 1


def test_a_late_short_stage_runs_at_any_width_with_room():
    # a late diffuse waits for its widest efficient width (it would run much longer on fewer);
    # a late encode or decode (seconds of work) runs at any width that has room, widest efficient
    # first, rather than wait for a whole node while on-time work keeps every node partly busy
    from trident_rs.policy.stage_pool import _Flight

    policy = StagePoolPolicy(Cluster(2, 8), COST)
    r = Request("v", "hunyuanvideo", Shape(720, 1280, 129), 50, 0.0, 1.0)  # its deadline long gone
    free = {0: set(range(8))}
    decode = policy._choose(_Flight(r, stage=STAGES.index("decode")), 100.0, 1.0, free)
    diffuse = policy._choose(_Flight(r, stage=STAGES.index("diffuse")), 100.0, 1.0, free)
    assert not decode.on_time and not diffuse.on_time
    assert len(diffuse.widths) == 1
    *_, efficient = policy._class("hunyuanvideo", STAGES.index("decode"), r.shape, 50)
    assert decode.widths[0] == max(efficient)
    assert len(decode.widths) > 1 and sorted(decode.widths) == sorted(set(decode.widths))


def test_a_diffuse_at_its_boundary_widens_onto_gpus_that_must_load_its_model_where_that_pays():
    # a HunyuanVideo diffuse runs at width 1 on the one GPU of its node that holds its model; the
    # node's other 7 GPUs hold FLUX and are free. At its chunk boundary, loading the model onto
    # them (20 s) and running its 49 remaining steps at width 8 finishes far sooner than going on
    # at width 1 (~10 s a step): it widens. A paused request (not going on where it ran) and the
    # policy with `widen_loads=False` still wait for GPUs that hold the model
    from trident_rs.policy.stage_pool import _Flight

    r = Request("v", "hunyuanvideo", Shape(720, 1280, 129), 50, 0.0, 100_000.0)
    for widen in (True, False):
        policy = StagePoolPolicy(Cluster(1, 8), COST, widen_loads=widen)
        for g in range(1, 8):
            policy.residency.record("flux", ("diffuse",), 0, (g,), Shape(1024, 1024))
        policy.residency.record("hunyuanvideo", ("diffuse",), 0, (0,), r.shape)
        f = _Flight(r, stage=STAGES.index("diffuse"), node=0, gpus=(0,), done=1)
        policy.flights[r.id] = f
        policy._budget, policy._ahead = policy._budgets(), {}
        free = {0: set(range(8))}
        c = policy._choose(f, 50.0, 1.0, free)
        assert 8 in c.widths and c.time[8] + 20.0 < c.time[1]
        work = c.time[8] + c.rest
        policy._boundary = {r.id}
        spot = policy._place(f, 8, free, 50.0, work, policy._stay_s(f, c, 1.0))
        assert (spot is not None) == widen
        if widen:
            assert spot[1] == tuple(range(8)) and spot[2] >= 20.0
        policy._boundary = set()  # paused: it did not go on where it ran
        assert policy._place(f, 8, free, 50.0, work, policy._stay_s(f, c, 1.0)) is None


def test_on_time_widths_leave_room_for_a_decode_at_the_width_its_memory_needs():
    # a 768x1360x81 CogVideoX decode needs 2 GPUs (memory) and takes far longer there than at its
    # fastest width. A diffuse width is on time only if that narrow decode still fits after it,
    # where any width allows it; where none does, the widths on time with the fastest decode (the
    # request is not given up as late while a fast decode could still save it)
    from trident_rs.policy.stage_pool import _Flight

    r = Request("v", "cogvideox", Shape(768, 1360, 81), 6, 0.0, 0.0)
    d = STAGES.index("diffuse")
    probe = StagePoolPolicy(Cluster(1, 8), COST)
    ws, time, fast, narrow, _ = probe._class(r.model, d, r.shape, r.steps)
    assert narrow > fast
    w0 = ws[0]
    wide = [w for w in ws if time[w] + narrow < time[w0] + fast]
    assert wide  # a wider diffuse makes room for the narrow decode in the time w0 leaves for the fast one
    free = {0: set(range(8))}

    def choose(deadline: float, **options):
        policy = StagePoolPolicy(Cluster(1, 8), COST, **options)
        return policy._choose(_Flight(replace(r, deadline=deadline), stage=d), 0.0, 1.0, free)

    c = choose(time[w0] + fast + 1e-6)
    assert c.on_time and w0 not in c.widths and set(wide) <= set(c.widths) and c.rest == narrow
    assert w0 in choose(time[w0] + fast + 1e-6, narrow_rest=False).widths
    tight = choose(time[ws[-1]] + fast + 1e-6)  # on time only if the decode runs at its fastest
    assert tight.on_time and tight.rest == fast


def test_a_request_on_time_at_the_median_is_not_given_up_as_late():
    # the slack (90% confidence of the measured error) makes a width "on time" only with margin;
    # a request that misses with that margin at every width but meets its deadline at the
    # median prediction still has a better-than-even chance: it keeps on-time order, at the
    # widths that make it, rather than wait as late work for its efficient width
    from trident_rs.policy.stage_pool import _Flight

    r = Request("x", "flux", Shape(2048, 2048), 28, 0.0, 0.0)
    d = STAGES.index("diffuse")
    free = {0: set(range(8))}

    def choose(**options):
        policy = StagePoolPolicy(Cluster(1, 8), COST, **options)
        for ratio in [0.8, 1.25] * 10:  # a measured error: median 1, slack well above it
            policy.error.add(ratio)
        slack, median = policy.error.factor(policy.z), policy.error.factor(0.0)
        ws, time, rest, narrow, _ = policy._class(r.model, d, r.shape, r.steps)
        fastest = min(ws, key=lambda w: time[w])
        deadline = median * (time[fastest] + rest) * 1.01  # on time at the median, at its fastest only
        assert slack * (time[fastest] + rest) > deadline and slack > 1.2 * median
        c = policy._choose(_Flight(replace(r, deadline=deadline), stage=d), 0.0, slack, free)
        return c, [w for w in ws if median * (time[w] + rest) <= deadline]

    c, at_median = choose()
    assert c.on_time and at_median and set(c.widths) == set(at_median)
    late, _ = choose(late_at_median=False)
    assert not late.on_time and len(late.widths) == 1  # late: waits for its widest efficient width


def test_a_request_narrowed_at_its_boundary_does_not_strand_gpus_a_waiting_task_cannot_take():
    # one node; R (81-frame CogVideoX) runs at width 8. W, the same shape, arrives at 215 s with
    # a deadline only width 8 meets; R's deadline is earlier, so R goes first at its boundaries,
    # and with 5 steps left its narrowest on-time width is small. Without `fill` R narrows to
    # width 1 for its last steps, 7 GPUs stand idle (W needs all 8) and W misses; with it R
    # runs on them at width 8 and W starts as soon as R is done, on time. The same with a
    # `fill_delay` no chunk meets (a tighter class of requests could be arriving).
    cluster, big = Cluster(1, 8), Shape(768, 1360, 81)
    reqs = [Request("R", "cogvideox", big, 50, 0.0, 400.0), Request("W", "cogvideox", big, 50, 215.0, 615.0)]

    def run(**options):
        res = simulate(cluster, StagePoolPolicy(cluster, COST, **options), COST, reqs, SimConfig.ideal())
        tail = [rec.width for rec in res.timeline["R"] if rec.stages == ("diffuse",) and rec.start > 220]
        return {r.id: res.finish[r.id] <= r.deadline for r in reqs}, tail

    made, tail = run()
    assert made == {"R": True, "W": True} and tail and set(tail) == {8}
    for options in ({"fill": False}, {"fill_delay": 1e-3}):
        made, tail = run(**options)
        assert made == {"R": True, "W": False} and min(tail) == 1
    with pytest.raises(ConfigError, match="fill_delay"):
        StagePoolPolicy(cluster, COST, fill_delay=-1)
