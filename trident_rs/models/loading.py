"""Load diffusers pipelines — whole, or only the components one stage needs.

Real models load from a hub id or a local directory through the real diffusers pipeline
classes; tiny ones are built offline once (`trident_rs.models.tiny`) and then loaded from their
cache directory through the very same `from_pretrained` path.

A stage pipeline holds only its stage's modules (the rest are None), so an encode replica does
not hold the transformer. Pipelines derive some attributes from the VAE in `__init__` and fall
back to defaults silently when `vae=None` (e.g. `vae_scale_factor = 8`); the family's `restore_vae_derived`
sets them from the VAE's config instead. What differs per family (pipeline class, each stage's
components, those attributes, any loading override) comes from its family module.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trident_rs.errors import ConfigError
from trident_rs.models.families import get_family
from trident_rs.models.spec import ModelSpec, get_spec
from trident_rs.vocab import STAGES, Stage

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

    return getattr(diffusers, get_family(family).pipeline_class)


def load_pipeline(
    model_name: str,
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    stage: Stage | None = None,
):
    """The diffusers pipeline of `model_name`; with `stage`, only that stage's modules are loaded."""
    spec = get_spec(model_name)
    family = get_family(spec.family)
    device = device or default_device()
    path = model_source(spec, source)
    cls = pipeline_class(spec.family)
    kwargs: dict = {_dtype_keyword(): resolve_dtype(dtype, spec, device)}
    if stage is not None:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}")
        keep = family.components[stage]
        expected, _ = cls._get_signature_keys(cls)
        kwargs.update({name: None for name in expected if name not in keep})
    if family.load_overrides is not None:
        family.load_overrides(path, kwargs)
    pipe = cls.from_pretrained(path, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "vae", None) is None:  # derived attributes fall back to defaults silently
        pipe.vae_config = _load_vae_config(path)  # edit pipelines read it (`trident_rs.models.image_edit`)
        family.restore_vae_derived(pipe, pipe.vae_config)
    return pipe


def _load_vae_config(path: str) -> dict:
    """The VAE's config.json (a few hundred bytes) without loading its weights."""
    local = Path(path) / "vae" / "config.json"
    if local.is_file():
        import json

        return json.loads(local.read_text())
    from diffusers import AutoencoderKL  # any model class reads a config.json the same way

    return dict(AutoencoderKL.load_config(path, subfolder="vae"))
