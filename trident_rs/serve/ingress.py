"""The HTTP ingress (FastAPI on Serve): OpenAI-compatible images/videos, native generate, models.

OpenAI-compatible surface: `POST /v1/images/generations` (`response_format` b64_json or url),
`POST /v1/images/edits` (img2img and inpainting, multipart; `trident_rs.serve.edits`),
the videos API (`POST/GET /v1/videos`, `GET/DELETE /v1/videos/{id}`, `GET .../content`; jobs and
their objects in `trident_rs.serve.videos`), stored results at `GET /v1/files/{id}/content`
(`trident_rs.serve.files`, fsspec), and idempotent calls under an `Idempotency-Key` or
`X-Request-Id` header (`trident_rs.serve.idempotency`). With `stream: true` the images endpoint
answers with OpenAI's server-sent events: `partial_images` (0-3) `image_generation.partial_image`
previews, then `image_generation.completed` (`_image_events`). The previews are made on the
diffuse replica from the loop's latents (`trident_rs.models.preview`), kept there per request
(`stage_deployment.PreviewMailbox`) and collected by the ingress while the diffuse call runs.

For each generation it validates (`GenerationParams.resolved()`: typed errors -> 4xx JSON),
admits it (bounded queue, 429), runs its stages on the granted replicas (`stage_runner`: grants,
ObjectRefs stage to stage, re-runs, re-derivation, chunks, the last plan while the controller is
down) and reports its end (done, failed, cancelled, timed_out) to the controller.
(No `from __future__ import annotations`: FastAPI must see the body models, not strings.)
"""
import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from trident_rs.errors import (ConfigError, ConflictError, GoneError, InvalidRequestError, NotFoundError,
                               OverloadedError, RequestTimedOutError, TridentError)
from trident_rs.media import mp4_bytes, png_bytes
from trident_rs.executors.base import StagePayload
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams, RequestState
from trident_rs.serve.adapters import adapter_cards, check_adapters
from trident_rs.serve.admission import Admission
from trident_rs.serve.cancellation import Inflight, RequestCancelled
from trident_rs.serve.config import AppConfig
from trident_rs.serve.controller_link import ControllerLink
from trident_rs.serve.edits import parse_edit, read_form
from trident_rs.serve.files import FileStore
from trident_rs.serve.grant import Grant
from trident_rs.serve.idempotency import IdempotencyCache, fingerprint, key_of
from trident_rs.serve.limits import GuardMiddleware, check_limits, configure as configure_guard
from trident_rs.serve.openai_bodies import ImagesRequest, VideosRequest, event_quality, parse_size
from trident_rs.serve.own_calls import OwnCalls
from trident_rs.serve.stage_retry import is_replica_failure
from trident_rs.serve.stage_runner import StageRunner
from trident_rs.serve.videos import (StageTimes, VideoJob, VideoJobs, check_deletable, estimate_progress,
                                     file_url, fps_for, frames_for_seconds)
from trident_rs.vocab import error_body

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


@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, controller: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.cfg = AppConfig.parse(config)
        controller = OwnCalls(controller)  # a request's calls may overlap: each is its own (see own_calls)
        self.controller = controller
        self.stages = {name: OwnCalls(handle) for name, handle in stages.items()}
        self.videos = VideoJobs(self.cfg.limits.max_video_jobs)  # OpenAI video jobs, for polling
        self.stage_times = StageTimes(self.cfg)  # predicted stage times: video progress
        self.idem = IdempotencyCache.from_config(self.cfg)  # Idempotency-Key / X-Request-Id
        f = self.cfg.files
        try:
            self.files = FileStore(f.url, f.expires_after_s, f.sweep_s)  # response_format url, video content
        except (ImportError, ValueError, OSError) as e:
            raise ConfigError(f"files.url {f.url!r} cannot be used: {type(e).__name__}: {e}") from None
        self.admission = Admission.from_config(self.cfg)  # bounded queue per model -> 429
        configure_guard(self.cfg)
        self.inflight = Inflight()  # DeploymentResponses per request id, for cancellation
        f = self.cfg.faults  # the controller may die: the link keeps dispatching on the last plan
        self.link = ControllerLink(controller, {d.name: (d.stage, d.width) for d in self.cfg.deployments},
                                   {d.name: d.replicas for d in self.cfg.deployments},
                                   timeout_s=f.controller_timeout_s, probe_s=f.controller_probe_s)
        self.runner = StageRunner(self.cfg, self.link, self.stages, self.inflight)  # a request's stages

    # -- the pipeline -----------------------------------------------------------------------------
    def _checked(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """`fn(...)`; a `TridentError` it raises (bad input) is counted as a rejection, then raised."""
        try:
            return fn(*args, **kw)
        except TridentError as e:
            self._reject(e)
            raise

    def _resolve(self, **fields: Any) -> GenerationParams:
        if fields.get("model") not in self.cfg.models:
            get_spec(fields.get("model"))  # unknown everywhere -> 404 with the known names
            raise InvalidRequestError("model", f"{fields['model']!r} is not served here; served: {self.cfg.models}")
        return check_adapters(self.cfg, check_limits(self.cfg.limits, GenerationParams(**fields).resolved()))

    def _check_n(self, n: int) -> None:
        if n > self.cfg.limits.max_n:
            raise InvalidRequestError("n", f"{n} exceeds the maximum {self.cfg.limits.max_n}")

    def _params(self, **fields: Any) -> GenerationParams:
        return self._checked(self._resolve, **fields)

    def _size(self, size: str | None) -> tuple[int | None, int | None]:
        return self._checked(parse_size, size)

    def _reject(self, e: Exception) -> None:
        """Count a request refused before admission (fire and forget: the 4xx must not wait)."""
        self.controller.reject.remote(type(e).__name__)

    async def generate(self, params: GenerationParams, rid: str | None = None, track: dict | None = None,
                       inputs: dict | None = None) -> StagePayload:
        """Run the three stages of one request; returns the decode payload (frames).

        `rid` (default: a fresh id) is what `GET /v1/requests/{rid}` reports progress under.
        `track` (a video job's): set to the running stage (`stage`, `t`, `width`), with the stages
        done appended to `track["done"]` as (stage, width). `inputs`: the encode stage's input
        tensors (an edit's image and mask).
        Ends in exactly one final state, reported to the controller: done, failed, cancelled
        (cancel endpoint or client disconnect) or timed_out (`limits.request_timeout_s`, 504).
        """
        rid = rid or uuid.uuid4().hex
        t0 = time.perf_counter()
        self.admission.admit(rid, params)  # OverloadedError -> 429 + Retry-After; no-op if already held
        state = RequestState.FAILED
        last: list[Grant | None] = [None]  # the grant of the last stage that ran to completion
        try:
            result = await asyncio.wait_for(self.runner.run(rid, params, last, track, inputs),
                                            self.cfg.limits.request_timeout_s)
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

    # -- OpenAI-compatible endpoints ------------------------------------------------------------------
    def _base_url(self, request: Request) -> str:
        """Where this server's files are reached: `files.public_url`, else the URL the request came to."""
        return self.cfg.files.public_url or str(request.base_url)

    def _idem_key(self, request: Request) -> tuple[str, str] | None:
        return self._checked(key_of, request.headers)

    @api.post("/v1/images/generations")
    async def images(self, body: ImagesRequest, request: Request) -> dict:
        self._checked(self._check_n, body.n)
        h, w = self._size(body.size)
        base = self._params(model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
                            height=h, width=w, steps=body.steps, guidance_scale=body.guidance_scale,
                            seed=body.seed, slo_ms=body.slo_ms, lora=body.lora)
        if get_spec(base.model).is_video:
            e = InvalidRequestError("model", f"{base.model} makes videos; use POST /v1/videos")
            self._reject(e)
            raise e
        key = self._idem_key(request)
        if body.stream:
            return self._checked(self._image_stream, body, base, request)
        return await self.idem.run("/v1/images/generations", key, fingerprint(body.model_dump()),
                                   lambda: self._images(body, base, request))

    @api.post("/v1/images/edits", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": ImagesRequest.model_json_schema()}}}})
    async def image_edits(self, request: Request) -> Any:
        """OpenAI `images.edit`: the multipart form checked in `trident_rs.serve.edits`, then the
        generations path (stream or not) with the image (and mask) in the encode stage's payload."""
        try:
            edit = parse_edit(*await read_form(request), self._resolve)
            self._check_n(edit.body.n)
        except TridentError as e:
            self._reject(e)
            raise
        body, base = edit.body, edit.params
        key = self._idem_key(request)
        if body.stream:
            return self._checked(self._image_stream, body, base, request, edit.inputs)
        fp = fingerprint({**body.model_dump(), "strength": base.strength, "inputs": edit.digest})
        return await self.idem.run("/v1/images/edits", key, fp, lambda: self._images(body, base, request, edit.inputs))

    def _image_stream(self, body: ImagesRequest, base: GenerationParams, request: Request,
                      inputs: dict | None = None) -> StreamingResponse:
        """Check and admit a streamed request (so 4xx and 429 come as statuses), then stream it.
        A stream is not replayed under an idempotency key: it runs each time."""
        if body.n != 1:
            raise InvalidRequestError("n", "stream: true makes one image (n = 1)")
        if body.response_format != "b64_json":
            raise InvalidRequestError("response_format", "a stream carries b64_json images only")
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.admission.admit(rid, base)  # 429 before the stream starts
        events = self._image_events(body, base, rid, inputs, "image_edit" if inputs else "image_generation")
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    async def _image_events(self, body: ImagesRequest, base: GenerationParams, rid: str,
                            inputs: dict | None = None, kind: str = "image_generation") -> AsyncIterator[str]:
        """OpenAI's image stream: `image_generation.partial_image` events (indices 0..n-1, as the
        diffuse replica makes them), then `image_generation.completed` with the image (the same
        image as without stream: previews only read the latents). A failure after the stream
        started ends it with an `error` event."""
        n = body.partial_images or 0
        queue: asyncio.Queue = asyncio.Queue()
        if n:
            self.runner.preview_sinks[rid] = (n, queue)
        common = {"size": f"{base.width}x{base.height}", "quality": event_quality(body.quality),
                  "background": "opaque", "output_format": "png"}

        def event(kind: str, **fields: Any) -> str:
            data = {"type": kind, "created_at": int(time.time()), **fields, **common}
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        task = asyncio.get_running_loop().create_task(self.generate(base, rid, inputs=inputs))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                k, png = get.result()
                yield event(f"{kind}.partial_image", b64_json=base64.b64encode(png).decode(),
                            partial_image_index=k)
            while not queue.empty():
                k, png = queue.get_nowait()
                yield event(f"{kind}.partial_image", b64_json=base64.b64encode(png).decode(),
                            partial_image_index=k)
            try:
                result = task.result()
            except Exception as e:  # noqa: BLE001 - the status line is sent: an error event
                status = getattr(e, "http_status", 500)
                body_ = error_body(str(e) or type(e).__name__, type(e).__name__, status, getattr(e, "field", None))
                yield f"event: error\ndata: {json.dumps({'type': 'error', **body_})}\n\n"
                return
            png = png_bytes(result.tensors["frames"][0])
            yield event(f"{kind}.completed", b64_json=base64.b64encode(png).decode(),
                        usage={"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                               "output_tokens": 0, "total_tokens": 0})
        finally:
            self.runner.preview_sinks.pop(rid, None)
            if not task.done():
                task.cancel()  # the client went away: the request is cancelled
                await asyncio.wait({task}, timeout=5.0)
            self.admission.release(rid)

    async def _images(self, body: ImagesRequest, base: GenerationParams, request: Request,
                      inputs: dict | None = None) -> dict:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        rids = [rid if body.n == 1 else f"{rid}-{i}" for i in range(body.n)]
        self.admission.admit_many(rids, base)  # all n or none (429)
        try:
            results = await asyncio.gather(*(self.generate(base.model_copy(update={"seed": base.seed + i}), r,
                                                           inputs=inputs)
                                             for i, r in enumerate(rids)))
        finally:  # also frees slots of generations cancelled before they started
            for r in rids:
                self.admission.release(r)
        pngs = [png_bytes(r.tensors["frames"][0]) for r in results]
        if body.response_format == "url":
            metas = await asyncio.to_thread(
                lambda: [self.files.put(png, "image/png", f"{r}.png", "image") for png, r in zip(pngs, rids)])
            base_url = self._base_url(request)
            data = [{"url": file_url(base_url, m["id"]), "revised_prompt": body.prompt} for m in metas]
        else:
            data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": body.prompt} for png in pngs]
        return {"created": int(time.time()), "data": data}

    # -- videos (OpenAI's videos API; trident_rs.serve.videos) ------------------------------------------
    @staticmethod
    async def _video_body(request: Request) -> VideosRequest:
        """The body as JSON or as a form (the official client posts multipart/form-data)."""
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form()
            except Exception as e:  # noqa: BLE001 - any parser error is the client's
                raise InvalidRequestError("body", f"malformed form data ({type(e).__name__}: {str(e)[:120]})") from None
            data: Any = {}
            for k, v in form.multi_items():
                if not isinstance(v, str):
                    raise InvalidRequestError(k, "file uploads are not supported: videos are made from text only")
                data[k] = v
        else:
            try:
                data = json.loads(await request.body())
            except ValueError as e:
                raise InvalidRequestError("body", f"malformed JSON ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("body", "must be a JSON object (or a form)")
        try:
            return VideosRequest.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def _video_params(self, body: VideosRequest) -> GenerationParams:
        model = body.model
        if model is None:
            videos = [m for m in self.cfg.models if get_spec(m).is_video]
            if not videos:
                raise InvalidRequestError("model", f"no video model is served here; served: {self.cfg.models}")
            model = videos[0]
        if model not in self.cfg.models:
            get_spec(model)  # unknown everywhere -> 404 with the known names
            raise InvalidRequestError("model", f"{model!r} is not served here; served: {self.cfg.models}")
        if not get_spec(model).is_video:
            raise InvalidRequestError("model", f"{model} makes images; use POST /v1/images/generations")
        if body.input_reference is not None:
            raise InvalidRequestError("input_reference", "not supported: videos are made from text only")
        frames = body.num_frames
        if body.seconds is not None:
            if frames is not None:
                raise InvalidRequestError("seconds", "give seconds or num_frames, not both")
            frames = frames_for_seconds(model, body.seconds)
        if body.response_format == "b64_json" and not body.wait:
            raise InvalidRequestError("response_format", "b64_json needs wait: true; a job's MP4 is at "
                                      "GET /v1/videos/{id}/content, or ask for url")
        h, w = parse_size(body.size)
        return self._resolve(model=model, prompt=body.prompt, negative_prompt=body.negative_prompt, height=h,
                             width=w, num_frames=frames, steps=body.steps, guidance_scale=body.guidance_scale,
                             seed=body.seed, slo_ms=body.slo_ms, lora=body.lora)

    @api.post("/v1/videos", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": VideosRequest.model_json_schema()},
        "multipart/form-data": {"schema": VideosRequest.model_json_schema()}}}})
    async def videos(self, request: Request) -> dict:
        """Create a video job (OpenAI `videos.create`); with `wait: true` answer when it is done."""
        body = await self._video_body_checked(request)
        params = self._checked(self._video_params, body)
        key = self._idem_key(request)
        fp = fingerprint(body.model_dump())
        if body.wait:
            return await self.idem.run("/v1/videos", key, fp, lambda: self._video_wait(body, params, request, key))
        for _ in range(2):
            job_id = await self.idem.run("/v1/videos", key, fp, lambda: self._video_start(body, params, request, key))
            job = self.videos.jobs.get(job_id)
            if job is not None:
                return self._video_object(job)
            if key is None:
                break
            self.idem.forget("/v1/videos", key[1])  # the job this key made was deleted or dropped: a new one
        raise NotFoundError("video_id", f"video job {job_id!r} was dropped as soon as it was made; retry")

    async def _video_body_checked(self, request: Request) -> VideosRequest:
        try:
            return await self._video_body(request)
        except (TridentError, RequestValidationError) as e:
            self._reject(e)
            raise

    async def _video_start(self, body: VideosRequest, params: GenerationParams, request: Request,
                           key: tuple[str, str] | None) -> str:
        """Admit and start a job; its id."""
        kept = self.videos
        if len(kept) >= kept.max_jobs and not any(j.finished for j in kept.jobs.values()):
            raise OverloadedError(f"{len(kept)} video jobs are running (limits.max_video_jobs); retry later", 5.0)
        job_id = f"video_{uuid.uuid4().hex}"
        self.admission.admit(job_id, params)  # 429 now, not a failed job later
        job = VideoJob(job_id, params.model, body.prompt, params, body.response_format, self._base_url(request),
                       idem=("/v1/videos", key[1]) if key else None)
        for old in kept.add(job):
            if old.idem:
                self.idem.forget(*old.idem)
        job.task = asyncio.get_running_loop().create_task(self._video_job(job))
        return job_id

    async def _video_wait(self, body: VideosRequest, params: GenerationParams, request: Request,
                          key: tuple[str, str] | None) -> dict:
        """A job answered when done: its object plus the MP4 (`b64_json`, the default) or its `url`."""
        job = self.videos.get(await self._video_start(body, params, request, key))
        mp4 = await job.task  # a disconnect cancels the task, and so the request
        if job.exc is not None:
            raise job.exc
        out = self._video_object(job)
        if body.response_format != "url":  # else the object carries its `url`
            out["b64_json"] = base64.b64encode(mp4).decode()
        return out

    async def _video_job(self, job: VideoJob) -> bytes | None:
        """Run a job to its end: the MP4 and its thumbnail stored, or the failure recorded. Returns
        the MP4 (None if it failed; a cancelled task raises)."""
        try:
            result = await self.generate(job.params, job.id, track=job.track)
            frames = result.tensors["frames"]
            mp4 = await asyncio.to_thread(mp4_bytes, frames, fps_for(job.model))
            thumb = png_bytes(frames[0])
            metas = await asyncio.to_thread(lambda: (self.files.put(mp4, "video/mp4", f"{job.id}.mp4", "video"),
                                                     self.files.put(thumb, "image/png", f"{job.id}.png", "thumbnail")))
            job.files = {"video": metas[0]["id"], "thumbnail": metas[1]["id"]}
            job.expires_at = metas[0]["expires_at"]
            job.status, job.completed_at = "completed", int(time.time())
            return mp4
        except asyncio.CancelledError:
            job.status, job.error = "failed", {"code": "cancelled", "message": f"video job {job.id!r} was cancelled"}
            raise
        except Exception as e:  # the job records the failure; the poller sees it
            job.progress = estimate_progress(job, self.stage_times)
            job.status, job.exc = "failed", e
            job.error = {"code": "cancelled" if isinstance(e, RequestCancelled) else type(e).__name__,
                         "message": str(e), "type": type(e).__name__}
            return None
        finally:
            self.admission.release(job.id)  # generate releases it too; not if cancelled before it ran

    def _video_object(self, job: VideoJob) -> dict:
        return job.to_object(estimate_progress(job, self.stage_times))

    @api.get("/v1/videos")
    async def list_videos(self, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc") -> dict:
        """OpenAI `videos.list`: the kept jobs by creation time, `limit` per page after the id `after`."""
        jobs, more = self._checked(self.videos.page, after, limit, order)
        data = [self._video_object(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @api.get("/v1/videos/{video_id}")
    async def video_job(self, video_id: str) -> dict:
        """OpenAI `videos.retrieve`: the job's `video` object (status, progress 0-100, ...)."""
        return self._video_object(self.videos.get(video_id))

    @api.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str,
                            variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> Response:
        """OpenAI `videos.download_content`: the MP4, or `variant=thumbnail` (a PNG of the first frame)."""
        job = self.videos.get(video_id)
        if job.status != "completed":
            why = (f"failed ({(job.error or {}).get('message', '')}): it has no content" if job.status == "failed"
                   else f"{job.live_status} ({self._video_object(job)['progress']}%): its content is ready "
                   "once it is completed")
            raise ConflictError("video_id", f"video job {job.id!r} is {why}")
        if variant not in job.files:
            raise InvalidRequestError("variant", f"{variant!r} is not made here; use 'video' or 'thumbnail'")
        if job.expires_at is not None and time.time() >= job.expires_at:
            raise GoneError("video_id", f"the content of video job {job.id!r} expired at {job.expires_at} (unix time)")
        data, meta = await asyncio.to_thread(self.files.read, job.files[variant])
        ext = "mp4" if variant == "video" else "png"
        return Response(data, media_type=meta["mime_type"],
                        headers={"Content-Disposition": f'inline; filename="{job.id}.{ext}"'})

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str) -> dict:
        """Cancel a queued or running job (its stage calls are cancelled and the controller frees its
        GPUs, as `POST /v1/requests/{id}/cancel`) and forget it. A finished job: 409."""
        job = self.videos.get(video_id)
        check_deletable(job)
        self.inflight.cancel(job.id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.wait({job.task}, timeout=5.0)
        self.videos.remove(job.id)
        if job.idem:
            self.idem.forget(*job.idem)
        if job.files:  # it completed while being cancelled
            await asyncio.to_thread(lambda: [self.files.delete(f) for f in job.files.values()])
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    # -- stored files (response_format: url) --------------------------------------------------------------
    @api.get("/v1/files/{file_id}")
    async def file_meta(self, file_id: str) -> dict:
        """A stored file's metadata (`bytes`, `created_at`, `expires_at`, ...); 404 unknown, 410 expired."""
        meta = await asyncio.to_thread(self.files.meta, file_id)
        return {k: v for k, v in meta.items() if k != "expires"}

    @api.get("/v1/files/{file_id}/content")
    async def file_content(self, file_id: str) -> Response:
        """A stored image or video (the URLs `response_format: url` hands out); 404 unknown, 410 expired.
        Open without an API key: the 128-bit random id is the credential, as in a presigned URL."""
        data, meta = await asyncio.to_thread(self.files.read, file_id)
        return Response(data, media_type=meta["mime_type"],
                        headers={"Content-Disposition": f'inline; filename="{meta.get("filename", file_id)}"'})

    # -- native API ------------------------------------------------------------------------------------
    @api.post("/v1/generate")
    async def native(self, body: GenerationParams, request: Request) -> dict:
        params = self._params(**body.model_dump())
        key = self._idem_key(request)
        return await self.idem.run("/v1/generate", key, fingerprint(body.model_dump()),
                                   lambda: self._native(params, request.headers.get("x-request-id")))

    async def _native(self, params: GenerationParams, rid: str | None) -> dict:
        result = await self.generate(params, rid)
        frames = result.tensors["frames"]
        if get_spec(params.model).is_video:
            fmt, data = "mp4", await asyncio.to_thread(mp4_bytes, frames, fps_for(params.model))
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
        return {"object": "list", "data": data + adapter_cards(self.cfg)}

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
            out["ingress"] = {"admission": self.admission.snapshot(), "controller_link": self.link.snapshot(),
                              "video_jobs": len(self.videos), "idempotency": self.idem.snapshot(),
                              "files": self.files.snapshot(), "rederive": dict(self.runner.rederive_stats)}
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
        """Server-sent events: the request's progress each time its state, stage, width or diffuse
        step changes or it pauses or resumes (`step` of `steps`, `progress`, `width`, `paused`,
        `chunk`: see `request_log`), ending with its final state (`done`, `failed`, `cancelled`,
        `timed_out`)."""
        first = await self.request_progress(request_id)
        if not isinstance(first, dict):
            return first  # 404 or 503, as for GET /v1/requests/{id}
        return StreamingResponse(self._events(request_id, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, request_id: str, prog: dict) -> AsyncIterator[str]:
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s
        last = None
        while True:
            key = (prog.get("state"), prog.get("stage"), prog.get("retries"), prog.get("step"), prog.get("width"),
                   prog.get("paused"))
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
