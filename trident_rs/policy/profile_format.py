"""The versioned profile format: measured or estimated stage costs on one kind of GPU.

A profile is a JSON document (`Profile`): the hardware it describes and a list of points, one
per (model, stage, height, width, frames, width_gpus, batch), each with the stage latency
(per denoising step for `diffuse`, the whole stage otherwise), its peak memory per GPU, and
whether it was `measured` or `estimated` (and from what). The profiler writes this format and
`CostModel` reads it. Pure pydantic; no torch, no ray.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trident_rs.errors import ProfileError
from trident_rs.policy.types import STAGES, Shape

FORMAT_VERSION = 1


class ProfilePoint(BaseModel):
    """The cost of one stage of one model at one shape, GPU width and batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    stage: Literal["encode", "diffuse", "decode"]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    frames: int = Field(default=1, gt=0)
    width_gpus: int = Field(default=1, gt=0)
    batch: int = Field(default=1, gt=0)
    latency_s: float = Field(gt=0, description="per step for diffuse, whole stage otherwise")
    memory_gb: float | None = Field(default=None, ge=0, description="peak memory per GPU; None = unknown")
    kind: Literal["measured", "estimated"] = "measured"
    memory_kind: Literal["measured", "estimated"] | None = Field(
        default=None, description="when memory was obtained differently from latency; None = same as kind")
    source: str = Field(default="", description="id in Profile.sources, or free text")

    @property
    def shape(self) -> Shape:
        return Shape(self.height, self.width, self.frames)

    @property
    def key(self) -> tuple[str, str, Shape, int, int]:
        """What identifies a point: (model, stage, shape, width_gpus, batch)."""
        return (self.model, self.stage, self.shape, self.width_gpus, self.batch)


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="e.g. 'NVIDIA L20' or 'cpu (2 cores)'")
    memory_gb: float = Field(gt=0, description="memory of one device (GPU, or host RAM for CPU)")


class Profile(BaseModel):
    """One profile file. `version` must equal `FORMAT_VERSION`."""

    model_config = ConfigDict(extra="forbid")

    version: int = FORMAT_VERSION
    hardware: Hardware
    description: str = ""
    sources: dict[str, str] = Field(default_factory=dict, description="source id -> attribution")
    points: list[ProfilePoint] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"profile format version {v} is not supported (this code reads {FORMAT_VERSION})")
        return v

    @field_validator("points")
    @classmethod
    def _unique_points(cls, points: list[ProfilePoint]) -> list[ProfilePoint]:
        seen: set[tuple] = set()
        for p in points:
            if p.key in seen:
                raise ValueError(f"duplicate point {p.model}/{p.stage} {p.shape.key} w{p.width_gpus} b{p.batch}")
            seen.add(p.key)
        return points


def parse_profile(data: object, origin: str = "<data>") -> Profile:
    """Validate a decoded JSON document; raise `ProfileError` naming the first problem."""
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: a profile must be a JSON object, got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ProfileError(f"{origin}: invalid profile at {where}: {first['msg']} ({e.error_count()} error(s))") from None


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_profile(data, str(path))


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write a profile as indented JSON (validated on the way out)."""
    Path(path).write_text(profile.model_dump_json(indent=1, exclude_none=True) + "\n")


__all__ = ["FORMAT_VERSION", "Hardware", "Profile", "ProfilePoint", "STAGES", "load_profile", "parse_profile", "save_profile"]
