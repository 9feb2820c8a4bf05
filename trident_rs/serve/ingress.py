"""The HTTP ingress (FastAPI on Serve): OpenAI-compatible images/videos, native generate, models.

For each generation it validates (`GenerationParams.resolved()`: typed errors -> 4xx JSON),
admits it (bounded queue, 429), tells the controller of the arrival (the answer brings the first
stage's grant), then for each later stage asks the controller for a grant (reporting the stage
just done on the same call) and calls the granted replica of that stage's deployment with the *ObjectRef of the previous
stage's output*: embeddings and latents go stage to stage through the object store and only
the decoded frames come back here. A stage whose replica dies is re-run from that ref
(`stage_retry`); while the controller is down, grants come from the last plan
(`controller_link`). The end (done, failed, cancelled, timed_out) is reported to the controller.
(No `from __future__ import annotations`: FastAPI must see the body models, not strings.)
"""
import asyncio
import base64
import dataclasses
import functools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from trident_rs.errors import InvalidRequestError, RequestTimedOutError, TridentError
from trident_rs.media import mp4_bytes, png_bytes
from trident_rs.executors.base import StagePayload
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams, RequestState
from trident_rs.serve.admission import Admission
from trident_rs.serve.cancellation import Inflight, RequestCancelled
from trident_rs.serve.config import AppConfig
from trident_rs.serve.controller_link import ControllerLink
from trident_rs.serve.grant import Grant, is_wrong_replica
from trident_rs.serve.limits import GuardMiddleware, check_limits, configure as configure_guard
from trident_rs.serve.stage_retry import is_replica_failure, run_stage
from trident_rs.vocab import STAGES, error_body

api = FastAPI(title="trident_rs", description="Stage-level serving of diffusion pipelines")
EVENTS_POLL_S = 0.1  # how often the progress stream looks at the controller
api.add_middleware(GuardMiddleware)  # API key, body size, JSON syntax (trident_rs.serve.limits)


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """OpenAI-style error body (the official client reads error.message)."""
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


@api.exception_handler(TridentError)
async def _trident_error(_: Request, e: TridentError) -> JSONResponse:
    resp = _error(e.http_status, str(e), type(e).__name__, getattr(e, "field", None))
    if getattr(e, "retry_after_s", None):
        resp.headers["Retry-After"] = str(max(1, round(e.retry_after_s)))  # type: ignore[attr-defined]
    return resp


@api.exception_handler(Exception)
async def _server_error(_: Request, e: Exception) -> JSONResponse:
    """A failure of the server's own (a stage raised): 500 with the error's kind and first line."""
    cause = getattr(e, "cause", None) or e  # a RayTaskError: the replica's own exception
    last = (str(cause).strip().splitlines() or [""])[-1][:300]
    return _error(500, f"{type(cause).__name__}: {last}" if last else type(cause).__name__, "InternalServerError")


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ())]
    loc = loc[1:] if len(loc) > 1 and loc[0] in ("body", "query") else loc
    field = ".".join(loc) or "body"
    return _error(422, f"{field}: {first.get('msg', 'invalid request')}", "InvalidRequestError", field)


class ImagesRequest(BaseModel):
    """OpenAI `images.generate` body, plus trident's extra knobs."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WxH', e.g. '1024x1024'")
    response_format: Literal["b64_json"] = "b64_json"
    quality: str | None = None  # accepted for compatibility, ignored
    style: str | None = None
    user: str | None = None
    steps: int | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = None
    negative_prompt: str = ""
    slo_ms: float | None = Field(None, gt=0)


class VideosRequest(BaseModel):
    """Video generation body (OpenAI videos-style `model`, `prompt`, `size`) plus every knob."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str
    size: str | None = None
    num_frames: int | None = None
    steps: int | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = None
    negative_prompt: str = ""
    slo_ms: float | None = Field(None, gt=0)
    wait: bool = Field(False, description="answer with the MP4 instead of a job id to poll")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None -> model defaults."""
    if size is None:
        return None, None
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise InvalidRequestError("size", f"{size!r} is not of the form 'WIDTHxHEIGHT'") from None
    return h, w


@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, controller: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.cfg = AppConfig.parse(config)
        self.controller = controller
        self.stages = stages
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.admission = Admission.from_config(self.cfg)  # bounded queue per model -> 429
        configure_guard(self.cfg)
        self.inflight = Inflight()  # DeploymentResponses per request id, for cancellation
        f = self.cfg.faults  # the controller may die: the link keeps dispatching on the last plan
        self.link = ControllerLink(controller, {d.name: (d.stage, d.width) for d in self.cfg.deployments},
                                   {d.name: d.replicas for d in self.cfg.deployments},
                                   timeout_s=f.controller_timeout_s, probe_s=f.controller_probe_s)

    # -- the pipeline -----------------------------------------------------------------------------
    def _params(self, **fields: Any) -> GenerationParams:
        try:
            if fields.get("model") not in self.cfg.models:
                get_spec(fields.get("model"))  # unknown everywhere -> 404 with the known names
                raise InvalidRequestError("model", f"{fields['model']!r} is not served here; served: {self.cfg.models}")
            return check_limits(self.cfg.limits, GenerationParams(**fields).resolved())
        except TridentError as e:
            self._reject(e)
            raise

    def _size(self, size: str | None) -> tuple[int | None, int | None]:
        try:
            return parse_size(size)
        except TridentError as e:
            self._reject(e)
            raise

    def _reject(self, e: Exception) -> None:
        """Count a request refused before admission (fire and forget: the 4xx must not wait)."""
        self.controller.reject.remote(type(e).__name__)

    async def generate(self, params: GenerationParams, rid: str | None = None) -> StagePayload:
        """Run the three stages of one request; returns the decode payload (frames).

        `rid` (default: a fresh id) is what `GET /v1/requests/{rid}` reports progress under.
        Ends in exactly one final state, reported to the controller: done, failed, cancelled
        (cancel endpoint or client disconnect) or timed_out (`limits.request_timeout_s`, 504).
        """
        rid = rid or uuid.uuid4().hex
        t0 = time.perf_counter()
        self.admission.admit(rid, params)  # OverloadedError -> 429 + Retry-After; no-op if already held
        state = RequestState.FAILED
        last: list[Grant | None] = [None]  # the grant of the last stage that ran to completion
        try:
            result = await asyncio.wait_for(self._stages(rid, params, last), self.cfg.limits.request_timeout_s)
            result.meta["latency_s"] = time.perf_counter() - t0
            state = RequestState.DONE
            return result
        except asyncio.TimeoutError:
            if time.perf_counter() - t0 < self.cfg.limits.request_timeout_s:
                raise  # a stage's own timeout, not the request's
            state = RequestState.TIMED_OUT
            raise RequestTimedOutError(rid, self.cfg.limits.request_timeout_s) from None
        except (RequestCancelled, asyncio.CancelledError):
            state = RequestState.CANCELLED
            raise
        finally:
            self.inflight.end(rid, state is RequestState.DONE)  # otherwise cancel what is still pending
            self.admission.release(rid)
            self.link.finish(rid, state, last[0])  # sent, not waited for

    async def _stages(self, rid: str, params: GenerationParams, last: list) -> StagePayload:
        """Encode, diffuse, decode: each stage where its grant says, re-run if its replica dies.
        Each acquire carries the previous stage's grant: that is how the controller hears it is done."""
        await self.link.submit(rid, params)
        out: Any = StagePayload(params, {}, {"request_id": rid})
        retries = 0
        watch = functools.partial(self.inflight.watch, rid)  # awaits that the cancel endpoint can interrupt
        for stage in STAGES:
            grant = await self.link.acquire(rid, stage, params, watch, done=last[0])
            last[0] = None
            out, n, grant = await self._run_stage(rid, stage, grant, out, watch)
            last[0] = grant
            retries += n
        out.meta["retries"] = retries
        return out

    async def _run_stage(self, rid: str, stage: str, grant: Grant, prev: Any, watch: Any) -> tuple[Any, int, Grant]:
        """One stage on its granted replica, granted again if that replica is gone before the
        call reaches it; re-run if it dies while running (on the deployment's least busy replica:
        the controller stops binding the dead one). Returns (output, re-runs, grant)."""
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
                        prev, g if not reruns else dataclasses.replace(g, replica_id=None))),
                    watch, stage=stage, last=stage == STAGES[-1],
                    retries=max(0, faults.stage_retries - reruns), backoff_s=faults.retry_backoff_s,
                    on_retry=lambda attempt, e, g=grant: on_retry(attempt, e, g))
                return out, reruns, grant
            except Exception as e:  # noqa: BLE001 - sorted just below
                if not is_wrong_replica(e):
                    raise
                here = getattr(getattr(e, "cause", None), "here", None) or getattr(e, "here", None)
                grant = await self.link.regrant(rid, grant, watch, here)

    # -- OpenAI-compatible endpoints ------------------------------------------------------------------
    @api.post("/v1/images/generations")
    async def images(self, body: ImagesRequest, request: Request) -> dict:
        if body.n > self.cfg.limits.max_n:
            e = InvalidRequestError("n", f"{body.n} exceeds the maximum {self.cfg.limits.max_n}")
            self._reject(e)
            raise e
        h, w = self._size(body.size)
        base = self._params(model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
                            height=h, width=w, steps=body.steps, guidance_scale=body.guidance_scale,
                            seed=body.seed, slo_ms=body.slo_ms)
        if get_spec(base.model).is_video:
            e = InvalidRequestError("model", f"{base.model} makes videos; use POST /v1/videos")
            self._reject(e)
            raise e
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        rids = [rid if body.n == 1 else f"{rid}-{i}" for i in range(body.n)]
        self.admission.admit_many(rids, base)  # all n or none (429)
        try:
            results = await asyncio.gather(*(self.generate(base.model_copy(update={"seed": base.seed + i}), r)
                                             for i, r in enumerate(rids)))
        finally:  # also frees slots of generations cancelled before they started
            for r in rids:
                self.admission.release(r)
        data = [{"b64_json": base64.b64encode(png_bytes(r.tensors["frames"][0])).decode(),
                 "revised_prompt": body.prompt} for r in results]
        return {"created": int(time.time()), "data": data}

    @api.post("/v1/videos")
    async def videos(self, body: VideosRequest) -> dict:
        h, w = self._size(body.size)
        params = self._params(model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
                              height=h, width=w, num_frames=body.num_frames, steps=body.steps,
                              guidance_scale=body.guidance_scale, seed=body.seed, slo_ms=body.slo_ms)
        if not get_spec(params.model).is_video:
            e = InvalidRequestError("model", f"{params.model} makes images; use POST /v1/images/generations")
            self._reject(e)
            raise e
        job_id = f"video_{uuid.uuid4().hex}"
        if not body.wait:
            self.admission.admit(job_id, params)  # 429 now, not a failed job later
        job: dict[str, Any] = {"id": job_id, "object": "video", "model": params.model, "status": "queued",
                               "created_at": int(time.time())}
        if body.wait:
            job.update(await self._video_result(params, job_id))
            return job
        self.jobs[job_id] = job
        while len(self.jobs) > self.cfg.limits.max_video_jobs:
            self.jobs.popitem(last=False)
        job["_task"] = asyncio.get_running_loop().create_task(self._video_job(job, params))
        return {k: v for k, v in job.items() if not k.startswith("_")}

    async def _video_result(self, params: GenerationParams, rid: str | None = None) -> dict:
        result = await self.generate(params, rid)
        mp4 = await asyncio.to_thread(mp4_bytes, result.tensors["frames"])
        return {"status": "completed", "b64_json": base64.b64encode(mp4).decode(),
                "num_frames": int(result.tensors["frames"].shape[0])}

    async def _video_job(self, job: dict, params: GenerationParams) -> None:
        job["status"] = "in_progress"
        try:
            job.update(await self._video_result(params, job["id"]))
        except Exception as e:  # the job records the failure; the poller sees it
            job.update(status="cancelled" if isinstance(e, RequestCancelled) else "failed",
                       error={"message": str(e), "type": type(e).__name__})

    @api.get("/v1/videos/{job_id}")
    async def video_job(self, job_id: str) -> Any:
        job = self.jobs.get(job_id)
        if job is None:
            return _error(404, f"no video job {job_id!r}", "NotFoundError", "job_id")
        return {k: v for k, v in job.items() if not k.startswith("_")}

    # -- native API ------------------------------------------------------------------------------------
    @api.post("/v1/generate")
    async def native(self, body: GenerationParams, request: Request) -> dict:
        params = self._params(**body.model_dump())
        result = await self.generate(params, request.headers.get("x-request-id"))
        frames = result.tensors["frames"]
        if get_spec(params.model).is_video:
            fmt, data = "mp4", await asyncio.to_thread(mp4_bytes, frames)
        else:
            fmt, data = "png", png_bytes(frames[0])
        timings = {k: v for k, v in result.meta.items() if isinstance(v, (int, float, str)) and k != "request_id"}
        return {"id": result.meta.get("request_id"), "model": params.model, "format": fmt,
                "b64": base64.b64encode(data).decode(), "params": params.model_dump(), "timings": timings}

    @api.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for name in self.cfg.models:
            spec = get_spec(name)
            data.append({"id": name, "object": "model", "owned_by": "trident_rs", "kind": spec.kind,
                         "default_size": list(spec.default_size), "default_steps": spec.default_steps,
                         "default_frames": spec.default_frames, "max_frames": spec.max_frames})
        return {"object": "list", "data": data}

    async def _ask_controller(self, call: Any) -> Any:
        """A read-only controller call; 503 (not 500) while the controller is restarting."""
        try:
            return await call
        except Exception as e:  # noqa: BLE001 - sorted just below
            if not is_replica_failure(e):
                raise
            return _error(503, "the controller is restarting; requests are still served on the last plan",
                          "ControllerUnavailableError")

    @api.get("/v1/status")
    async def status(self) -> Any:
        out = await self._ask_controller(self.controller.status.remote())
        if isinstance(out, dict):
            out["ingress"] = {"admission": self.admission.snapshot(), "controller_link": self.link.snapshot()}
        return out

    @api.post("/v1/requests/{request_id}/cancel")
    async def cancel(self, request_id: str) -> Any:
        """Cancel a queued or running request (your `X-Request-Id`, or a video job id)."""
        hits = self.inflight.cancel(request_id)
        if not hits:
            return _error(404, f"no running request {request_id!r}", "NotFoundError", "request_id")
        return {"id": request_id, "status": "cancelled", "cancelled": hits}

    @api.get("/v1/requests/{request_id}")
    async def request_progress(self, request_id: str) -> Any:
        """Which stage a request is in (send your own id in `X-Request-Id`; video jobs use the job id)."""
        prog = await self._ask_controller(self.controller.request_status.remote(request_id))
        if isinstance(prog, JSONResponse):
            return prog
        if prog is None:
            return _error(404, f"no request {request_id!r} (recent ones are kept)", "NotFoundError", "request_id")
        return prog

    @api.get("/v1/requests/{request_id}/events")
    async def request_events(self, request_id: str) -> Any:
        """Server-sent events: the request's progress each time its state or stage changes,
        ending with its final state (`done`, `failed`, `cancelled`, `timed_out`)."""
        first = await self.request_progress(request_id)
        if not isinstance(first, dict):
            return first  # 404 or 503, as for GET /v1/requests/{id}
        return StreamingResponse(self._events(request_id, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, request_id: str, prog: dict) -> AsyncIterator[str]:
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s
        last = None
        while True:
            key = (prog.get("state"), prog.get("stage"), prog.get("retries"))
            if key != last:
                last = key
                yield f"event: progress\ndata: {json.dumps(prog, default=str)}\n\n"
            if RequestState(prog["state"]).final or time.monotonic() > deadline:
                return
            await asyncio.sleep(EVENTS_POLL_S)
            nxt = await self._ask_controller(self.controller.request_status.remote(request_id))
            if not isinstance(nxt, dict):  # forgotten or the controller is restarting: stop here
                return
            prog = nxt

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        """Prometheus text format (see trident_rs.serve.metrics)."""
        from trident_rs.serve.metrics import CONTENT_TYPE

        text = await self._ask_controller(self.controller.metrics_text.remote())
        return text if isinstance(text, JSONResponse) else PlainTextResponse(text, media_type=CONTENT_TYPE)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": self.cfg.models}


IngressDeployment = serve.deployment(Ingress, name="Ingress", max_ongoing_requests=1000,
                                     ray_actor_options={"num_cpus": 0})
