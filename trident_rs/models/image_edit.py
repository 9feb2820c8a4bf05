"""Image edits (image-to-image, inpainting) split into stages, on the family's own diffusers edit pipelines.

Which stage VAE-encodes the input image: **encode**. The encode stage is the one that turns a
request's inputs into the diffuse stage's conditioning and already runs before diffuse, so the
image latents ride the same hop as the prompt embeddings (no extra hop, no new ordering
dependency); the image VAE is small (~84M parameters) next to the text encoders (~5B), so encode
replicas grow little when they also hold it. Doing it on decode replicas would add a
decode -> diffuse dependency and a hop. Mixing the image latents with noise at `strength` stays
in the diffuse stage: it is the pipeline's own `prepare_latents`, with the scheduler and the
request's generator.

What travels (numpy, in `StagePayload.tensors`):

    ingress -> encode   image          uint8 (1, H, W, 3)  the input image, RGB
                        mask           uint8 (1, H, W)     inpainting only; 255 = repaint (diffusers' white)
    encode -> diffuse   image_latents  the VAE's sample, scaled and shifted as the pipeline does
                        rng_state      uint8               the request's generator after that sample
                        mask           (passed on)

Exactness: the one-call pipeline draws the VAE sample from the request's generator and then the
initial noise from the same generator; the encode stage draws the sample, and the diffuse stage
resumes the generator from `rng_state` (`trident_rs.models.chunking.DenoiseChunk`) before the
pipeline draws the noise. diffusers' edit pipelines take latents in place of an image where the
channel count is the VAE's latent channels (`image_processor.preprocess` and `prepare_latents`
skip the VAE then), so diffuse runs the unchanged pipeline on them. Inpainting passes the same
latents as `masked_image_latents`: they only feed transformers with extra mask channels
(SD3's 33-channel, FLUX Fill), which the families' standard transformers are not, and the
one-call pipeline draws the masked image's sample after the noise, so the output is unchanged.

Edits run all their steps in one diffuse call (no step ranges), at width 1: xfuser has no edit
pipelines, so the policy never grants an edit a wider replica (`Request.widest`) and a
sequence-parallel replica refuses one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from trident_rs.errors import ConfigError, InvalidRequestError
from trident_rs.models.chunking import RNG_IN as RNG_STATE
from trident_rs.models.tensors import gather, generators, split, stack

if TYPE_CHECKING:
    from trident_rs.request import GenerationParams

IMAGE, MASK, IMAGE_LATENTS = "image", "mask", "image_latents"


class _VaeConfigOnly:
    """The VAE as a diffuse-stage edit pipeline needs it: only its config (`prepare_latents` reads
    the latent channels, scaling and shift factors). The image was encoded on the encode stage."""

    def __init__(self, config: dict):
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)

    def encode(self, *args: Any, **kwargs: Any):
        raise ConfigError("a diffuse-stage edit pipeline got pixels: the encode stage VAE-encodes the image")


def edit_pipeline(pipe, class_name: str):
    """The diffusers pipeline `class_name` on `pipe`'s modules (made once per pipe). A stage
    pipeline without a VAE gets a config-only stand-in (`vae_config`, set by the loader)."""
    cache = vars(pipe).setdefault("_edit_pipelines", {})
    if class_name not in cache:
        import diffusers

        cls = getattr(diffusers, class_name)
        names, _ = cls._get_signature_keys(cls)
        modules = {n: getattr(pipe, n, None) for n in names}
        if modules.get("vae") is None:
            config = getattr(pipe, "vae_config", None)
            if config is None:
                raise ConfigError(f"{class_name}: the stage pipeline has neither a VAE nor its config")
            modules["vae"] = _VaeConfigOnly(config)
        edit = cls(**modules)
        edit.set_progress_bar_config(disable=True)
        cache[class_name] = edit
    return cache[class_name]


def encode_images(pipe, params: list["GenerationParams"], inputs: list[dict[str, np.ndarray]],
                  pipelines: dict[str, str]) -> list[dict[str, np.ndarray]]:
    """Encode stage: each request's image -> its image latents and generator state (mask passed on).

    `pipelines`: edit kind -> the family's diffusers class. Preprocessing is the kind's pipeline's;
    the sample is the inpaint pipeline's `_encode_vae_image` (the img2img pipelines encode the same
    way, inline in `prepare_latents`)."""
    import torch
    from PIL import Image

    encoder = edit_pipeline(pipe, pipelines["inpaint"])
    vae = encoder.vae
    if not hasattr(vae, "encode") or isinstance(vae, _VaeConfigOnly):
        raise ConfigError("the encode stage holds no VAE: edits need it (family components['encode'])")
    out = []
    for p, tensors, g in zip(params, inputs, generators(params)):
        image = _input(tensors, IMAGE, p)
        processor = edit_pipeline(pipe, pipelines[p.edit]).image_processor
        pixels = processor.preprocess(Image.fromarray(image[0]), height=p.height, width=p.width)
        latents = encoder._encode_vae_image(pixels.to(pipe._execution_device, torch.float32).to(vae.dtype),
                                            generator=g)
        item = {IMAGE_LATENTS: split(latents)[0], RNG_STATE: g.get_state().numpy().copy()}
        if p.edit == "inpaint":
            item[MASK] = _input(tensors, MASK, p)
        out.append(item)
    return out


def call_inputs(pipe, params: list["GenerationParams"], embeddings: list[dict[str, np.ndarray]],
                pipelines: dict[str, str], dtype) -> tuple[Any, dict[str, Any]]:
    """Diffuse stage: (the pipeline to call, the extra call arguments) for a group of requests:
    `pipe` and none for generations; the edit pipeline with the image latents, `strength` (and the
    masks) for edits."""
    p0 = params[0]
    if p0.edit is None:
        return pipe, {}
    if p0.edit not in pipelines:
        raise InvalidRequestError("model", f"{p0.model} does not support image edits ({p0.edit})")
    edit = edit_pipeline(pipe, pipelines[p0.edit])
    latents = stack(gather(embeddings, IMAGE_LATENTS), pipe._execution_device, dtype)
    extra: dict[str, Any] = {"image": latents, "strength": p0.strength}
    if p0.edit == "inpaint":
        from PIL import Image

        extra["mask_image"] = [Image.fromarray(m[0]) for m in gather(embeddings, MASK)]
        extra["masked_image_latents"] = latents
    return edit, extra


def _input(tensors: dict[str, np.ndarray], key: str, p: "GenerationParams") -> np.ndarray:
    """A request's uint8 image (1, H, W, 3) or mask (1, H, W), checked."""
    value = tensors.get(key)
    want = 4 if key == IMAGE else 3
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != want or len(value) != 1:
        raise InvalidRequestError(key, f"an {p.edit} request needs {key!r} as uint8 numpy with {want} dims "
                                       f"and batch 1, got {getattr(value, 'dtype', type(value).__name__)}")
    if key == IMAGE and value.shape[-1] != 3:
        raise InvalidRequestError(key, f"must be RGB (1, H, W, 3), got {value.shape}")
    return value
