"""Stage executors backed by real diffusers pipelines (`build_executor("diffusers", ...)`).

Each executor loads only its stage's modules, runs same-shape payloads in one batched call
(a batch of N gives what N single calls give: every request draws its initial noise from its
own generator), and records its wall time in `payload.meta["timings_s"][stage]`.

Diffuse runs each payload's `step_range` (steps [a, b); all steps when None); payloads with the
same shape and range share a call. `meta["diffuse_steps"]` records the range that ran.

LoRA adapters (`loras`: name -> source, `lora_slots`): encode and diffuse executors keep an
`AdapterCache` (`trident_rs.models.adapters`); only payloads with the same adapters and scales
share a call, each group runs with exactly its adapters active (none: all disabled), and the
seconds spent loading are recorded in `meta["lora_load_s"][stage]`.
"""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import Any

import torch

from trident_rs.errors import ConfigError, InvalidRequestError, UnknownAdapterError
from trident_rs.executors.base import StageExecutor, StagePayload
from trident_rs.models.adapters import AdapterCache
from trident_rs.models.chunking import check_chunk_state, check_step_range, scheduler_name
from trident_rs.models.families import get_family
from trident_rs.models.spec import get_spec
from trident_rs.models.tensors import StepCallback, gather, to_uint8
from trident_rs.request import GenerationParams
from trident_rs.vocab import STAGES, Stage


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can share one pipeline call (same shape, steps, guidance and
    adapters; edits: of one kind and strength)."""
    return (params.height, params.width, params.num_frames, params.steps, params.guidance_scale, params.edit,
            params.strength, tuple((r.name, r.scale) for r in params.lora))


class DiffusersStageExecutor(StageExecutor):
    """One stage of one model on a diffusers pipeline that holds only that stage's modules.

    Options: `source` (hub id or directory), `dtype`, `device`, `pipeline` (an already loaded
    pipeline to reuse), `on_step(step, total)` (diffuse progress hook), `keep_float` (decode
    also returns the float frames under "frames_float", before uint8 rounding), `on_preview`
    (diffuse: `sink(request_id, index, png)` for the partial images a payload asks for with
    `meta["partial_images"]` (0-3) under `meta["request_id"]`; `trident_rs.models.preview`).
    """

    def __init__(self, model: str, stage: Stage, *, source: str | None = None, dtype: Any = None,
                 device: str | None = None, pipeline: Any = None, on_step: StepCallback | None = None,
                 keep_float: bool = False, on_preview: Any = None, loras: dict[str, str] | None = None,
                 lora_slots: int = 4):
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; choose from {list(STAGES)}")
        self.model, self.stage = model, stage
        self.spec = get_spec(model)
        self.family = get_family(self.spec.family).stages
        self.on_step = on_step
        self.keep_float = keep_float
        self.on_preview = on_preview
        if pipeline is None:
            from trident_rs.models.loading import load_pipeline

            pipeline = load_pipeline(model, source=source, dtype=dtype, device=device, stage=stage)
        self.pipe = pipeline
        self.adapters = AdapterCache(pipeline, loras, lora_slots) if loras and stage != "decode" else None
        # one group at a time while adapters switch: a replica may run batches in several threads
        self._lock = threading.Lock() if self.adapters is not None else nullcontext()

    def adapter_stats(self) -> dict[str, Any] | None:
        """The adapter cache's loaded adapters, counts and load/unload seconds (None: no adapters)."""
        return None if self.adapters is None else self.adapters.snapshot()

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        resolved = [self._resolve(p) for p in batch]  # validate everything before any compute
        ranges = [self._step_range(p, params) for p, params in zip(batch, resolved)]
        groups: dict[tuple, list[int]] = {}
        for i, params in enumerate(resolved):
            groups.setdefault((*batch_key(params), ranges[i]), []).append(i)
        out: list[StagePayload | None] = [None] * len(batch)
        for (*_, step_range), indices in groups.items():
            params = [resolved[i] for i in indices]
            with self._lock:
                load_s = self.adapters.activate(params[0].lora) if self.adapters is not None else 0.0
                start = time.perf_counter()
                with torch.inference_mode():
                    tensors = self._run_group(params, [batch[i].tensors for i in indices], step_range,
                                              [batch[i].meta for i in indices])
                elapsed = time.perf_counter() - start
            for i, t in zip(indices, tensors):
                meta = dict(batch[i].meta)
                meta["timings_s"] = {**meta.get("timings_s", {}), self.stage: elapsed}
                meta["batch_sizes"] = {**meta.get("batch_sizes", {}), self.stage: len(indices)}
                meta["stage"] = self.stage
                if load_s:
                    meta["lora_load_s"] = {**meta.get("lora_load_s", {}), self.stage: load_s}
                if step_range is not None:
                    meta["diffuse_steps"] = step_range
                out[i] = StagePayload(params=resolved[i], tensors=t, meta=meta)
        return out  # type: ignore[return-value]

    def _resolve(self, payload: StagePayload) -> GenerationParams:
        if payload.params.model != self.model:
            raise InvalidRequestError("model", f"{payload.params.model!r} sent to a {self.model!r} executor")
        if payload.params.lora and self.adapters is None and self.stage != "decode":
            raise UnknownAdapterError(payload.params.lora[0].name)  # none configured on this replica
        return payload.params.resolved()

    def _step_range(self, payload: StagePayload, params: GenerationParams) -> tuple[int, int] | None:
        """Diffuse: the validated range of steps to run (a payload without one runs them all)."""
        if self.stage != "diffuse":
            return None
        a, b = check_step_range(payload.tensors, payload.step_range, params.steps)
        if a > 0:
            shape = self.family.latents_shape(self.pipe, params)
            check_chunk_state(payload.tensors, shape, scheduler_name(self.pipe))
        return a, b

    def _run_group(self, params: list[GenerationParams], inputs: list[dict],
                   step_range: tuple[int, int] | None = None, metas: list[dict] | None = None) -> list[dict]:
        if self.stage == "encode":
            out = self.family.encode(self.pipe, params)
            if params[0].edit is not None:  # (a group is all edits or none: batch_key)
                for item, image in zip(out, self.family.encode_images(self.pipe, params, inputs)):
                    item.update(image)
            return out
        if self.stage == "diffuse":
            return self.family.diffuse(self.pipe, params, inputs, on_step=self._step_hook(params, metas),
                                       step_range=step_range)
        frames = self.family.decode(self.pipe, params, gather(inputs, "latents"))
        return [{"frames": to_uint8(f), **({"frames_float": f} if self.keep_float else {})} for f in frames]

    def _step_hook(self, params: list[GenerationParams], metas: list[dict] | None) -> StepCallback | None:
        """`on_step`, or a `PreviewHook` around it when a request of the group wants partial images."""
        wanted = [(str(m.get("request_id", "")), int(m.get("partial_images") or 0)) for m in metas or []]
        if self.on_preview is None or not any(n for _, n in wanted):
            return self.on_step
        from trident_rs.models.preview import PreviewHook

        p0 = params[0]
        return PreviewHook(self.on_step, wanted, p0.denoise_steps, lambda x: self.family.preview_latents(self.pipe, p0, x),
                           self.pipe.vae_scale_factor, self.on_preview)


def make_executor(model: str, stage: Stage, **options: Any) -> DiffusersStageExecutor:
    return DiffusersStageExecutor(model, stage, **options)
