"""The user-facing generation request: one pydantic schema for HTTP, CLI and Python."""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trident_rs.models.spec import get_spec
from trident_rs.vocab import Shape

MAX_LORA_SCALE = 4.0  # a LoRA's scale must lie in [-MAX_LORA_SCALE, MAX_LORA_SCALE]


class LoraRef(BaseModel):
    """One LoRA adapter of a request: its name in the config's `loras` and its scale (weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _in_range(cls, v: float) -> float:
        if not -MAX_LORA_SCALE <= v <= MAX_LORA_SCALE:  # also refuses NaN
            raise ValueError(f"{v:g} is outside [{-MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]")
        return v


DEFAULT_STRENGTH = 0.6  # diffusers' img2img and inpaint default


class GenerationParams(BaseModel):
    """Everything one generation needs. `resolved()` fills model defaults and validates.

    Validation raises `InvalidRequestError` / `UnknownModelError` before any compute.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    prompt: str
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    slo_ms: float | None = Field(default=None, gt=0)
    # An image edit (`POST /v1/images/edits`): the input image (and, inpainting, the mask) travel
    # as tensors in the stage payload, not here. `strength` in (0, 1]: the share of the schedule
    # run from the noised image (diffusers' meaning); None: `DEFAULT_STRENGTH` for edits.
    edit: Literal["img2img", "inpaint"] | None = None
    strength: float | None = None
    lora: tuple[LoraRef, ...] = ()  # LoRA adapters, applied together (names checked by the server)

    def resolved(self) -> "GenerationParams":
        """A copy with every None replaced by the model's default, validated against its spec."""
        spec = get_spec(self.model)
        h, w = spec.default_size
        strength = self.strength if self.strength is not None or self.edit is None else DEFAULT_STRENGTH
        out = self.model_copy(
            update={
                "strength": strength,
                "height": self.height if self.height is not None else h,
                "width": self.width if self.width is not None else w,
                "num_frames": self.num_frames if self.num_frames is not None else spec.default_frames,
                "steps": self.steps if self.steps is not None else spec.default_steps,
                "guidance_scale": self.guidance_scale if self.guidance_scale is not None else spec.default_guidance,
            }
        )
        spec.validate(
            height=out.height, width=out.width, frames=out.num_frames, steps=out.steps,
            guidance=out.guidance_scale, prompt=out.prompt,
        )
        if len(out.negative_prompt) > spec.max_prompt_chars:
            from trident_rs.errors import InvalidRequestError

            raise InvalidRequestError("negative_prompt", f"longer than {spec.max_prompt_chars} characters")
        out._check_edit()
        twice = sorted({n for n in out.adapters if out.adapters.count(n) > 1})
        if twice:
            from trident_rs.errors import InvalidRequestError

            raise InvalidRequestError("lora", f"adapter(s) listed more than once: {twice}")
        return out

    def _check_edit(self) -> None:
        from trident_rs.errors import InvalidRequestError

        if self.edit is None:
            if self.strength is not None:
                raise InvalidRequestError("strength", "only image edits take a strength")
            return
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise InvalidRequestError("strength", f"{s!r} is outside 0 < strength <= 1")
        if self.denoise_steps < 1:
            raise InvalidRequestError("strength", f"{s} of {self.steps} steps runs no denoising step; "
                                                  "raise strength or steps")

    @property
    def denoise_steps(self) -> int:
        """Denoising steps the loop runs (of a resolved request): all `steps`, or for an edit the
        last ones of the schedule that `strength` keeps, counted as diffusers' `get_timesteps` does
        (`steps - int(steps - steps * strength)`: 4 steps at 0.6 run 3)."""
        steps = self.steps or 0
        if self.edit is None:
            return steps
        return steps - int(max(steps - steps * (self.strength or 0.0), 0))

    @property
    def shape(self) -> Shape:
        return Shape(self.height or 0, self.width or 0, self.num_frames or 1)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the request's LoRA adapters, in order."""
        return tuple(r.name for r in self.lora)


class RequestState(str, Enum):
    """Where a request is in its life; `GET /v1/requests/{id}` reports it.

    queued (waiting for its next stage to be launched) -> encoding -> queued -> diffusing ->
    queued -> decoding -> done; or it ends failed, cancelled or timed_out at any point.
    """

    QUEUED = "queued"
    ENCODING = "encoding"
    DIFFUSING = "diffusing"
    DECODING = "decoding"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @classmethod
    def running(cls, stage: str) -> "RequestState":
        """The state of a request whose `stage` is running."""
        return {"encode": cls.ENCODING, "diffuse": cls.DIFFUSING, "decode": cls.DECODING}[stage]

    @property
    def final(self) -> bool:
        return self in (RequestState.DONE, RequestState.FAILED, RequestState.CANCELLED, RequestState.TIMED_OUT)
