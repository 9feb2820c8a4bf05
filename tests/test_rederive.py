"""Re-deriving stage outputs lost with their node (issue 20), without Ray: `Lineage` driven by a
fake three-stage chain whose "object store" loses objects on demand."""
import asyncio

import pytest

from trident_rs.errors import StageFailedError
from trident_rs.serve.rederive import Lineage, is_object_lost

STAGES = ("encode", "diffuse", "decode")


class Lost(Exception):
    lost_object = True


class Store:
    """Refs are names; `lose(name)` drops an object as a dead node would."""

    def __init__(self):
        self.objects: dict[str, str] = {}
        self.runs: list[str] = []

    def put(self, name: str, value: str) -> str:
        self.objects[name] = value
        return name

    def lose(self, *names: str) -> None:
        for n in names:
            self.objects.pop(n, None)

    async def probe(self, ref) -> bool:
        return not isinstance(ref, str) or ref in self.objects


async def drive(store: Store, faults: dict, max_rederive: int = 4) -> tuple[str, Lineage]:
    """Run the chain; `faults[(stage, run)]` is called before that run of that stage reads its input."""
    chain = Lineage(STAGES, {"prompt": "p"}, max_rederive=max_rederive)
    count: dict[str, int] = {}
    i = 0
    out = None
    while i < len(STAGES):
        stage = STAGES[i]
        count[stage] = count.get(stage, 0) + 1
        store.runs.append(stage)
        try:
            hook = faults.get((stage, count[stage]))
            if hook:
                hook()
            inp = chain.input(i)
            if isinstance(inp, str) and inp not in store.objects:
                raise Lost(f"{inp} lost")
            out = store.put(f"{stage}#{count[stage]}", stage)
            if stage == "decode":
                out = {"frames": "ok"}
        except Exception as e:  # noqa: BLE001
            i = await chain.lost(i, e, store.probe)
            continue
        chain.done(i, out)
        i += 1
    return out, chain


def test_no_fault_runs_each_stage_once_and_keeps_two_outputs_at_most():
    store = Store()
    out, chain = asyncio.run(drive(store, {}))
    assert out == {"frames": "ok"} and store.runs == list(STAGES)
    assert chain.rederived_stages == 0
    assert chain.inputs[1] is None  # the embeddings were dropped once decode had read the latents


def test_latents_lost_before_decode_reads_them_rerun_diffuse_from_the_embeddings():
    store = Store()
    out, chain = asyncio.run(drive(store, {("decode", 1): lambda: store.lose("diffuse#1")}))
    assert out == {"frames": "ok"}
    assert store.runs == ["encode", "diffuse", "decode", "diffuse", "decode"]
    assert chain.rederived_stages == 1 and chain.events == 1


def test_embeddings_and_latents_lost_together_restart_from_the_request():
    store = Store()
    out, chain = asyncio.run(drive(store, {("decode", 1): lambda: store.lose("encode#1", "diffuse#1")}))
    assert out == {"frames": "ok"}
    assert store.runs == ["encode", "diffuse", "decode", "encode", "diffuse", "decode"]
    assert chain.rederived_stages == 2


def test_embeddings_lost_before_diffuse_reads_them_rerun_encode_from_the_request():
    store = Store()
    out, chain = asyncio.run(drive(store, {("diffuse", 1): lambda: store.lose("encode#1")}))
    assert store.runs == ["encode", "diffuse", "encode", "diffuse", "decode"]
    assert chain.rederived_stages == 1


def test_a_stage_whose_own_output_was_lost_is_run_again_from_its_input():
    store = Store()
    chain = Lineage(STAGES, {"prompt": "p"})
    store.put("encode#1", "e")
    chain.done(0, "encode#1")
    # diffuse finished, but its output vanished before the ingress read it: its input is fine
    j = asyncio.run(chain.lost(1, Lost("diffuse output lost"), store.probe))
    assert j == 1 and chain.rederived_stages == 1


def test_other_errors_are_not_rederived_and_the_budget_is_bounded():
    chain = Lineage(STAGES, {"prompt": "p"}, max_rederive=1)
    with pytest.raises(ValueError):
        asyncio.run(chain.lost(1, ValueError("the request's own"), Store().probe))
    store = Store()
    always = {("decode", k): (lambda: store.lose(*list(store.objects))) for k in range(1, 10)}
    with pytest.raises(StageFailedError):
        asyncio.run(drive(store, always, max_rederive=2))


def test_is_object_lost_sees_through_wrappers():
    ray_ex = pytest.importorskip("ray.exceptions")

    class Wrapped(Exception):
        def __init__(self, cause):
            self.cause = cause

    assert is_object_lost(ray_ex.ObjectLostError("ab" * 14, "owner", "call site"))
    assert is_object_lost(Wrapped(ray_ex.OwnerDiedError("ab" * 14, "owner", "call site")))
    assert not is_object_lost(Wrapped(ValueError("x")))
    assert not is_object_lost(ray_ex.RayActorError())
