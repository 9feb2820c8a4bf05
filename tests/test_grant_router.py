"""The grant router inside Serve's own routing loop (no Ray cluster): a call whose granted replica
is not (yet) a candidate waits for it without starving the caller's event loop, then falls back
to the candidates. Serve retries an empty choice without sleeping unless the router asks for
back-off, which once froze a streamed request's ingress for tens of seconds (CI, 2026-12-02)."""
import asyncio
import time

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from trident_rs.serve.grant import Grant  # noqa: E402
from trident_rs.serve.routing import PIN_WAIT_S, GrantRouter  # noqa: E402

DEPLOYMENT = DeploymentID("diffuse-w1", "app")


class FakeReplica:
    def __init__(self, unique_id: str):
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.max_ongoing_requests = 8


def _router(*ids: str) -> GrantRouter:
    router = GrantRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    replicas = [FakeReplica(i) for i in ids]
    router._replicas = {r.replica_id: r for r in replicas}
    router._replicas_list = replicas
    return router


def _call(replica_id: str | None) -> PendingRequest:
    grant = Grant("r1", "diffuse", "diffuse-w1", 1, replica_id=replica_id)
    return PendingRequest(args=["payload", grant], kwargs={}, metadata=RequestMetadata("r1", "run"))


def _first_choice(router: GrantRouter, granted: str | None) -> tuple[list[str], float, int]:
    """Serve's retry loop for a call granted to `granted`, until it yields candidates:
    (their ids, seconds waited, event-loop ticks meanwhile)."""
    return asyncio.run(_choose(router, granted))


async def _choose(router: GrantRouter, granted: str | None) -> tuple[list[str], float, int]:
    call = _call(granted)  # its future needs the running loop
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.get_running_loop().create_task(tick())
    choices = router._choose_replicas_with_backoff(call)
    t0 = time.monotonic()
    try:
        got = await choices.__anext__()
    finally:
        await choices.aclose()
        ticker.cancel()
    return [r.replica_id.unique_id for r in got], time.monotonic() - t0, ticks


def test_a_granted_call_goes_to_its_replica_at_once():
    ids, waited, _ = _first_choice(_router("a", "b"), "b")
    assert ids == ["b"] and waited < 0.1


def test_a_call_waiting_for_its_replica_leaves_the_event_loop_free_then_falls_back():
    ids, waited, ticks = _first_choice(_router("a", "b"), "gone")
    assert sorted(ids) == ["a", "b"]  # the replica there refuses it; the ingress has it granted again
    assert PIN_WAIT_S <= waited < PIN_WAIT_S + 1.0
    assert ticks >= 0.5 * waited / 0.01, f"the loop ran {ticks} times in {waited:.2f} s: starved"


def test_an_ungranted_call_is_offered_every_replica():
    ids, waited, _ = _first_choice(_router("a", "b"), None)
    assert sorted(ids) == ["a", "b"] and waited < 0.1


def test_each_handle_call_of_one_request_is_a_request_of_its_own():
    """Two calls made while serving one request get distinct internal ids (Serve matches a routed
    replica to its call by that id), and the caller's own context is left as it was."""
    from ray.serve import context as serve_context

    from trident_rs.serve.own_calls import OwnCalls

    seen = []

    class Method:
        def remote(self, *args, **kwargs):
            ctx = serve_context._get_serve_request_context()
            seen.append((ctx.request_id, ctx._internal_request_id, args, kwargs))
            return "response"

    class Handle:
        run = Method()

    async def serve_one_request():
        serve_context._set_request_context(request_id="http-1", _internal_request_id="internal-1")
        handle = OwnCalls(Handle())
        assert handle.run.remote("payload", grant="g") == "response"
        handle.run.remote("payload")
        return serve_context._get_serve_request_context()._internal_request_id

    assert asyncio.run(serve_one_request()) == "internal-1"
    assert [s[0] for s in seen] == ["http-1", "http-1"]  # logs still name the HTTP request
    assert len({s[1] for s in seen} | {"internal-1"}) == 3
    assert seen[0][2:] == (("payload",), {"grant": "g"})
