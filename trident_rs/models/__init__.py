"""Model registry: what each model family is and the rules its requests must follow.

`spec` is pure Python (the policy layer reads it); loading pipelines (torch, diffusers) lives in
`trident_rs.models.loading` and `trident_rs.models.tiny`, imported only where needed.
"""
from trident_rs.models.spec import REGISTRY, ModelSpec, get_spec, model_names

__all__ = ["REGISTRY", "ModelSpec", "get_spec", "model_names"]
