"""What a model family is: the parts every family module (`trident_rs.models.families.<name>`) fills in.

Pure Python (no torch at import): the policy layer reads the specs. A family module defines one
`FAMILY = Family(...)` holding everything about the family: its model specs (sizes, frames,
widths, defaults), the diffusers pipeline class and which components each stage loads, its
stage functions, its xfuser pipeline class, its tiny builder, and the figures its profile
estimates are derived from. The loader, the executors, the tiny-model cache and
`profiles/derive_estimates.py` read these; they keep no per-family tables of their own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from trident_rs.errors import InvalidRequestError
from trident_rs.vocab import Shape, Stage

if TYPE_CHECKING:
    import numpy as np

    from trident_rs.models.tensors import StepCallback
    from trident_rs.request import GenerationParams

IMAGE_WIDTHS = {"encode": (1,), "diffuse": (1, 2, 4, 8), "decode": (1,)}
VIDEO_WIDTHS = {"encode": (1,), "diffuse": (1, 2, 4, 8), "decode": (1, 2, 4, 8)}
TINY_WIDTHS = {"encode": (1,), "diffuse": (1,), "decode": (1,)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # the family module's name, e.g. "sd3"
    source: str  # hub id or local directory; "" for tiny models built offline
    kind: str  # "image" | "video"
    size_multiple: int  # height and width must be multiples of this (VAE scale × patch)
    vae_scale: int  # pixels per latent pixel (spatial)
    patch: int  # transformer patch size in latent pixels
    default_size: tuple[int, int]  # (height, width)
    max_size: int  # largest height or width accepted (configurable per deployment)
    default_steps: int
    max_steps: int
    default_guidance: float
    guidance_range: tuple[float, float] = (0.0, 30.0)
    default_frames: int = 1
    max_frames: int = 1
    frame_rule: tuple[int, int] = (1, 0)  # frames f valid iff (f - offset) % step == 0, as (step, offset)
    temporal_compression: int = 1  # VAE frames per latent frame (video)
    widths: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"encode": (1,), "diffuse": (1, 2, 4, 8), "decode": (1,)}
    )
    profile_model: str = ""  # key in the cost model's profiles ("" = same as family)
    max_prompt_chars: int = 2000
    max_height: int | None = None  # where height and width have different limits (else max_size)

    @property
    def is_video(self) -> bool:
        return self.kind == "video"

    def tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Transformer sequence length of the diffuse stage for this shape."""
        lat_frames = 1 if frames <= 1 else (frames - 1) // self.temporal_compression + 1
        per_frame = (height // (self.vae_scale * self.patch)) * (width // (self.vae_scale * self.patch))
        return lat_frames * per_frame

    def valid_frames(self, frames: int) -> bool:
        step, offset = self.frame_rule
        return 1 <= frames <= self.max_frames and (frames - offset) % step == 0

    def validate(
        self,
        *,
        height: int,
        width: int,
        frames: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        prompt: object = "",
    ) -> None:
        """Raise `InvalidRequestError` naming the first bad field; return None when all are fine."""
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", f"must be a string, got {type(prompt).__name__}")
        if len(prompt) > self.max_prompt_chars:
            raise InvalidRequestError("prompt", f"longer than {self.max_prompt_chars} characters")
        for name, value, limit in (("height", height, self.max_height or self.max_size), ("width", width, self.max_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRequestError(name, "must be an integer")
            if value <= 0 or value % self.size_multiple:
                raise InvalidRequestError(name, f"{value} is not a positive multiple of {self.size_multiple}")
            if value > limit:
                raise InvalidRequestError(name, f"{value} exceeds the maximum {limit}")
        if not isinstance(frames, int) or isinstance(frames, bool):
            raise InvalidRequestError("num_frames", "must be an integer")
        if not self.is_video and frames != 1:
            raise InvalidRequestError("num_frames", f"{self.name} makes images; num_frames must be 1")
        if self.is_video and not self.valid_frames(frames):
            step, offset = self.frame_rule
            raise InvalidRequestError(
                "num_frames",
                f"{frames} is not valid for {self.name}: need (frames - {offset}) % {step} == 0 "
                f"and 1 <= frames <= {self.max_frames}",
            )
        if steps is not None:
            if not isinstance(steps, int) or isinstance(steps, bool):
                raise InvalidRequestError("steps", "must be an integer")
            if not 1 <= steps <= self.max_steps:
                raise InvalidRequestError("steps", f"{steps} is outside 1..{self.max_steps}")
        if guidance is not None:
            lo, hi = self.guidance_range
            if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not lo <= guidance <= hi:
                raise InvalidRequestError("guidance_scale", f"{guidance!r} is outside {lo}..{hi}")



@dataclass(frozen=True)
class ModelFacts:
    """Public architecture figures the profile estimates are derived from
    (`trident_rs/profiles/derive_estimates.py` holds the rules)."""

    encoder_params: float  # all text encoders together
    prompt_tokens: int  # tokens each encoder pass sees (longest encoder)
    cfg: bool  # two sequences (positive + negative) per request
    dit_params: float
    hidden: int
    vae_3d: bool
    # Only for families without a measured diffuse table: the transformer's depth (for the
    # attention FLOPs of the diffuse estimate) and the shapes to tabulate.
    dit_layers: int = 0
    estimate_shapes: tuple[Shape, ...] = ()


@dataclass(frozen=True)
class XfuserPipeline:
    """xfuser's (xDiT) wrapper class for the family's diffusers pipeline, and whether the family
    batches CFG (so CFG parallel fits)."""

    class_name: str
    batches_cfg: bool


class FamilyStages(ABC):
    """Stage functions of one family. All requests of one call share shape, steps and guidance;
    each returns one item per request, in order."""

    # Image edits: edit kind ("img2img", "inpaint") -> the family's diffusers pipeline class for it
    # (`trident_rs.models.image_edit`); empty: the family makes no edits.
    edit_pipelines: ClassVar[dict[str, str]] = {}

    def encode_images(self, pipe, params: list["GenerationParams"], inputs: list[dict[str, np.ndarray]]
                      ) -> list[dict[str, np.ndarray]]:
        """Encode stage of image edits (all `params` edits): each request's input image (and mask)
        -> its image latents and generator state, merged into its encode output."""
        if not self.edit_pipelines:
            raise InvalidRequestError("model", f"{params[0].model} does not support image edits")
        from trident_rs.models.image_edit import encode_images

        return encode_images(pipe, params, inputs, self.edit_pipelines)

    @abstractmethod
    def encode(self, pipe, params: list["GenerationParams"]) -> list[dict[str, np.ndarray]]:
        """Prompts -> prompt embeddings (per request, batch dim 1)."""

    @abstractmethod
    def diffuse(self, pipe, params: list["GenerationParams"], embeddings: list[dict[str, np.ndarray]],
                on_step: StepCallback | None = None, step_range: tuple[int, int] | None = None
                ) -> list[dict[str, np.ndarray]]:
        """Embeddings + per-request seeds -> `{"latents": final latents}` per request, in the
        pipeline's own layout. With `step_range=(a, b)` only steps [a, b) run
        (`trident_rs.models.chunking`): from the chunk state in `embeddings` when a > 0, and
        returning the embeddings and the chunk state at b when b < steps."""

    @abstractmethod
    def latents_shape(self, pipe, params: "GenerationParams") -> tuple[int, ...]:
        """One request's latents shape (batch dim 1) in the pipeline's layout, as diffuse returns them."""

    @abstractmethod
    def decode(self, pipe, params: list["GenerationParams"], latents: list[np.ndarray]) -> list[np.ndarray]:
        """Latents -> float frames in [0, 1], shape (F, H, W, 3) per request."""

    def preview_latents(self, pipe, params: "GenerationParams", latents):
        """The loop's latents (a torch tensor, the batch first) as (B, C, h, w) for a preview
        (`trident_rs.models.preview`); the pipeline's layout is already that for most families."""
        return latents


@dataclass(frozen=True)
class Family:
    """Everything about one model family. See the module docstring."""

    name: str
    specs: tuple[ModelSpec, ...]  # real models and their tiny variant(s)
    pipeline_class: str  # diffusers class name
    components: dict[Stage, tuple[str, ...]]  # modules each stage loads; every other one is None
    stages: FamilyStages
    build_tiny: Callable[[], Any]  # the tiny random-weight pipeline, in memory (seeded)
    facts: ModelFacts
    restore_vae_derived: Callable[[Any, dict], None]  # (pipe, VAE config): what __init__ derives from the VAE
    xfuser: XfuserPipeline | None = None  # None: no sequence-parallel diffuse (width 1 only)
    load_overrides: Callable[[str, dict], None] | None = None  # (path, from_pretrained kwargs) -> None
    tiny_index_classes: dict[str, list[str]] = field(default_factory=dict)  # model_index.json entries to set
