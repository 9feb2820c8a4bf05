"""Per-family stage code: how SD3, FLUX, CogVideoX and HunyuanVideo split into encode, diffuse and decode
using each diffusers pipeline's own helpers."""
from __future__ import annotations

import importlib

from trident_rs.errors import ConfigError
from trident_rs.executors.families.base import FamilyStages

_MODULES = {
    "sd3": "trident_rs.executors.families.sd3",
    "flux": "trident_rs.executors.families.flux",
    "cogvideox": "trident_rs.executors.families.cogvideox",
    "hunyuanvideo": "trident_rs.executors.families.hunyuanvideo",
}


def get_family(family: str) -> FamilyStages:
    if family not in _MODULES:
        raise ConfigError(f"no diffusers stage executor for family {family!r}; have {sorted(_MODULES)}")
    return importlib.import_module(_MODULES[family]).STAGES


__all__ = ["FamilyStages", "get_family"]
