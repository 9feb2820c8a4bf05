"""What the policy layer and the validators need to know about each model family.

Pure Python, no torch: the policy layer and the simulator import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trident_rs.errors import InvalidRequestError, UnknownModelError

@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "sd3" | "flux" | "cogvideox" | "hunyuanvideo"
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


_IMAGE_WIDTHS = {"encode": (1,), "diffuse": (1, 2, 4, 8), "decode": (1,)}
_VIDEO_WIDTHS = {"encode": (1,), "diffuse": (1, 2, 4, 8), "decode": (1, 2, 4, 8)}

_REAL = [
    ModelSpec("sd3", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "image", 16, 8, 2,
              (1024, 1024), 2048, 28, 200, 7.0, widths=_IMAGE_WIDTHS),
    ModelSpec("flux", "flux", "black-forest-labs/FLUX.1-dev", "image", 16, 8, 2,
              (1024, 1024), 4096, 28, 200, 3.5, widths=_IMAGE_WIDTHS),
    ModelSpec("cogvideox", "cogvideox", "THUDM/CogVideoX1.5-5B", "video", 16, 8, 2,
              (768, 1360), 1360, 50, 200, 6.0, default_frames=81, max_frames=161,
              frame_rule=(16, 1), temporal_compression=4, widths=_VIDEO_WIDTHS, max_height=768),
    ModelSpec("hunyuanvideo", "hunyuanvideo", "hunyuanvideo-community/HunyuanVideo", "video", 16, 8, 2,
              (720, 1280), 1280, 50, 200, 6.0, default_frames=129, max_frames=129,
              frame_rule=(4, 1), temporal_compression=4, widths=_VIDEO_WIDTHS),
]

# Tiny random-weight variants built offline (trident_rs.models.tiny). Their cost profile is the
# one the profiler measures on this machine; `profile_model` names the real family whose GPU
# table stands in for them in emulated runs.
_TINY = [
    ModelSpec("tiny-sd3", "sd3", "", "image", 16, 8, 2, (64, 64), 1024, 4, 100, 7.0,
              widths={"encode": (1,), "diffuse": (1, 2), "decode": (1,)}, profile_model="sd3"),
    ModelSpec("tiny-flux", "flux", "", "image", 16, 8, 2, (64, 64), 1024, 4, 100, 3.5,
              widths={"encode": (1,), "diffuse": (1, 2), "decode": (1,)}, profile_model="flux"),
    ModelSpec("tiny-cogvideox", "cogvideox", "", "video", 16, 8, 2, (64, 64), 256, 4, 100, 6.0,
              default_frames=9, max_frames=49, frame_rule=(8, 1), temporal_compression=4,
              widths={"encode": (1,), "diffuse": (1,), "decode": (1,)}, profile_model="cogvideox"),
    ModelSpec("tiny-hunyuanvideo", "hunyuanvideo", "", "video", 16, 8, 2, (64, 64), 256, 4, 100, 6.0,
              default_frames=9, max_frames=33, frame_rule=(4, 1), temporal_compression=4,
              widths={"encode": (1,), "diffuse": (1,), "decode": (1,)}, profile_model="hunyuanvideo"),
]

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _REAL + _TINY}


def model_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name), model_names()) from None
