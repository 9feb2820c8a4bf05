"""One request's life through its stages: the loop the ingress runs for every generation.

For each stage it takes a grant (the first rides on `submit`; each later `acquire` reports the
stage just done), calls the granted replica of that stage's deployment with the *ObjectRef of
the previous stage's output* (embeddings and latents go stage to stage through the object store;
only the decoded frames come back), and:
- re-runs the stage if its replica dies, from that ref (`stage_retry`), or grants it again if the
  replica is gone before the call reaches it (`Grant`, `is_wrong_replica`);
- re-derives an input lost with its node from the input kept before it (`rederive.Lineage`);
- runs a chunk-granted diffuse chunk by chunk, from the ObjectRef of the last boundary's state
  (issue 17), stopping a cancelled request at the next boundary;
- collects a streamed image's partial images from the diffuse replica while it runs;
- goes on the last plan while the controller is unreachable (`controller_link`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from trident_rs.executors.base import StagePayload
from trident_rs.request import GenerationParams
from trident_rs.serve.cancellation import Inflight, RequestCancelled
from trident_rs.serve.config import AppConfig
from trident_rs.serve.controller_link import ControllerLink
from trident_rs.serve.grant import Grant, is_wrong_replica
from trident_rs.serve.rederive import Lineage, ray_probe
from trident_rs.serve.stage_retry import run_stage
from trident_rs.vocab import STAGES

PREVIEW_POLL_S = 0.05  # how often a streamed image request collects its partial images


@dataclass
class StageRunner:
    """Runs requests' stages on the replicas the controller grants (one per ingress replica)."""

    cfg: AppConfig
    link: ControllerLink
    stages: dict[str, Any]  # deployment name -> its handle
    inflight: Inflight  # DeploymentResponses per request id, for cancellation
    preview_sinks: dict[str, tuple[int, asyncio.Queue]] = field(default_factory=dict)  # streamed requests
    rederive_stats: dict[str, int] = field(default_factory=lambda: {"lost_objects": 0, "requests": 0, "stages": 0})
    probe_input: Callable[..., Any] = ray_probe  # whether a kept stage input can still be read (tests swap it)

    async def run(self, rid: str, params: GenerationParams, last: list, track: dict | None = None,
                      inputs: dict | None = None) -> StagePayload:
        """Encode, diffuse, decode of request `rid`: each stage where its grant says, re-run if its
        replica dies, re-derived if its input was lost with a node. Each acquire carries the
        previous stage's grant: that is how the controller hears it is done. `last[0]` is set to
        the grant of the last stage that ran to completion (for the caller's `finish`)."""
        await self.link.submit(rid, params)
        sink = self.preview_sinks.get(rid)
        out: Any = StagePayload(params, dict(inputs or {}), {"request_id": rid, **({"partial_images": sink[0]} if sink else {})})
        retries = 0
        watch = functools.partial(self.inflight.watch, rid)  # awaits that the cancel endpoint can interrupt
        chain = Lineage(STAGES, out, max_rederive=self.cfg.faults.stage_retries + 2)  # lost objects: rederive
        held: Grant | None = None  # a controller grant not yet run to completion (kept across a re-derivation)
        i = 0
        while i < len(STAGES):
            stage = STAGES[i]
            if held is not None and held.stage == stage:
                grant = held
            elif chain.redo(i):  # re-deriving a stage already reported done: on the last plan
                grant = self.link.local_grant(rid, stage, params)
            else:
                grant = held = await self.link.acquire(rid, stage, params, watch, done=last[0])
                last[0] = None
            if track is not None:
                track.update(stage=stage, t=time.monotonic(), width=grant.width)
            chunked = stage == "diffuse" and grant.chunked and not chain.redo(i)
            try:
                if chunked:
                    out, n, grant = await self._chunks(rid, params, grant, chain.input(i), watch, last, track, sink)
                elif stage == "diffuse" and sink is not None and not chain.redo(i):
                    out, n, grant = await self._with_previews(rid, grant, sink[1],
                                                              self._run_stage(rid, stage, grant, chain.input(i), watch))
                else:
                    out, n, grant = await self._run_stage(rid, stage, grant, chain.input(i), watch)
            except Exception as e:  # noqa: BLE001 - Lineage.lost re-raises all but a lost object
                if chunked:  # the controller has it mid-way through its chunks: re-run whole, on the last plan
                    held = None
                    chain.done_once.add(i)
                elif held is not None and held.stage == stage:
                    held = grant
                i = await chain.lost(i, e, self.probe_input)
                self.rederive_stats["lost_objects"] += 1
                continue
            chain.done(i, out)
            if held is not None and held.stage == stage:
                held = None
                last[0] = grant
            if track is not None:
                track["done"].append((stage, grant.width))
            retries += n
            i += 1
        out.meta["retries"] = retries
        out.meta["rederived_stages"] = chain.rederived_stages
        if chain.rederived_stages:
            self.rederive_stats["requests"] += 1
            self.rederive_stats["stages"] += chain.rederived_stages
        return out

    async def _chunks(self, rid: str, params: GenerationParams, grant: Grant, prev: Any, watch: Any,
                      last: list, track: dict | None, sink: tuple | None = None) -> tuple[Any, int, Grant]:
        """Diffuse chunk by chunk (issue 17). Each chunk runs where its grant says, from the
        ObjectRef of the last boundary's state, which this ingress owns: a replica that dies
        loses only the chunk it was running, re-run from that ref. At each boundary the chunk's
        grant goes back with the `acquire` of the next one, which the policy grants now (the same
        or another replica, at any width), later (the request is paused, its state kept in the
        object store), or never again before the request's next stage. A cancel lets the running
        chunk end, then stops the request at that boundary (the controller frees its GPUs with
        the chunk's grant). A grant without steps (the last plan) runs all the steps left.
        Returns (the last chunk's output, re-runs, its grant)."""
        reruns = 0
        shielded = functools.partial(self.inflight.watch, rid, shield=True)  # a cancel waits for the boundary
        while True:
            if self.inflight.cancelled(rid):
                raise RequestCancelled(rid)
            if track is not None:
                track.update(width=grant.width)
            run = self._run_stage(rid, "diffuse", grant, prev, shielded if grant.chunked else watch,
                                  shield=grant.chunked)
            if sink is not None:  # a streamed image: each chunk's partial images, from its replica
                prev, n, grant = await self._with_previews(rid, grant, sink[1], run)
            else:
                prev, n, grant = await run
            reruns += n
            if self.inflight.cancelled(rid):
                last[0] = grant  # the boundary: the controller frees what the chunk held
                raise RequestCancelled(rid)
            if not grant.chunked or grant.steps[1] >= params.denoise_steps:
                return prev, reruns, grant
            last[0] = grant
            grant = await self.link.acquire(rid, "diffuse", params, watch, done=grant)
            last[0] = None

    async def _with_previews(self, rid: str, grant: Grant, queue: asyncio.Queue, run: Any) -> Any:
        """Await `run` (the diffuse stage) while collecting the request's partial images from the
        granted replica into `queue` every `PREVIEW_POLL_S`, and once more when it is done."""
        stage = self.stages[grant.deployment]

        async def collect(drop: bool = False) -> None:
            try:
                got = await stage.previews.remote(rid, grant, drop)
            except Exception:  # noqa: BLE001 - a preview lost is not the request lost
                return
            for item in sorted(got):
                queue.put_nowait(item)

        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), PREVIEW_POLL_S)
                if not done.is_set():
                    await collect()

        # the poller is stopped between calls, never cancelled inside one: a `previews` call the
        # replica has answered (taking its images out of the mailbox) must reach the queue
        poller = asyncio.get_running_loop().create_task(poll())
        try:
            out = await run
        finally:
            done.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(poller, 10)  # a replica that never answers: give up on its previews
        await collect(drop=True)  # the previews were made during the call: all are there now
        return out

    async def _run_stage(self, rid: str, stage: str, grant: Grant, prev: Any, watch: Any,
                         shield: bool = False) -> tuple[Any, int, Grant]:
        """One stage on its granted replica, granted again if that replica is gone before the
        call reaches it; re-run if it dies while running (on the deployment's least busy replica:
        the controller stops binding the dead one). Returns (output, re-runs, grant). `shield`:
        a cancel does not interrupt the call (a diffuse chunk runs to its boundary)."""
        faults = self.cfg.faults
        reruns = 0

        def on_retry(attempt: int, e: BaseException, g: Grant) -> None:
            nonlocal reruns
            reruns += 1
            self.link.stage_retry(rid, g, attempt, e)

        while True:
            try:
                out, _ = await run_stage(
                    lambda g=grant: self.inflight.add(rid, self.stages[g.deployment].run.remote(
                        prev, g if not reruns else dataclasses.replace(g, replica_id=None)), shield=shield),
                    watch, stage=stage, last=stage == STAGES[-1],
                    retries=max(0, faults.stage_retries - reruns), backoff_s=faults.retry_backoff_s,
                    on_retry=lambda attempt, e, g=grant: on_retry(attempt, e, g))
                return out, reruns, grant
            except Exception as e:  # noqa: BLE001 - sorted just below
                if not is_wrong_replica(e):
                    raise
                here = getattr(getattr(e, "cause", None), "here", None) or getattr(e, "here", None)
                grant = await self.link.regrant(rid, grant, watch, here)

