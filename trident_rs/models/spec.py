"""Every model by name: the specs of all families (`trident_rs.models.families`).

Pure Python, no torch: the policy layer and the simulator import it. A `ModelSpec` says what the
policy layer and the validators need to know about a model (sizes, frames, widths, defaults).
"""
from __future__ import annotations

from trident_rs.errors import UnknownModelError
from trident_rs.models.families import FAMILIES
from trident_rs.models.family import ModelSpec

REGISTRY: dict[str, ModelSpec] = {s.name: s for f in FAMILIES.values() for s in f.specs}

__all__ = ["REGISTRY", "ModelSpec", "get_spec", "model_names"]


def model_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name), model_names()) from None
