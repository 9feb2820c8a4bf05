"""Re-running a stage whose replica died, from the previous stage's result (issue 8, item 4).

Each stage call returns a `DeploymentResponse`. The ingress turns it into the `ObjectRef` of the
stage's output and waits for it to be ready; that ref, owned by the ingress, is what the next
stage is called with, so the output stays in the object store, survives the death of the
replica that made it, and is where a retry of the *next* stage starts from. (Waiting reads the
output on the ingress's node: zero-copy for numpy on one node, one extra copy across nodes.)

A replica death surfaces as `RayActorError` (or `ActorDiedError` / `ActorUnavailableError`,
its subclasses), or as a `RayTaskError` caused by one (a width-k replica whose rank actor
died). Only those are retried: any other error is the request's own and is raised at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from trident_rs.errors import StageFailedError


def is_replica_failure(e: BaseException) -> bool:
    """Whether `e` means the replica (or one of its rank actors) died, not that the work failed."""
    if isinstance(e, RayActorError):
        return True
    return isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), RayActorError)


async def run_stage(call: Callable[[], Any], watch: Callable[[Awaitable], Awaitable], *, stage: str,
                    last: bool, retries: int, backoff_s: float,
                    on_retry: Callable[[int, BaseException], None] | None = None) -> tuple[Any, int]:
    """Run one stage, re-calling it on replica death; returns (output, retries used).

    `call()` issues the stage call (a `DeploymentResponse`), `watch(aw)` awaits with cancellation.
    The output is an `ObjectRef` for the next stage, or the payload itself for the `last` stage.
    After `retries` re-runs the stage fails with `StageFailedError` (HTTP 503).
    """
    attempt = 0
    while True:
        resp = call()
        try:
            if last:
                return await watch(resp), attempt
            ref = await watch(resp._to_object_ref())
            await watch(ref)  # raises the stage's error, if it had one
            return ref, attempt
        except Exception as e:  # noqa: BLE001 - sorted just below
            if not is_replica_failure(e):
                raise
            if attempt >= retries:
                raise StageFailedError(stage, attempt + 1, e) from e
            attempt += 1
            if on_retry is not None:
                on_retry(attempt, e)
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
