"""The ingress's link to the controller, which keeps requests moving while the controller is down.

Normally every request is submitted to the controller and each of its stages waits for the
controller's grant. The link remembers the last plan the controller published (replica counts
per deployment, returned by every `submit`) and, per request class and stage, the deployment
the controller last granted. When the controller cannot be reached (its replica died: the call
raises `RayActorError`; or `submit` is not answered within `controller_timeout_s`), the link
goes *down* for `controller_probe_s` and hands out grants itself from what it remembers; Serve
spreads them over that deployment's replicas. A request keeps the path it started on, except
that a request whose controller dies mid-way (or which a restarted controller no longer knows)
finishes on the last plan. After `controller_probe_s` the next submit tries the controller again.

Grants made here (`Grant.on_last_plan`) have no batch id and name no replica; the controller is
never told of them. Calls on a request's path: `submit` (which brings the first stage's grant when
the policy launches it at once), one `acquire` per later stage (carrying the previous stage's
grant: that is how the controller learns it is done), and `finish` (carrying the last grant),
which is sent without waiting for the answer.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from trident_rs.errors import UnknownRequestError
from trident_rs.request import GenerationParams, RequestState
from trident_rs.serve.grant import Grant
from trident_rs.serve.stage_retry import is_replica_failure
from trident_rs.vocab import Shape, Stage

logger = logging.getLogger("ray.serve")


class ControllerUnreachable(Exception):
    """The controller stopped answering while a call to it waited."""
MAX_ROUTES = 4096


class ControllerLink:
    def __init__(self, handle: Any, deployments: dict[str, tuple[Stage, int]], counts: dict[str, int], *,
                 timeout_s: float = 2.0, probe_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        """`deployments`: name -> (stage, width); `counts`: the configured initial replica counts."""
        self.handle = handle
        self.deployments = dict(deployments)
        self.counts = dict(counts)
        self.timeout_s, self.probe_s, self.clock = timeout_s, probe_s, clock
        # (model, shape, stage) -> the deployment last granted; least recently used dropped past MAX_ROUTES
        self.routes: OrderedDict[tuple[str, Shape, str], str] = OrderedDict()
        self.down_until: float | None = None
        self.local: set[str] = set()  # requests being dispatched here, not by the controller
        self.stats = {"controller_failures": 0, "local_requests": 0, "local_grants": 0, "regrants": 0}
        self.first: dict[str, Grant] = {}  # rid -> first stage's grant, brought by submit
        self._pending: set[asyncio.Task] = set()  # finish calls not waited for
        self._down_waiters: set[asyncio.Future] = set()  # acquires to wake when the controller goes down

    @property
    def up(self) -> bool:
        return self.down_until is None or self.clock() >= self.down_until

    def _down(self, e: BaseException) -> None:
        if self.up:
            logger.warning("controller unreachable (%s); dispatching on the last plan for %.0f s",
                           type(e).__name__, self.probe_s)
        self.down_until = self.clock() + self.probe_s
        self.stats["controller_failures"] += 1
        for fut in list(self._down_waiters):  # requests waiting for a grant go on the last plan now
            if not fut.done():
                fut.set_result(None)

    async def _unless_down(self, call: Any) -> Any:
        """Await `call` (a controller call), unless the controller is found unreachable meanwhile
        (another request's submit timed out): then cancel it and raise `ControllerUnreachable`.
        A controller that is partitioned, not dead, never answers: without this, requests waiting
        for their next stage's grant would wait for it as long as the partition lasts."""
        gone = asyncio.get_running_loop().create_future()
        self._down_waiters.add(gone)
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            if hasattr(call, "cancel"):
                call.cancel()
            raise ControllerUnreachable()
        finally:
            self._down_waiters.discard(gone)
            if not task.done():
                task.cancel()

    def _go_local(self, rid: str) -> None:
        if rid not in self.local:
            self.local.add(rid)
            self.stats["local_requests"] += 1

    # -- the three calls of a request's life -------------------------------------------------------
    async def submit(self, rid: str, params: GenerationParams) -> None:
        if self.up:
            try:
                out = await asyncio.wait_for(
                    self.handle.submit.remote(rid, params.model, params.shape, params.denoise_steps, params.slo_ms,
                                              params.edit is not None, [(r.name, r.scale) for r in params.lora]),
                    self.timeout_s)
                self.counts = dict(out.get("counts") or self.counts)
                if out.get("grant") is not None:
                    self.first[rid] = out["grant"]
                self.down_until = None
                return
            except Exception as e:  # noqa: BLE001 - sorted just below
                if not (isinstance(e, asyncio.TimeoutError) or is_replica_failure(e)):
                    raise
                self._down(e)  # had it got there late, `finish` (always sent) ends it there with its real state
        self._go_local(rid)

    async def acquire(self, rid: str, stage: Stage, params: GenerationParams,
                      watch: Callable[[Awaitable], Awaitable], done: Grant | None = None) -> Grant:
        """The grant for `stage` of `rid`: the controller's, or one from the last plan. `done`:
        the grant of the stage just finished, reported to the controller on the same call."""
        if rid not in self.local:
            try:
                grant = self.first.pop(rid, None)
                if grant is None or grant.stage != stage:
                    grant = await watch(self._unless_down(self.handle.acquire.remote(rid, stage, done)))
                self._remember(params, stage, grant)
                return grant
            except Exception as e:  # noqa: BLE001 - sorted just below
                if isinstance(e, UnknownRequestError):  # a restarted controller: it lost our request
                    logger.warning("controller no longer knows request %s; finishing it on the last plan", rid)
                elif isinstance(e, ControllerUnreachable):
                    pass  # already marked down
                elif is_replica_failure(e):
                    self._down(e)
                else:
                    raise
                self._go_local(rid)
        return self.local_grant(rid, stage, params)

    def _remember(self, params: GenerationParams, stage: Stage, grant: Grant) -> None:
        key = (params.model, params.shape, stage)
        self.routes[key] = grant.deployment
        self.routes.move_to_end(key)
        if len(self.routes) > MAX_ROUTES:
            self.routes.popitem(last=False)

    async def regrant(self, rid: str, grant: Grant, watch: Callable[[Awaitable], Awaitable],
                      here: str | None = None) -> Grant:
        """`grant`'s replica refused the call (it is not the granted one, which is gone): ask the
        controller for the same launch on another replica; on the last plan, any replica."""
        self.stats["regrants"] += 1
        if grant.local or rid in self.local:
            return Grant.on_last_plan(rid, grant.stage, grant.deployment, grant.width)
        try:
            return await watch(self.handle.regrant.remote(grant, here))
        except Exception as e:  # noqa: BLE001 - sorted just below
            if not (isinstance(e, UnknownRequestError) or is_replica_failure(e)):
                raise
            if is_replica_failure(e):
                self._down(e)
            self._go_local(rid)
            return Grant.on_last_plan(rid, grant.stage, grant.deployment, grant.width)

    def finish(self, rid: str, state: RequestState, done: Grant | None = None) -> None:
        """Report the end (and `done`, the last stage's grant); not waited for. Sent for requests
        dispatched on the last plan too: a controller that got their submit late (partitioned, not
        dead) ends them with their real state, and one that never knew them counts them once."""
        self.first.pop(rid, None)
        if rid in self.local:
            self.local.discard(rid)
            done = None
        try:
            resp = self.handle.finish.remote(rid, state.value, None if done is None or done.local else done)
        except Exception as e:  # noqa: BLE001 - a dead controller forgets the request anyway
            logger.warning("could not report the end of %s: %s", rid, type(e).__name__)
            return
        task = asyncio.get_running_loop().create_task(self._await_finish(resp))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _await_finish(self, resp: Any) -> None:
        try:
            await resp
        except Exception as e:  # noqa: BLE001 - a dead controller forgets the request anyway
            if is_replica_failure(e):
                self._down(e)
            else:
                logger.warning("finish was refused: %s", e)

    def stage_retry(self, rid: str, grant: Grant, attempt: int, error: BaseException) -> None:
        """Tell the controller (fire and forget) that a stage is being re-run."""
        if rid not in self.local and self.up:
            self.handle.stage_retry.remote(grant, attempt, type(error).__name__)

    # -- dispatch without the controller ------------------------------------------------------------
    def local_grant(self, rid: str, stage: Stage, params: GenerationParams) -> Grant:
        """Where the last plan ran this request class's `stage`; else the stage's most-replicated
        deployment (ties: the narrower)."""
        name = self.routes.get((params.model, params.shape, stage))
        if name is None or self.counts.get(name, 0) <= 0:
            names = [n for n, (s, _) in self.deployments.items() if s == stage]
            name = max(names, key=lambda n: (self.counts.get(n, 0), -self.deployments[n][1]))
        self.stats["local_grants"] += 1
        return Grant.on_last_plan(rid, stage, name, self.deployments[name][1])

    def snapshot(self) -> dict:
        return {"controller_up": self.up, "local_in_flight": len(self.local), "last_counts": dict(self.counts),
                **self.stats}
