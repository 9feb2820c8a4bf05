"""Video jobs as OpenAI's videos API (issue 18 part 3): the job records, their OpenAI `video`
objects, `seconds` <-> frames, progress, and the list's pages. No Serve calls here: the ingress
runs the jobs (`trident_rs.serve.ingress`).

Frame rates. A video model makes `num_frames` frames that play at its family's rate; `seconds`
asks for (frames - 1) / fps of video, snapped to the nearest frame count the model takes
(`ModelSpec.frame_rule`, `(frames - offset) % step == 0`):

| family | fps | e.g. |
|---|---|---|
| cogvideox (CogVideoX1.5) | 16 | 4 s -> 65 frames (81 = 5 s) |
| wan (Wan 2.1) | 16 | 4 s -> 65 frames (81 = 5 s) |
| hunyuanvideo | 24 | 4 s -> 97 frames (129 = 5.33 s) |

Any other video family plays at `DEFAULT_FPS`. The MP4 is written at the same rate, so it lasts
the `seconds` the job reports.

Progress (0-100) is estimated at the ingress from what it sees of the job's stages: the stages
done, and for the running one the time it has run against the cost model's prediction for its
width (the same predictions admission uses, on the served clock), counted for diffuse in whole
denoising steps. It never reaches 100 before the job completes and never goes back.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from trident_rs.errors import ConflictError, InvalidRequestError, NotFoundError
from trident_rs.models.spec import get_spec
from trident_rs.vocab import STAGES

FAMILY_FPS = {"cogvideox": 16, "wan": 16, "hunyuanvideo": 24}
DEFAULT_FPS = 16
MAX_TOMBSTONES = 1000  # deleted ids remembered, for a 404 that says so


def fps_for(model: str) -> int:
    return FAMILY_FPS.get(get_spec(model).family, DEFAULT_FPS)


def seconds_of(model: str, frames: int) -> float:
    return (frames - 1) / fps_for(model) if frames > 1 else 0.0


def fmt_seconds(s: float) -> str:
    return f"{round(s, 3):g}"


def frames_for_seconds(model: str, seconds: Any) -> int:
    """The frame count for a clip of `seconds` (a positive number, or its string as OpenAI sends
    it) on `model`; `InvalidRequestError("seconds")` when the model cannot make it."""
    spec = get_spec(model)
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        s = math.nan
    if isinstance(seconds, bool) or not math.isfinite(s) or s <= 0:
        raise InvalidRequestError("seconds", f"{seconds!r} is not a positive number of seconds")
    if not spec.is_video:
        raise InvalidRequestError("seconds", f"{model} makes images")
    fps = fps_for(model)
    step, offset = spec.frame_rule
    k = round((s * fps + 1 - offset) / step)
    shortest = fmt_seconds(seconds_of(model, offset + step))
    longest = max((offset + i * step for i in range(spec.max_frames // step + 1)
                   if offset + i * step <= spec.max_frames), default=offset)
    if k < 1:
        raise InvalidRequestError("seconds", f"{fmt_seconds(s)} s is too short for {model}: its shortest "
                                  f"clip is {shortest} s ({offset + step} frames at {fps} fps)")
    frames = offset + k * step
    if frames > spec.max_frames:
        raise InvalidRequestError("seconds", f"{fmt_seconds(s)} s needs {frames} frames at {fps} fps; {model} "
                                  f"makes at most {longest} frames ({fmt_seconds(seconds_of(model, longest))} s)")
    return frames


@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str
    params: Any  # resolved GenerationParams
    response_format: str | None = None  # "url": the completed object carries the MP4's URL
    base_url: str = ""  # where the files are served (for `url`)
    status: str = "queued"  # then completed or failed (set by the ingress); in_progress is `live_status`
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    files: dict[str, str] = field(default_factory=dict)  # variant -> stored file id
    track: dict = field(default_factory=lambda: {"done": []})  # stage, t, width; stages done (ingress)
    progress: int = 0  # last reported (monotone)
    idem: tuple[str, str] | None = None  # (scope, key) it was created under
    task: Any = None  # the asyncio task running it
    exc: BaseException | None = None  # why it failed (re-raised to a `wait: true` caller)

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @property
    def live_status(self) -> str:
        """OpenAI's status: queued until its first stage is granted, then in_progress until it ends."""
        return "in_progress" if self.status == "queued" and "stage" in self.track else self.status

    @property
    def size(self) -> str:
        return f"{self.params.width}x{self.params.height}"

    def to_object(self, progress: int | None = None) -> dict[str, Any]:
        """OpenAI's `video` object, plus trident's `num_frames`, `fps`, `steps`, `stage` (and `url`)."""
        if progress is not None:
            self.progress = max(self.progress, min(100, int(progress)))
        p = self.params
        status = self.live_status
        out = {"id": self.id, "object": "video", "model": self.model, "status": status,
               "progress": 100 if self.status == "completed" else self.progress,
               "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": self.expires_at,
               "error": self.error, "prompt": self.prompt, "remixed_from_video_id": None,
               "seconds": fmt_seconds(seconds_of(self.model, p.num_frames)), "size": self.size,
               "num_frames": p.num_frames, "fps": fps_for(self.model), "steps": p.steps,
               "stage": self.track.get("stage") if status == "in_progress" else None}
        if self.status == "completed" and self.response_format == "url" and "video" in self.files:
            out["url"] = file_url(self.base_url, self.files["video"])
        return out


def file_url(base: str, file_id: str) -> str:
    return f"{base.rstrip('/')}/v1/files/{file_id}/content"


class StageTimes:
    """Predicted seconds of a stage for a request at a width (cost model, served clock), cached."""

    def __init__(self, cfg: Any):
        from trident_rs.serve.slo import clock_scale

        self.clock = clock_scale(cfg)
        self._cost: Any = "unloaded"
        self._cache: dict[tuple, float] = {}

    def __call__(self, params: Any, stage: str, width: int = 1) -> float:
        key = (params.model, params.shape, params.steps, stage, width)
        got = self._cache.get(key)
        if got is None:
            from trident_rs.policy.stage_estimate import default_cost_model, predict_stage_s

            if self._cost == "unloaded":
                self._cost = default_cost_model()
            if len(self._cache) > 4096:
                self._cache.clear()
            got = self._cache[key] = max(1e-6, self.clock * predict_stage_s(
                self._cost, params.model, stage, params.shape, width, 1, params.steps or 1))
        return got


def estimate_progress(job: VideoJob, stage_s: StageTimes, now: float | None = None) -> int:
    """0-99 while the job runs (see the module docstring); 100 once completed."""
    if job.status == "completed":
        return 100
    track = job.track
    if job.live_status != "in_progress":
        return job.progress
    now = time.monotonic() if now is None else now
    p = job.params
    done = dict(track["done"])  # stage -> width it ran at
    current = track.get("stage") if track.get("stage") not in done else None
    widths = {s: done.get(s, track.get("width", 1) if s == current else 1) for s in STAGES}
    times = {s: stage_s(p, s, widths[s]) for s in STAGES}
    total = sum(times.values())
    so_far = sum(times[s] for s in done)
    if current is not None:
        frac = min(1.0, max(0.0, (now - track.get("t", now)) / times[current]))
        if current == "diffuse":
            steps = max(1, p.steps or 1)
            frac = min(steps - 1, math.floor(frac * steps)) / steps  # whole steps, the last not yet
        else:
            frac = min(frac, 0.9)
        so_far += frac * times[current]
    return max(job.progress, min(99, int(100 * so_far / total)))


class VideoJobs:
    """The jobs kept for polling, oldest first: at most `max_jobs`; past that the oldest finished
    ones are dropped (running ones only when every kept job is running)."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, VideoJob] = OrderedDict()
        self.deleted: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: VideoJob) -> list[VideoJob]:
        """Keep `job`; returns the jobs dropped to make room."""
        self.jobs[job.id] = job
        dropped = []
        while len(self.jobs) > self.max_jobs:
            victim = next((j for j in self.jobs.values() if j.finished), None) or next(iter(self.jobs.values()))
            dropped.append(self.jobs.pop(victim.id))
        return dropped

    def get(self, job_id: str) -> VideoJob:
        job = self.jobs.get(job_id)
        if job is None:
            why = "it was deleted" if job_id in self.deleted else "unknown, or dropped from the kept jobs"
            raise NotFoundError("video_id", f"no video job {job_id[:80]!r} ({why})")
        return job

    def remove(self, job_id: str) -> VideoJob | None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.deleted[job_id] = None
            while len(self.deleted) > MAX_TOMBSTONES:
                self.deleted.popitem(last=False)
        return job

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """One page of the list in `order` (by creation), after the job `after`; (jobs, has_more)."""
        jobs = list(self.jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise NotFoundError("after", f"no video job {after[:80]!r} to list after (unknown, deleted "
                                    "or dropped from the kept jobs)")
            jobs = jobs[ids.index(after) + 1:]
        return jobs[:limit], len(jobs) > limit


def check_deletable(job: VideoJob) -> None:
    """Only a queued or running job can be deleted (cancelled); a finished one: 409 naming why."""
    if job.finished:
        until = f"; its content is kept until {job.expires_at} (unix time)" if job.expires_at else ""
        raise ConflictError("video_id", f"video job {job.id!r} is {job.status}: DELETE cancels a queued or "
                            f"in-progress job, there is nothing left to cancel{until}")
