"""Step-level elasticity on the Serve runtime, without Ray (issue 17).

- the controller with a shared-pool policy: fixed slot replicas, chunk grants naming the replica
  of the launch's width and its GPU ids, a width change between chunks, pauses, progress (step i
  of n, width, paused), cancellation freeing the GPUs at the boundary;
- `trident` `placement: pool, elastic: true` in the controller: chunked diffuse, never two
  launches on one GPU;
- the ingress's chunk loop with fake stages: each chunk starts from the last boundary's ref, a
  replica death re-runs only the running chunk, a cancel stops at the next boundary.
"""
import asyncio

import pytest

from trident_rs.errors import ConfigError
from trident_rs.policy.scripted import ChunkScriptPolicy
from trident_rs.policy.types import Cluster, ClusterState, Request
from controller_fakes import published  # noqa: F401 - the fixture

from trident_rs.serve import controller as mod
from trident_rs.serve.config import AppConfig
from trident_rs.serve.grant import Grant
from trident_rs.vocab import Shape

DEPLOYMENTS = [{"stage": "encode", "width": 1, "replicas": 1}, {"stage": "diffuse", "width": 1, "replicas": 2},
               {"stage": "diffuse", "width": 2, "replicas": 1}, {"stage": "decode", "width": 1, "replicas": 1}]
SCRIPT = {"models": ["sd3"], "executor": "emulated", "time_scale": 0.001, "faults": {"controller_timeout_s": 0.2},
          "cluster": {"nodes": 1, "gpus_per_node": 2}, "deployments": DEPLOYMENTS,
          "policy": {"name": "chunk-script", "options": {"chunks": [[1, 1], [2, 2], [1, 1]]}}}
POOL = {**SCRIPT, "cluster": {"nodes": 1, "gpus_per_node": 8}, "time_scale": 0.01,
        "deployments": [{"stage": "encode", "width": 1, "replicas": 1}, {"stage": "decode", "width": 1, "replicas": 1}]
        + [{"stage": "diffuse", "width": w, "replicas": 1} for w in (1, 2, 4, 8)],
        "policy": {"name": "trident", "options": {"placement": "pool", "elastic": True, "boundary_s": 0.001}}}


async def _register(ctl, cfg) -> None:
    for d in cfg["deployments"]:
        name = f"{d['stage']}-w{d['width']}"
        for i in range(d["replicas"]):
            await ctl.register(f"{name}#{i}", name, "node-a")


async def _first_chunk(rid: str) -> tuple:
    """A controller on SCRIPT with its replicas registered, and `rid`'s first diffuse chunk grant."""
    ctl = mod.Controller(SCRIPT)
    await _register(ctl, SCRIPT)
    grant = (await ctl.submit(rid, "sd3", Shape(512, 512), 4))["grant"]
    return ctl, await ctl.acquire(rid, "diffuse", grant)


def test_pool_config_reserves_no_gpus_and_may_deploy_more_slots_than_gpus():
    cfg = AppConfig.parse(SCRIPT)  # 5 replicas of 6 GPU-widths on 2 GPUs: slots, not reservations
    assert cfg.pool and not any(cfg.reserves_gpus(d) for d in cfg.deployments)
    with pytest.raises(ConfigError, match="initial replicas need"):  # groups: replicas are GPUs
        AppConfig.parse({**SCRIPT, "policy": {"name": "trident", "options": {"placement": "groups"}}})


def test_chunk_grants_change_width_pause_and_report_progress(published):
    async def go():
        ctl = mod.Controller({**SCRIPT, "policy": {"name": "chunk-script", "options": {
            "chunks": [[1, 1], [2, 2], [1, 1]], "pause_before": 2, "pause_s": 0.3}}})
        assert published == {"encode-w1": 1, "diffuse-w1": 2, "diffuse-w2": 1, "decode-w1": 1}
        await _register(ctl, SCRIPT)
        grant = (await ctl.submit("r", "sd3", Shape(512, 512), 4))["grant"]
        assert grant.stage == "encode" and grant.replica_id == "encode-w1#0" and grant.steps is None
        seen = []
        grant = await ctl.acquire("r", "diffuse", grant)
        while True:
            prog = await ctl.request_status("r")
            seen.append((grant.steps, grant.deployment, grant.width, grant.gpus, prog["step"], prog["width"]))
            assert grant.replica_id.startswith(grant.deployment) and len(grant.gpus) == grant.width
            if grant.steps[1] == 4:
                break
            nxt = asyncio.ensure_future(ctl.acquire("r", "diffuse", grant))
            await asyncio.sleep(0.05)
            prog = await ctl.request_status("r")
            if grant.steps == (1, 3):  # paused at this boundary for 0.3 s (no chunk granted)
                assert not nxt.done() and prog["paused"] and prog["state"] == "queued" and prog["step"] == 3
                assert ctl.inflight == {}  # its GPUs are free while it is paused
            ctl.broker.schedule()  # the controller's tick
            await asyncio.sleep(0.3)
            ctl.broker.schedule()
            grant = await asyncio.wait_for(nxt, 2.0)
        assert [s[:3] for s in seen] == [((0, 1), "diffuse-w1", 1), ((1, 3), "diffuse-w2", 2), ((3, 4), "diffuse-w1", 1)]
        assert [s[4] for s in seen] == [0, 1, 3] and [s[5] for s in seen] == [1, 2, 1]
        assert seen[1][3] == (0, 1)  # the w2 chunk holds both GPUs
        grant = await ctl.acquire("r", "decode", grant)
        prog = await ctl.request_status("r")
        assert prog["step"] == 4 and prog["progress"] == 1.0 and not prog["paused"] and prog["chunks"] == 3
        await ctl.finish("r", "done", grant)
        assert ctl.inflight == {} and ctl.stats["completed"] == 1
    asyncio.run(go())


def test_a_request_cancelled_at_a_boundary_frees_its_gpus_and_is_never_granted_again(published):
    async def go():
        ctl, grant = await _first_chunk("c")
        assert grant.steps == (0, 1)
        await ctl.finish("c", "cancelled", grant)  # the ingress stops at the chunk's end
        assert ctl.inflight == {} and ctl.broker.granted == {}
        out = await ctl.submit("n", "sd3", Shape(512, 512), 4)  # the GPUs went to the next request
        assert out["grant"] is not None and out["grant"].stage == "encode"
        st = await ctl.request_status("c")
        assert st["state"] == "cancelled" and st["step"] == 1
    asyncio.run(go())


def test_a_pool_grant_whose_replica_is_gone_moves_to_another_of_its_width(published):
    async def go():
        ctl, grant = await _first_chunk("r")
        assert grant.deployment == "diffuse-w1"
        await ctl.deregister(grant.replica_id)
        again = await asyncio.wait_for(ctl.regrant(grant), 1.0)
        assert again.replica_id != grant.replica_id and again.deployment == "diffuse-w1"
        assert again.steps == grant.steps and again.batch_id == grant.batch_id
    asyncio.run(go())


def test_trident_pool_elastic_runs_in_chunks_and_never_shares_a_gpu(published):
    async def go():
        ctl = mod.Controller(POOL)
        assert ctl.policy.elastic and ctl.policy.widths["diffuse"] == frozenset({1, 2, 4, 8})
        await _register(ctl, POOL)
        rids = [f"r{i}" for i in range(6)]
        chunks: dict[str, list] = {r: [] for r in rids}

        async def one(rid: str) -> None:
            grant = (await ctl.submit(rid, "flux", Shape(1024, 1024), 28))["grant"]
            for stage in ("encode", "diffuse", "decode"):
                if grant is None or grant.stage != stage:
                    grant = await ctl.acquire(rid, stage, grant)
                while True:
                    held = [(l.node, g) for l, _ in ctl.inflight.values() for g in l.gpus]
                    assert len(held) == len(set(held)) <= 8  # the pool never over-allocates
                    await asyncio.sleep(0.001)
                    if stage != "diffuse":
                        break
                    chunks[rid].append((grant.steps, grant.width))
                    if grant.steps is None or grant.steps[1] >= 28:
                        break
                    grant = await ctl.acquire(rid, "diffuse", grant)
            await ctl.finish(rid, "done", grant)

        ctl.cfg.models.append("flux")
        await asyncio.wait_for(asyncio.gather(*(one(r) for r in rids)), 30)
        assert ctl.stats["completed"] == 6 and ctl.inflight == {}
        assert any(len(c) > 1 for c in chunks.values()), chunks  # diffuse ran in chunks
        for c in chunks.values():  # contiguous chunks covering all 28 steps
            assert c[0][0][0] == 0 and c[-1][0][1] == 28
            assert all(a[0][1] == b[0][0] for a, b in zip(c, c[1:]))
    asyncio.run(go())


def test_chunk_script_policy_walks_its_script():
    p = ChunkScriptPolicy(Cluster(1, 2), chunks=[[1, 1], [2, 2]])
    p.add_request(Request("r", "sd3", Shape(64, 64), 5, 0.0, 10.0), 0.0)
    state = ClusterState(0.0, {0: frozenset({0, 1})})
    launches = []
    while True:
        out = p.schedule(state)
        if not out.launches:
            break
        (launch,) = out.launches
        launches.append((launch.stages[0], launch.width, launch.steps))
        p.on_launch_done(launch, 0.0)
    assert launches == [("encode", 1, None), ("diffuse", 1, (0, 1)), ("diffuse", 2, (1, 3)), ("diffuse", 2, (3, 5)),
                        ("decode", 1, None)]
    with pytest.raises(ConfigError):
        ChunkScriptPolicy(Cluster(1, 2), chunks=[[1, 4]])


# -- the ingress's chunk loop, with fakes ------------------------------------------------------------

class ChunkController:
    """The fake controller granting diffuse as `chunks` of (steps, width)."""

    def __init__(self, base, chunks):
        self.base, self.chunks = base, chunks
        self.next: dict[str, int] = {}

    def grant(self, rid, stage, done):
        if stage != "diffuse":
            return Grant(rid, stage, f"{stage}-w1", 1, batch_id=0)
        a = done.steps[1] if done is not None and done.stage == "diffuse" else 0
        n, w = self.chunks[min(self.next.get(rid, 0), len(self.chunks) - 1)]
        self.next[rid] = self.next.get(rid, 0) + 1
        return Grant(rid, "diffuse", "diffuse-w1", w, batch_id=1, steps=(a, a + n))


def _chunked_ingress(chunks, stage_s=0.0, gate=None):
    """The in-process ingress (fakes) whose controller grants diffuse as `chunks`; returns
    (ingress, fake controller, fake diffuse stage)."""
    from tests.ingress_fakes import _Method, make_ingress

    _, inst = make_ingress({"models": ["tiny-sd3"]}, stage_s=stage_s, gate=gate)
    fake = inst.link.handle.handle  # under OwnCalls
    ctl = ChunkController(fake, chunks)
    orig = fake._acquire

    async def acquire(rid, stage, done=None):
        await orig(rid, stage, done)
        return ctl.grant(rid, stage, done)
    fake.acquire = _Method(fake._failing("acquire", acquire), eager=True)
    return inst, fake, inst.stages["diffuse-w1"].handle


def test_the_ingress_runs_diffuse_chunk_by_chunk_from_the_last_boundary():
    from ray.exceptions import ActorDiedError

    from tests.ingress_fakes import unpatch
    from trident_rs.request import GenerationParams

    inst, fake, diffuse = _chunked_ingress([(1, 1), (2, 2), (1, 1)])
    try:
        real_run, calls = diffuse._run, []

        async def run(prev, grant):  # the 2nd call: the replica dies mid-chunk
            calls.append(await prev)  # what each call started from
            diffuse.deaths = [ActorDiedError()] if len(calls) == 2 else []
            return await real_run(prev, grant)
        diffuse.run.fn = run
        params = GenerationParams(model="tiny-sd3", prompt="p", steps=4).resolved()
        out = asyncio.run(inst.generate(params, "r"))
    finally:
        unpatch()
    steps = [g.steps for g in diffuse.grants]
    assert steps == [(0, 1), (1, 3), (1, 3), (3, 4)]  # only the chunk that died ran twice
    assert [g.width for g in diffuse.grants] == [1, 2, 2, 1]
    assert out.meta["retries"] == 1
    assert calls[1] is calls[2]  # the re-run started from the same boundary (the ref the ingress kept)
    # every boundary went back to the controller: acquire of the next chunk carried the last one
    assert fake.done == [("r", "encode"), ("r", "diffuse"), ("r", "diffuse"), ("r", "diffuse"), ("r", "decode")]


def test_a_cancel_stops_the_request_at_the_next_boundary():
    from tests.ingress_fakes import settle, unpatch
    from trident_rs.request import GenerationParams
    from trident_rs.serve.cancellation import RequestCancelled

    gate = asyncio.Event()

    async def go(inst, diffuse):
        params = GenerationParams(model="tiny-sd3", prompt="p", steps=4).resolved()
        task = asyncio.ensure_future(inst.generate(params, "c"))
        while not diffuse.grants:
            await asyncio.sleep(0.01)
        assert inst.inflight.cancel("c") == ["c"]
        await asyncio.sleep(0.05)
        assert not task.done()  # the running chunk is not interrupted
        gate.set()
        with pytest.raises(RequestCancelled):
            await task
        await settle()

    inst, fake, diffuse = _chunked_ingress([(1, 1)], gate=gate)
    try:
        asyncio.run(go(inst, diffuse))
    finally:
        unpatch()
    assert [g.steps for g in diffuse.grants] == [(0, 1)]  # no chunk after the boundary
    assert fake.finished == [("c", "cancelled")]
    assert ("c", "diffuse") in fake.done  # the chunk's grant rode on finish: its GPUs are freed


def test_a_replica_runs_the_grants_steps_or_the_steps_left_of_a_chunk_state():
    import numpy as np

    from trident_rs.executors.base import StagePayload
    from trident_rs.models.chunking import STEP
    from trident_rs.request import GenerationParams
    from trident_rs.serve.stage_deployment import with_step_range

    p = StagePayload(GenerationParams(model="sd3", prompt="p", steps=8).resolved())
    assert with_step_range(p, None).step_range is None  # no chunk: all the steps
    assert with_step_range(p, (0, 3)).step_range == (0, 3)  # the grant's chunk
    at3 = StagePayload(p.params, {STEP: np.asarray(3, np.int64)})
    assert with_step_range(at3, None).step_range == (3, 8)  # granted on the last plan: the rest
    assert with_step_range(at3, (3, 5)).step_range == (3, 5)


def test_a_streamed_request_collects_each_chunks_partial_images():
    """Partial images are made on whichever replica runs the chunk at the preview's step: the
    ingress collects them from each chunk's replica (the fake makes n per call)."""
    from tests.ingress_fakes import unpatch
    from trident_rs.request import GenerationParams

    inst, fake, diffuse = _chunked_ingress([(1, 1), (2, 2), (1, 1)])

    async def go():
        queue: asyncio.Queue = asyncio.Queue()
        inst.runner.preview_sinks["s"] = (2, queue)
        params = GenerationParams(model="tiny-sd3", prompt="p", steps=4).resolved()
        await inst.generate(params, "s")
        return [queue.get_nowait()[0] for _ in range(queue.qsize())]
    try:
        got = asyncio.run(go())
    finally:
        unpatch()
    assert [g.steps for g in diffuse.grants] == [(0, 1), (1, 3), (3, 4)]
    assert got == [0, 1] * 3 and not any(diffuse.mailbox.values())  # all collected, nothing left
