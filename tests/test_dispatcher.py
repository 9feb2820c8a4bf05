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


def test_widest_efficient_width_that_meets_the_deadline():
    # width 2 is efficient for the big image (>= 0.8 of width 1's GPU-seconds), width 8 is not:
    # a roomy task takes width 2 (done sooner for little more GPU time), a tight one width 8
    d = Dispatcher(COST)  # on_time_width="efficient", the default
    groups = [group("diffuse", 1, 0, 0), group("diffuse", 2, 0, 2), group("diffuse", 8, 1, 0), group("decode", 1, 0, 1)]
    t = {w: COST.stage_time("img", "diffuse", BIG, w, 1, 28) for w in (1, 2, 8)}
    assert t[1] >= 0.8 * 2 * t[2] and t[1] < 0.8 * 8 * t[8]
    dec = COST.stage_time("img", "decode", BIG)
    d.add(req(0, BIG, t[1] + dec + 1), "diffuse")
    d.add(req(1, BIG, t[8] + dec + 1), "diffuse")
    launches = {l.request_ids[0]: l.width for l in d.dispatch(0.0, groups, free_all())}
    assert launches == {"r1": 8, "r0": 2}


def test_smallest_width_that_meets_the_deadline():
    d = Dispatcher(COST, on_time_width="narrowest")
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


# ---- the optimized fast path decides exactly as a straightforward one ---------------------------
import bisect  # noqa: E402
import random  # noqa: E402

from trident_rs.policy.dispatcher import StageTask  # noqa: E402
from trident_rs.policy.types import STAGES  # noqa: E402


class ReferenceDispatcher(Dispatcher):
    """The rules of the dispatcher, written plainly: one list per (model, stage) sorted by
    priority key, walked task by task, re-filtered after every call; batch companions are the
    same-class tasks after the current one in that list."""

    def __init__(self, cost, **kw):
        super().__init__(cost, **kw)
        self.queues: dict = {}

    def add(self, request, stage="encode"):
        task = StageTask(request, stage, next(self._seq), key=request.deadline)
        bisect.insort(self.queues.setdefault((request.model, stage), []), (task.sort_key(), task))
        self.unlaunched.add(request.id)
        self.requests[request.id] = request

    def _has_queued(self, qk):
        return bool(self.queues.get(qk))

    def ordered(self, qk):
        return [t for _, t in self.queues.get(qk, [])]

    def _dispatch_fast(self, now, qk, free, busy_end, all_widths):
        queue, (model, stage) = self.queues[qk], qk
        launches, taken, i = [], set(), 0
        while i < len(queue) and any(free.values()):
            task = queue[i][1]
            if task.seq in taken:
                i += 1
                continue
            r = task.request
            need = self.min_width(model, stage, r.shape)
            times = {w: self.time(model, stage, r.shape, w, r.steps) for w in all_widths[qk] if w >= need}
            rest = self.remaining_after(r, stage, all_widths)
            late_before = now + min(times.values(), default=float("inf")) + rest
            if not task.late and late_before > r.deadline:
                # it and every other on-time task of its class that is late too
                demoted = [e for e in queue[i:] if not e[1].late and e[1].request.deadline < late_before
                           and (e[1].request.shape, e[1].request.steps) == (r.shape, r.steps)]
                queue[:] = [e for e in queue if e not in demoted]
                for _, t in demoted:
                    self._mark_late(t)
                    bisect.insort(queue, (t.sort_key(), t))
                continue
            usable = sorted(w for w, gs in free.items() if gs and w >= need)
            if not usable:
                i += 1
                continue
            width = None
            if not task.late:
                fits = [w for w in usable if now + times[w] + rest <= r.deadline]
                w0 = min(times)
                eff = [w for w in fits if times[w0] * w0 >= 0.8 * times[w] * w]
                width = eff[-1] if eff else (fits[0] if fits else None)
                if width is None and any(end + times[w] + rest <= r.deadline
                                         for w, end in busy_end.items() if w in times):
                    i += 1
                    continue
            if width is None and self.late_width == "best":
                width = self._late_best(now, usable, times, busy_end)
                if width is not None and stage == "diffuse" and now < r.deadline:
                    ideal_w, ideal_t = self.ideal_diffuse(r)
                    if max(times) < ideal_w and times[width] > 1.5 * ideal_t:
                        width = None
                if width is None:
                    i += 1
                    continue
            if width is None:
                key = (lambda w: (times[w], w)) if self.late_width == "fastest" else (lambda w: (w * times[w], w))
                width = min(usable, key=key)
            batch = [task]
            size = self.best_batch(model, stage, r.shape, width, r.steps)
            t_batch = self.time(model, stage, r.shape, width, r.steps, size)
            if size > 1 and (task.late or now + t_batch + rest <= r.deadline):
                for _, o in queue[i + 1:]:
                    if len(batch) == size:
                        break
                    if (o.seq not in taken and (o.request.shape, o.request.steps) == (r.shape, r.steps)
                            and (o.late or now + t_batch + rest <= o.request.deadline)):
                        batch.append(o)
            taken.update(t.seq for t in batch)
            launches.append(self._launch(batch, stage, free[width].pop()))
            i += 1
        self.queues[qk] = [e for e in queue if e[1].seq not in taken]
        return launches


def _random_groups(rng):
    groups = []
    for model in ("img", "vid"):
        for stage in STAGES:
            widths = ([1] if stage == "encode" else rng.sample([1, 2, 4, 8], rng.randint(1, 4))
                      if stage == "diffuse" else [1, 2] if model == "vid" else [1])
            for w in widths:
                for k in range(rng.randint(1, 3)):
                    node = len(groups)
                    groups.append(ReplicaGroup(f"{model}:{stage}-w{w}@n{node}", model, (stage,), w, node,
                                               tuple(range(w))))
    return groups


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**9), st.sampled_from(["best", "efficient", "fastest"]), st.sampled_from([1, 4, 8]),
       st.sampled_from([None, 0.0, 5.0]))
def test_fast_path_decides_like_the_reference_on_random_queues(seed, late_width, max_batch, late_delay_s):
    """Random queues (several classes and stages, on-time, tight and hopeless deadlines), random
    plans (widths, several groups each), random free/busy groups and unready groups, over a run
    of calls with completions in between: both make the same launches, in the same order, and
    leave the same queues (order, keys, late flags)."""
    rng = random.Random(seed)
    kw = dict(late_width=late_width, max_batch=max_batch, late_delay_s=late_delay_s)
    fast, ref = Dispatcher(COST, **kw), ReferenceDispatcher(COST, **kw)
    groups = _random_groups(rng)
    now, n, running = 0.0, 0, []
    for step in range(12):
        for _ in range(rng.randint(0, 40)):
            model = rng.choice(["img", "vid"])
            shape = rng.choice(COST.shapes(model))
            steps = rng.choice([10, 28])
            slo = COST.stage_time(model, "diffuse", shape, 1, 1, steps) * rng.choice([0.05, 0.3, 1.0, 2.0, 4.0])
            arrival = now - rng.uniform(0, slo)
            r = Request(f"r{n}", model, shape, steps, arrival, arrival + slo)
            n += 1
            stage = rng.choice(STAGES)
            fast.add(r, stage)
            ref.add(r, stage)
        offered = [g for g in groups if rng.random() < 0.8]
        free_gpus = {g.node: frozenset(range(g.width)) for g in groups if rng.random() < 0.9}
        a, b = fast.dispatch(now, offered, free_gpus), ref.dispatch(now, offered, free_gpus)
        assert a == b, f"step {step}"
        for qk in set(fast._classes) | set(ref.queues):
            fa, rb = fast.ordered(qk), ref.ordered(qk)
            assert [(t.request.id, t.key, t.late) for t in fa] == [(t.request.id, t.key, t.late) for t in rb]
        running += a
        rng.shuffle(running)
        for launch in running[: rng.randint(0, len(running))]:
            assert fast.on_done(launch) == ref.on_done(launch)
            running.remove(launch)
        now += rng.uniform(0.0, 30.0)
