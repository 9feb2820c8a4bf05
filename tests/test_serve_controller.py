"""The serve Controller deployment's class in-process (no Ray): request states, restarts, and
a policy that fails or times out never taking the controller down (issue 8, item 4); the lean
request path, the replica registry and grants naming replicas (issue 21)."""
import asyncio

import pytest

from trident_rs.errors import UnknownRequestError
from controller_fakes import published  # noqa: F401 - the fixture

from trident_rs.serve import controller as mod
from trident_rs.vocab import Shape

CFG = {"models": ["sd3"], "faults": {"controller_timeout_s": 0.2}, "executor": "emulated", "time_scale": 0.001,
       "cluster": {"nodes": 1, "gpus_per_node": 8},
       "deployments": [{"stage": s, "width": 1, "replicas": 1} for s in ("encode", "diffuse", "decode")],
       "policy": {"name": "greedy", "options": {"replan": False}}}


def _run(coro):
    return asyncio.run(coro)


def test_a_request_moves_through_its_states_and_ends_once(published):
    async def go():
        ctl = mod.Controller(CFG)  # one replica per stage
        out = await ctl.submit("r", "sd3", Shape(512, 512), 4)
        assert out["counts"] == {"encode-w1": 1, "diffuse-w1": 1, "decode-w1": 1}
        grant = out["grant"]  # the first stage's grant comes with the answer to submit
        assert grant.stage == "encode" and grant.deployment == "encode-w1" and grant.batch == 1
        s = await ctl.submit("s", "sd3", Shape(512, 512), 4)  # waits briefly (the encode replica is busy): no grant
        assert s["grant"] is None
        state = lambda rid: ctl.progress[rid]["state"]  # noqa: E731
        assert (state("r"), state("s")) == ("encoding", "queued")  # s waits for the encode replica
        seen = []
        for stage in ("diffuse", "decode"):  # each acquire reports the previous stage done
            grant = await ctl.acquire("r", stage, grant)
            seen.append(state("r"))
        assert seen == ["diffusing", "decoding"]
        assert state("s") == "encoding"  # launched when r left the encode replica
        await ctl.finish("r", "done", grant)  # the last stage's grant rides on finish
        st = await ctl.request_status("r")
        assert st["state"] == "done" and st["stages_done"] == ["encode", "diffuse", "decode"]
        await ctl.finish("r", "done")  # a second report changes nothing
        assert ctl.stats["completed"] == 1
    _run(go())


def test_cancelled_and_timed_out_requests_free_their_gpus_and_are_counted(published):
    async def go():
        ctl = mod.Controller(CFG)
        grants = [(await ctl.submit(rid, "sd3", Shape(512, 512), 4))["grant"] for rid in ("c", "t")]
        assert grants[0].stage == "encode" and grants[1] is None  # c holds the encode replica
        await ctl.finish("c", "cancelled")
        await ctl.finish("t", "timed_out")  # never started
        assert ctl.inflight == {} and ctl.active == {}
        assert ctl.stats["cancelled"] == 1 and ctl.stats["timed_out"] == 1 and ctl.stats["completed"] == 0
        text = await ctl.metrics_text()
        assert 'trident_requests_total{outcome="cancelled"} 1.0' in text
        assert 'trident_requests_total{outcome="timed_out"} 1.0' in text
        with pytest.raises(ValueError):
            await ctl.finish("x", "exploded")  # not a final state
    _run(go())


def test_acquire_for_an_unknown_request_fails_fast_instead_of_waiting(published):
    async def go():
        ctl = mod.Controller(CFG)
        with pytest.raises(UnknownRequestError):
            await asyncio.wait_for(ctl.acquire("never-submitted", "encode"), 1.0)
    _run(go())


def test_a_submit_arriving_after_the_ingress_gave_up_is_ignored(published):
    async def go():
        ctl = mod.Controller(CFG)
        await ctl.finish("late", "failed")  # the ingress timed out on submit and said so
        out = await ctl.submit("late", "sd3", Shape(512, 512), 4)
        assert out["ignored"] and ctl.policy.pending() == 0 and ctl.active == {}
    _run(go())


def test_a_restarted_controller_keeps_the_published_counts(published):
    published.update({"encode-w1": 1, "diffuse-w1": 3, "decode-w1": 1})
    trident = {**CFG, "policy": {"name": "trident", "options": {"models": []}}}  # no prior: first plan empty
    ctl = mod.Controller(trident)
    assert ctl.counts == {"encode-w1": 1, "diffuse-w1": 3, "decode-w1": 1}
    assert published["diffuse-w1"] == 3 and "restarted" in ctl.replans[-1]["reason"]


def test_trident_gets_the_served_models_as_its_prior_and_plans_before_any_request(published):
    ctl = mod.Controller({**CFG, "policy": {"name": "trident"}})
    assert ctl.plan.groups and sum(published.values()) >= 3
    assert {g.stages[0] for g in ctl.plan.groups} == {"encode", "diffuse", "decode"}


def test_a_policy_that_raises_is_logged_and_the_controller_keeps_serving(published, monkeypatch):
    async def go():
        ctl = mod.Controller(CFG)
        real = ctl.policy.schedule
        monkeypatch.setattr(ctl.policy, "schedule", lambda state: 1 / 0)
        await ctl.submit("p", "sd3", Shape(512, 512), 4)  # does not raise
        assert "trident_policy_errors_total 1.0" in await ctl.metrics_text()
        monkeypatch.setattr(ctl.policy, "schedule", real)  # the next event schedules it
        grant = await asyncio.wait_for(ctl.acquire("p", "encode"), 2.0)
        assert grant.deployment == "encode-w1"
    _run(go())


def test_a_solver_without_a_solution_in_time_falls_back_to_the_greedy_plan(published, monkeypatch):
    from trident_rs.policy import solver

    monkeypatch.setattr(solver.PlacementSolver, "_solve_counts",
                        lambda *a, **k: (None, {}, {"status": "UNKNOWN", "fallback": False}))
    cfg = {**CFG, "policy": {"name": "trident", "options": {"workload": "flux-paper"}}}
    ctl = mod.Controller(cfg)
    assert ctl.plan.groups and ctl.plan.stats["fallback"]
    assert "greedy plan" in ctl.replans[-1]["reason"]
    assert sum(published.values()) >= 3 and all(published[d] >= 1 for d in published)


def test_grants_name_the_registered_replica_and_groups_wait_for_one(published):
    async def go():
        ctl = mod.Controller(CFG)
        await ctl.register("rep-e", "encode-w1", "node-a", ["0"])
        out = await ctl.submit("r", "sd3", Shape(512, 512), 4)
        assert out["grant"].replica_id == "rep-e"
        # no diffuse replica registered yet: its group is not ready, the request waits
        waiting = asyncio.ensure_future(ctl.acquire("r", "diffuse", out["grant"]))
        await asyncio.sleep(0.05)
        assert not waiting.done() and ctl.broker.waiters
        await ctl.register("rep-d", "diffuse-w1", "node-b", ["1"])
        grant = await asyncio.wait_for(waiting, 1.0)
        assert grant.replica_id == "rep-d" and grant.deployment == "diffuse-w1"
        st = await ctl.status()
        assert {r["replica_id"] for r in st["replicas"]["replicas"]} == {"rep-e", "rep-d"}
        assert {g["replica"] for g in st["plan"]} >= {"rep-e", "rep-d"}
        # the granted replica is gone: the same launch moves to another replica of its deployment
        await ctl.register("rep-d2", "diffuse-w1", "node-b", ["2"])
        await ctl.deregister("rep-d")
        again = await asyncio.wait_for(ctl.regrant(grant), 1.0)
        assert again.replica_id == "rep-d2" and again.batch_id == grant.batch_id
        await ctl.register("rep-d", "diffuse-w1", "node-b", ["1"])  # a late heartbeat does not revive it
        assert "rep-d" not in ctl.broker.registry.replicas
    _run(go())


def test_a_missed_heartbeat_drops_the_replica_and_a_restart_rebuilds_the_registry(published):
    async def go():
        ctl = mod.Controller(CFG)
        await ctl.register("rep-e", "encode-w1", "node-a")
        reg = ctl.broker.registry
        reg.replicas["rep-e"].last_seen -= 100
        assert reg.expire(mod.time.monotonic()) == ["rep-e"] and not reg.replicas
        fresh = mod.Controller(CFG)  # restarted: empty until the next heartbeats
        assert not fresh.broker.registry.enabled
        await fresh.register("rep-e2", "encode-w1", "node-a")
        assert fresh.broker.registry.enabled and "rep-e2" in fresh.broker.registry.replicas
    _run(go())


def test_default_slo_is_one_definition_for_admission_and_dispatch(published):
    from trident_rs.request import GenerationParams
    from trident_rs.serve.admission import Admission
    from trident_rs.serve.config import AppConfig

    ctl = mod.Controller(CFG)
    params = GenerationParams(model="sd3", prompt="x", height=512, width=512, steps=4).resolved()
    adm = Admission.from_config(AppConfig.parse(CFG))
    assert adm.slo(params) == pytest.approx(ctl._default_slo("sd3", params.shape, 4))


def test_a_reshape_on_two_nodes_publishes_what_fits_widest_first_and_waits_for_room(published):
    from trident_rs.policy.types import PlacementPlan, ReplicaGroup

    cfg = {**CFG, "cluster": {"nodes": 2, "gpus_per_node": 8},
           "deployments": [{"stage": "encode"}, {"stage": "decode"},
                           *({"stage": "diffuse", "width": w, "replicas": int(w == 1)} for w in (1, 4, 8))]}
    ctl = mod.Controller(cfg)
    b, reg = ctl.broker, ctl.broker.registry
    b.ray_nodes = lambda: {"A": 8.0, "B": 8.0}
    b.evict = lambda replicas: None
    for i, d in enumerate(("encode-w1", "decode-w1", "diffuse-w1")):
        reg.register(f"r{i}", d, "A", (), mod.time.monotonic())
    reg.register("r3", "diffuse-w1", "B", (), mod.time.monotonic())  # a w1 replica sits on B
    b.counts["diffuse-w1"] = 2
    b.roll()
    g = lambda gid, stage, w, node, first: ReplicaGroup(gid, "sd3", (stage,), w, node,  # noqa: E731
                                                        tuple(range(first, first + w)))
    plan = PlacementPlan((g("e", "encode", 1, 0, 0), g("d", "decode", 1, 0, 1), g("x", "diffuse", 1, 0, 2),
                          g("w4", "diffuse", 4, 0, 4), g("w8", "diffuse", 8, 1, 0)))
    b.publish(plan, "test")  # diffuse-w1 2 -> 1 at once; w8 does not fit while r3 holds a GPU of B, and
    # w4 waits for it (Ray could put w4 on B)
    assert (published["diffuse-w1"], published["diffuse-w8"], published["diffuse-w4"]) == (1, 0, 0)
    reg.deregister("r3")  # Serve stopped the w1 replica on B: B is whole again
    b.roll()
    assert published["diffuse-w8"] == 1 and published["diffuse-w4"] == 0  # w4 once w8 runs
    reg.register("w8a", "diffuse-w8", "B", (), mod.time.monotonic())
    b.roll()
    assert b.published == b.counts


def test_a_wide_replica_that_fits_nowhere_gets_room_from_idle_narrow_ones(published):
    cfg = {**CFG, "cluster": {"nodes": 2, "gpus_per_node": 8},
           "deployments": [{"stage": "encode"}, {"stage": "decode"},
                           *({"stage": "diffuse", "width": w, "replicas": int(w == 1)} for w in (1, 8))]}
    ctl = mod.Controller(cfg)
    stopped = []
    b, reg = ctl.broker, ctl.broker.registry
    b.evict, b.ray_nodes = stopped.extend, lambda: {"A": 8.0, "B": 8.0}
    now = mod.time.monotonic()
    for r, d, n in (("e", "encode-w1", "A"), ("x", "diffuse-w1", "A"), ("d", "decode-w1", "B")):
        reg.register(r, d, n, (), now)
    assert b.defrag("diffuse-w8") == [("decode-w1", "d")] == stopped  # B had 7 free: move one
    assert "d" not in reg.replicas and b.defrags[-1]["for"] == "diffuse-w8"
    b.ray_nodes = lambda: {"A": 8.0, "B": 8.0, "C": 8.0}
    assert b.defrag("diffuse-w8") == []  # an empty node: it fits, Ray is still placing it


def test_a_request_cancelled_mid_diffuse_stays_cancelled_when_the_policy_launches_its_next_stage(published):
    """The policy has no cancel: it sees the diffuse launch end and launches the decode, which the
    broker voids at once (no GPU is held); the request log must not show it decoding again."""
    async def go():
        ctl = mod.Controller(CFG)
        grant = (await ctl.submit("c", "sd3", Shape(512, 512), 4))["grant"]
        grant = await ctl.acquire("c", "diffuse", grant)
        assert ctl.progress["c"]["state"] == "diffusing"
        await ctl.finish("c", "cancelled")
        ctl.broker.schedule()
        st = await ctl.request_status("c")
        assert st["state"] == "cancelled" and st["stage"] is None, st
        assert ctl.inflight == {} and ctl.broker.granted == {}
    _run(go())


def test_after_a_partition_each_request_is_counted_once_with_its_real_state(published):
    """Issue 20: a submit that reached the controller late (the ingress had gone on the last plan)
    is ended by the request's real finish; a request the controller never saw is counted once as
    done on the last plan; a finish repeated is not counted again."""
    async def go():
        ctl = mod.Controller(CFG)
        await ctl.submit("late", "sd3", Shape(512, 512), 4)  # arrived after the ingress gave up on it
        await ctl.finish("late", "done")  # its real end, reported once the request is done
        await ctl.finish("never-seen", "done")
        await ctl.finish("never-seen", "done")  # a repeat: nothing more to count
        late = await ctl.submit("never-seen", "sd3", Shape(512, 512), 4)  # its submit, later still
        assert late["ignored"] and late["grant"] is None
        st = ctl.stats
        assert st["submitted"] == 1 and st["completed"] == 1 and st.get("failed", 0) == 0
        assert st["done_on_last_plan"] == 1
        assert ctl.active == {}

    _run(go())


def test_a_request_done_on_the_last_plan_leaves_no_gpus_held_by_its_later_stages(published):
    """Issue 20, found by the partition test: the ingress gave up on the controller after the
    encode (its acquire cancelled) and finished the request on the last plan. The policy still
    launches that request's diffuse and decode; nobody collects those grants, so they must be
    voided, or they hold the replicas forever and every later acquire waits."""
    async def go():
        ctl = mod.Controller(CFG)  # one replica per stage
        grant = (await ctl.submit("p", "sd3", Shape(512, 512), 4))["grant"]
        waiting = asyncio.ensure_future(ctl.acquire("p", "diffuse", grant))
        await asyncio.sleep(0)
        waiting.cancel()  # the partition: the ingress stopped waiting for the controller
        await asyncio.gather(waiting, return_exceptions=True)
        await ctl.finish("p", "done")  # done on the last plan: no last grant comes with it
        for _ in range(3):
            ctl.broker.schedule()
        assert ctl.inflight == {} and ctl.broker.granted == {}, (ctl.inflight, ctl.broker.granted)
        nxt = await ctl.submit("q", "sd3", Shape(512, 512), 4)  # the replicas are free for the next
        grant = nxt["grant"]
        for stage in ("diffuse", "decode"):
            grant = await asyncio.wait_for(ctl.acquire("q", stage, grant), 5)
        await ctl.finish("q", "done", grant)
        assert ctl.stats["completed"] == 2
    _run(go())
