"""Load diffusers pipelines — whole, or only the components one stage needs.

Real models load from a hub id or a local directory through the real diffusers pipeline
classes; tiny ones are built offline once (`trident_rs.models.tiny`) and then loaded from their
cache directory through the very same `from_pretrained` path.

A stage pipeline holds only its stage's modules (the rest are None), so an encode replica does
not hold the transformer. Pipelines derive some attributes from the VAE in `__init__` and fall
back to defaults silently when `vae=None` (e.g. `vae_scale_factor = 8`); `_restore_vae_derived`
sets them from the VAE's config instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trident_rs.errors import ConfigError
from trident_rs.models.spec import ModelSpec, get_spec
from trident_rs.vocab import Stage

PIPELINE_CLASSES = {
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "cogvideox": "CogVideoXPipeline",
    "hunyuanvideo": "HunyuanVideoPipeline",
}

# The modules each stage needs, per family; every other module is loaded as None.
STAGE_COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd3": {
        "encode": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
        "diffuse": ("transformer", "scheduler"),
        "decode": ("vae",),
    },
    "flux": {
        "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        "diffuse": ("transformer", "scheduler"),
        "decode": ("vae",),
    },
    "cogvideox": {
        "encode": ("text_encoder", "tokenizer"),
        "diffuse": ("transformer", "scheduler"),
        "decode": ("vae",),
    },
    "hunyuanvideo": {
        "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        "diffuse": ("transformer", "scheduler"),
        "decode": ("vae",),
    },
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, spec: ModelSpec, device: str) -> torch.dtype:
    """float32 for tiny models and on CPU; bfloat16 for real models on GPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if (not spec.source or device == "cpu") else torch.bfloat16
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def model_source(spec: ModelSpec, source: str | os.PathLike | None = None) -> str:
    """Where to load `spec` from: an explicit source, `$TRIDENT_MODEL_<NAME>`, the spec's hub id,
    or (tiny models) the offline-built cache directory."""
    if source:
        return str(source)
    env = os.environ.get("TRIDENT_MODEL_" + spec.name.upper().replace("-", "_"))
    if env:
        return env
    if spec.source:
        return spec.source
    from trident_rs.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model(spec.name))


def _dtype_keyword() -> str:
    """diffusers >= 0.36 takes `dtype=` and deprecates `torch_dtype=`; older ones take only the latter."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[family])


def load_pipeline(
    model_name: str,
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    stage: Stage | None = None,
):
    """The diffusers pipeline of `model_name`; with `stage`, only that stage's modules are loaded."""
    spec = get_spec(model_name)
    device = device or default_device()
    path = model_source(spec, source)
    cls = pipeline_class(spec.family)
    kwargs: dict = {_dtype_keyword(): resolve_dtype(dtype, spec, device)}
    if stage is not None:
        if stage not in STAGE_COMPONENTS[spec.family]:
            raise ConfigError(f"unknown stage {stage!r}")
        keep = STAGE_COMPONENTS[spec.family][stage]
        expected, _ = cls._get_signature_keys(cls)
        kwargs.update({name: None for name in expected if name not in keep})
    if spec.family == "hunyuanvideo" and kwargs.get("tokenizer", "load") is not None:
        kwargs["tokenizer"] = _llama3_tokenizer(path)
    pipe = cls.from_pretrained(path, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "vae", None) is None:
        _restore_vae_derived(pipe, spec.family, path)
    return pipe


def _llama3_tokenizer(path: str):
    """HunyuanVideo's Llama 3 tokenizer, loaded from its tokenizer.json as it is.

    The model index names it `LlamaTokenizerFast`, and in transformers 5 that class rebuilds a
    Llama-2-style (Metaspace) tokenizer from the vocabulary, dropping tokenizer.json's byte-level
    pre-tokenizer: newlines vanish and words split into letters, with no error. The generic
    backend (what `AutoTokenizer` also picks for a byte-level file) keeps the file's pipeline."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, subfolder="tokenizer")


def _restore_vae_derived(pipe, family: str, path: str) -> None:
    """Set the attributes a pipeline's `__init__` derives from its VAE, from the VAE's config."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.video_processor import VideoProcessor

    vae_config = _load_vae_config(path)
    if family in ("sd3", "flux"):
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        pipe.vae_scale_factor = scale
        # FLUX packs 2×2 latent patches, so its image processor works at twice the VAE scale.
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=scale * (2 if family == "flux" else 1))
        if family == "flux":
            pipe.latent_channels = vae_config["latent_channels"]
    elif family == "cogvideox":
        pipe.vae_scale_factor_spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
        pipe.vae_scale_factor_temporal = vae_config["temporal_compression_ratio"]
        pipe.vae_scaling_factor_image = vae_config["scaling_factor"]
        pipe.video_processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)
    elif family == "hunyuanvideo":
        pipe.vae_scale_factor_spatial = vae_config["spatial_compression_ratio"]
        pipe.vae_scale_factor_temporal = vae_config["temporal_compression_ratio"]
        pipe.video_processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)


def _load_vae_config(path: str) -> dict:
    """The VAE's config.json (a few hundred bytes) without loading its weights."""
    local = Path(path) / "vae" / "config.json"
    if local.is_file():
        import json

        return json.loads(local.read_text())
    from diffusers import AutoencoderKL  # any model class reads a config.json the same way

    return dict(AutoencoderKL.load_config(path, subfolder="vae"))
