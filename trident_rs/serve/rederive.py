"""Re-deriving a stage output lost with its node (issue 20).

A stage's output stays in the object store of the node whose replica made it (the ingress owns
the ref; only small outputs are inlined into the ingress). When that node dies, the object can
go with it: the next stage (or the ingress waiting for it) gets `ObjectLostError` (or one of its
subclasses: `OwnerDiedError`, `ObjectReconstructionFailedError`, `ObjectFetchTimedOutError`...),
possibly wrapped in a `RayTaskError`. Ray cannot rebuild it from lineage (a Serve replica's
calls are not retried by Ray), so the ingress does: it keeps each stage's *input* until the stage
after it has run (encode's input is the request itself, diffuse's the embeddings ref, decode's
the latents ref), and when a stage fails on a lost object it finds the latest stage whose input
is still reachable and runs the chain again from there.

`Lineage` is that bookkeeping, with no Ray in it (the probe that says whether an input is still
reachable is passed in), so it is unit-tested with fakes; `ray_probe` is the probe for refs.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from trident_rs.errors import StageFailedError

PROBE_TIMEOUT_S = 10.0  # an input that cannot be read in this long counts as lost (re-deriving is always safe)


def _lost_types() -> tuple[type, ...]:
    try:
        from ray.exceptions import ObjectLostError
    except ImportError:  # pragma: no cover - policy-only installs
        return ()
    return (ObjectLostError,)


def is_object_lost(e: BaseException | None) -> bool:
    """Whether `e` (or the error it wraps: `RayTaskError.cause`, `__cause__`) is an object lost
    with its node, rather than a failure of the work or of a replica."""
    lost = _lost_types()
    seen = 0
    while e is not None and seen < 8:
        if lost and isinstance(e, lost):
            return True
        if getattr(e, "lost_object", False):  # fakes in tests
            return True
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return False


class Lineage:
    """What a request keeps to re-run its stages: `inputs[i]` is the input of stage `i` (0: the
    request's own payload, held here, which cannot be lost and is kept to the end); a later input
    is dropped once the stage after its stage has run, so at most two stage outputs are held.

    `lost(i, e)` is called when stage `i` failed: it re-raises anything that is not a lost object,
    else returns the stage to run next (the latest `j <= i` whose input is still reachable; `j == i`
    means stage `i`'s own output was lost before the ingress read it) and counts the stages that
    will run again. `redo(j)`: whether stage `j` is a re-run (its first run was reported done)."""

    def __init__(self, stages: Sequence[str], payload: Any, max_rederive: int = 4):
        self.stages = tuple(stages)
        self.inputs: list[Any] = [payload] + [None] * len(self.stages)
        self.max_rederive = max_rederive
        self.done_once: set[int] = set()  # stages that ran to completion at least once
        self.rederived_stages = 0  # stage runs caused by lost objects
        self.events = 0  # lost objects met

    def input(self, i: int) -> Any:
        return self.inputs[i]

    def done(self, i: int, out: Any) -> None:
        """Stage `i` ran: its output is stage `i + 1`'s input; stage `i - 1`'s input is no longer
        needed (stage `i` has read its input, the one a lost output of `i - 1` is re-derived from)."""
        self.inputs[i + 1] = out
        if i >= 2:  # the request's own payload (inputs[0]) is kept: every chain can restart from it
            self.inputs[i - 1] = None
        self.done_once.add(i)

    def redo(self, i: int) -> bool:
        return i in self.done_once

    async def lost(self, i: int, e: BaseException, probe: Callable[[Any], Awaitable[bool]]) -> int:
        if not is_object_lost(e):
            raise e
        if self.events >= self.max_rederive:
            raise StageFailedError(self.stages[i], self.events + 1, e) from e
        self.events += 1
        j = i
        while j > 0 and not await probe(self.inputs[j]):
            j -= 1
            if self.inputs[j] is None:  # dropped earlier (a stage output): go back to the request
                j = 0
                break
        # stages j .. i-1 run again to rebuild i's input; j == i: stage i's own output was lost
        self.rederived_stages += max(1, i - j)
        for k in range(j + 1, len(self.inputs)):
            self.inputs[k] = None  # lost, or made from what was lost
        return j


async def ray_probe(ref: Any, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `ref` (an `ObjectRef`; anything else is held here and cannot be lost) can still be read."""
    try:
        from ray import ObjectRef
    except ImportError:  # pragma: no cover
        return True
    if not isinstance(ref, ObjectRef):
        return True
    try:
        await asyncio.wait_for(ref, timeout_s)
        return True
    except asyncio.TimeoutError:
        return False
    except Exception as e:  # noqa: BLE001 - sorted just below
        return not is_object_lost(e)
