"""The request bodies of the OpenAI-compatible endpoints, and the `size` field they share.

`ImagesRequest` (`POST /v1/images/generations`, and the fields of `/v1/images/edits`) and
`VideosRequest` (`POST /v1/videos`) are OpenAI's bodies plus trident's knobs; unknown fields are
a 422 naming them.
(No `from __future__ import annotations`: FastAPI must see the body models, not strings.)
"""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trident_rs.errors import InvalidRequestError
from trident_rs.request import LoraRef


class ImagesRequest(BaseModel):
    """OpenAI `images.generate` body, plus trident's extra knobs."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WxH', e.g. '1024x1024'")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="'url': PNGs stored (config `files`) and served at GET /v1/files/{id}/content")
    quality: str | None = None  # accepted for compatibility, ignored
    style: str | None = None
    user: str | None = None
    steps: int | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = None
    negative_prompt: str = ""
    slo_ms: float | None = Field(None, gt=0)
    stream: bool = Field(False, strict=True, description="server-sent events: partial images, then the image")
    partial_images: int | None = Field(None, ge=0, le=3, strict=True,
                                       description="previews streamed before the image (0-3; stream only)")
    output_format: Literal["png"] | None = None  # OpenAI's; only PNG is made here
    background: Literal["auto", "opaque"] | None = None
    lora: tuple[LoraRef, ...] = Field((), description="LoRA adapters [{name, scale}] (config `loras`)")


class VideosRequest(BaseModel):
    """OpenAI `videos.create` body (JSON or multipart form, as the official client sends it):
    `prompt`, `model` (default: the first video model served), `seconds` (mapped to frames at the
    family's fps, `trident_rs.serve.videos`), `size` 'WxH'; plus every knob."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    size: str | None = None
    seconds: Any = Field(None, description="clip length, e.g. '4' (or give num_frames)")
    input_reference: Any = Field(None, description="not supported (text-to-video only)")
    num_frames: int | None = None
    steps: int | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = None
    negative_prompt: str = ""
    slo_ms: float | None = Field(None, gt=0)
    wait: bool = Field(False, description="answer with the MP4 instead of a job id to poll")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="'url': the completed job carries the MP4's URL; 'b64_json' (wait only, its default): "
        "the MP4 inline")
    lora: tuple[LoraRef, ...] = Field((), description="LoRA adapters [{name, scale}] (config `loras`)")


def event_quality(q: str | None) -> str:
    """The request's `quality` as OpenAI's events spell it (unknown values: 'auto')."""
    return q if q in ("low", "medium", "high", "auto") else "auto"


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None -> model defaults."""
    if size is None:
        return None, None
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise InvalidRequestError("size", f"{size!r} is not of the form 'WIDTHxHEIGHT'") from None
    return h, w
