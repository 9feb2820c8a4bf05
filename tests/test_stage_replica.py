"""The stage replica's side of a grant, in-process (no Ray): a call granted to another replica is
refused, and a batched launch runs as one executor batch as soon as all its members are here
(issue 21)."""
import asyncio

import pytest

from trident_rs.executors.base import StagePayload
from trident_rs.request import GenerationParams
from trident_rs.serve.grant import Grant, WrongReplicaError
from trident_rs.serve.stage_deployment import StageReplica

CFG = {"models": ["sd3"], "executor": "emulated", "time_scale": 1e-6, "cluster": {"nodes": 1, "gpus_per_node": 8}}


def _payload(seed: int) -> StagePayload:
    return StagePayload(GenerationParams(model="sd3", prompt="x", height=256, width=256, steps=2, seed=seed).resolved())


def test_a_launch_of_three_runs_as_one_batch_on_the_granted_replica_and_others_are_refused():
    async def go():
        rep = StageReplica(CFG, "encode", 1)
        rep.replica_id = "me"
        grants = [Grant(f"r{i}", "encode", "encode-w1", 1, batch_id=7, batch=3, replica_id="me") for i in range(3)]
        outs = await asyncio.wait_for(asyncio.gather(*(rep.run(_payload(i), g) for i, g in enumerate(grants))), 2.0)
        assert [o.meta["encode_batch"] for o in outs] == [3, 3, 3]
        one = await rep.run(_payload(9), Grant("s", "encode", "encode-w1", 1, batch_id=8, replica_id="me"))
        assert one.meta["encode_batch"] == 1
        with pytest.raises(WrongReplicaError):
            await rep.run(_payload(1), Grant("t", "encode", "encode-w1", 1, batch_id=9, replica_id="other"))
        # a member that never comes (cancelled): the others run after the gather window
        lone = Grant("u", "encode", "encode-w1", 1, batch_id=10, batch=2, replica_id="me")
        out = await asyncio.wait_for(rep.run(_payload(2), lone), 2.0)
        assert out.meta["encode_batch"] == 1
    asyncio.run(go())
